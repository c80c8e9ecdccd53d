"""What the hub's core is told (events) and what it asks for (instructions).

``HubCore.handle(*events, now=...)`` is the only way hub state changes; it
returns instructions that the server carries out (dask's
``worker_state_machine`` shape).  Both are plain data, so a test builds
events, calls ``handle`` and compares the instructions it gets with the
ones it expects: no socket, no clock.

Peers are named by an ``int`` the server gives each connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union, Optional

from .auth import Principal


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class Connected:
    """A peer finished its hello; ``version`` is the protocol version agreed."""

    peer: int
    who: Principal
    version: int
    address: Optional[str] = None  # the peer's IP as the server saw it (None: a local pseudo-peer)


@dataclass(frozen=True)
class Disconnected:
    peer: int


@dataclass(frozen=True)
class Received:
    """A decoded message from a peer (a request or a daemon's report)."""

    peer: int
    msg: Any


@dataclass(frozen=True)
class BlobStored:
    """A peer's upload arrived whole and matched its sha256."""

    peer: int
    rid: int
    sha256: str


@dataclass(frozen=True)
class Tick:
    """Time passed: heartbeats, waits and grace periods may have expired."""


@dataclass(frozen=True)
class TokensRevoked:
    token_ids: frozenset[str]


@dataclass(frozen=True)
class CancelContinued:
    """The rest of a large cancellation, handled in a later batch."""

    peer: int
    rid: int
    remaining: tuple[str, ...]
    by_state: tuple[tuple[str, int], ...] = ()
    done: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResultsRefused:
    """A daemon's ``task_done`` / ``tasks_done`` failed validation (``problem``
    names the field); ``results``: the (task id, attempt) pairs it was about."""

    peer: int
    rid: Optional[int]
    results: tuple[tuple[str, int], ...]
    problem: str


@dataclass(frozen=True)
class BlobsScanned:
    """A garbage collection's snapshot scan ended: ``candidates`` looked
    unreferenced (blobgc.py); the core re-checks and deletes them.
    ``peer`` None: the hub's own scheduled run (no reply)."""

    peer: Optional[int]
    rid: int
    dry_run: bool
    grace: float
    candidates: tuple[str, ...]
    listing: Any  # blobgc.Listing of the scan


Event = Union[Connected, Disconnected, Received, BlobStored, Tick, TokensRevoked, CancelContinued, BlobsScanned,
              ResultsRefused]


# ------------------------------------------------------------ instructions


@dataclass(frozen=True)
class Send:
    """Send ``msg`` to a peer (a reply, an assignment, a live event)."""

    peer: int
    msg: Any


@dataclass(frozen=True)
class Close:
    """Disconnect a peer, telling it why."""

    peer: int
    code: int
    reason: str


@dataclass(frozen=True)
class StreamBlob:
    """Send a stored blob's bytes to a peer as the reply to request ``rid``."""

    peer: int
    rid: int
    sha256: str


@dataclass(frozen=True)
class Later:
    """Handle this event in a following batch (after pending I/O)."""

    event: Any = field(default=None)


@dataclass(frozen=True)
class ScanBlobs:
    """Start a blob garbage collection (an admin's ``blob_gc``); answer ``rid``."""

    peer: int
    rid: int
    dry_run: bool


Instruction = Union[Send, Close, StreamBlob, Later, ScanBlobs]

"""CreditPiggy's Python API (seed 002) over HWF's hub: ``cpapi_setup``,
``cpapi_alloc``, ``cpapi_discard``, ``cpapi_claim``, ``cpapi_counters``,
``cpapi_meta``.

Plain blocking functions, as the original library's: each is one request on
a connection opened by ``cpapi_setup`` (the client's I/O runs on HWF's
background event-loop thread, so they are safe from a notebook cell too).
The endpoint may be a unix socket path (a hub started with ``--unix PATH``),
``host:port`` or a ``ws://`` / ``wss://`` URL.  Credentials are an HWF token
(or CreditPiggy's ``(project_id, project_auth)`` pair, whose second item is
the token); without them ``HWF_TOKEN`` is used.  A refused request raises
:class:`CreditError` naming the slot and the problem; success returns True.

Who may do what comes from the token.  A client token is the job manager of
its user's own slots: it allocates, claims, discards and sets counters and
meta on them.  Slot names are per user (two users' "job-17" are two slots;
another user's names answer as unknown).  An admin token addresses a user's
slot as ``"USER/NAME"``.  A daemon token may do none of this (a machine earns
credits only from the tasks the hub assigned it), and a task's slot (named
by its task id) is the hub's alone: it is settled from the task's result.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional, Union

from hub_server import protocol as p
from hub_server.link import RemoteError

from .hub import Hub

Credentials = Union[str, tuple[Any, str], None]

_lock = threading.Lock()
_hub: Optional[Hub] = None


class CreditError(RemoteError):
    """The hub refused a credit request; ``code`` says why (e.g. ``unknown_slot``)."""


class NotSetUp(RuntimeError):
    """A cpapi_* call before cpapi_setup()."""


def endpoint_url(server_endpoint: str) -> str:
    """CreditPiggy's three endpoint kinds as a hub URL."""
    e = server_endpoint.strip()
    if not e:
        raise ValueError("cpapi_setup: empty server endpoint")
    if "://" in e:
        scheme = e.split("://", 1)[0]
        if scheme not in ("ws", "wss", "unix"):
            raise ValueError(f"cpapi_setup: {e!r}: use a ws:// or wss:// URL (HWF hubs speak websockets), "
                             "a unix socket path or host:port")
        return e
    if e.startswith("unix:"):
        return e
    if e.startswith("/") or e.startswith("."):
        return "unix:" + os.path.abspath(e)
    if ":" not in e:
        raise ValueError(f"cpapi_setup: {e!r} is neither a unix socket path, host:port nor a URL")
    return "ws://" + e


def _token(credentials: Credentials) -> Optional[str]:
    if credentials is None:
        return os.environ.get("HWF_TOKEN")
    if isinstance(credentials, (tuple, list)):
        if len(credentials) != 2:
            raise ValueError("credentials: an HWF token, or a (project_id, project_auth) pair")
        return str(credentials[1])
    return str(credentials)


def cpapi_setup(server_endpoint: str, credentials: Credentials = None) -> None:
    """Say where the hub is (and with which token); replaces an earlier setup."""
    global _hub
    hub = Hub(endpoint_url(server_endpoint), token=_token(credentials))
    with _lock:
        old, _hub = _hub, hub
    if old is not None:
        old.close_sync()


def _call(slot_id: str, make: Any) -> Any:
    with _lock:
        hub = _hub
    if hub is None:
        raise NotSetUp("call cpapi_setup(server_endpoint, credentials) first")
    try:
        return hub._request_sync(make)
    except RemoteError as exc:
        raise CreditError(exc.code, f"slot {slot_id!r}: {exc}") from None


def cpapi_alloc(slot_id: str, min: Optional[int] = None, max: Optional[int] = None,
                credits: Optional[int] = None, expire: Optional[float] = None) -> bool:
    """Allocate ``slot_id`` giving ``credits``, or between ``min`` and ``max``
    (decided at claim).  ``expire``: minutes until an unclaimed slot expires (24 h)."""
    seconds = None if expire is None else float(expire) * 60.0
    _call(slot_id, lambda rid: p.CreditAlloc(id=rid, slot=str(slot_id), credits=credits, min=min, max=max,
                                              expire=seconds))
    return True


def cpapi_discard(slot_id: str, reason: Optional[str] = None) -> bool:
    """Discard ``slot_id``, e.g. with reason 'expired', 'invalid' or 'lost'."""
    _call(slot_id, lambda rid: p.CreditDiscard(id=rid, slot=str(slot_id), reason=reason))
    return True


def cpapi_claim(slot_id: str, machine_id: str, credits: Optional[int] = None) -> bool:
    """Claim your own ``slot_id`` for ``machine_id`` (any string); ``credits``
    count only where the slot was allocated with a range (clamped into it).
    A task's slot cannot be claimed: the hub settles it from the task's result."""
    _call(slot_id, lambda rid: p.CreditClaim(id=rid, slot=str(slot_id), machine=str(machine_id), credits=credits))
    return True


def cpapi_counters(slot_id: str, **kwargs: Union[int, float]) -> bool:
    """Named counters, summed into the machine's, owner's and user's totals on claim."""
    _call(slot_id, lambda rid: p.CreditCounters(id=rid, slot=str(slot_id), counters=kwargs))
    return True


def cpapi_meta(slot_id: str, **kwargs: Any) -> bool:
    """Named metadata, kept on the slot only."""
    meta = {k: str(v) for k, v in kwargs.items()}
    _call(slot_id, lambda rid: p.CreditMeta(id=rid, slot=str(slot_id), meta=meta))
    return True


__all__ = ["cpapi_setup", "cpapi_alloc", "cpapi_discard", "cpapi_claim", "cpapi_counters", "cpapi_meta",
           "CreditError", "NotSetUp", "endpoint_url"]

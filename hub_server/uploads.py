"""Who holds the hub's upload slots, and for how long (sans-I/O).

An upload is announced (``blob_put``) before its bytes come, and holds a
slot until it ends.  Announcing costs the announcer nothing, so slots are
shared out explicitly (issue 18, row 4: one user's 256 silent announcements
used to refuse every other user's upload and lose a finished task's artifact):

* per connection (``--max-uploads-per-connection``) and per user
  (``--max-uploads-per-user``; a daemon token's owner counts as one user);
* clients and admins share ``--max-uploads`` slots; daemons have a pool of
  their own (``--max-daemon-uploads``), so a flood of client announcements
  never refuses the artifact upload of a finished task;
* an upload that receives no bytes for ``--upload-idle-timeout`` seconds is
  dropped and its slot freed (``expired``).

The gate only counts; the server opens files and sends the refusals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import protocol as p

Refusal = tuple[str, str]  # (error code, message naming the limit and its flag)


@dataclass
class _Open:
    owner: str  # the user (or daemon owner) it counts against
    daemon: bool
    size: int
    last: float  # when it was announced or last received bytes


class UploadGate:
    def __init__(self, limits: p.Limits, idle_timeout: float) -> None:
        self.limits = limits
        self.idle_timeout = idle_timeout
        self._open: dict[tuple[int, int], _Open] = {}
        self._per_peer: dict[int, int] = {}
        self._per_owner: dict[str, int] = {}
        self._pool = {False: 0, True: 0}  # daemon? -> uploads open
        self._bytes_per_owner: dict[str, int] = {}

    def admit(self, peer: int, tid: int, owner: str, daemon: bool, size: int, now: float) -> Optional[Refusal]:
        """Take a slot for upload ``tid`` of ``peer``, or say which limit refuses it."""
        lim = self.limits
        on_peer = self._per_peer.get(peer, 0)
        mine = self._per_owner.get(owner, 0)
        if on_peer >= lim.max_uploads_per_connection:
            return ("limit", f"{on_peer} uploads already open on this connection "
                             f"(max_uploads_per_connection={lim.max_uploads_per_connection}, "
                             "flag --max-uploads-per-connection)")
        if mine >= lim.max_uploads_per_user:
            return ("limit", f"{owner.split(':', 1)[1]!r} has {mine} uploads open "
                             f"(max_uploads_per_user={lim.max_uploads_per_user}, flag --max-uploads-per-user); "
                             "finish or cancel one first")
        pool, cap, flag = ((self._pool[True], lim.max_daemon_uploads, "max_daemon_uploads") if daemon
                           else (self._pool[False], lim.max_uploads, "max_uploads"))
        if pool >= cap:
            who = "daemons" if daemon else "clients"
            return ("busy", f"the hub has {pool} uploads of {who} open ({flag}={cap}, flag "
                            f"--{flag.replace('_', '-')}); try again shortly")
        self._open[(peer, tid)] = _Open(owner, daemon, size, now)
        self._per_peer[peer] = on_peer + 1
        self._per_owner[owner] = mine + 1
        self._pool[daemon] += 1
        self._bytes_per_owner[owner] = self._bytes_per_owner.get(owner, 0) + size
        return None

    def is_open(self, peer: int, tid: int) -> bool:
        return (peer, tid) in self._open

    def received(self, peer: int, tid: int, now: float) -> None:
        """Bytes arrived: the upload is alive."""
        up = self._open.get((peer, tid))
        if up is not None:
            up.last = now

    def release(self, peer: int, tid: int) -> None:
        """The upload ended (stored, failed or expired): free its slot."""
        up = self._open.pop((peer, tid), None)
        if up is None:
            return
        _decrement(self._per_peer, peer, 1)
        _decrement(self._per_owner, up.owner, 1)
        _decrement(self._bytes_per_owner, up.owner, up.size)
        self._pool[up.daemon] -= 1

    def release_peer(self, peer: int) -> None:
        """The connection ended: every upload it held ends with it."""
        for key in [k for k in self._open if k[0] == peer]:
            self.release(*key)

    def expired(self, now: float) -> list[tuple[int, int]]:
        """(peer, tid) of uploads silent for longer than the idle timeout, released."""
        cutoff = now - self.idle_timeout
        stale = [key for key, up in self._open.items() if up.last < cutoff]
        for key in stale:
            self.release(*key)
        return stale

    def expiry_message(self) -> str:
        return (f"upload dropped: no bytes arrived for {self.idle_timeout:g}s "
                "(flag --upload-idle-timeout); announce it again when the data is ready")

    def open_bytes(self, owner: str) -> int:
        """Bytes announced by ``owner``'s open uploads (booked against its blob quota)."""
        return self._bytes_per_owner.get(owner, 0)

    def count(self, daemon: bool) -> int:
        return self._pool[daemon]


def _decrement(counts: dict, key: object, by: int) -> None:
    left = counts.get(key, 0) - by
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)

"""Bounded connections for the hub's listeners (HTTP API and websocket).

Before a connection reaches aiohttp or websockets it is counted: past a cap
per address or in total it is answered at once (429/503 naming the flag) and
closed, so 10,000 idle sockets from one attacker cannot eat the hub's file
descriptors.  An HTTP connection must also send a whole request head within
``header_timeout`` seconds of opening (aiohttp has no separate header-read
timeout: its keep-alive timer is armed at connect, but with the idle timeout's
length).  Refusals are logged through one ``RateLimitedLog`` line per cause.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Optional

from websockets.asyncio.server import ServerConnection

from .ratelog import RateLimitedLog


class ConnectionCaps:
    """Open connections per address and in total; sans-I/O."""

    def __init__(self, total: int, per_address: int, total_flag: str, per_address_flag: str) -> None:
        self.total, self.per_address = total, per_address
        self.total_flag, self.per_address_flag = total_flag, per_address_flag
        self.open: dict[str, int] = {}
        self.count = 0

    def admit(self, address: str) -> Optional[tuple[int, str]]:
        """Count a new connection from ``address``; or (status, why) naming the flag."""
        if self.count >= self.total:
            return 503, (f"the hub has {self.count} connections open on this port "
                         f"({self.total_flag}={self.total}); try again shortly")
        held = self.open.get(address, 0)
        if held >= self.per_address:
            return 429, (f"{held} connections are open from {address} "
                         f"({self.per_address_flag}={self.per_address})")
        self.open[address] = held + 1
        self.count += 1
        return None

    def release(self, address: str) -> None:
        held = self.open.get(address, 0) - 1
        if held <= 0:
            self.open.pop(address, None)
        else:
            self.open[address] = held
        self.count -= 1


def refusal(status: int, why: str) -> bytes:
    """A whole HTTP response that needs no request read first: the error, then close."""
    body = json.dumps({"error": "too_many_connections", "message": why}).encode()
    reason = {429: "Too Many Requests", 503: "Service Unavailable"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unix"


# A refused websocket connection is answered when its request arrives: answered
# at once, a client still sending its handshake may read the close first and see
# "connection closed", not the reason naming the flag.  It waits at most
# REFUSED_LINGER seconds, and never more than REFUSED_LINGER_MAX refused
# connections wait at once (beyond that, a flood's refusals are answered and
# closed at once).
REFUSED_LINGER = 1.0
REFUSED_LINGER_MAX = 64


class Refused:
    """A refused connection's answer, written on its first bytes (or timer)."""

    waiting = 0  # refused connections waiting for their request, hub-wide

    def __init__(self, transport: asyncio.BaseTransport, problem: tuple[int, str], log: RateLimitedLog,
                 what: str, linger: bool = True) -> None:
        status, why = problem
        log(f"{what}-refused-{status}", f"{what} connection from {_address(transport)} refused: {why}")
        self.transport, self.response = transport, refusal(status, why)
        self._timer: Optional[asyncio.TimerHandle] = None
        if not linger or Refused.waiting >= REFUSED_LINGER_MAX:
            self.answer()
            return
        Refused.waiting += 1
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER, self.answer)

    def answer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            Refused.waiting -= 1
        if not self.transport.is_closing():
            self.transport.write(self.response)  # type: ignore[attr-defined]
            self.transport.close()


class GuardedHttp(asyncio.Protocol):
    """Wraps one aiohttp request handler: counts it, refuses it over a cap, and
    closes it if no whole request head arrives within ``header_timeout``."""

    def __init__(self, inner: asyncio.Protocol, caps: ConnectionCaps, log: RateLimitedLog,
                 header_timeout: float) -> None:
        self.inner, self.caps, self.log, self.header_timeout = inner, caps, log, header_timeout
        self.address: Optional[str] = None
        self.transport: Optional[asyncio.BaseTransport] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._tail = b""
        self._refused: Optional[Refused] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        problem = self.caps.admit(_address(transport))
        if problem is not None:
            # Answered at once: a flood of refused HTTP connections held fds
            # longer when they waited (the HTTP clients here read the answer).
            self._refused = Refused(transport, problem, self.log, "HTTP", linger=False)
            return
        self.address, self.transport = _address(transport), transport
        self._timer = asyncio.get_running_loop().call_later(self.header_timeout, self._too_slow)
        self.inner.connection_made(transport)

    def _too_slow(self) -> None:
        self._timer = None
        self.log("http-header-timeout", f"HTTP connection from {self.address} closed: no whole request head "
                                        f"within {self.header_timeout:g} s (--http-header-timeout)",
                 level=20)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.address is None:
            if self._refused is not None:
                self._refused.answer()
            return
        if self._timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._timer.cancel()
                self._timer = None
            self._tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> Optional[bool]:
        return self.inner.eof_received() if self.address is not None else None

    def pause_writing(self) -> None:
        if self.address is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.address is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.address is None:
            if self._refused is not None:
                self._refused.answer()
            return
        if self._timer is not None:
            self._timer.cancel()
        self.caps.release(self.address)
        self.address = None
        self.inner.connection_lost(exc)


def guarded_http(factory: Callable[[], asyncio.Protocol], caps: ConnectionCaps, log: RateLimitedLog,
                 header_timeout: float) -> Callable[[], asyncio.Protocol]:
    """A protocol factory for ``loop.create_server``: aiohttp's, guarded."""
    return lambda: GuardedHttp(factory(), caps, log, header_timeout)


class CountedConnection(ServerConnection):
    """A websocket connection counted from the moment it is accepted (before its
    handshake); over a cap it is answered 429/503 (see ``Refused``) and closed."""

    hwf_caps: ConnectionCaps
    hwf_log: RateLimitedLog
    _hwf_address: Optional[str] = None
    _hwf_refused: Optional[Refused] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        problem = self.hwf_caps.admit(_address(transport))
        if problem is not None:
            self._hwf_refused = Refused(transport, problem, self.hwf_log, "websocket")
            return
        self._hwf_address = _address(transport)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._hwf_address is not None:
            super().data_received(data)
        elif self._hwf_refused is not None:
            self._hwf_refused.answer()

    def eof_received(self) -> Optional[bool]:
        return super().eof_received() if self._hwf_address is not None else None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._hwf_address is None:
            if self._hwf_refused is not None:
                self._hwf_refused.answer()
            return
        self.hwf_caps.release(self._hwf_address)
        self._hwf_address = None
        super().connection_lost(exc)


def counted_connection(caps: ConnectionCaps, log: RateLimitedLog) -> Any:
    """A ``ServerConnection`` class for ``serve(create_connection=...)`` bound to ``caps``."""
    return type("HubConnection", (CountedConnection,), {"hwf_caps": caps, "hwf_log": log})


FD_RESERVE = 256  # descriptors kept for the store, blobs, logs and daemons' uploads


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as servers do at start);
    the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 2**20


def fit_caps(fd_limit: int, wanted: dict[str, int]) -> dict[str, int]:
    """Connection caps (flag -> value) lowered, in proportion, to fit under
    ``fd_limit`` minus a reserve, so that accept() never fails for lack of fds."""
    room = max(16, fd_limit - FD_RESERVE)
    total = sum(wanted.values())
    if total <= room:
        return dict(wanted)
    return {flag: max(4, value * room // total) for flag, value in wanted.items()}

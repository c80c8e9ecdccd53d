"""CreditPiggy's daemon protocol served by the hub: unix, TCP and UDP listeners.

The edge for ``creditline.py``: each command (the first read of a
connection, or one datagram) is parsed into a credit request and fed to the
hub's core through one pseudo-peer, exactly as a websocket request is, so
the line protocol meets the same handlers, rules and ledger; there is no
second way into the state.  The core's answer (``ok``, ``credit_claimed``
or ``error``) becomes ``OK`` or ``ER``.

The line protocol acts as one client user, ``--creditpiggy-user`` (never
an admin): it allocates, claims, discards, counts and metas that user's own
slots only; another user's slots and every task's slot answer as unknown.
On a unix socket trust comes from the file, as with the CreditPiggy daemon:
it is created 0600 (``--creditpiggy-mode`` widens it, e.g. to a job
managers' group).  TCP and UDP ports are open to every local process (the
tasks the farm runs included), so there each line must carry the shared
secret of ``--creditpiggy-secret-file`` (``creditline.py`` says how); the
hub refuses to start a tcp/udp endpoint without one.  They bind only to
loopback addresses unless the operator passes ``--creditpiggy-allow-remote``.

Like the daemon, one command per connection: read it, answer, close.
Connections are bounded in number and in idle time; datagrams in flight
are bounded too (beyond that they are answered ``ER`` at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from . import creditline
from . import protocol as p
from .auth import Principal
from .unixsock import ListenError, UnixSocketFile, bind_unix

log = logging.getLogger("hwf.hub.creditpiggy")

DEFAULT_USER = "creditpiggy"
# Never a real token id (those are ``tok-<hex>``): revoking tokens never
# closes the line protocol's peer.
TOKEN_ID = "creditpiggy-line"
# After answering: how long and how much of a client's further input is read
# and dropped before the connection is closed.
LINGER_SECONDS = 1.0
LINGER_BYTES = 2**20


@dataclass(frozen=True)
class Endpoint:
    """Where to listen: ``unix:PATH``, ``tcp:HOST:PORT`` or ``udp:HOST:PORT``."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}:{host}:{self.port}"


def parse_endpoint(spec: str, allow_remote: bool = False) -> Endpoint:
    """``unix:/abs/path`` | ``tcp:HOST:PORT`` | ``udp:HOST:PORT`` (IPv6 as ``[::1]``).

    A TCP/UDP host that is not a loopback address is refused unless
    ``allow_remote``: whoever reaches the port can claim credits.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("unix", "tcp", "udp"):
        raise ValueError(f"creditpiggy endpoint {spec!r}: expected unix:PATH, tcp:HOST:PORT or udp:HOST:PORT")
    if kind == "unix":
        path = rest[2:] if rest.startswith("///") else rest
        if not path.startswith("/"):
            raise ValueError(f"creditpiggy endpoint {spec!r}: the unix socket path must be absolute")
        return Endpoint("unix", path=path)
    host, sep, port_text = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"creditpiggy endpoint {spec!r}: expected {kind}:HOST:PORT with a port 0-65535")
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"creditpiggy endpoint {spec!r}: {host} is not a loopback address; whoever reaches it "
                         "could claim credits (pass --creditpiggy-allow-remote to bind it anyway)")
    return Endpoint(kind, host=host, port=int(port_text))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name could resolve anywhere


class _QuietLog:
    """At most ``burst`` lines per ``window`` seconds: a flood of bad lines
    (anyone who can connect may send them) must not flood the hub's log."""

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self._start = 0.0
        self._count = 0
        self._dropped = 0

    def __call__(self, level: int, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._start > self.window:
            if self._dropped:
                log.warning("creditpiggy: %d more refusals not logged", self._dropped)
            self._start, self._count, self._dropped = now, 0, 0
        self._count += 1
        if self._count <= self.burst:
            log.log(level, text, *args)
        else:
            self._dropped += 1


class HubPort(Protocol):
    """What the line server needs of the hub server: a way in for a local peer."""

    def attach(self, peer: Any, who: Principal) -> int: ...
    def submit(self, pid: int, msg: Any) -> None: ...
    def detach(self, pid: int) -> None: ...


class _LinePeer:
    """The pseudo-peer the core answers: replies resolve the waiting commands."""

    def __init__(self, on_close: Any) -> None:
        self.waiting: dict[int, asyncio.Future] = {}
        self.closing = False
        self._on_close = on_close

    def post(self, msg: Any) -> None:
        fut = self.waiting.pop(getattr(msg, "id", None), None)  # type: ignore[arg-type]
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def close(self, code: int, reason: str) -> None:
        """The core dropped this peer: fail what waits, and come back as a new one."""
        waiting, self.waiting = self.waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_result(p.Error(id=None, code="closed", message=reason))
        self._on_close()


class CreditLineServer:
    def __init__(self, hub: HubPort, endpoints: list[Endpoint], *, user: str = DEFAULT_USER,
                 unix_mode: int = 0o600, idle_timeout: float = 10.0, max_connections: int = 256,
                 max_datagrams: int = 1024, reply_timeout: float = 60.0, secret: Optional[str] = None) -> None:
        if secret is None and any(ep.kind in ("tcp", "udp") for ep in endpoints):
            raise ValueError("a tcp: or udp: creditpiggy endpoint needs a shared secret: "
                             "pass --creditpiggy-secret-file FILE (mode 600)")
        self.hub = hub
        self.endpoints = endpoints
        self.secret = secret
        self.who = Principal(token_id=TOKEN_ID, role="client", user=user)
        self.unix_mode = unix_mode
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_datagrams = max_datagrams
        self.reply_timeout = reply_timeout
        self.bound: list[str] = []  # what is listening, ports resolved (tcp:127.0.0.1:PORT)
        self._ids = itertools.count(1)
        self._peer = _LinePeer(self._reattach)
        self._pid: Optional[int] = None
        self._servers: list[asyncio.AbstractServer] = []
        self._transports: list[asyncio.BaseTransport] = []
        self._unix_files: list[UnixSocketFile] = []
        self._connections: set[asyncio.Task] = set()  # open unix/tcp connections
        self._answering: set[asyncio.Task] = set()  # datagrams being answered
        self._refusal = _QuietLog()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Listen on every endpoint; a ListenError names the one that failed."""
        self._pid = self.hub.attach(self._peer, self.who)
        try:
            for ep in self.endpoints:
                await self._START[ep.kind](self, ep)
        except BaseException:
            await self.close()
            raise
        for where in self.bound:
            log.info("creditpiggy line protocol on %s, acting as user %r", where, self.who.user)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for transport in self._transports:
            transport.close()
        for task in [*self._connections, *self._answering]:
            task.cancel()
        for f in self._unix_files:
            f.remove()
        self._servers, self._transports, self._unix_files = [], [], []
        if self._pid is not None:
            self.hub.detach(self._pid)
            self._pid = None

    def _reattach(self) -> None:
        if self._pid is not None:
            self.hub.detach(self._pid)
            self._peer = _LinePeer(self._reattach)
            self._pid = self.hub.attach(self._peer, self.who)

    async def _start_unix(self, ep: Endpoint) -> None:
        f = bind_unix(ep.path, self.unix_mode, "creditpiggy unix socket")
        self._unix_files.append(f)
        self._servers.append(await asyncio.start_unix_server(self._connection, sock=f.sock))
        self.bound.append(str(ep))

    async def _start_tcp(self, ep: Endpoint) -> None:
        try:
            server = await asyncio.start_server(self._connection, ep.host, ep.port)
        except OSError as exc:
            raise ListenError(f"cannot listen on creditpiggy {ep}: {exc.strerror or exc}") from None
        self._servers.append(server)
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            self.bound.append(str(Endpoint("tcp", host=host, port=port)))

    async def _start_udp(self, ep: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self), local_addr=(ep.host, ep.port))
        except OSError as exc:
            raise ListenError(f"cannot listen on creditpiggy {ep}: {exc.strerror or exc}") from None
        self._transports.append(transport)
        host, port = transport.get_extra_info("sockname")[:2]
        self.bound.append(str(Endpoint("udp", host=host, port=port)))

    _START = {"unix": _start_unix, "tcp": _start_tcp, "udp": _start_udp}

    # -- one command ----------------------------------------------------------

    async def execute(self, data: bytes, origin: str) -> bytes:
        """Parse a command, hand it to the core, and turn its reply into OK/ER."""
        rid = next(self._ids)
        try:
            # tcp and udp need the secret: any local process can reach them
            msg = creditline.parse(data, rid, secret=self.secret, need_secret=origin != "unix")
        except creditline.LineError as exc:
            self._refusal(logging.INFO, "creditpiggy %s: ER: %s", origin, exc)
            return creditline.ER
        if self._pid is None:
            self._refusal(logging.INFO, "creditpiggy %s: ER: the hub is shutting down", origin)
            return creditline.ER
        fut = asyncio.get_running_loop().create_future()
        self._peer.waiting[rid] = fut
        self.hub.submit(self._pid, msg)
        try:
            answer = await asyncio.wait_for(fut, self.reply_timeout)
        except asyncio.TimeoutError:
            self._refusal(logging.WARNING, "creditpiggy %s: ER: no answer from the hub's core in %gs",
                          origin, self.reply_timeout)
            return creditline.ER
        finally:
            self._peer.waiting.pop(rid, None)
        if isinstance(answer, p.Error):
            self._refusal(logging.INFO, "creditpiggy %s: ER: %s: %s", origin, answer.code, answer.message)
        return creditline.reply(answer)

    # -- streams (unix, tcp) --------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        origin = _origin(writer)
        try:
            if len(self._connections) >= self.max_connections:
                self._refusal(logging.WARNING, "creditpiggy %s: ER: %d connections open (the limit)",
                              origin, len(self._connections))
                await _answer_and_linger(reader, writer, creditline.ER, self.idle_timeout)
                return
            self._connections.add(task)
            # Like the CreditPiggy daemon: the first read is the command.
            data = await asyncio.wait_for(reader.read(creditline.MAX_LINE_BYTES + 1), self.idle_timeout)
            if data:
                answer = await self.execute(data, origin)
                # Answered: lingering for the client's EOF holds no connection slot
                # (a client that never half-closes must not starve the next ones).
                self._connections.discard(task)
                await _answer_and_linger(reader, writer, answer, self.idle_timeout)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    # -- datagrams (udp) -------------------------------------------------------

    def datagram(self, transport: asyncio.DatagramTransport, data: bytes, addr: Any) -> None:
        origin = f"udp {addr[0]}:{addr[1]}"
        if len(self._answering) >= self.max_datagrams:
            self._refusal(logging.WARNING, "creditpiggy %s: ER: %d datagrams in flight (the limit)",
                          origin, len(self._answering))
            transport.sendto(creditline.ER, addr)
            return
        task = asyncio.ensure_future(self._answer(transport, data, addr, origin))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, transport: asyncio.DatagramTransport, data: bytes, addr: Any, origin: str) -> None:
        answer = await self.execute(data, origin)
        if not transport.is_closing():
            transport.sendto(answer, addr)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, server: CreditLineServer) -> None:
        self.server = server
        self.transport: Optional[asyncio.DatagramTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.server.datagram(self.transport, data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("creditpiggy udp: %s", exc)


async def _answer_and_linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes,
                             timeout: float) -> None:
    writer.write(answer)
    writer.write_eof()
    await asyncio.wait_for(writer.drain(), timeout)
    await _linger(reader)


async def _linger(reader: asyncio.StreamReader) -> None:
    """Read (and drop) what the client still sends, briefly: closing a socket
    with unread input resets the connection, and the reset can overtake the
    answer (e.g. after an over-long line)."""
    dropped = 0
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        while dropped < LINGER_BYTES:
            chunk = await asyncio.wait_for(reader.read(65536), LINGER_SECONDS)
            if not chunk:
                return
            dropped += len(chunk)


def _origin(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"tcp {peer[0]}:{peer[1]}"
    return "unix"

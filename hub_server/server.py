"""The hub's websocket server: the thin I/O layer around ``HubCore``.

decode -> handle -> execute.  Authenticates each connection in the HTTP
handshake (``Authorization: Bearer``), decodes frames with ``protocol``,
turns them into events (``events.py``), and hands every event that arrived
in one loop iteration to ``HubCore.handle`` as one batch; then it carries
out the instructions that come back (send through each peer's bounded
outbox, close, stream a blob).  It decides nothing about tasks.  What it
owns is I/O: sockets, blob files being uploaded or streamed, timers.

A bad frame gets an ``error`` reply; the connection and the hub keep going.
A revoked token's connections are closed within ``revocation_poll``
seconds, even when ``hwf token revoke`` ran in another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Optional

import websockets
from websockets.asyncio.server import ServerConnection, serve, unix_serve

from . import auth
from . import blobgc
from . import protocol as p
from .auth import Principal
from .blobs import BlobError, BlobStore, BlobWriter
from .conncaps import ConnectionCaps, counted_connection, fit_caps, raise_fd_limit
from .core import HubCore
from .creditserver import CreditLineServer
from .events import (
    BlobsScanned, BlobStored, Close, Connected, Disconnected, Event, Instruction, Later, Received, ResultsRefused,
    ScanBlobs, Send, StreamBlob, Tick, TokensRevoked,
)
from .peer import Peer
from .ratelog import RateLimitedLog
from .statelock import StateLock
from .uploads import UploadGate
from .unixsock import UnixSocketFile, bind_unix

log = logging.getLogger("hwf.hub")


@dataclass
class HubConfig:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = p.DEFAULT_PORT
    limits: p.Limits = field(default_factory=p.Limits)
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    # After a hub restart, how long daemons get to come back before the
    # attempts they were running are given up and retried elsewhere.
    reconnect_grace: float = 15.0
    # Like HTC-Grid's intra-VPC mode: callers on this machine (127.0.0.1 /
    # ::1) without a token are let in as clients of user "loopback".
    trust_loopback: bool = False
    # Serve wss:// with this certificate chain and key (PEM files).
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    # A peer whose live output has been dropped this long is disconnected.
    slow_reader_timeout: float = 60.0
    # The HTC-Grid handler of tasks whose client config names none, on daemons
    # without their own: "module:function" or a shell command.
    grid_handler: Optional[str] = None
    # Python-call tasks a daemon may hold per slot beyond its slots.
    prefetch: int = 1
    python_trusted_owners: tuple[str, ...] = ()
    revocation_poll: float = 0.5
    # The Manager HTTP API and status page (http_api.py): None = off, 0 = any free port.
    http_port: Optional[int] = None
    # (network, user): token-less HTTP calls from these addresses act as that client user.
    http_trust: list = field(default_factory=list)
    # How often time is handed to the core (heartbeats, waits, grace periods).
    tick_interval: float = 0.1
    # The websocket protocol also on a unix socket (same token auth), this mode.
    unix_path: Optional[Path] = None
    unix_mode: int = 0o660
    # CreditPiggy's line protocol (creditserver.py): endpoints, the client
    # user its commands act as; trust from the unix socket's file mode, and
    # over tcp/udp from the shared secret each line carries.
    creditpiggy: list[Any] = field(default_factory=list)  # creditserver.Endpoint
    creditpiggy_user: str = "creditpiggy"
    creditpiggy_secret: Optional[str] = field(default=None, repr=False)
    creditpiggy_mode: int = 0o600
    creditpiggy_idle_timeout: float = 10.0
    creditpiggy_max_connections: int = 256
    # An announced upload that receives no bytes this long is dropped (uploads.py).
    upload_idle_timeout: float = 10.0
    # Blob garbage collection (blobgc.py): how often the hub runs it (0: never;
    # ``hwf blobs gc`` still works), and how long a stored or used blob is spared.
    blob_gc_interval: float = 3600.0
    blob_gc_grace: float = 3600.0
    # Connections open at once on the websocket port (counted before the
    # handshake), in all and from one address.
    max_connections: int = 4096
    max_connections_per_address: int = 512
    # The HTTP API: a new connection's first request head must arrive within
    # header_timeout; an idle keep-alive connection is closed after idle_timeout.
    http_header_timeout: float = 10.0
    http_idle_timeout: float = 60.0
    http_max_connections: int = 1024
    http_max_connections_per_address: int = 64
    # /api/events streams open at once, in all and per user.
    http_max_streams: int = 64
    http_max_streams_per_user: int = 4


LOOPBACK = Principal(token_id="", role="client", user="loopback")


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for ``wss://``: TLS 1.2 or newer, the given chain and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


class HubServer:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.store = auth.open_state_dir(config.state_dir)
        self.state_lock = StateLock(config.state_dir)
        self.state_lock.hold_shared()
        self.store.checkpoint_in_background()
        self.blobs = BlobStore(Path(config.state_dir) / "blobs", config.limits.max_blob_store_bytes)
        self.core = HubCore(self.store, self.blobs, config.limits, now=time.time(),
                            heartbeat_interval=config.heartbeat_interval,
                            heartbeat_timeout=config.heartbeat_timeout,
                            reconnect_grace=config.reconnect_grace, grid_handler=config.grid_handler,
                            prefetch=config.prefetch, trusted_owners=config.python_trusted_owners)
        self.peers: dict[int, Peer] = {}
        self._peer_ids = itertools.count(1)
        self.uploads = UploadGate(config.limits, config.upload_idle_timeout)
        self._gc_lock = asyncio.Lock()
        self._pending: list[Event] = []
        self._flush_scheduled = False
        self._server: Any = None
        self._unix_server: Any = None
        self._unix_file: Optional[UnixSocketFile] = None
        self.credit_lines: Optional[CreditLineServer] = None
        self._tasks: set[asyncio.Task] = set()
        self.port: Optional[int] = None
        self.http: Any = None  # http_api.HttpApi when --http-port is on
        self.started_at = time.time()
        self.ratelog = RateLimitedLog(log)
        self.ws_caps = ConnectionCaps(config.max_connections, config.max_connections_per_address,
                                      "--max-connections", "--max-connections-per-address")

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        self._fit_connection_caps()
        asyncio.get_running_loop().set_exception_handler(self._loop_exception)
        tls = tls_context(c.tls_cert, c.tls_key) if c.tls_cert and c.tls_key else None
        options = dict(process_request=self._authenticate, max_size=c.limits.max_message_bytes,
                       compression=None, ping_interval=20, ping_timeout=60,
                       create_connection=counted_connection(self.ws_caps, self.ratelog))
        self._server = await serve(self._handle, c.host, c.port, ssl=tls, **options)
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        if c.unix_path is not None:  # same handshake and tokens; no TLS on a local socket
            self._unix_file = bind_unix(c.unix_path, c.unix_mode, "hub unix socket")
            self._unix_server = await unix_serve(self._handle, sock=self._unix_file.sock, **options)
            log.info("hub %s listening on unix:%s", self.core.hub_id, c.unix_path)
        if c.creditpiggy:
            self.credit_lines = CreditLineServer(
                self, c.creditpiggy, user=c.creditpiggy_user, unix_mode=c.creditpiggy_mode,
                idle_timeout=c.creditpiggy_idle_timeout, max_connections=c.creditpiggy_max_connections,
                secret=c.creditpiggy_secret)
            await self.credit_lines.start()
        if c.http_port is not None:
            from .http_api import HttpApi  # aiohttp is imported only when the API is on

            self.http = HttpApi(self, c.host, c.http_port, trust=c.http_trust, tls=tls)
            await self.http.start()
        self._spawn(self._tick())
        self._spawn(self._watch_revocations())
        self._spawn(self._expire_uploads())
        if c.blob_gc_interval > 0:
            self._spawn(self._collect_blobs_every(c.blob_gc_interval))
        self._feed(Tick())  # the first scheduling pass (a restarted hub may hold queued tasks)
        scheme = "wss" if tls else "ws"
        here = "127.0.0.1" if c.host in ("0.0.0.0", "::", "") else c.host
        here = f"[{here}]" if ":" in here else here
        self.state_lock.write_address(f"{scheme}://{here}:{self.port}")  # for 'hwf blobs gc'
        log.info("hub %s listening on %s://%s:%s", self.core.hub_id, scheme, c.host, self.port)
        if tls is None and c.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("serving plain ws:// on %s: tokens, code and data cross the network in clear; "
                        "use --tls-cert/--tls-key", c.host)

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.credit_lines is not None:
            await self.credit_lines.close()
        if self.http is not None:
            await self.http.close()
        for server in (self._server, self._unix_server):
            if server is not None:
                server.close()
                await server.wait_closed()
        if self._unix_file is not None:
            self._unix_file.remove()
        self.store.close()
        self.state_lock.close()

    def _fit_connection_caps(self) -> None:
        """Raise the fd limit to its hard limit and keep every connection cap
        under it: the hub refuses connections with a reason, never with EMFILE."""
        c = self.config
        limit = raise_fd_limit()
        wanted = {"--max-connections": c.max_connections}
        if c.http_port is not None:
            wanted["--http-max-connections"] = c.http_max_connections
        if c.creditpiggy:
            wanted["--creditpiggy-max-connections"] = c.creditpiggy_max_connections
        fitted = fit_caps(limit, wanted)
        if fitted != wanted:
            log.warning("open-file limit is %d: connection caps lowered to %s (raise the hard limit, "
                        "e.g. LimitNOFILE= in the service file, to keep them)", limit,
                        ", ".join(f"{k} {v}" for k, v in fitted.items()))
            c.max_connections = fitted["--max-connections"]
            c.http_max_connections = fitted.get("--http-max-connections", c.http_max_connections)
            c.creditpiggy_max_connections = fitted.get("--creditpiggy-max-connections",
                                                       c.creditpiggy_max_connections)
            self.ws_caps.total = c.max_connections
        c.max_connections_per_address = min(c.max_connections_per_address, c.max_connections)
        c.http_max_connections_per_address = min(c.http_max_connections_per_address, c.http_max_connections)
        self.ws_caps.per_address = c.max_connections_per_address

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's own reports: a failing accept() (EMFILE, ENFILE, ENOBUFS) would log a
        traceback per retry; it is one line per cause per interval here."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and "accept" in context.get("message", ""):
            self.ratelog(f"accept-{exc.errno}", f"accept failed: {exc.strerror or exc} (connections are refused "
                                                f"until descriptors free up)")
            return
        loop.default_exception_handler(context)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- local peers: a way in for other protocols (creditserver.py) ----------

    def attach(self, peer: Any, who: Principal) -> int:
        """Connect a local pseudo-peer (``post(msg)``, ``close(code, reason)``)."""
        pid = next(self._peer_ids)
        self.peers[pid] = peer
        self._feed(Connected(pid, who, p.PROTOCOL_VERSION))
        return pid

    def submit(self, pid: int, msg: Any) -> None:
        """A request from a local peer, handled like a websocket frame's."""
        self._feed(Received(pid, msg))

    def blob_stored(self, pid: int, rid: int, sha256: str) -> None:
        """A local peer stored a blob (an HTTP upload): the core grants it and acks ``rid``."""
        self._feed(BlobStored(pid, rid, sha256))

    def detach(self, pid: int) -> None:
        if self.peers.pop(pid, None) is not None:
            self._feed(Disconnected(pid))

    # -- events in, instructions out -----------------------------------------

    def _feed(self, event: Event) -> None:
        """Queue an event; everything queued in this loop iteration is one batch."""
        self._pending.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        events, self._pending = self._pending, []
        try:
            instructions = self.core.handle(*events, now=time.time())
        except Exception:  # the batch's transaction failed (e.g. disk full)
            log.exception("handling %d event(s) failed", len(events))
            return
        for ins in instructions:
            self._EXECUTE[type(ins)](self, ins)

    def _do_send(self, ins: Send) -> None:
        peer = self.peers.get(ins.peer)
        if peer is not None:
            peer.post(ins.msg)

    def _do_close(self, ins: Close) -> None:
        peer = self.peers.get(ins.peer)
        if peer is not None:
            peer.close(ins.code, ins.reason)

    def _do_stream(self, ins: StreamBlob) -> None:
        peer = self.peers.get(ins.peer)
        if peer is not None:
            self._spawn(self._stream_blob(peer, ins.rid, ins.sha256))

    def _do_later(self, ins: Later) -> None:
        # call_soon from a callback runs after the next poll for I/O.
        asyncio.get_running_loop().call_soon(self._feed, ins.event)

    def _do_scan_blobs(self, ins: ScanBlobs) -> None:
        self._spawn(self._collect_blobs(ins.peer, ins.rid, ins.dry_run))

    _EXECUTE: dict[type, Any] = {Send: _do_send, Close: _do_close, StreamBlob: _do_stream, Later: _do_later,
                                 ScanBlobs: _do_scan_blobs}

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_interval)
            self._feed(Tick())
            self.ratelog.flush()
            if self.http is not None:
                self.http.log.flush()

    async def _watch_revocations(self) -> None:
        """Tokens revoked (here or by ``hwf token revoke`` in another process)."""
        version = self.store.data_version()
        while True:
            await asyncio.sleep(self.config.revocation_poll)
            now = self.store.data_version()
            if now != version:
                version = now
                self._feed(TokensRevoked(frozenset(self.store.revoked_token_ids())))

    # -- handshake ----------------------------------------------------------

    def _authenticate(self, connection: ServerConnection, request: Any) -> Any:
        token = auth.bearer(request.headers.get("Authorization"))
        if token is None and self.config.trust_loopback and _is_loopback(connection):
            connection.hwf_principal = LOOPBACK  # type: ignore[attr-defined]
            return None
        if token is None:
            return connection.respond(
                HTTPStatus.UNAUTHORIZED, "missing token: send 'Authorization: Bearer <token>'\n"
            )
        who = auth.authenticate(self.store, token)
        if not isinstance(who, Principal):
            return connection.respond(HTTPStatus.FORBIDDEN, who + "\n")
        connection.hwf_principal = who  # type: ignore[attr-defined]
        return None

    async def _hello(self, peer: Peer) -> Optional[int]:
        """The protocol version both sides speak, or None (refused, closed)."""
        try:
            first = await asyncio.wait_for(peer.ws.recv(), timeout=30)
            msg = p.decode(first)
        except (asyncio.TimeoutError, p.ProtocolError) as exc:
            return await self._refuse_hello(peer, "bad_hello", f"expected hello: {exc}")
        if not isinstance(msg, p.Hello):
            return await self._refuse_hello(peer, "bad_hello", f"expected hello, got {type(msg).__name__}")
        if msg.version < p.MIN_PROTOCOL_VERSION:
            text = (f"protocol version {msg.version} is not supported (hub speaks "
                    f"{p.MIN_PROTOCOL_VERSION} to {p.PROTOCOL_VERSION})")
            return await self._refuse_hello(peer, "version", text)
        version = min(msg.version, p.PROTOCOL_VERSION)
        peer.post(p.Welcome(version=version, role=peer.role, hub_id=self.core.hub_id,
                            limits=self.config.limits, time=time.time(),
                            http_port=self.http.port if self.http is not None else None))
        return version

    @staticmethod
    async def _refuse_hello(peer: Peer, code: str, text: str) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await peer.ws.send(p.encode(p.Error(id=None, code=code, message=text)), text=True)
            await peer.ws.close(1002, text[:120])
        return None

    # -- connection ---------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        peer = Peer(ws, ws.hwf_principal, self.config.limits,  # type: ignore[attr-defined]
                    self.config.slow_reader_timeout)
        pid = next(self._peer_ids)
        self.peers[pid] = peer
        connected = False
        try:
            version = await self._hello(peer)
            if version is None:
                return
            self._feed(Connected(pid, peer.principal, version, _remote_ip(ws)))
            connected = True
            async for frame in ws:
                if peer.closing:
                    break
                if isinstance(frame, bytes):
                    self._on_chunk(pid, peer, frame)
                else:
                    self._on_text(pid, peer, frame)
                await peer.wait_room()  # a peer that does not read its replies is not read either
        except websockets.ConnectionClosed:
            pass
        finally:
            del self.peers[pid]
            self.uploads.release_peer(pid)
            await peer.stop()
            if connected:
                self._feed(Disconnected(pid))

    def _on_text(self, pid: int, peer: Peer, frame: str) -> None:
        try:
            msg = p.decode(frame)
        except p.ProtocolError as exc:
            refused = p.refused_results(frame) if p.TaskDone in peer.allowed else []
            if refused:  # the core ends those attempts, and answers
                self._feed(ResultsRefused(pid, p.request_id(frame), tuple(refused), str(exc)))
            else:
                peer.post(p.Error(id=p.request_id(frame), code="bad_message", message=str(exc)))
            return
        if not isinstance(msg, peer.allowed):
            text = p.forbidden_text(peer.role, msg)
            peer.post(p.Error(id=getattr(msg, "id", None), code="forbidden", message=text))
        elif isinstance(msg, p.BlobPut):
            self._start_upload(pid, peer, msg)
        else:
            self._feed(Received(pid, msg))

    # -- blobs: file I/O stays here; who may do what is the core's ----------

    def _start_upload(self, pid: int, peer: Peer, msg: p.BlobPut) -> None:
        limits = self.config.limits
        owner = peer.principal.blob_scope
        problem = None
        if msg.size > limits.max_file_bytes:
            problem = ("too_large", f"file of {msg.size} bytes exceeds max_file_bytes={limits.max_file_bytes}")
        elif msg.id in peer.uploads:
            problem = ("bad_request", f"transfer id {msg.id} is already in use")
        else:
            over = self.core.blob_quota_refusal(peer.principal, msg.sha256, msg.size,
                                                pending=self.uploads.open_bytes(owner))
            problem = (("quota", over) if over else
                       self.uploads.admit(pid, msg.id, owner, peer.role == "daemon", msg.size, time.monotonic()))
        if problem is None:
            try:
                writer = self.blobs.writer(msg.sha256, msg.size)
            except BlobError as exc:
                self.uploads.release(pid, msg.id)
                problem = ("store_full" if "full" in str(exc) else "bad_request", str(exc))
        if problem is not None:
            peer.post(p.Error(id=msg.id, code=problem[0], message=problem[1]))
        elif msg.size == 0:
            self.uploads.release(pid, msg.id)
            self._finish_upload(pid, peer, msg.id, writer)
        else:
            peer.uploads[msg.id] = writer

    async def _collect_blobs(self, peer: Optional[int], rid: int, dry_run: bool) -> None:
        """Scan for unreferenced blobs in a thread; the core makes the final cut."""
        grace = self.config.blob_gc_grace
        async with self._gc_lock:  # one scan at a time
            try:
                found, listing = await asyncio.to_thread(blobgc.candidates, self.store.path, self.blobs,
                                                         time.time(), grace)
            except Exception as exc:
                log.exception("blob gc scan failed")
                if peer is not None and peer in self.peers:
                    self.peers[peer].post(p.Error(id=rid, code="internal", message=f"blob gc scan failed: {exc}"))
                return
            self._feed(BlobsScanned(peer, rid, dry_run, grace, tuple(found), listing))

    async def _collect_blobs_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._collect_blobs(None, 0, False)

    async def _expire_uploads(self) -> None:
        """Drop announced uploads that receive no bytes (``--upload-idle-timeout``)."""
        while True:
            await asyncio.sleep(min(1.0, self.config.upload_idle_timeout / 4))
            for pid, tid in self.uploads.expired(time.monotonic()):
                peer = self.peers.get(pid)
                writer = peer.uploads.pop(tid, None) if peer is not None else None
                if writer is not None:
                    writer.abort()
                    peer.post(p.Error(id=tid, code="timeout", message=self.uploads.expiry_message()))

    def _on_chunk(self, pid: int, peer: Peer, frame: bytes) -> None:
        try:
            tid, payload = p.decode_chunk(frame)
        except p.ProtocolError as exc:
            peer.post(p.Error(id=None, code="bad_frame", message=str(exc)))
            return
        writer = peer.uploads.get(tid)
        if writer is None:
            peer.post(p.Error(id=tid, code="bad_frame", message=f"no upload open with id {tid}"))
            return
        try:
            writer.write(payload)
        except BlobError as exc:
            del peer.uploads[tid]
            self.uploads.release(pid, tid)
            peer.post(p.Error(id=tid, code="bad_blob", message=str(exc)))
            return
        self.uploads.received(pid, tid, time.monotonic())
        if writer.complete:
            del peer.uploads[tid]
            self.uploads.release(pid, tid)
            self._finish_upload(pid, peer, tid, writer)

    def _finish_upload(self, pid: int, peer: Peer, tid: int, writer: BlobWriter) -> None:
        try:
            writer.finish()
        except BlobError as exc:
            peer.post(p.Error(id=tid, code="bad_blob", message=str(exc)))
            return
        self._feed(BlobStored(pid, tid, writer.sha256))  # the core grants access and acks

    async def _stream_blob(self, peer: Peer, rid: int, sha: str) -> None:
        try:
            size = self.blobs.size(sha)
            peer.post(p.BlobData(id=rid, sha256=sha, size=size))
            for block in self.blobs.read_chunks(sha, self.config.limits.chunk_bytes):
                await peer.send_bytes(p.encode_chunk(rid, block))
        except FileNotFoundError:
            peer.post(p.Error(id=rid, code="not_found", message=f"no blob {sha[:12]}… on the hub"))
        except websockets.ConnectionClosed:
            pass


def _remote_ip(ws: ServerConnection) -> Optional[str]:
    """The peer's IP (None on a unix socket)."""
    addr = ws.remote_address
    return str(addr[0]) if isinstance(addr, tuple) and addr else None


def _is_loopback(connection: ServerConnection) -> bool:
    peer = connection.remote_address
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    return host in ("127.0.0.1", "::1") or host.startswith("127.")


async def run_hub(config: HubConfig, ready_file: Optional[str] = None) -> None:
    """Run until cancelled; write ``host port`` to ``ready_file`` once listening."""
    server = HubServer(config)
    try:
        await server.start()
    except BaseException:  # e.g. a socket in use: leave no listener or socket file behind
        await server.close()
        raise
    if ready_file:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as f:
            http = f" {server.http.port}" if server.http is not None else ""
            f.write(f"{config.host} {server.port}{http}\n")
        os.replace(tmp, ready_file)
    try:
        await server.serve_forever()
    finally:
        await server.close()

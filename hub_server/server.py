"""The hub's websocket server: the thin I/O layer around ``HubCore``.

Authenticates each connection in the HTTP handshake (``Authorization:
Bearer``), decodes frames with ``protocol``, hands them to the core with the
caller's ``Principal``, and sends replies through the peer's bounded outbox
(``peer.py``).  A bad frame gets an ``error`` reply; the connection and the
hub keep going.  A revoked token's connections are closed within
``revocation_poll`` seconds, even when ``hwf token revoke`` ran in another
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Optional

import websockets
from websockets.asyncio.server import ServerConnection, serve

from . import auth
from . import protocol as p
from .auth import Principal
from .blobs import BlobError, BlobStore, BlobWriter, check_sha
from .core import HubCore, RequestError
from .peer import Peer

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
    revocation_poll: float = 0.5


LOOPBACK = Principal(token_id="", role="client", user="loopback")


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for ``wss://``: TLS 1.2 or newer, the given chain and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _send_quietly(peer: Peer, msg: Any) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        await peer.send(msg)


class _Sub:
    """One client's watch: events for some tasks or a whole session."""

    __slots__ = ("peer", "wid", "output", "task_ids", "session_id")

    def __init__(self, peer: Peer, wid: int, output: bool, task_ids: set[str], session_id: Optional[str]):
        self.peer, self.wid, self.output = peer, wid, output
        self.task_ids, self.session_id = task_ids, session_id


class HubServer:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.store = auth.open_state_dir(config.state_dir)
        self.store.checkpoint_in_background()
        self.blobs = BlobStore(Path(config.state_dir) / "blobs", config.limits.max_blob_store_bytes)
        self.core = HubCore(self.store, self.blobs, config.limits)
        self.peers: set[Peer] = set()
        self.daemons: dict[str, Peer] = {}
        self._open_uploads = 0
        self._subs_by_task: dict[str, set[_Sub]] = {}
        self._subs_by_session: dict[str, set[_Sub]] = {}
        self._subs_by_peer: dict[Peer, dict[int, _Sub]] = {}
        self.core.listeners.append(self._on_task_event)
        self._server: Any = None
        self._tasks: set[asyncio.Task] = set()
        self._schedule_pending = False
        self.port: Optional[int] = None
        self.started_at = time.time()

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        tls = tls_context(c.tls_cert, c.tls_key) if c.tls_cert and c.tls_key else None
        self._server = await serve(
            self._handle,
            c.host,
            c.port,
            process_request=self._authenticate,
            max_size=c.limits.max_message_bytes,
            compression=None,
            ping_interval=20,
            ping_timeout=60,
            ssl=tls,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        self._spawn(self._watch_heartbeats())
        self._spawn(self._watch_revocations())
        if self.core.active:
            self._spawn(self._expire_absent_daemons())
        self.schedule_soon()
        scheme = "wss" if tls else "ws"
        log.info("hub %s listening on %s://%s:%s", self.core.hub_id, scheme, c.host, self.port)
        if tls is None and c.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("serving plain ws:// on %s: tokens, code and data cross the network in clear; "
                        "use --tls-cert/--tls-key", c.host)

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.store.close()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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

    async def _watch_revocations(self) -> None:
        """Close the connections of tokens revoked (here or by ``hwf token revoke``)."""
        version = self.store.data_version()
        while True:
            await asyncio.sleep(self.config.revocation_poll)
            now = self.store.data_version()
            if now == version:
                continue
            version = now
            revoked = self.store.revoked_token_ids()
            for peer in list(self.peers):
                if peer.principal.token_id in revoked:
                    log.info("closing a connection of revoked token %s", peer.principal.token_id)
                    peer.close(1008, "token revoked")

    # -- connection ---------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        peer = Peer(ws, ws.hwf_principal, self.config.limits,  # type: ignore[attr-defined]
                    self.config.slow_reader_timeout)
        self.peers.add(peer)
        try:
            if not await self._hello(peer):
                return
            async for frame in ws:
                if peer.closing:
                    break
                if isinstance(frame, bytes):
                    await self._on_chunk(peer, frame)
                else:
                    await self._on_text(peer, frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.peers.discard(peer)
            self._open_uploads -= len(peer.uploads)
            await peer.stop()
            for sub in list(self._subs_by_peer.get(peer, {}).values()):
                self._drop_sub(sub)
            if peer.machine_id is not None and self.daemons.get(peer.machine_id) is peer:
                del self.daemons[peer.machine_id]
                self.core.disconnect(peer.machine_id, time.time(), "daemon connection lost")
                self.schedule_soon()

    async def _hello(self, peer: Peer) -> bool:
        """Version check before anything else; the refusal is written directly
        (nothing is queued yet), then the connection closes."""
        try:
            first = await asyncio.wait_for(peer.ws.recv(), timeout=30)
            msg = p.decode(first)
        except (asyncio.TimeoutError, p.ProtocolError) as exc:
            return await self._refuse_hello(peer, "bad_hello", f"expected hello: {exc}")
        if not isinstance(msg, p.Hello):
            return await self._refuse_hello(peer, "bad_hello", f"expected hello, got {type(msg).__name__}")
        if msg.version != p.PROTOCOL_VERSION:
            text = f"protocol version {msg.version} is not supported (hub speaks {p.PROTOCOL_VERSION})"
            return await self._refuse_hello(peer, "version", text)
        peer.post(
            p.Welcome(
                version=p.PROTOCOL_VERSION, role=peer.role, hub_id=self.core.hub_id,
                limits=self.config.limits, time=time.time(),
            )
        )
        return True

    @staticmethod
    async def _refuse_hello(peer: Peer, code: str, text: str) -> bool:
        with contextlib.suppress(websockets.ConnectionClosed):
            await peer.ws.send(p.encode(p.Error(id=None, code=code, message=text)), text=True)
            await peer.ws.close(1002, text[:120])
        return False

    async def _on_text(self, peer: Peer, frame: str) -> None:
        try:
            msg = p.decode(frame)
        except p.ProtocolError as exc:
            await peer.send(p.Error(id=p.request_id(frame), code="bad_message", message=str(exc)))
            return
        rid = getattr(msg, "id", None)
        if not isinstance(msg, peer.allowed):
            text = f"a {peer.role} may not send {type(msg).__struct_config__.tag!r}"
            await peer.send(p.Error(id=rid, code="forbidden", message=text))
            return
        try:
            await self._dispatch(peer, msg)
        except RequestError as exc:
            await peer.send(p.Error(id=rid, code=exc.code, message=str(exc)))
        except Exception as exc:  # a bug must not take the hub down
            log.exception("error handling %s", type(msg).__name__)
            await peer.send(p.Error(id=rid, code="internal", message=f"hub error: {exc!r}"))

    async def _dispatch(self, peer: Peer, msg: Any) -> None:
        now = time.time()
        who = peer.principal
        if isinstance(msg, p.Submit):
            reply = self.core.submit(msg, who)
            await peer.send(reply)
            self.schedule_soon()
        elif isinstance(msg, p.GetResults):
            self._spawn(self._answer_results(peer, msg))
        elif isinstance(msg, p.GetPool):
            await peer.send(p.Pool(id=msg.id, machines=self.core.pool(msg)))
        elif isinstance(msg, p.BlobsMissing):
            # "Present" only for blobs this caller may use: whether anyone
            # else stored a file is not revealed (a re-upload is cheap).
            missing = [s for s in msg.sha256
                       if not (self.blobs.has(self._sha(s)) and self.core.blob_readable(who, s, peer.machine_id))]
            await peer.send(p.BlobsMissingReply(id=msg.id, missing=missing))
        elif isinstance(msg, p.BlobPut):
            self._start_upload(peer, msg)
        elif isinstance(msg, p.BlobGet):
            self._spawn(self._stream_blob(peer, msg))
        elif isinstance(msg, p.Watch):
            await peer.send(self._watch(peer, msg))
        elif isinstance(msg, p.Unwatch):
            sub = self._subs_by_peer.get(peer, {}).get(msg.watch)
            if sub is not None:
                self._drop_sub(sub)
            await peer.send(p.Ok(id=msg.id))
        elif isinstance(msg, p.Cancel):
            ids = self.core.cancel_targets(msg, who)
            self._spawn(self._cancel(peer, msg.id, ids))
        elif isinstance(msg, p.GetSession):
            await peer.send(self.core.session(msg.session_id, msg.id, who))
        elif isinstance(msg, p.Draining):
            if peer.machine_id is not None:
                self.core.set_draining(peer.machine_id, now)
        elif isinstance(msg, p.Output):
            if peer.machine_id is not None:
                self._on_output(peer.machine_id, msg)
        elif isinstance(msg, p.Register):
            if peer.machine_id is not None:
                raise RequestError("bad_request", f"this connection is already registered as {peer.machine_id!r}")
            reply = self.core.register(msg, now, who)
            reply.heartbeat_interval = self.config.heartbeat_interval
            peer.machine_id = reply.machine_id
            self.daemons[reply.machine_id] = peer
            await peer.send(reply)
            for tid, attempt in self.core.machines[reply.machine_id].cancelling:
                peer.post(p.CancelTask(task_id=tid, attempt=attempt))  # stale work: stop it
            self.schedule_soon()
        elif isinstance(msg, (p.Heartbeat, p.TaskStarted, p.StageDone, p.TaskDone)):
            if peer.machine_id is None:
                raise RequestError("not_registered", "register before sending task messages")
            if isinstance(msg, p.Heartbeat):
                self.core.heartbeat(peer.machine_id, msg, now)
            elif isinstance(msg, p.TaskStarted):
                self.core.started(peer.machine_id, msg)
            elif isinstance(msg, p.StageDone):
                self.core.stage_done(peer.machine_id, msg)
            else:
                self.core.accept_artifacts(peer.machine_id, who, msg)
                self.core.task_done(peer.machine_id, msg, now)
                await peer.send(p.Ok(id=msg.id))  # acked whether new or a resend
                self.schedule_soon()

    async def _cancel(self, peer: Peer, rid: int, ids: list[str], chunk: int = 100) -> None:
        """Cancel in chunks of one transaction each, yielding in between, so
        200,000 cancellations never hold the hub for long: a request from
        someone else needs a few loop iterations (read, handle, write), and
        each chunk (~5 ms) delays each of them once."""
        by_state: dict[str, int] = {}
        done: list[str] = []
        try:
            for i in range(0, len(ids), chunk):
                counts, cancelled, kills = self.core.cancel_tasks(ids[i:i + chunk], time.time())
                for state, n in counts.items():
                    by_state[state] = by_state.get(state, 0) + n
                done += cancelled
                for machine_id, order in kills:
                    daemon = self.daemons.get(machine_id)
                    if daemon is not None:
                        daemon.post(order)
                await asyncio.sleep(0)
            await _send_quietly(peer, p.Cancelled(id=rid, task_ids=done, by_state=by_state))
        except Exception as exc:
            log.exception("error cancelling tasks")
            await _send_quietly(peer, p.Error(id=rid, code="internal", message=f"hub error: {exc!r}"))
        finally:
            self.schedule_soon()

    @staticmethod
    def _sha(s: str) -> str:
        try:
            return check_sha(s)
        except BlobError as exc:
            raise RequestError("bad_request", str(exc)) from None

    # -- watches ------------------------------------------------------------

    def _watch(self, peer: Peer, msg: p.Watch) -> p.Watching:
        if msg.session_id is not None:
            ids = self.core.session(msg.session_id, msg.id, peer.principal).task_ids
        else:
            ids = list(dict.fromkeys(msg.task_ids))
        limit = self.config.limits.max_results_per_request
        if len(ids) > limit:
            raise RequestError("limit", f"a watch covers at most {limit} tasks, got {len(ids)}")
        briefs = self.core.briefs(ids, peer.principal)
        sub = _Sub(peer, msg.id, msg.output, set(ids), msg.session_id)
        self._subs_by_peer.setdefault(peer, {})[msg.id] = sub
        if msg.session_id is not None:
            self._subs_by_session.setdefault(msg.session_id, set()).add(sub)
        else:
            for b in briefs:
                if b.status not in p.TERMINAL_STATES:
                    self._subs_by_task.setdefault(b.task_id, set()).add(sub)
        return p.Watching(id=msg.id, tasks=briefs)

    def _drop_sub(self, sub: _Sub) -> None:
        self._subs_by_peer.get(sub.peer, {}).pop(sub.wid, None)
        if sub.session_id is not None:
            self._subs_by_session.get(sub.session_id, set()).discard(sub)
        for tid in sub.task_ids:
            subs = self._subs_by_task.get(tid)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs_by_task[tid]

    def _subs_for(self, task_id: str, session_id: Optional[str]) -> set[_Sub]:
        subs = self._subs_by_task.get(task_id, set())
        if session_id is not None and session_id in self._subs_by_session:
            subs = subs | self._subs_by_session[session_id]
        return subs

    def _on_task_event(self, task_id: str, session_id: str, status: str, info: dict[str, Any]) -> None:
        subs = self._subs_for(task_id, session_id)
        if not subs:
            return
        now = time.time()
        for sub in subs:
            sub.peer.post(p.TaskEvent(watch=sub.wid, task_id=task_id, status=status, time=now, **info))
        if status in p.TERMINAL_STATES:
            self._subs_by_task.pop(task_id, None)

    def _on_output(self, machine_id: str, msg: p.Output) -> None:
        t = self.core.active.get(msg.task_id)
        if t is None or t.attempt != msg.attempt or t.machine != machine_id:
            return
        for sub in self._subs_for(msg.task_id, t.session_id):
            if sub.output:
                sub.peer.post(p.Output(task_id=msg.task_id, attempt=msg.attempt, stream=msg.stream,
                                       text=msg.text, watch=sub.wid))

    # -- scheduling ---------------------------------------------------------

    def schedule_soon(self) -> None:
        """Coalesce many triggers in one loop iteration into one scheduling pass."""
        if not self._schedule_pending:
            self._schedule_pending = True
            asyncio.get_running_loop().call_soon(self._schedule)

    def _schedule(self) -> None:
        self._schedule_pending = False
        for machine_id, assign in self.core.schedule():
            peer = self.daemons.get(machine_id)
            if peer is not None:
                peer.post(assign)

    async def _watch_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            deadline = time.time() - self.config.heartbeat_timeout
            for machine_id, peer in list(self.daemons.items()):
                m = self.core.machines.get(machine_id)
                if m is not None and m.last_seen < deadline:
                    log.warning("daemon %s missed heartbeats; dropping it", machine_id)
                    del self.daemons[machine_id]
                    self.core.disconnect(machine_id, time.time(), "daemon heartbeats stopped")
                    self.schedule_soon()
                    self._spawn(peer.ws.close(1011, "heartbeat timeout"))

    async def _expire_absent_daemons(self) -> None:
        """After a restart: attempts whose daemon never came back are lost."""
        await asyncio.sleep(self.config.reconnect_grace)
        now = time.time()
        absent: dict[str, list[str]] = {}
        for t in self.core.active.values():
            if t.status in ("assigned", "running") and t.machine not in self.daemons:
                absent.setdefault(t.machine or "?", []).append(t.task_id)
        for machine_id, tids in absent.items():
            with self.store.transaction():
                self.core.lose_attempts(machine_id, tids, now, "daemon did not return after hub restart")
            m = self.core.machines.get(machine_id)
            if m is not None:
                m.running.difference_update(tids)
        if absent:
            self.schedule_soon()

    # -- results ------------------------------------------------------------

    async def _answer_results(self, peer: Peer, msg: p.GetResults) -> None:
        try:
            self.core.check_known(msg.task_ids, peer.principal)
            timed_out = False
            if msg.wait:
                fut = self.core.wait_for(msg.task_ids)
                if fut is not None:
                    try:
                        await asyncio.wait_for(asyncio.shield(fut), msg.timeout)
                    except asyncio.TimeoutError:
                        timed_out = True
                    finally:
                        if not fut.done():
                            self.core.drop_waiter(fut)
            await peer.send(
                p.Results(id=msg.id, tasks=self.core.records(msg.task_ids, peer.principal), timed_out=timed_out)
            )
        except RequestError as exc:
            await _send_quietly(peer, p.Error(id=msg.id, code=exc.code, message=str(exc)))
        except websockets.ConnectionClosed:
            pass
        except Exception as exc:
            log.exception("error answering get_results")
            await _send_quietly(peer, p.Error(id=msg.id, code="internal", message=f"hub error: {exc!r}"))

    # -- blobs --------------------------------------------------------------

    def _start_upload(self, peer: Peer, msg: p.BlobPut) -> None:
        limits = self.config.limits
        if msg.size > limits.max_file_bytes:
            raise RequestError(
                "too_large", f"file of {msg.size} bytes exceeds max_file_bytes={limits.max_file_bytes}"
            )
        if msg.id in peer.uploads:
            raise RequestError("bad_request", f"transfer id {msg.id} is already in use")
        if len(peer.uploads) >= limits.max_uploads_per_connection:
            raise RequestError("limit", f"{len(peer.uploads)} uploads already open on this connection "
                                        f"(max_uploads_per_connection={limits.max_uploads_per_connection})")
        if self._open_uploads >= limits.max_uploads:
            raise RequestError("busy", f"the hub has {self._open_uploads} uploads open "
                                       f"(max_uploads={limits.max_uploads}); try again shortly")
        try:
            writer = self.blobs.writer(msg.sha256, msg.size)
        except BlobError as exc:
            code = "store_full" if "full" in str(exc) else "bad_request"
            raise RequestError(code, str(exc)) from None
        if msg.size == 0:
            self._finish_upload(peer, msg.id, writer)
        else:
            peer.uploads[msg.id] = writer
            self._open_uploads += 1

    async def _on_chunk(self, peer: Peer, frame: bytes) -> None:
        try:
            tid, payload = p.decode_chunk(frame)
        except p.ProtocolError as exc:
            await peer.send(p.Error(id=None, code="bad_frame", message=str(exc)))
            return
        writer = peer.uploads.get(tid)
        if writer is None:
            await peer.send(p.Error(id=tid, code="bad_frame", message=f"no upload open with id {tid}"))
            return
        try:
            writer.write(payload)
        except BlobError as exc:
            del peer.uploads[tid]
            self._open_uploads -= 1
            await peer.send(p.Error(id=tid, code="bad_blob", message=str(exc)))
            return
        if writer.complete:
            del peer.uploads[tid]
            self._open_uploads -= 1
            self._finish_upload(peer, tid, writer)

    def _finish_upload(self, peer: Peer, tid: int, writer: BlobWriter) -> None:
        try:
            writer.finish()
        except BlobError as exc:
            peer.post(p.Error(id=tid, code="bad_blob", message=str(exc)))
            return
        self.core.grant_blob(peer.principal, writer.sha256)
        peer.post(p.Ok(id=tid))

    async def _stream_blob(self, peer: Peer, msg: p.BlobGet) -> None:
        try:
            sha = self._sha(msg.sha256)
            # Someone else's blob answers exactly like a missing one.
            if not (self.blobs.has(sha) and self.core.blob_readable(peer.principal, sha, peer.machine_id)):
                raise RequestError("not_found", f"no blob {sha[:12]}… on the hub")
            size = self.blobs.size(sha)
            await peer.send(p.BlobData(id=msg.id, sha256=sha, size=size))
            for block in self.blobs.read_chunks(sha, self.config.limits.chunk_bytes):
                await peer.send_bytes(p.encode_chunk(msg.id, block))
        except RequestError as exc:
            await _send_quietly(peer, p.Error(id=msg.id, code=exc.code, message=str(exc)))
        except websockets.ConnectionClosed:
            pass


def _is_loopback(connection: ServerConnection) -> bool:
    peer = connection.remote_address
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    return host in ("127.0.0.1", "::1") or host.startswith("127.")


async def run_hub(config: HubConfig, ready_file: Optional[str] = None) -> None:
    """Run until cancelled; write ``host port`` to ``ready_file`` once listening."""
    server = HubServer(config)
    await server.start()
    if ready_file:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{config.host} {server.port}\n")
        os.replace(tmp, ready_file)
    try:
        await server.serve_forever()
    finally:
        await server.close()

"""The Manager HTTP API and the status page: the render farm's side of the hub.

A thin aiohttp layer over the same ``HubCore`` as the websocket: every
request is authenticated (the same Bearer tokens, or an admin-trusted
address as a named user), turned into a protocol request, handed to the
core as a local pseudo-peer's message, and its reply turned into the seed's
JSON shapes (``httpshapes.py``).  Nothing here decides about tasks; tenancy
and roles are the core's, so user B gets 404 for A's task here as on the
websocket.  Bodies may be JSON, form-encoded or multipart (a brender
server posts forms with ``settings`` as a JSON string and a ``jobfile``).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import json
import logging
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import auth
from . import compilers
from . import httpshapes as shapes
from . import protocol as p
from .auth import Principal
from .blobs import BlobError
from .httpshapes import HttpError
from .conncaps import ConnectionCaps, guarded_http
from .openapi import openapi_document
from .ratelog import RateLimitedLog
from .snapfeed import SnapshotFeeds

if TYPE_CHECKING:
    from .server import HubServer

log = logging.getLogger("hwf.http")

STATIC_DIR = Path(__file__).with_name("static")
TRUST_TOKEN_ID = "http-trust"
REPLY_TIMEOUT = 60.0
MAX_BODY_BYTES = 64 * 2**20  # a jobfile zip and its form (the hub's max_file_bytes may cut it lower)
SNAPSHOT_TASKS = 200
EVENTS_INTERVAL = 0.5  # how often the event stream looks for changes
EVENTS_PING = 15.0
EVENTS_RECHECK = 1.0  # how often a stream re-checks its token when nothing changed
CLIENT_HEADER = "X-HWF-Client"  # not CORS-safelisted: a page on another site cannot send it without a preflight
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


_CORE_STATUS = {"not_found": 404, "forbidden": 403, "not_queued": 409, "queue_full": 429, "limit": 413,
                "missing_blob": 422, "bad_task": 422, "bad_hardware": 422, "bad_path": 422,
                "bad_request": 400, "conflict": 409, "closed": 503, "internal": 500}


def parse_trust(items: list[str]) -> list[tuple[Any, str]]:
    """``CIDR=USER`` pairs (``--http-trust``), checked: a bad one raises ValueError naming it."""
    out = []
    for item in items:
        cidr, sep, user = item.partition("=")
        if not sep:
            raise ValueError(f"--http-trust {item!r}: give CIDR=USER, e.g. 10.0.0.0/24=render")
        try:
            net = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as exc:
            raise ValueError(f"--http-trust {item!r}: {exc}") from None
        out.append((net, auth.check_user(user.strip())))
    return out


class _OneReply:
    """A local pseudo-peer for one request: keeps the reply to ``rid``."""

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()

    def post(self, msg: Any) -> None:
        if getattr(msg, "id", None) == self.rid and not self.future.done():
            self.future.set_result(msg)

    def close(self, code: int, reason: str) -> None:
        if not self.future.done():
            self.future.set_result(p.Error(id=self.rid, code="closed", message=reason))


class HttpApi:
    def __init__(self, hub: "HubServer", host: str, port: int, *, trust: list[tuple[Any, str]] = (),
                 tls: Optional[ssl.SSLContext] = None) -> None:
        self.hub = hub
        self.host, self.port = host, port
        self.trust = list(trust)
        self.tls = tls
        self._rids = itertools.count(1)
        self._runner: Optional[web.AppRunner] = None
        self._listener: Optional[asyncio.base_events.Server] = None
        c = hub.config
        self.log = RateLimitedLog(log)
        self.caps = ConnectionCaps(c.http_max_connections, c.http_max_connections_per_address,
                                   "--http-max-connections", "--http-max-connections-per-address")
        self.feeds = SnapshotFeeds(self._snapshot_of, EVENTS_INTERVAL, max_total=c.http_max_streams,
                                   max_per_user=c.http_max_streams_per_user)
        self.app = self._make_app()

    # -- lifecycle ------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._same_site])
        r = app.router
        r.add_get("/", self._index)
        r.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
        r.add_get("/api/openapi.json", self._openapi)
        r.add_get("/api/whoami", self._whoami)
        r.add_get("/api/snapshot", self._snapshot)
        r.add_get("/api/events", self._events)
        r.add_post("/tasks", self._post_tasks)
        r.add_get("/tasks", self._list_tasks)
        r.add_get("/tasks/file/{job_id}", self._job_file)
        r.add_get("/tasks/{id}", self._get_task)
        r.add_patch("/tasks/{id}", self._patch_task)
        r.add_delete("/tasks/{id}", self._delete_task)
        r.add_get("/workers", self._list_workers)
        r.add_post("/workers", self._post_worker)
        r.add_get("/workers/{id}", self._get_worker)
        r.add_patch("/workers/{id}", self._patch_worker)
        r.add_get("/sessions", self._list_sessions)
        r.add_get("/sessions/{id}", self._get_session)
        r.add_get("/credits", self._credits)
        return app

    async def start(self) -> int:
        c = self.hub.config
        # keepalive_timeout: an idle connection (no request under way) is closed after it.
        self._runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=c.http_idle_timeout)
        await self._runner.setup()
        assert self._runner.server is not None
        factory = guarded_http(self._runner.server, self.caps, self.log, c.http_header_timeout)
        self._listener = await asyncio.get_running_loop().create_server(
            factory, self.host, self.port, ssl=self.tls, reuse_address=True)
        sock = self._listener.sockets[0]
        self.port = sock.getsockname()[1]
        scheme = "https" if self.tls else "http"
        log.info("HTTP API and status page on %s://%s:%s/", scheme, self.host, self.port)
        return self.port

    async def close(self) -> None:
        await self.feeds.close()
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- plumbing -------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as exc:
            resp = _error(exc.status, exc.code, exc.message)
            if exc.status == 401:  # nothing more to say to a caller without a token: free the connection
                resp.force_close()
            return resp
        except web.HTTPRequestEntityTooLarge as exc:
            return _error(413, "too_large", f"request body is larger than {MAX_BODY_BYTES} bytes ({exc.text})")
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: say so, do not leak a traceback page
            log.exception("HTTP %s %s failed", request.method, request.path)
            return _error(500, "internal", f"hub error: {type(exc).__name__}")

    @web.middleware
    async def _same_site(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        """A browser sends ``Origin`` with every cross-site POST (forms and no-cors
        fetches included): one that is not the hub's own may not change state."""
        origin = request.headers.get("Origin")
        if request.method in STATE_CHANGING and origin is not None and not _same_origin(request):
            raise HttpError(403, "cross_site", f"refused: Origin {origin[:100]!r} is not this hub's own "
                                               f"({_own_origin(request)!r}); a page on another site may not "
                                               "change the farm")
        return await handler(request)

    def _who(self, request: web.Request) -> Principal:
        token = auth.bearer(request.headers.get("Authorization"))
        if token is None:
            user = self._trusted_user(request.remote)
            if user is not None:
                if CLIENT_HEADER not in request.headers and not _same_origin(request):
                    raise HttpError(403, "cross_site",
                                    f"a call without a token from a --http-trust address must send the header "
                                    f"{CLIENT_HEADER} (any value) or come from the hub's own page: a web page "
                                    "on another site cannot send it")
                return Principal(token_id=TRUST_TOKEN_ID, role="client", user=user)
            raise HttpError(401, "unauthorized", "missing token: send 'Authorization: Bearer <token>'")
        who = auth.authenticate(self.hub.store, token)
        if not isinstance(who, Principal):
            raise HttpError(401, "unauthorized", who)
        if who.role == "daemon":
            raise HttpError(403, "forbidden", "daemon tokens do not use the HTTP API (daemons use the websocket)")
        return who

    def _trusted_user(self, remote: Optional[str]) -> Optional[str]:
        if not remote or not self.trust:
            return None
        try:
            ip = ipaddress.ip_address(remote)
        except ValueError:
            return None
        for net, user in self.trust:
            if ip.version == net.version and ip in net:
                return user
        return None

    async def _ask(self, who: Principal, make: Callable[[int], Any]) -> Any:
        """One request to the core as ``who``; its reply, or HttpError for an ``error``."""
        rid = next(self._rids)
        msg = make(rid)
        if type(msg) not in p.ALLOWED[who.role]:
            raise HttpError(403, "forbidden", f"a {who.role} token may not {msg.__struct_config__.tag}")
        return await self._round_trip(who, rid, lambda pid: self.hub.submit(pid, msg))

    async def _round_trip(self, who: Principal, rid: int, deliver: Callable[[int], None]) -> Any:
        """``deliver(pid)`` an event from a pseudo-peer of ``who``; the core's reply to ``rid``."""
        peer = _OneReply(rid)
        pid = self.hub.attach(peer, who)
        try:
            deliver(pid)
            reply = await asyncio.wait_for(peer.future, REPLY_TIMEOUT)
        except asyncio.TimeoutError:
            raise HttpError(504, "timeout", f"the hub did not answer within {REPLY_TIMEOUT:.0f} s") from None
        finally:
            self.hub.detach(pid)
        if isinstance(reply, p.Error):
            raise HttpError(_CORE_STATUS.get(reply.code, 400), reply.code, reply.message)
        return reply

    async def _task_id(self, who: Principal, given: str) -> str:
        """A task named by its HWF id or by the caller's own id (``external_id``)."""
        if given.startswith("t-"):
            return given
        try:
            ext = msgspec.convert(given, p.ExternalId)
        except msgspec.ValidationError:
            raise HttpError(404, "not_found", f"unknown task {given[:80]!r}") from None
        got = await self._ask(who, lambda rid: p.ListTasks(id=rid, external_id=ext, limit=1, include_hidden=True))
        if not got.tasks:
            raise HttpError(404, "not_found", f"unknown task {given[:80]!r}")
        return got.tasks[0].task_id

    async def _record(self, who: Principal, task_id: str) -> p.TaskRecord:
        res = await self._ask(who, lambda rid: p.GetResults(id=rid, task_ids=[task_id]))
        return res.tasks[0]

    # -- pages ------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(self.hub.config.limits))

    async def _whoami(self, request: web.Request) -> web.Response:
        who = self._who(request)
        return web.json_response({"user": who.user, "role": who.role})

    # -- tasks ------------------------------------------------------------------

    async def _post_tasks(self, request: web.Request) -> web.Response:
        who = self._who(request)
        form, jobfile = await _read_body(request)
        job = shapes.job_request(form)  # HttpError-free: raises shapes.FieldError
        jobdata: Optional[p.DataSpec] = None
        if jobfile is not None:
            sha = await self._store_upload(who, jobfile)
            if job.job_id is not None:
                await self._ask(who, lambda rid: p.PutJobFile(id=rid, job_id=job.job_id, sha256=sha))
            jobdata = p.DataSpec(filename=shapes.JOBFILE_NAME, sha256=sha, size=len(jobfile))
        elif job.job_id is not None:
            got = await self._ask(who, lambda rid: p.GetJobFile(id=rid, job_id=job.job_id))
            if got.sha256 is not None and self.hub.blobs.has(got.sha256):  # sent with an earlier task of the job
                jobdata = p.DataSpec(filename=shapes.JOBFILE_NAME, sha256=got.sha256,
                                     size=self.hub.blobs.size(got.sha256))
        try:
            specs = compilers.compile_job(job.type, job.settings, priority=job.priority, parser=job.parser,
                                          job_id=job.job_id, external_id=job.external_id)
        except compilers.CompileError as exc:
            raise HttpError(422, "bad_job", str(exc)) from None
        if jobdata is not None:
            specs = [shapes.with_jobfile(s, jobdata) for s in specs]
        sub = await self._ask(who, lambda rid: p.Submit(id=rid, tasks=specs, session_id=job.session_id))
        res = await self._ask(who, lambda rid: p.GetResults(id=rid, task_ids=sub.task_ids))
        tasks = [shapes.task(r) for r in res.tasks]
        body = tasks[0] if len(tasks) == 1 else {"job_id": job.job_id, "session_id": sub.session_id, "tasks": tasks}
        return web.json_response(body, status=202)

    async def _store_upload(self, who: Principal, data: bytes) -> str:
        limits = self.hub.config.limits
        if len(data) > limits.max_file_bytes:
            raise HttpError(413, "too_large", f"jobfile of {len(data)} bytes exceeds max_file_bytes={limits.max_file_bytes}")
        sha = hashlib.sha256(data).hexdigest()
        if not self.hub.blobs.has(sha):
            try:
                w = self.hub.blobs.writer(sha, len(data))
                w.write(data)
                await asyncio.to_thread(w.finish)
            except BlobError as exc:
                raise HttpError(507 if "full" in str(exc) else 400, "bad_blob", str(exc)) from None
        await self._stored(who, sha)
        return sha

    async def _stored(self, who: Principal, sha: str) -> None:
        """Tell the core ``who`` uploaded ``sha`` (it grants access), as a websocket upload does."""
        rid = next(self._rids)
        await self._round_trip(who, rid, lambda pid: self.hub.blob_stored(pid, rid, sha))

    async def _list_tasks(self, request: web.Request) -> web.Response:
        who = self._who(request)
        q = shapes.task_query(request.query)
        got = await self._ask(who, lambda rid: p.ListTasks(id=rid, **q))
        return web.json_response({"tasks": [shapes.task(t) for t in got.tasks], "total": got.total,
                                  "offset": q["offset"], "limit": q["limit"]})

    async def _get_task(self, request: web.Request) -> web.Response:
        who = self._who(request)
        tid = await self._task_id(who, request.match_info["id"])
        return web.json_response(shapes.task(await self._record(who, tid), full=True))

    async def _patch_task(self, request: web.Request) -> web.Response:
        who = self._who(request)
        tid = await self._task_id(who, request.match_info["id"])
        form, _ = await _read_body(request)
        change = shapes.task_patch(form)
        if "priority" in change:
            await self._ask(who, lambda rid: p.UpdateTask(id=rid, task_id=tid, priority=change["priority"]))
        if change.get("status") == "cancelled":
            await self._ask(who, lambda rid: p.Cancel(id=rid, task_ids=[tid]))
        return web.Response(status=204)

    async def _delete_task(self, request: web.Request) -> web.Response:
        who = self._who(request)
        tid = await self._task_id(who, request.match_info["id"])
        rec = await self._record(who, tid)
        if rec.status not in p.TERMINAL_STATES:
            await self._ask(who, lambda rid: p.Cancel(id=rid, task_ids=[tid]))
        await self._ask(who, lambda rid: p.UpdateTask(id=rid, task_id=tid, hidden=True))
        rec = await self._record(who, tid)
        return web.json_response(shapes.task(rec), status=202)

    async def _job_file(self, request: web.Request) -> web.Response:
        who = self._who(request)
        job_id = shapes.external_id(request.match_info["job_id"], "job_id")
        got = await self._ask(who, lambda rid: p.GetJobFile(id=rid, job_id=job_id))
        return web.json_response({"file": got.sha256 is not None})

    # -- workers ----------------------------------------------------------------

    async def _pool(self, who: Principal) -> list[p.MachineInfo]:
        got = await self._ask(who, lambda rid: p.GetPool(id=rid, include_offline=True))
        return got.machines

    async def _list_workers(self, request: web.Request) -> web.Response:
        who = self._who(request)
        return web.json_response({m.machine_id: shapes.worker(m) for m in await self._pool(who)})

    async def _get_worker(self, request: web.Request) -> web.Response:
        who = self._who(request)
        wid = request.match_info["id"]
        for m in await self._pool(who):
            if m.machine_id == wid:
                return web.json_response(shapes.worker(m, full=True))
        raise HttpError(404, "not_found", f"unknown worker {wid[:80]!r}")

    async def _post_worker(self, request: web.Request) -> web.Response:
        self._who(request)
        raise HttpError(400, "use_websocket",
                        "daemons register themselves over the hub's websocket: run "
                        "`hwf daemon --hub ws://HUB:8765 --token-file daemon.token` on the machine "
                        "(an admin makes the token with `hwf token create --role daemon --user OWNER`)")

    async def _patch_worker(self, request: web.Request) -> web.Response:
        who = self._who(request)
        wid = request.match_info["id"]
        form, _ = await _read_body(request)
        status = shapes.worker_patch(form)
        if not who.is_admin:
            raise HttpError(403, "forbidden", "only an admin token may enable, disable or drain workers")
        try:
            machine_id = msgspec.convert(wid, p.Name)
        except msgspec.ValidationError:
            raise HttpError(404, "not_found", f"unknown worker {wid[:80]!r}") from None
        await self._ask(who, lambda rid: p.SetMachine(id=rid, machine_id=machine_id, status=status))
        return web.Response(status=204)

    # -- sessions, credits, the live page ------------------------------------------

    async def _list_sessions(self, request: web.Request) -> web.Response:
        who = self._who(request)
        return web.json_response({"sessions": await self._sessions(who)})

    async def _sessions(self, who: Principal) -> list[dict[str, Any]]:
        got = await self._ask(who, lambda rid: p.ListSessions(id=rid))
        return [shapes.session(msgspec.structs.asdict(r)) for r in got.sessions]

    async def _get_session(self, request: web.Request) -> web.Response:
        who = self._who(request)
        sid = request.match_info["id"]
        try:
            sid = msgspec.convert(sid, p.Id)
        except msgspec.ValidationError:
            raise HttpError(404, "not_found", f"unknown session {sid[:80]!r}") from None
        got = await self._ask(who, lambda rid: p.GetSession(id=rid, session_id=sid))
        return web.json_response(shapes.session({"session_id": got.session_id, "created": got.created,
                                                 "user": None, "counts": got.counts}, task_ids=got.task_ids))

    async def _credits(self, request: web.Request) -> web.Response:
        who = self._who(request)
        by = shapes.credit_group(request.query.get("by", "user"))
        got = await self._ask(who, lambda rid: p.GetCreditTally(id=rid, by=by))
        return web.json_response({"by": got.by, "rows": [shapes.credit_row(r) for r in got.rows]})

    async def _snapshot_of(self, who: Principal) -> dict[str, Any]:
        """What the page shows: small fields and counts only (``brief``: no stages,
        outputs or values are loaded, however big the tasks' results are)."""
        tasks = await self._ask(who, lambda rid: p.ListTasks(id=rid, limit=SNAPSHOT_TASKS, brief=True))
        pool = await self._pool(who)
        credit_rows = None
        try:
            tally = await self._ask(who, lambda rid: p.GetCreditTally(id=rid, by="user"))
            credit_rows = [shapes.credit_row(r) for r in tally.rows] or None
        except HttpError:
            credit_rows = None
        return {"time": time.time(), "user": who.user, "role": who.role, "sessions": await self._sessions(who),
                "tasks": [shapes.task(t) for t in tasks.tasks],
                "workers": {m.machine_id: shapes.worker(m) for m in pool}, "credits": credit_rows}

    async def _snapshot(self, request: web.Request) -> web.Response:
        return web.json_response(await self._snapshot_of(self._who(request)))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: a ``snapshot`` whenever what this caller sees changed.

        Every stream of one user reads the same snapshot, computed once per
        interval (``snapfeed.py``); streams are capped per user and in total."""
        who = self._who(request)
        problem = self.feeds.room_for(who)
        if problem is not None:
            raise HttpError(429, "too_many_streams", problem)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        try:
            async with self.feeds.subscribe(who) as feed:
                await resp.prepare(request)
                seen, last_sent = -1, time.monotonic()
                while True:
                    version, data = await feed.next(seen, EVENTS_RECHECK)
                    # The token is checked again each round: a revoked (or expired)
                    # token must not keep watching the farm on a stream it opened before.
                    self._who(request)
                    now = time.monotonic()
                    if version != seen:
                        seen, last_sent = version, now
                        await resp.write(b"event: snapshot\ndata: " + data + b"\n\n")
                    elif now - last_sent > EVENTS_PING:
                        last_sent = now
                        await resp.write(b": ping\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        except HttpError as exc:  # e.g. the token was revoked meanwhile, or too many streams
            if not resp.prepared:
                raise
            try:
                await resp.write(b"event: error\ndata: " + json.dumps({"error": exc.code, "message": exc.message}).encode()
                                 + b"\n\n")
            except ConnectionResetError:
                pass
        return resp


_PAGE_HEADERS = {
    # Everything the page needs is served from here: no CDN, no inline scripts.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _own_origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}".lower()


def _same_origin(request: web.Request) -> bool:
    """``Origin`` is the hub's own (its page calling it), as the browser addressed it."""
    origin = request.headers.get("Origin")
    return origin is not None and origin.lower() == _own_origin(request)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


async def _read_body(request: web.Request) -> tuple[dict[str, Any], Optional[bytes]]:
    """A body as fields, whatever its encoding: JSON object, form or multipart
    (``jobfile`` comes back as bytes)."""
    ctype = request.content_type
    if not request.can_read_body:
        return {}, None
    if ctype == "application/json":
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HttpError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "bad_json", "the body must be a JSON object")
        return body, None
    if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        fields: dict[str, Any] = {}
        jobfile = None
        try:
            post = await request.post()
        except (ValueError, HttpProcessingError, UnicodeDecodeError, AssertionError) as exc:
            raise HttpError(400, "bad_body", f"the {ctype} body does not parse: {type(exc).__name__}: "
                                             f"{str(exc)[:200]}") from None
        for key, value in post.items():
            if isinstance(value, web.FileField):
                if key != "jobfile":
                    raise HttpError(422, "bad_field", f"{key}: only 'jobfile' may be a file")
                jobfile = value.file.read()
            else:
                fields[key] = value
        return fields, jobfile
    raise HttpError(415, "unsupported_media_type",
                    f"send application/json, application/x-www-form-urlencoded or multipart/form-data, not {ctype!r}")

"""``Hub``: the client's handle on a hub (seed 000's class, implemented in full).

Every coroutine runs on the client's background I/O loop, so it can be
awaited from any loop (a notebook cell's top-level ``await`` included); each
has a blocking ``<name>_sync`` twin.  The websocket is opened on first use
and reopened after a drop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Mapping, Optional, TypeVar, Union
from urllib.parse import urlsplit

from hub_server import protocol as p
from hub_server.link import (
    AccessRefused, ConnectError, HubError, Link, LinkClosed, RemoteError, SSLArg, client_tls, normalize_url,
)
from hub_server.paths import unsafe_relative_path

from ._ioloop import on_io_loop, sync_twin

from .functions import FunctionClient, PyFuture, make_options, task_ids_async
from .functions import gather_async as _gather_async
from .functions import gather_sync as _gather_sync
from .functions import map_calls as _map_calls
from .functions import submit as _submit_call
from .jobs import DataArg
from .jobs import submit_job as _submit_job
from .results import HardwarePool, ResultList

if TYPE_CHECKING:
    import pandas as pd

    from .dispatch import Submission

T = TypeVar("T")
TaskIds = Union[str, Iterable[str], Iterable[PyFuture]]
log = logging.getLogger("hwf.client")
EventCallback = Callable[[p.TaskEvent], None]
OutputCallback = Callable[[p.Output], None]
SnapshotCallback = Callable[[list[p.TaskBrief]], None]


class Watcher:
    """Live events for some tasks or a session; callbacks run on HWF's I/O thread.

    After a dropped connection the watch is renewed and ``on_snapshot`` gets
    the current state again, so nothing that happened meanwhile is missed.
    """

    def __init__(self, hub: "Hub", task_ids: list[str], session_id: Optional[str], output: bool,
                 on_event: Optional[EventCallback], on_output: Optional[OutputCallback],
                 on_snapshot: Optional[SnapshotCallback]) -> None:
        self.hub, self.task_ids, self.session_id, self.output = hub, task_ids, session_id, output
        self.on_event, self.on_output, self.on_snapshot = on_event, on_output, on_snapshot
        self.snapshot: list[p.TaskBrief] = []
        self.watch_id: Optional[int] = None
        self.closed = False

    def _call(self, fn: Optional[Callable[[Any], None]], arg: Any) -> None:
        if fn is None:
            return
        try:
            fn(arg)
        except Exception:  # a widget bug must not kill the connection
            log.exception("error in an HWF watch callback")

    async def _subscribe(self, link: Link) -> None:
        rid = link.next_id()
        self.hub._watchers[rid] = self
        try:
            reply = await link.request(p.Watch(id=rid, task_ids=self.task_ids, session_id=self.session_id,
                                               output=self.output))
        except BaseException:
            self.hub._watchers.pop(rid, None)
            raise
        self.watch_id = rid
        self.snapshot = reply.tasks
        self._call(self.on_snapshot, reply.tasks)

    @on_io_loop
    async def close(self) -> None:
        self.closed = True
        wid, self.watch_id = self.watch_id, None
        if wid is not None and self.hub._watchers.pop(wid, None) is not None:
            link = self.hub._link
            if link is not None and link.is_open:
                try:
                    await link.request(p.Unwatch(id=link.next_id(), watch=wid))
                except HubError:
                    pass

    close_sync = sync_twin(close)


class Session:
    """A session: every task dispatched into it, with counts per state."""

    def __init__(self, hub: "Hub", info: p.SessionInfo) -> None:
        self.hub = hub
        self.session_id = info.session_id
        self.created = info.created
        self.task_ids = list(info.task_ids)
        self.counts = dict(info.counts)

    @property
    def done(self) -> bool:
        return sum(self.counts.get(s, 0) for s in p.TERMINAL_STATES) == len(self.task_ids)

    async def results(self, wait: bool = False, timeout: Optional[float] = None) -> ResultList:
        return await self.hub.get_result(self.task_ids, wait=wait, timeout=timeout)

    def results_sync(self, wait: bool = False, timeout: Optional[float] = None) -> ResultList:
        return self.hub.get_result_sync(self.task_ids, wait=wait, timeout=timeout)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"<Session {self.session_id}: {len(self.task_ids)} task(s) {counts}>"


def _id_list(ids: TaskIds) -> list[str]:
    if isinstance(ids, str):
        return [ids]
    out = list(ids)
    for i in out:
        if not isinstance(i, str):
            raise TypeError(f"task ids are strings, got {i!r}")
    return out


def _submit_chunks(specs: list[p.TaskSpec], limits: p.Limits) -> list[list[p.TaskSpec]]:
    """Split a submission so each message stays under the hub's count and size limits."""
    budget = int(limits.max_message_bytes * 0.8)
    chunks: list[list[p.TaskSpec]] = [[]]
    size = 0
    for spec in specs:
        n = len(p.encode(spec)) + 1
        if n > budget:
            raise RemoteError("too_large", f"one task encodes to {n} bytes, above the hub's message limit "
                                           f"({limits.max_message_bytes} bytes): send big inputs as Data files")
        if chunks[-1] and (size + n > budget or len(chunks[-1]) >= limits.max_tasks_per_submit):
            chunks.append([])
            size = 0
        chunks[-1].append(spec)
        size += n
    return chunks


def artifact_destination(root: Path, task_id: str, name: str) -> Optional[Path]:
    """Where an artifact is saved: inside ``root/<task_id>/``, or None.

    The name comes from a daemon (untrusted) through the hub: it must be a
    relative path without '..' whose every parent, symlinks resolved, stays
    in the task's folder."""
    if unsafe_relative_path(task_id) or "/" in task_id or "\\" in task_id or unsafe_relative_path(name):
        return None
    folder = (root / task_id).resolve()
    dest = (folder / name).resolve()
    if dest == folder or not dest.is_relative_to(folder):
        return None
    return folder / name


class Hub:
    """A connection to an HWF hub.

    ``address`` may be ``"host"``, ``"host:port"``, ``"ws://host:port"`` or
    ``"wss://host:port"`` (TLS; ``ssl`` = a CA file or an ``SSLContext`` when
    the hub's certificate is not signed by a CA the system trusts);
    ``token`` defaults to the ``HWF_TOKEN`` environment variable.
    """

    def __init__(
        self,
        address: str = "127.0.0.1",
        token: Optional[str] = None,
        *,
        artifacts_dir: Union[str, os.PathLike] = "hwf_artifacts",
        connect_timeout: float = 10.0,
        reconnect_timeout: float = 120.0,
        ssl: SSLArg = None,
    ) -> None:
        self.url = normalize_url(address)
        # wss://: trust this CA file (or use this SSLContext); default: system CAs.
        self.ssl = client_tls(self.url, ssl)
        self.ip_address = urlsplit(self.url).hostname or ""
        self.token = token if token is not None else os.environ.get("HWF_TOKEN")
        self.artifacts_dir = Path(artifacts_dir)
        self.connect_timeout = connect_timeout
        # After a connection that worked drops, keep retrying (with backoff)
        # this long: a hub restart should not fail a waiting get_result.
        self.reconnect_timeout = reconnect_timeout
        self._ever_connected = False
        self._link: Optional[Link] = None
        self._connecting: Optional[asyncio.Future] = None
        self._watchers: dict[int, Watcher] = {}
        self._functions: Optional[FunctionClient] = None  # hub.submit's futures, made on first use
        # The last unfiltered pool and when it came: the HTML card shows it
        # (a repr must never wait on the network).
        self._pool_cache: Optional[tuple[HardwarePool, float]] = None

    def __repr__(self) -> str:
        state = "connected" if self._link is not None and self._link.is_open else "not connected"
        return f"<Hub {self.url} ({state})>"

    @property
    def status_url(self) -> Optional[str]:
        """The hub's status page (its Manager HTTP API), once connected; None if it serves none."""
        welcome = self._link.welcome if self._link is not None else None
        if welcome is None or welcome.http_port is None:
            return None
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss"):  # a unix: socket: the page is on the hub's own host
            return f"http://127.0.0.1:{welcome.http_port}/"
        host = parts.hostname or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if parts.scheme == 'wss' else 'http'}://{host}:{welcome.http_port}/"

    def _repr_html_(self) -> str:
        """A Dask-like card: address, state, workers/slots/memory from the last
        fetched pool, the status page link.  No network call."""
        from . import cards

        state = "connected" if self._link is not None and self._link.is_open else "not connected"
        pool, fetched = self._pool_cache or (None, None)
        pool_rows, sections = cards.pool_section(pool, fetched)
        rows = [("address", cards.code(self.url)), ("state", cards.esc(state)), *pool_rows]
        return cards.card("HWF Hub", rows, status_url=self.status_url, sections=sections)

    # -- connection (runs on the I/O loop) -----------------------------------

    async def _connected(self) -> Link:
        if self._link is not None and self._link.is_open:
            return self._link
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> Link:
        link = Link(self.url, self.token, agent="hwf-client", on_message=self._on_push, ssl=self.ssl)
        await link.connect(timeout=self.connect_timeout)
        self._link = link
        self._ever_connected = True
        renew = [w for w in set(self._watchers.values()) if not w.closed]
        self._watchers.clear()
        for w in renew:
            await w._subscribe(link)
        return link

    def _on_push(self, msg: Any) -> None:
        if isinstance(msg, (p.TaskEvent, p.Output)):
            w = self._watchers.get(msg.watch) if msg.watch is not None else None
            if w is not None:
                w._call(w.on_event if isinstance(msg, p.TaskEvent) else w.on_output, msg)

    async def _request(self, make: Any, *, idempotent: bool = True) -> Any:
        """Send ``make(request_id)`` and return the reply, reconnecting as
        ``_on_link`` does.  ``make`` is called per try, so it can recompute
        what depends on time (a wait's remaining timeout)."""
        return await self._on_link(lambda link: link.request(make(link.next_id())), idempotent=idempotent)

    async def _on_link(self, attempt: Callable[[Link], Awaitable[T]], *, idempotent: bool = True) -> T:
        """``attempt(link)`` on the open connection.

        If a connection that worked drops (hub restart, network blip), reconnect
        with backoff for up to ``reconnect_timeout`` s and try again -- only for
        work that is safe to repeat."""
        deadline: Optional[float] = None
        delay = 0.1
        while True:
            try:
                link = await self._connected()
                return await attempt(link)
            except (LinkClosed, ConnectError) as exc:
                if not (idempotent and self._ever_connected) or isinstance(exc, AccessRefused):
                    raise
                now = time.monotonic()
                deadline = deadline or now + self.reconnect_timeout
                if now >= deadline:
                    raise
                log.warning("hub %s unreachable; retrying in %.1fs", self.url, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @on_io_loop
    async def _request_any(self, make: Any) -> Any:
        """One request from a blocking caller (the CreditPiggy facade)."""
        return await self._request(make, idempotent=False)

    _request_sync = sync_twin(_request_any)

    @property
    def limits(self) -> p.Limits:
        return self._link.limits if self._link is not None else p.Limits()

    @on_io_loop
    async def connect(self) -> "Hub":
        """Open the connection now (it opens by itself on first use)."""
        await self._connected()
        return self

    @on_io_loop
    async def close(self) -> None:
        """Close the connection; futures still waiting fail with ``ConnectError``
        (their tasks go on: ``get_result`` finds them from a new Hub)."""
        if self._functions is not None:
            self._functions.close()
            self._functions = None
        if self._link is not None:
            await self._link.close()
            self._link = None

    # -- results ------------------------------------------------------------

    @on_io_loop
    async def get_result(
        self,
        job_ids: TaskIds,
        wait: bool = False,
        timeout: Optional[float] = None,
        *,
        download: bool = True,
    ) -> ResultList:
        """Results of tasks (ids, or futures of ``submit``/``map``);
        ``wait=True`` returns when all have ended.

        Waiting is event-driven: the hub answers when the last task ends (or
        ``timeout`` seconds pass, returning what is known then).
        """
        if isinstance(job_ids, PyFuture):
            job_ids = [job_ids]
        ids = _id_list(job_ids if isinstance(job_ids, str) else await task_ids_async(job_ids))
        if not ids:
            return ResultList()
        records: list[p.TaskRecord] = []
        # Results carry command output: ask in modest batches to keep replies small.
        batch = max(1, min(self.limits.max_results_per_request, 500))
        until = None if timeout is None else time.monotonic() + timeout

        def left() -> Optional[float]:
            return None if until is None else max(0.0, until - time.monotonic())

        for i in range(0, len(ids), batch):
            records.extend(await self._records(ids[i : i + batch], wait, left))
        results = ResultList.from_records(records)
        if download:
            await self._download_artifacts(results)
        return results

    async def _records(self, ids: list[str], wait: bool = False,
                       left: Callable[[], Optional[float]] = lambda: None) -> list[p.TaskRecord]:
        """Records of ``ids``; a batch whose reply would pass the hub's message
        limit (refused before it is built, naming --max-message-bytes) is asked
        for in halves."""
        try:
            reply = await self._request(lambda rid: p.GetResults(id=rid, task_ids=ids, wait=wait, timeout=left()))
        except RemoteError as exc:
            if exc.code != "limit" or "--max-message-bytes" not in str(exc) or len(ids) < 2:
                raise
            half = len(ids) // 2
            return await self._records(ids[:half], wait, left) + await self._records(ids[half:], wait, left)
        return reply.tasks

    async def _download_artifacts(self, results: ResultList) -> None:
        link = await self._connected()
        for r in results:
            for a in r.artifacts:
                if not a.ok or not a.name:
                    continue
                dest = artifact_destination(self.artifacts_dir, r.task_id, a.name)
                if dest is None:
                    a.error = f"refused to save artifact {a.name[:200]!r}: its name leaves the task's folder"
                    a.sha256 = None
                    continue
                if not (dest.is_file() and dest.stat().st_size == a.size):
                    try:
                        await link.download(a.sha256, dest)
                    except HubError as exc:
                        a.error = f"download failed: {exc}"
                        continue
                a.path = dest

    @on_io_loop
    async def get_hardware_pool(
        self, *hardware: Mapping[str, Any], include_offline: bool = False
    ) -> HardwarePool:
        """Machines matching any of the given hardware dicts (all with none)."""
        reply = await self._request(
            lambda rid: p.GetPool(id=rid, hardware=[dict(h) for h in hardware], include_offline=include_offline)
        )
        pool = HardwarePool.from_machines(reply.machines)
        if not hardware:
            self._pool_cache = (pool, time.time())
        return pool

    # -- credits ----------------------------------------------------------------

    @on_io_loop
    async def credit_tally(self, by: str = "owner") -> "pd.DataFrame":
        """Credit totals by ``machine``, ``owner``, ``user`` or ``session``, ranked.

        A client sees the slots of its own tasks and allocations; an admin, all."""
        from .tally import tally_frame

        if by not in ("machine", "owner", "user", "session"):
            raise ValueError(f"by must be machine, owner, user or session, not {by!r}")
        reply = await self._request(lambda rid: p.GetCreditTally(id=rid, by=by))
        return tally_frame(by, reply.rows)

    @on_io_loop
    async def credit_slots(self, state: Optional[str] = None, *, session: Optional[str] = None,
                           machine: Optional[str] = None, limit: int = 10_000) -> "pd.DataFrame":
        """One row per credit slot (yours; an admin's: all), oldest first."""
        from .tally import slots_frame

        reply = await self._request(lambda rid: p.GetCreditSlots(
            id=rid, state=state, session_id=session, machine=machine, limit=limit))
        return slots_frame(reply.slots)

    @on_io_loop
    async def credit_link(self, machine: str, user: str) -> dict[str, Any]:
        """Admin: link ``machine`` to ``user``; its pending credits are paid to them."""
        r = await self._request(lambda rid: p.CreditLink(id=rid, machine=machine, user=user), idempotent=False)
        return {"machine": r.machine, "user": r.user, "paid_credits": r.paid_credits, "paid_slots": r.paid_slots}

    # -- live events and sessions ---------------------------------------------

    @on_io_loop
    async def watch(
        self,
        task_ids: Optional[TaskIds] = None,
        *,
        session: Optional[str] = None,
        on_event: Optional[EventCallback] = None,
        on_output: Optional[OutputCallback] = None,
        on_snapshot: Optional[SnapshotCallback] = None,
        output: bool = False,
    ) -> Watcher:
        """Subscribe to live task events (and output, for tasks dispatched with
        ``stream=True``).  Callbacks run on HWF's I/O thread: keep them short."""
        if (task_ids is None) == (session is None):
            raise ValueError("watch takes task ids or session=, not both or neither")
        w = Watcher(self, _id_list(task_ids) if task_ids is not None else [], session, output,
                    on_event, on_output, on_snapshot)
        await w._subscribe(await self._connected())
        return w

    @on_io_loop
    async def session(self, session_id: str) -> Session:
        """A session's tasks and their counts per state (e.g. after a kernel restart)."""
        reply = await self._request(lambda rid: p.GetSession(id=rid, session_id=session_id))
        return Session(self, reply)

    @on_io_loop
    async def cancel(self, task_ids: Optional[TaskIds] = None, *, session: Optional[str] = None) -> dict[str, Any]:
        """Cancel unfinished tasks (by id, or a whole session).

        Running tasks are killed on their daemon (SIGTERM, then SIGKILL after
        a grace period) and never retried.  Returns the cancelled ids and
        counts by the state each task was in."""
        if (task_ids is None) == (session is None):
            raise ValueError("cancel takes task ids or session=, not both or neither")
        ids = _id_list(task_ids) if task_ids is not None else []
        reply = await self._request(lambda rid: p.Cancel(id=rid, task_ids=ids, session_id=session))
        return {"cancelled": reply.task_ids, "by_state": reply.by_state}

    # -- Python functions ----------------------------------------------------

    def submit(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        hardware: Optional[Mapping[str, Any]] = None,
        priority: int = 0,
        max_retries: int = 3,
        timeout: Optional[float] = None,
        track: Union[str, Iterable[str], bool] = "time",
        session: Optional[str] = None,
        label: Optional[str] = None,
        **kwargs: Any,
    ) -> PyFuture:
        """Run ``fn(*args, **kwargs)`` on a daemon; returns a future at once.

        ``fn`` and its arguments travel cloudpickled (an argument whose pickle
        exceeds 1 MiB is uploaded once as its own blob); the task needs a
        daemon running this client's Python major.minor (``runtime``
        requirement, added for you).  ``track``: ``"time,ram,cpu"``, a list,
        or True for all.  See :class:`PyFuture` for ``result()``, ``await``,
        ``cancel()`` and callbacks."""
        opts = make_options(hardware, priority, max_retries, timeout, track, session, label)
        return _submit_call(self, fn, args, kwargs, opts)

    def map(
        self,
        fn: Callable[..., Any],
        /,
        *iterables: Iterable[Any],
        hardware: Optional[Mapping[str, Any]] = None,
        priority: int = 0,
        max_retries: int = 3,
        timeout: Optional[float] = None,
        track: Union[str, Iterable[str], bool] = "time",
        session: Optional[str] = None,
        label: Optional[str] = None,
        chunksize: int = 1,
        **kwargs: Any,
    ) -> list[PyFuture]:
        """``fn(*items)`` for the items zipped from ``iterables`` (shortest wins,
        like ``map``), each a task; ``kwargs`` go to every call (a big one is
        pickled and uploaded once).  Sent in as few messages as the hub's
        limits allow; returns the futures in order, at once.

        ``chunksize=N`` runs N calls per task (as ``multiprocessing``'s and
        ipyparallel's ``map`` do): far less overhead for calls of a few
        milliseconds, still one future per call (its own value or exception);
        a chunk's calls share its task's timing and retries, and cancelling
        a call's future cancels the task once all of its chunk's are cancelled."""
        opts = make_options(hardware, priority, max_retries, timeout, track, session, label)
        return _map_calls(self, fn, iterables, kwargs, opts, chunksize)

    def gather(self, futures: Iterable[PyFuture], timeout: Optional[float] = None) -> list[Any]:
        """The futures' values, in order; raises the first exception met.
        Blocks (safe in a notebook cell); async code: ``await hub.gather_async(futures)``."""
        return _gather_sync(futures, timeout)

    async def gather_async(self, futures: Iterable[PyFuture]) -> list[Any]:
        """``gather`` for async code, on any event loop."""
        return await _gather_async(futures)

    # -- jobs (the Manager API's type + settings) -----------------------------

    @on_io_loop
    async def submit_job(
        self,
        type: str,
        settings: Mapping[str, Any],
        *,
        parser: Optional[str] = None,
        priority: int = 0,
        session: Optional[str] = None,
        data: Union["DataArg", Iterable["DataArg"], None] = None,
        job_id: Optional[str] = None,
        external_id: Optional[str] = None,
        stream: bool = False,
    ) -> "Submission":
        """Compile a job as the HTTP API's ``POST /tasks`` would and queue its tasks.

        ``type``: ``"shell"`` (one task) or ``"frames"`` (one task per chunk
        of a frame range; ``parser`` defaults to ``"frames"``), ``settings``
        as documented in ``hub_server.compilers``.  ``data``: local files
        (paths or ``Data``), uploaded once and saved into every task's
        directory (``settings["data"]`` picks some of them by name).  Bad
        settings raise ``CompileError`` naming the field, before any upload.
        Returns the task ids (a ``Submission``, with its ``session_id``)."""
        return await _submit_job(self, type, settings, parser=parser, priority=priority, session=session,
                                data=data, job_id=job_id, external_id=external_id, stream=stream)

    # -- submission (used by dispatch) --------------------------------------

    async def _upload_missing(self, files: dict[Path, tuple[str, int]]) -> None:
        link = await self._connected()
        for path, (sha, size) in files.items():
            if size > link.limits.max_file_bytes:
                raise RemoteError(
                    "too_large",
                    f"Data file {str(path)!r} is {size} bytes, above the hub's "
                    f"max_file_bytes={link.limits.max_file_bytes}",
                )
        by_sha = {sha: path for path, (sha, _) in files.items()}
        for sha in await link.missing_blobs(list(by_sha)):
            await link.upload(by_sha[sha], sha)

    async def _submit(self, specs: list[p.TaskSpec], session: Optional[str]) -> tuple[str, list[str]]:
        link = await self._connected()
        ids: list[str] = []
        for chunk in _submit_chunks(specs, link.limits):
            key = uuid.uuid4().hex  # a resend after a dropped link returns the same ids
            reply = await self._request(
                lambda rid, c=chunk, k=key, s=session: p.Submit(id=rid, tasks=c, session_id=s, key=k)
            )
            session = reply.session_id
            ids.extend(reply.task_ids)
        assert session is not None
        return session, ids

    connect_sync = sync_twin(connect)
    close_sync = sync_twin(close)
    get_result_sync = sync_twin(get_result)
    get_hardware_pool_sync = sync_twin(get_hardware_pool)
    watch_sync = sync_twin(watch)
    cancel_sync = sync_twin(cancel)
    session_sync = sync_twin(session)
    credit_tally_sync = sync_twin(credit_tally)
    credit_slots_sync = sync_twin(credit_slots)
    credit_link_sync = sync_twin(credit_link)
    submit_job_sync = sync_twin(submit_job)


__all__ = ["Hub", "HubError", "ConnectError", "PyFuture", "RemoteError", "Session", "Watcher"]

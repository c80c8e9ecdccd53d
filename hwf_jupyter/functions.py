"""``hub.submit`` / ``hub.map`` / ``hub.gather``: Python functions as tasks.

The caller's thread pickles (so a call captures its arguments as they are
now, and an unpicklable one fails right there) and hands the tasks to
HWF's I/O thread, where ``FunctionClient`` does the network work:

* **batching**: whatever was submitted while the previous batch was on
  its way goes in the next ``submit`` message(s), so a loop of
  ``hub.submit`` calls costs few messages, and a ``map`` one per 20,000;
* **blobs**: large arguments and pickles are uploaded once (the hub is asked
  which it lacks first);
* **one watch per accepted batch** (not a poll per future): a terminal
  event queues the task for one batched ``get_results``, whose records
  complete the futures (values unpickled, remote exceptions rebuilt);
* **reconnects**: after a dropped link, it reconnects (the watches are
  renewed with a snapshot, so nothing that ended meanwhile is missed), or
  fails the pending futures with ``ConnectError`` after
  ``hub.reconnect_timeout`` seconds.

Every function task is pinned to daemons with runtime ``python<major.minor>``
of this interpreter (see pycall.py).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Union

import cloudpickle
import msgspec

from hub_server import hardware as hw
from hub_server import protocol as p
from hub_server.link import ConnectError, HubError

from ._ioloop import io_loop
from .futures import PyFuture
from . import _chunkcall
from .pycall import (
    RUNTIME,
    CallEncoder,
    RemoteException,
    RemoteTraceback,
    TaskFailed,
    describe,
    is_error,
    load_value,
    remote_exception,
    send_local_module_by_value,
    with_local_source,
)
from .results import TaskResult
from .task import TaskError

if TYPE_CHECKING:
    from .hub import Hub, Watcher

log = logging.getLogger("hwf.functions")
# Daemons need not have hwf_jupyter: a chunk's runner travels with its code.
cloudpickle.register_pickle_by_value(_chunkcall)

TRACKS = ("time", "ram", "cpu", "gpu")
FETCH_BATCH = 500  # ids per get_results: records carry stdout, keep replies modest
# While more tasks are still running, a fetch waits this long for others to
# end, so a map's results come in a few large get_results, not one per task
# (each costs the hub a store read); a lone task is fetched at once.
FETCH_GATHER_SECONDS = 0.02
STAGE_NAME = "python"
MAX_CHUNKSIZE = 100_000  # calls in one task of a chunked map


# ----------------------------------------------------------- building tasks


@dataclass(frozen=True)
class Options:
    """What ``submit``/``map`` take besides the call, checked in the caller's thread."""

    hardware: dict[str, Any]
    priority: int = 0
    max_retries: int = 3
    timeout: Optional[float] = None
    track: tuple[str, ...] = ("time",)
    session: Optional[str] = None
    label: Optional[str] = None


def make_options(hardware: Optional[Mapping[str, Any]], priority: int, max_retries: int,
                 timeout: Optional[float], track: Union[str, Iterable[str], bool], session: Optional[str],
                 label: Optional[str] = None) -> Options:
    """Validate the options (a mistake raises ``TaskError`` naming it) and
    add the ``runtime`` requirement of this Python."""
    req = dict(hardware or {})
    given = req.pop("runtime", None)
    if given not in (None, "any", RUNTIME):
        raise TaskError(f"hardware runtime={given!r}: a Python function pickled by this client needs "
                        f"runtime={RUNTIME!r} (the daemon's worker must run Python {RUNTIME[6:]})")
    try:
        hw.normalize(req)
    except hw.HardwareError as exc:
        raise TaskError(str(exc)) from None
    req["runtime"] = RUNTIME
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TaskError(f"priority must be a whole number, got {priority!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= 100:
        raise TaskError(f"max_retries must be a whole number from 0 to 100, got {max_retries!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise TaskError(f"timeout must be > 0 seconds, got {timeout!r}")
    if track is True:
        tracks: tuple[str, ...] = TRACKS
    elif track is False or track is None:
        tracks = ()
    else:
        items = track.split(",") if isinstance(track, str) else list(track)
        tracks = tuple(t.strip() for t in items if t.strip())
        unknown = sorted(set(tracks) - set(TRACKS))
        if unknown:
            raise TaskError(f"track: unknown measure(s) {', '.join(unknown)} (use {', '.join(TRACKS)})")
    if session is not None and not isinstance(session, str):
        raise TaskError(f"session must be a session id string, got {session!r}")
    return Options(req, priority, max_retries, None if timeout is None else float(timeout), tracks, session, label)


def task_spec(encoded: Any, sizes: Mapping[str, int], opts: Options, label: str) -> p.TaskSpec:
    """The task of one encoded call: a single stage running it on a warm worker."""
    stage = p.StageSpec(
        name=STAGE_NAME, cmds=[], data=encoded.data_specs(sizes), call=encoded.py_call(),
        track_time="time" in opts.track, track_ram="ram" in opts.track,
        track_cpu="cpu" in opts.track, track_gpu="gpu" in opts.track,
    )
    return p.TaskSpec(stages=[stage], hardware=opts.hardware, priority=opts.priority,
                      max_retries=opts.max_retries, timeout=opts.timeout, label=opts.label or label)


@dataclass
class Batch:
    """Tasks pickled by one ``submit``/``map`` call, waiting for the I/O thread."""

    futures: list[PyFuture]
    specs: list[p.TaskSpec]
    blobs: dict[str, bytes]
    session: Optional[str]


def build_batch(calls: Iterable[tuple[Callable[..., Any], tuple, dict]], opts: Options,
                on_cancel: Callable[[PyFuture], None], pins: Optional[list[str]] = None) -> Batch:
    """Pickle every call (raising ``TypeError`` for one that does not pickle);
    ``pins``: one daemon name per call, for calls that must run there."""
    enc = CallEncoder()
    futures, specs = [], []
    for i, (fn, args, kwargs) in enumerate(calls):
        if not callable(fn):
            raise TypeError(f"submit takes a callable first, got {fn!r}")
        encoded = enc.encode(fn, args, kwargs)
        label = describe(fn)
        spec = task_spec(encoded, enc.sizes, opts, label)
        if pins is not None:
            spec = msgspec.structs.replace(spec, hardware=dict(spec.hardware, daemon=pins[i]))
        specs.append(spec)
        futures.append(PyFuture(opts.label or label, on_cancel=on_cancel))
    return Batch(futures, specs, enc.blobs, opts.session)


# ------------------------------------------------------------ task outcome


def outcome(rec: p.TaskRecord) -> tuple[str, Any]:
    """What a terminal record means for its future, with no I/O:
    ``("value", v)``, ``("download", artifact sha256)``, ``("error", exc)``
    or ``("cancelled", None)``."""
    value = rec.value
    if rec.status == "cancelled":
        return "cancelled", None
    if is_error(value):
        return "error", remote_exception(value)
    if rec.status == "finished" and value is not None:
        if value.pickled is not None:
            return "value", base64.b64decode(value.pickled)
        if value.artifact is not None:
            for a in rec.artifacts:
                if a.name == value.artifact and a.sha256 is not None and a.error is None:
                    return "download", a.sha256
            return "error", TaskFailed(
                f"task {rec.task_id}: its value was too large to send inline and its artifact "
                f"{value.artifact!r} did not reach the hub", task_id=rec.task_id, status=rec.status)
    why = rec.error or rec.reason or "no value was returned"
    if rec.status == "finished":
        why = "it finished without a value (was it a Python call?)"
    return "error", TaskFailed(f"task {rec.task_id} {rec.status}: {why}", task_id=rec.task_id,
                               status=rec.status, reason=rec.reason)


# --------------------------------------------------------- the I/O side


@dataclass
class _Watch:
    watcher: Optional["Watcher"] = None
    remaining: set[str] = field(default_factory=set)


class FunctionClient:
    """A hub's function futures: lives on the I/O loop (except ``enqueue`` and
    ``request_cancel``, which only hand work over to it)."""

    def __init__(self, hub: "Hub") -> None:
        self.hub = hub
        self.session_id: Optional[str] = None  # the hub session of this client's function tasks
        self._queue: list[Batch] = []
        self._flushing: Optional[asyncio.Task] = None
        self._futures: dict[str, PyFuture] = {}  # task id -> pending future
        self._watch_of: dict[str, _Watch] = {}  # task id -> its batch's watch
        self._ended: dict[str, None] = {}  # task ids to fetch (ordered set)
        self._fetching: Optional[asyncio.Task] = None
        self._cancel: dict[str, None] = {}
        self._cancelling: Optional[asyncio.Task] = None
        self._guard: Optional[asyncio.Task] = None
        self.closed = False
        # Counters, for tests and curiosity: messages this client sent.
        self.stats = {"submits": 0, "watches": 0, "fetches": 0, "uploads": 0, "upload_bytes": 0}

    # -- from any thread -------------------------------------------------------

    def enqueue(self, batch: Batch) -> None:
        io_loop().loop.call_soon_threadsafe(self._add, batch)

    def request_cancel(self, fut: PyFuture) -> None:
        io_loop().loop.call_soon_threadsafe(self._cancel_one, fut)

    # -- submitting ----------------------------------------------------------------

    def _add(self, batch: Batch) -> None:
        if self.closed:
            for f in batch.futures:
                f._refused(ConnectError("the Hub was closed before these tasks were sent"))
            return
        self._queue.append(batch)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        while self._queue:
            batches, self._queue = self._queue, []
            by_session: dict[Optional[str], list[Batch]] = {}
            for b in batches:
                by_session.setdefault(b.session, []).append(b)
            for session, group in by_session.items():
                try:
                    await self._send(session, group)
                except Exception as exc:  # the hub refused, or it is unreachable
                    for b in group:
                        for f in b.futures:
                            if f.task_id is None:
                                f._refused(exc)
                            elif self._futures.pop(f.task_id, None) is not None:
                                f._settle(exc=exc)  # accepted, but it could not be watched

    async def _upload(self, blobs: dict[str, bytes]) -> None:
        if not blobs:
            return
        link = await self.hub._connected()
        limit = link.limits.max_file_bytes
        for sha, data in blobs.items():
            if len(data) > limit:
                raise TaskError(f"a pickled argument or call is {len(data)} bytes, above the hub's "
                                f"max_file_bytes={limit}: send it as a Data file of a shell task, or split it")
        for sha in await link.missing_blobs(list(blobs)):
            data = blobs[sha]
            with tempfile.TemporaryFile(prefix="hwf-arg-") as f:
                await asyncio.to_thread(f.write, data)
                f.flush()
                await link.upload(f, sha, name=f"pickled argument {sha[:12]}…")
            self.stats["uploads"] += 1
            self.stats["upload_bytes"] += len(data)

    async def _send(self, session: Optional[str], group: list[Batch]) -> None:
        blobs: dict[str, bytes] = {}
        for b in group:
            blobs.update(b.blobs)
        await self._upload(blobs)
        for b in group:
            b.blobs = {}  # let big pickles go as soon as they are on the hub
        futures = [f for b in group for f in b.futures]
        specs = [s for b in group for s in b.specs]
        own = session is None
        session_id, ids = await self.hub._submit(specs, self.session_id if own else session)
        self.stats["submits"] += 1
        if own:
            self.session_id = session_id
        step = self.hub.limits.max_results_per_request
        chunks = [ids[i : i + step] for i in range(0, len(ids), step)]
        watches = [_Watch(remaining=set(chunk)) for chunk in chunks]
        for chunk, watch in zip(chunks, watches):
            for tid in chunk:
                self._watch_of[tid] = watch
        for f, tid in zip(futures, ids):
            f._accepted(tid, session_id)
            if f.cancelled():  # cancelled before the hub knew it
                self._cancel[tid] = None
            else:
                self._futures[tid] = f
        self._kick_cancel()
        self._ensure_guard()
        for chunk, watch in zip(chunks, watches):
            # The snapshot in the reply reports tasks that ended before the
            # watch began, so subscribing after the submit misses nothing.
            watch.watcher = await self.hub._on_link(
                lambda link, chunk=chunk: self.hub.watch(chunk, on_event=self._on_event, on_snapshot=self._on_snapshot))
            self.stats["watches"] += 1
            self._close_watch_if_done(watch)

    # -- completion --------------------------------------------------------------------

    def _on_event(self, ev: p.TaskEvent) -> None:
        if ev.status in p.TERMINAL_STATES:
            self._task_ended(ev.task_id)

    def _on_snapshot(self, briefs: list[p.TaskBrief]) -> None:
        for b in briefs:
            if b.status in p.TERMINAL_STATES:
                self._task_ended(b.task_id)

    def _task_ended(self, task_id: str) -> None:
        watch = self._watch_of.pop(task_id, None)
        if watch is not None:
            watch.remaining.discard(task_id)
            self._close_watch_if_done(watch)
        if task_id in self._futures:
            self._ended[task_id] = None
            if self._fetching is None or self._fetching.done():
                self._fetching = asyncio.ensure_future(self._fetch())

    def _close_watch_if_done(self, watch: _Watch) -> None:
        if not watch.remaining and watch.watcher is not None:
            w, watch.watcher = watch.watcher, None
            asyncio.ensure_future(w.close())

    async def _fetch(self) -> None:
        while self._ended:
            if len(self._ended) < min(FETCH_BATCH, len(self._futures)):
                await asyncio.sleep(FETCH_GATHER_SECONDS)
            ids = list(self._ended)[:FETCH_BATCH]
            for tid in ids:
                del self._ended[tid]
            try:
                records = await self.hub._records(ids)
            except HubError as exc:
                for tid in ids:
                    f = self._futures.pop(tid, None)
                    if f is not None:
                        f._settle(exc=exc)
                continue
            self.stats["fetches"] += 1
            for rec in records:
                if rec.status not in p.TERMINAL_STATES:
                    continue  # an event raced an older record: a later event brings it back
                f = self._futures.pop(rec.task_id, None)
                if f is not None:
                    await self._resolve(f, rec)

    async def _resolve(self, f: PyFuture, rec: p.TaskRecord) -> None:
        info = TaskResult.from_record(rec)
        kind, what = outcome(rec)
        try:
            if kind == "value":
                f._settle(load_value(what), info=info)
            elif kind == "download":
                f._settle(await self._download_value(what), info=info)
            elif kind == "cancelled":
                f._settle(cancelled=True, info=info)
            else:
                f._settle(exc=what, info=info)
        except Exception as exc:  # the value did not unpickle here, or its download failed
            f._settle(exc=TaskFailed(f"task {rec.task_id} finished, but its value could not be loaded here: "
                                     f"{type(exc).__name__}: {exc}", task_id=rec.task_id, status=rec.status),
                      info=info)

    async def _download_value(self, sha: str) -> Any:
        link = await self.hub._connected()
        with tempfile.TemporaryDirectory(prefix="hwf-value-") as d:
            path = f"{d}/value.pkl"
            await link.download(sha, path)

            def load() -> Any:
                with open(path, "rb") as fh:
                    return load_value(fh.read())

            return await asyncio.to_thread(load)

    # -- cancelling ------------------------------------------------------------------

    def _cancel_one(self, fut: PyFuture) -> None:
        if fut.task_id is None:
            return  # not accepted yet: _send cancels it on arrival
        self._futures.pop(fut.task_id, None)
        self._cancel[fut.task_id] = None
        self._kick_cancel()

    def _kick_cancel(self) -> None:
        if self._cancel and (self._cancelling is None or self._cancelling.done()):
            self._cancelling = asyncio.ensure_future(self._send_cancels())

    async def _send_cancels(self) -> None:
        while self._cancel:
            ids = list(self._cancel)[: self.hub.limits.max_results_per_request]
            for tid in ids:
                del self._cancel[tid]
            try:
                await self.hub._request(lambda rid, ids=ids: p.Cancel(id=rid, task_ids=ids))
            except HubError as exc:
                log.warning("could not cancel %d task(s) on the hub: %s", len(ids), exc)

    # -- staying connected ---------------------------------------------------------

    def _ensure_guard(self) -> None:
        if self._guard is None or self._guard.done():
            self._guard = asyncio.ensure_future(self._keep_connected())

    async def _keep_connected(self) -> None:
        """While futures wait, reopen a dropped link (which renews the watches)."""
        while self._futures and not self.closed:
            link = self.hub._link
            if link is None or not link.is_open:
                try:
                    await self.hub._on_link(_nothing)
                except HubError as exc:
                    self._fail_all(ConnectError(f"lost the hub and could not reconnect within "
                                                f"{self.hub.reconnect_timeout:.0f}s: {exc}"))
                    return
                continue
            assert link.closed is not None
            # The timeout only rechecks whether futures are still waiting.
            await asyncio.wait({link.closed}, timeout=5.0)

    def _fail_all(self, exc: BaseException) -> None:
        futures, self._futures = self._futures, {}
        self._ended.clear()
        for f in futures.values():
            f._settle(exc=exc)

    def close(self) -> None:
        """The Hub is closing: pending futures fail (their tasks go on, on the hub)."""
        self.closed = True
        for b in self._queue:
            for f in b.futures:
                f._refused(ConnectError("the Hub was closed before these tasks were sent"))
        self._queue = []
        self._fail_all(ConnectError("the Hub was closed while this task ran; its result is still on the hub: "
                                    "hub.get_result(task_id) from a new Hub"))


async def _nothing(link: Any) -> None:
    """An attempt that only needs the link open (reconnecting renews the watches)."""


_client_lock = threading.Lock()


def client_of(hub: "Hub") -> FunctionClient:
    """The hub's FunctionClient, made on first use (by whichever thread submits first)."""
    with _client_lock:
        if hub._functions is None:
            hub._functions = FunctionClient(hub)
        return hub._functions


def submit(hub: "Hub", fn: Callable[..., Any], args: tuple, kwargs: dict, opts: Options) -> PyFuture:
    client = client_of(hub)
    batch = build_batch([(fn, args, kwargs)], opts, client.request_cancel)
    client.enqueue(batch)
    return batch.futures[0]


def map_calls(hub: "Hub", fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], kwargs: dict,
              opts: Options, chunksize: int = 1) -> list[PyFuture]:
    if not iterables:
        raise TypeError("map needs at least one iterable of arguments")
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or not 1 <= chunksize <= MAX_CHUNKSIZE:
        raise TaskError(f"chunksize must be a whole number from 1 to {MAX_CHUNKSIZE}, got {chunksize!r}")
    client = client_of(hub)
    if chunksize > 1:
        return _map_chunked(client, fn, list(zip(*iterables)), kwargs, opts, chunksize)
    batch = build_batch(((fn, args, kwargs) for args in zip(*iterables)), opts, client.request_cancel)
    if batch.futures:
        client.enqueue(batch)
    return batch.futures


# ------------------------------------------------------- chunked map


class _Chunk:
    """One task running several calls of a map: the futures of its calls
    complete from the chunk's own (internal) future; the task is cancelled
    once every one of its calls' futures is."""

    def __init__(self, task: PyFuture, size: int, label: str) -> None:
        self.task = task
        self.items = [PyFuture(label, on_cancel=self._cancelled_one) for _ in range(size)]
        task.submitted.add_done_callback(self._submitted)
        concurrent.futures.Future.add_done_callback(task, self._ended)

    def _cancelled_one(self, _: PyFuture) -> None:
        if all(f.cancelled() for f in self.items):
            self.task.cancel()

    def _submitted(self, sub: concurrent.futures.Future) -> None:
        exc = sub.exception()
        for f in self.items:
            if exc is not None:
                f._refused(exc)
            else:
                f._accepted(sub.result(), self.task.session_id or "")

    def _ended(self, task: concurrent.futures.Future) -> None:
        info = self.task.info
        if task.cancelled():
            for f in self.items:
                f._settle(cancelled=True, info=info)
            return
        exc = task.exception()
        values = None if exc is not None else task.result()
        if exc is None and (not isinstance(values, list) or len(values) != len(self.items)):
            exc = TaskFailed(f"task {self.task.task_id}: its chunk returned {type(values).__name__}, "
                             f"not {len(self.items)} results", task_id=self.task.task_id)
        for i, f in enumerate(self.items):
            if exc is not None:
                f._settle(exc=exc, info=info)
                continue
            item = values[i]
            if item[0]:
                f._settle(item[1], info=info)
            else:
                f._settle(exc=_chunk_exception(item), info=info)


def _chunk_exception(item: tuple) -> BaseException:
    _, kept, error_type, text, tb_text = item
    exc = kept if isinstance(kept, BaseException) else RemoteException(error_type, text)
    if tb_text:
        exc.__cause__ = RemoteTraceback(with_local_source(tb_text))
    return exc


def _map_chunked(client: FunctionClient, fn: Callable[..., Any], items: list[tuple], kwargs: dict,
                 opts: Options, chunksize: int) -> list[PyFuture]:
    if not callable(fn):
        raise TypeError(f"map takes a callable first, got {fn!r}")
    send_local_module_by_value(fn)  # run_chunk sends fn: the rule for fn's module still holds
    label = opts.label or describe(fn)
    calls = []
    for start in range(0, len(items), chunksize):
        calls.append((_chunkcall.run_chunk, (fn, items[start:start + chunksize]), kwargs))
    batch = build_batch(calls, opts, client.request_cancel)
    chunks = []
    for i, task in enumerate(batch.futures):
        n = len(calls[i][1][1])
        task.label = f"{label}[{i * chunksize}:{i * chunksize + n}]"
        chunks.append(_Chunk(task, n, label))
    batch.specs = [msgspec.structs.replace(spec, label=c.task.label) for spec, c in zip(batch.specs, chunks)]
    if batch.futures:
        client.enqueue(batch)
    return [f for c in chunks for f in c.items]


def submit_each(hub: "Hub", calls: list[tuple[Callable[..., Any], tuple, dict]], opts: Options,
                pins: Optional[list[str]] = None) -> list[PyFuture]:
    """Several calls in one batch (one encoder: shared big arguments pickled once)."""
    client = client_of(hub)
    batch = build_batch(calls, opts, client.request_cancel, pins)
    if batch.futures:
        client.enqueue(batch)
    return batch.futures


def gather_sync(futures: Iterable[PyFuture], timeout: Optional[float] = None) -> list[Any]:
    """Values in order; raises the first exception (in list order) as ``result()`` would."""
    items = list(futures)
    deadline = None if timeout is None else time.monotonic() + timeout
    out = []
    for f in items:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        out.append(f.result(left))
    return out


async def gather_async(futures: Iterable[PyFuture]) -> list[Any]:
    items = list(futures)
    out = []
    for f in items:
        out.append(await f)
    return out


def task_ids_of(items: Iterable[Any]) -> list[Any]:
    """Task ids for ``get_result``/``watch_progress``: futures become their ids
    (waiting until the hub accepted them; a refused submit is skipped; the
    calls of one chunk share a task, listed once)."""
    out = []
    for x in items:
        if isinstance(x, PyFuture):
            try:
                out.append(x.submitted.result())
            except Exception:
                continue
        else:
            out.append(x)
    return _once(out)


def _once(ids: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    return [i for i in ids if not (isinstance(i, str) and (i in seen or seen.add(i)))]


async def task_ids_async(items: Iterable[Any]) -> list[Any]:
    out = []
    for x in items:
        if isinstance(x, PyFuture):
            try:
                out.append(await asyncio.wrap_future(x.submitted))
            except Exception:
                continue
        else:
            out.append(x)
    return _once(out)


__all__ = ["FunctionClient", "PyFuture", "TaskFailed", "gather_async", "gather_sync", "map_calls", "submit"]

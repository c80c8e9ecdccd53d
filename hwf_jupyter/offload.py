"""MECAnywhere's offload SDK (seed 003) over an HWF hub.

    await initiate_connection(timeout=10)            # HWF_HUB_URL / HWF_TOKEN, or hub=/token=
    await offload_task("t1", "mypkg.work:run", data, callback, runtime="python")
    await join(task_timeout=60, join_timeout=300)
    await disconnect()

``runtime``: ``"python"`` — ``container_ref`` is ``"module:function"``, imported
on the daemon (the worker's Python path: installed packages) and called with
``data``; ``"shell"`` — ``container_ref`` is a command given ``data`` on stdin,
its stdout is the result; ``"docker"`` (the default, as in MECA) / ``"podman"``
— run as MECA's executor runs them (the image serves HTTP on 8080, ``data``
is POSTed, the reply body is the result) by daemons started with
``--containers`` where that engine answers; elsewhere the task waits, with a
wait reason saying no daemon runs docker.  ``callback`` is called once per task id, on the event loop that called
``offload_task``, in completion order; both of MECA's shapes are accepted:
``callback(result)`` and ``callback(task_id, status, response, err, corr_id)``
(status 1 = success).  ``resource={"cpu": 1, "memory": 256}`` (memory in MB)
and ``use_gpu``/``gpu_count`` become hardware requirements.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from hub_server import protocol as p

from ._ioloop import on_io_loop
from .hub import Hub
from .pycall import PYTHON, TaskFailed

DEFAULT_TASK_TIMEOUT = 3600.0
DEFAULT_JOIN_TIMEOUT = 24 * 3600.0
RUNTIMES = ("python", "shell", "docker", "podman")


class OffloadError(RuntimeError):
    """A refused offload, or a join that timed out (``unfinished`` names the task ids)."""

    def __init__(self, message: str, unfinished: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.unfinished = unfinished


@dataclass
class _Session:
    hub: Hub
    pending: dict[str, asyncio.Task] = field(default_factory=dict)  # MECA task id -> its waiter
    hwf_ids: dict[str, str] = field(default_factory=dict)  # MECA task id -> HWF task id
    offloaded: dict[str, float] = field(default_factory=dict)  # MECA task id -> loop time
    timed_out: dict[str, float] = field(default_factory=dict)  # MECA task id -> its task_timeout


_session: Optional[_Session] = None


def _require() -> _Session:
    if _session is None:
        raise OffloadError("not connected: await initiate_connection() first")
    return _session


async def initiate_connection(timeout: float = 10, *, hub: Optional[str] = None,
                              token: Optional[str] = None) -> None:
    """Connect to the hub (``HWF_HUB_URL``/``HWF_TOKEN`` unless given)."""
    global _session
    url = hub or os.environ.get("HWF_HUB_URL")
    if not url:
        raise OffloadError("no hub address: pass hub= or set HWF_HUB_URL")
    h = Hub(url, token=token or os.environ.get("HWF_TOKEN"))
    await asyncio.wait_for(h.connect(), timeout)
    if _session is not None:
        await disconnect()
    _session = _Session(h)


def hardware_of(resource: Optional[dict[str, Any]], runtime: str, use_gpu: bool, gpu_count: int) -> dict[str, Any]:
    """MECA's resource dict as HWF hardware requirements."""
    hw: dict[str, Any] = {}
    for key, value in (resource or {}).items():
        if key == "cpu":
            hw["cores"] = int(value)
        elif key == "memory":
            hw["ram"] = f"{int(value)}MB"
        else:
            raise OffloadError(f"resource {key!r} is not known (known: cpu, memory in MB)")
    if use_gpu or gpu_count:
        hw["gpu"] = "yes"
    hw["runtime"] = f"python{PYTHON}" if runtime == "python" else runtime
    return hw


def _stage(container_ref: str, data: str, runtime: str) -> p.StageSpec:
    if runtime == "python":
        if ":" not in container_ref:
            raise OffloadError(f"runtime python: container_ref {container_ref!r} is not 'module:function'")
        return p.StageSpec(name="offload", cmds=[], call=p.PyCall(python=PYTHON, ref=container_ref, arg=data))
    if runtime == "shell":
        return p.StageSpec(name="offload", cmds=[container_ref], stdin=data)
    return p.StageSpec(name="offload", cmds=[], container=p.ContainerCall(engine=runtime, image=container_ref,
                                                                             data=data))


def _callback_shape(callback: Callable[..., Any]) -> int:
    """1 for callback(result), 5 for callback(task_id, status, response, err, corr_id)."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return 1
    positional = [q for q in params if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    if any(q.kind == q.VAR_POSITIONAL for q in params) or len(positional) >= 5:
        return 5
    return 1


async def offload_task(task_id: str, container_ref: str, data: str, callback: Callable[..., Any],
                       resource: Optional[dict[str, Any]] = None, runtime: Optional[str] = None, *,
                       use_gpu: bool = False, gpu_count: int = 0, task_timeout: Optional[float] = None) -> str:
    """Queue one task; returns ``task_id`` at once.  ``callback`` runs when it ends."""
    s = _require()
    runtime = runtime or "docker"  # MECA's container_ref is an image unless a runtime says otherwise
    if runtime not in RUNTIMES:
        raise OffloadError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if task_id in s.pending:
        raise OffloadError(f"task id {task_id!r} is already offloaded and not yet joined")
    data = data if isinstance(data, str) else str(data)
    spec = p.TaskSpec(stages=[_stage(container_ref, data, runtime)],
                      hardware=hardware_of(resource, runtime, use_gpu, gpu_count),
                      timeout=task_timeout or DEFAULT_TASK_TIMEOUT, label=f"meca:{task_id}", max_retries=1)
    hwf_id = await _submit_one(s.hub, spec)
    s.hwf_ids[task_id] = hwf_id
    s.offloaded[task_id] = asyncio.get_running_loop().time()
    shape = _callback_shape(callback)
    s.pending[task_id] = asyncio.ensure_future(_wait_and_call(s, task_id, hwf_id, runtime, callback, shape))
    return task_id


@on_io_loop
async def _submit_one(hub: Hub, spec: p.TaskSpec) -> str:
    _, (hwf_id,) = await hub._submit([spec], None)  # the hub's link lives on HWF's I/O loop
    return hwf_id


async def _wait_and_call(s: _Session, task_id: str, hwf_id: str, runtime: str,
                         callback: Callable[..., Any], shape: int) -> None:
    (r,) = await s.hub.get_result([hwf_id], wait=True)
    ok, response, err = True, None, None
    try:
        if task_id in s.timed_out:
            raise TaskFailed(f"task {task_id} ran longer than task_timeout={s.timed_out[task_id]:g}s",
                             task_id=task_id, status="failed")
        if r.status != "finished" and (runtime != "python" or r.py_value is None):
            raise TaskFailed(f"task {task_id}: {r.error or r.status}", task_id=task_id, status=r.status)
        if runtime == "python":
            response = r.value
        else:
            cmds = [c for st in r.stages for c in st.commands]
            response = cmds[-1].stdout if cmds else ""
    except Exception as exc:  # the task's own failure goes to the callback
        ok, err = False, f"{type(exc).__name__}: {exc}"
    if shape == 5:
        out = callback(task_id, 1 if ok else 0, response, err, task_id)
    else:
        out = callback(response if ok else err)
    if inspect.isawaitable(out):
        await out


async def join(task_timeout: Optional[float] = None, join_timeout: float = DEFAULT_JOIN_TIMEOUT) -> None:
    """Wait until every offloaded task's callback ran.  A task running longer
    than ``task_timeout`` (seconds since its offload) is cancelled on the farm and
    its callback gets the timeout as its error; ``join_timeout`` bounds the whole
    wait and raises naming the tasks still running (they keep running)."""
    s = _require()
    waiting = dict(s.pending)
    if not waiting:
        return
    watchdogs = []
    if task_timeout is not None:
        loop = asyncio.get_running_loop()
        for tid, fut in waiting.items():
            delay = max(0.0, s.offloaded[tid] + task_timeout - loop.time())
            watchdogs.append(loop.call_later(delay, _time_out, s, tid, fut, task_timeout))
    try:
        done, left = await asyncio.wait(waiting.values(), timeout=join_timeout)
    finally:
        for w in watchdogs:
            w.cancel()
    for tid, fut in waiting.items():
        if fut in done:
            s.pending.pop(tid, None)
            fut.result()  # a callback's own exception surfaces here
    if left:
        names = sorted(t for t, f in waiting.items() if f in left)
        raise OffloadError(f"join timed out after {join_timeout:g}s; still running: {', '.join(names)}",
                           unfinished=tuple(names))


def _time_out(s: _Session, task_id: str, fut: asyncio.Future, limit: float) -> None:
    if not fut.done():
        s.timed_out[task_id] = limit
        asyncio.ensure_future(s.hub.cancel([s.hwf_ids[task_id]]))


async def disconnect() -> None:
    """Stop waiting for callbacks and close the connection (tasks keep running)."""
    global _session
    s, _session = _session, None
    if s is None:
        return
    for fut in s.pending.values():
        fut.cancel()
    await s.hub.close()


__all__ = ["initiate_connection", "offload_task", "join", "disconnect", "OffloadError", "hardware_of"]

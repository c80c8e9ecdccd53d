"""Run a stage whose ``call`` is a Python call, on the slot's warm worker.

The runner hands such a stage here (runner.py runs command stages): its
Data files are fetched as for commands (the pickle, ``hwf-arg-*``
arguments, a module for a ``ref``), then the call goes to the slot's
worker (pyworkers.py) and comes back as a stage with one "command"
(``python: f(...)``, its stdout and stderr, time, CPU and peak RAM as
tracked) plus the value, or the exception, for ``TaskOutcome.value``.
A worker that dies during the call makes the attempt ``lost``: the hub
retries it, as when a daemon is lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from hub_server import gridcall
from hub_server.protocol import CommandOutcome, PyValue, StageOutcome, StageSpec

from .pyworkers import PyWorkers, WorkerDied, WorkerError
from .runner import FetchData, OnOutput, _Capture, _cancelled, _fetch_stage_data, _Failure

if TYPE_CHECKING:
    from .accounts import TaskUser
    from .runner import CancelLike

VALUE_FILE = "hwf-value.pkl"
MAX_TRACEBACK = 64 * 1024
MAX_ERROR = 4096


@dataclass
class CallContext:
    """Where a task's Python calls run: the pool, the task's slot and user,
    and the daemon's own HTC-Grid handler (if any)."""

    pool: Optional[PyWorkers]
    slot: int = 0
    user: Optional["TaskUser"] = None
    user_key: str = ""
    grid_handler: Optional[str] = None


def resolve_grid(stage: StageSpec, calls: Optional[CallContext]) -> StageSpec:
    """A ``@grid`` stage with this daemon's handler in place (else unchanged:
    it then fails with a clear error)."""
    if calls is not None and calls.grid_handler and gridcall.needs_handler(stage):
        return gridcall.with_handler(stage, calls.grid_handler)
    return stage


def _request(stage: StageSpec, workdir: Path, env: Optional[Mapping[str, str]], inline_max: int) -> dict[str, Any]:
    call = stage.call
    assert call is not None
    req: dict[str, Any] = {"cwd": str(workdir), "env": dict(env) if env is not None else None,
                           "python": call.python, "track_ram": stage.track_ram, "inline_max": inline_max}
    if call.ref is not None:
        ref = call.ref
        if gridcall.is_grid_call(stage):
            req["grid"] = True
            ref = ref[len(gridcall.GRID_REF) + 1:]
        req["ref"], req["arg"] = ref, call.arg
    else:
        req["pickled"], req["pickled_file"] = call.pickled, call.pickled_file
    return req


def _bounded(value: Optional[PyValue], inline_max: int) -> Optional[PyValue]:
    """A worker's value as the daemon forwards it: it runs the user's code, so
    its sizes are checked and the only file it may name is the value file."""
    if value is None:
        return None
    if value.artifact is not None:
        value.artifact = VALUE_FILE
    if value.pickled is not None and len(value.pickled) > (inline_max + 2) // 3 * 4:
        value.pickled = None
        value.repr = (value.repr + " [value dropped: larger than the inline limit]")[:4096]
    if value.traceback is not None and len(value.traceback) > MAX_TRACEBACK:
        value.traceback = value.traceback[:MAX_TRACEBACK] + "\n[traceback cut]"
    return value


def _failed_value(error_type: str, text: str) -> PyValue:
    return PyValue(error_type=error_type, traceback=text, repr=text[:200])


async def run_call_stage(
    stage: StageSpec,
    workdir: Path,
    *,
    calls: Optional[CallContext],
    fetch_data: FetchData,
    on_output: Optional[OnOutput],
    max_output_bytes: int,
    cancel: Optional["CancelLike"],
    env: Optional[Mapping[str, str]] = None,
    inline_max: int = 64 * 1024,
    spent: Optional[Any] = None,
) -> tuple[StageOutcome, Optional[_Failure], Optional[PyValue]]:
    """(stage outcome, failure or None, the call's value or exception)."""
    outcome = StageOutcome(name=stage.name, status="finished", comment=stage.comment)
    failure = await _fetch_stage_data(stage, workdir, fetch_data, cancel, calls.user if calls else None)
    if failure is not None:
        outcome.status = "failed"
        if failure.reason is None:
            outcome.note = failure.error
        return outcome, failure, None
    if stage.track_gpu:
        outcome.note = "track_gpu: not measured for Python calls"
    if gridcall.needs_handler(stage):
        text = ("this daemon has no HTC-Grid handler (start it with --grid-handler module:function or a "
                "shell command, or give the hub one with hwf hub --grid-handler)")
        outcome.status = "failed"
        return outcome, _Failure(f"stage {stage.name!r}: {text}"), _failed_value("GridHandlerMissing", text)
    if calls is None or calls.pool is None:
        text = "this daemon runs no Python calls: it found no Python its task users can run (see hwf daemon --python)"
        outcome.status = "failed"
        return outcome, _Failure(f"stage {stage.name!r}: {text}"), _failed_value("NoPythonRuntime", text)

    out = _Capture("stdout", max_output_bytes, on_output)
    err = _Capture("stderr", max_output_bytes, on_output)
    started = time.time()
    t0 = time.perf_counter()
    value: Optional[PyValue] = None
    reply = None
    failure = None
    describe = "python: the call"
    try:
        reply = await calls.pool.call(calls.slot, calls.user, calls.user_key, _request(stage, workdir, env, inline_max),
                                      cancel=cancel, out=out, err=err)
    except WorkerDied as exc:
        failure = _Failure(f"stage {stage.name!r}: {exc} during the call", reason="worker_lost")
        failure.lost = True
    except WorkerError as exc:
        failure = _Failure(f"stage {stage.name!r}: {exc}")
        value = _failed_value("WorkerError", str(exc))
    finally:
        out.close()
        err.close()
    wall = time.perf_counter() - t0
    if reply is None and failure is None:  # cancelled or timed out: the worker was killed
        failure = _cancelled(cancel)  # type: ignore[arg-type]
    command = CommandOutcome(cmd=describe, exit_code=None, stdout=out.text(), stderr=err.text(),
                             stdout_truncated=out.truncated, stderr_truncated=err.truncated)
    if reply is not None:
        if spent is not None:  # credits are paid by CPU-seconds, tracked or not
            spent.add(reply.cpu, wall, None)
        command.cmd = reply.describe[:4096]
        command.exit_code = 0 if reply.ok else 1
        value = _bounded(reply.value, inline_max)
        if not reply.ok:
            failure = _Failure(f"stage {stage.name!r}: {(reply.error or 'the call failed')[:MAX_ERROR]}", exit_code=1)
        if stage.track_time:
            command.duration = reply.wall
        if stage.track_cpu:
            command.cpu_time = reply.cpu
        if stage.track_ram:
            command.peak_ram = reply.peak_ram
    if stage.track_time:
        outcome.started = started
        outcome.duration = wall
    if stage.track_cpu and reply is not None:
        outcome.cpu_time = reply.cpu
        outcome.cpu_percent = 100.0 * reply.cpu / wall if wall > 0 else 0.0
    if stage.track_ram and reply is not None:
        outcome.peak_ram = reply.peak_ram
    outcome.commands = [command]
    if failure is not None:
        outcome.status = "failed"
    return outcome, failure, value

"""Run one task attempt: fetch its data, run its stages, collect artifacts.

``run_task`` is the whole of what a daemon does with an assigned task,
minus the talking to the hub, which the caller plugs in as callbacks
(``fetch_data``, ``upload_artifact``, ``on_stage``, ``on_output``).
Commands run as ``user`` (another account, when the daemon is root) with
the environment ``env``; the daemon touches the task dir, which that user
controls, only through fds walked with ``O_NOFOLLOW`` (safefs.py), so a
task's symlinks cannot turn the daemon's rights against other files.  It
always returns a ``TaskOutcome``: a failing command, a refused file name,
a callback that raises or a cancellation all become a failed outcome whose
``error`` says what happened, never an exception.

Stopping a task early goes through a ``Cancel``: ``cancel.set("timeout")``
(or any reason) makes ``run_task`` stop the running command's whole
process tree (SIGTERM, then SIGKILL after ``kill_grace`` seconds), skip the
rest, and report ``reason`` = the given reason.  A plain ``asyncio.Event``
works too and reports reason ``"cancelled"``.  Artifacts are still
collected after a failure or a cancellation: logs are most useful then.
"""

from __future__ import annotations

import asyncio
import codecs
import inspect
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Awaitable, BinaryIO, Callable, Mapping, Optional, Union

from hwf_daemon.accounts import TaskUser
from hwf_daemon.artifacts import UploadArtifact, collect_artifacts
from hwf_daemon.gpu import GpuSampler
from hwf_daemon.safefs import create_for_writing
from hwf_daemon.tracking import TrackedProcess, Usage
from hub_server.protocol import (
    ArtifactInfo,
    CommandOutcome,
    DataSpec,
    StageOutcome,
    StageSpec,
    TaskOutcome,
    TaskSpec,
)

if TYPE_CHECKING:
    from hwf_daemon.isolation import Box
    from hwf_daemon.pystage import CallContext

log = logging.getLogger(__name__)

NO_GPU_NOTE = "track_gpu: no GPU on this machine"
# Once a command has exited and its group is killed, only a process that
# escaped the group can still hold its pipes open: do not wait for it long.
_PIPE_DRAIN_TIMEOUT = 2.0
_READ_CHUNK = 65536
_ERROR_OF_REASON = {"cancelled": "cancelled", "timeout": "timed out"}

# fetch_data(data, file): write the data's bytes into ``file`` (open, empty).
FetchData = Callable[[DataSpec, BinaryIO], Awaitable[None]]
OnStage = Callable[[int, StageOutcome], Optional[Awaitable[None]]]
OnOutput = Callable[[str, str], None]


class Cancel:
    """A request to stop a running task, with the reason to report.

    ``set(reason)`` is idempotent: the first reason wins.  ``"timeout"`` is
    reported as error ``"timed out"``, ``"cancelled"`` as ``"cancelled"``,
    any other reason as ``"cancelled: <reason>"``.  Call it from the event
    loop's thread (``loop.call_soon_threadsafe`` from elsewhere).
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.reason: Optional[str] = None
        self.error: Optional[str] = None  # the error to report instead of the reason's
        self._futures: set[asyncio.Future] = set()

    def set(self, reason: str = "cancelled", error: Optional[str] = None) -> None:
        if self.reason is None:
            self.reason = reason
            self.error = error
        self._event.set()
        for fut in self._futures:
            if not fut.done():
                fut.set_result(None)
        self._futures.clear()

    def future(self) -> asyncio.Future:
        """A future done once this is set (``discard`` it when done with it):
        waiting on it costs no task, unlike ``wait()``."""
        fut = asyncio.get_running_loop().create_future()
        if self._event.is_set():
            fut.set_result(None)
        else:
            self._futures.add(fut)
        return fut

    def discard(self, fut: asyncio.Future) -> None:
        self._futures.discard(fut)

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


CancelLike = Union[Cancel, asyncio.Event]


def cancel_error(reason: str) -> str:
    """The ``error`` text of an outcome stopped for ``reason``."""
    return _ERROR_OF_REASON.get(reason, f"cancelled: {reason}")


def _reason_of(cancel: CancelLike) -> str:
    if isinstance(cancel, Cancel) and cancel.reason:
        return cancel.reason
    return "cancelled"


class _Failure:
    """Why the task failed: what goes into the TaskOutcome."""

    def __init__(
        self, error: str, exit_code: Optional[int] = None, reason: Optional[str] = None
    ) -> None:
        self.error = error
        self.exit_code = exit_code
        self.reason = reason
        self.lost = False  # not the task's doing (its Python worker died): the hub retries it


def _cancelled(cancel: CancelLike) -> _Failure:
    reason = _reason_of(cancel)
    if isinstance(cancel, Cancel) and cancel.error:
        return _Failure(cancel.error, reason=reason)
    return _Failure(cancel_error(reason), reason=reason)


LIMIT = "limit"  # the reason of a task stopped for going past one of its limits (isolation.py)


def _describe_exc(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _short(cmd: str, limit: int = 80) -> str:
    cmd = " ".join(cmd.split())
    return cmd if len(cmd) <= limit else cmd[: limit - 3] + "..."


def exit_text(code: int) -> str:
    """How a process ended, from its exit code (negative: the signal)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


def _exit_error(stage: str, n: int, cmd: str, code: int) -> str:
    """``n`` counts from 0, as the results' ``command_index`` does."""
    return f"stage {stage!r} command {n} ({_short(cmd)!r}) {exit_text(code)}"


# ------------------------------------------------------------------ output


class _Capture:
    """The kept head of one output stream, plus live forwarding of all of it."""

    def __init__(self, stream: str, limit: int, on_output: Optional[OnOutput]) -> None:
        self.stream = stream
        self.limit = max(0, limit)
        self.on_output = on_output
        self.data = bytearray()
        self.truncated = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace") if on_output is not None else None

    def feed(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.data += chunk[: max(room, 0)]
            self.truncated = True
        else:
            self.data += chunk
        if self._decoder is not None:
            self._forward(self._decoder.decode(chunk))

    def close(self) -> None:
        if self._decoder is not None:
            self._forward(self._decoder.decode(b"", final=True))

    def _forward(self, text: str) -> None:
        if text and self.on_output is not None:
            try:
                self.on_output(self.stream, text)
            except Exception:  # a broken viewer must not break the task
                log.exception("on_output callback failed")

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", errors="replace")


def _pump(pipe: IO[bytes], capture: _Capture) -> asyncio.Future:
    """Read a pipe to its end on the event loop (a reader callback on its
    fd: no transport, stream or task per pipe); done at EOF.  Cancelling
    the future stops reading and closes the pipe."""
    loop = asyncio.get_running_loop()
    fd = pipe.fileno()
    done: asyncio.Future = loop.create_future()

    def ready() -> None:
        for _ in range(4):  # a few chunks at a time: a flood must not starve the loop
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:  # read error: as good as the end
                chunk = b""
            if not chunk:
                done.set_result(None)
                return
            capture.feed(chunk)

    def finished(_: asyncio.Future) -> None:
        loop.remove_reader(fd)
        pipe.close()
        capture.close()

    try:
        os.set_blocking(fd, False)
        loop.add_reader(fd, ready)
    except BaseException:
        pipe.close()
        raise
    done.add_done_callback(finished)
    return done


async def _drain(readers: list[asyncio.Future]) -> None:
    if all(r.done() and not r.cancelled() and r.exception() is None for r in readers):
        return  # the common case: both pipes were read to their end
    _, pending = await asyncio.wait(readers, timeout=_PIPE_DRAIN_TIMEOUT)
    for task in pending:
        task.cancel()
    for task in readers:
        try:
            await task
        except asyncio.CancelledError:
            if task not in pending:
                raise
        except Exception:
            log.exception("reading command output failed")


# ---------------------------------------------------------------- commands


async def _race(aw: Awaitable, cancel: Optional[CancelLike]) -> bool:
    """Await ``aw`` unless ``cancel`` is set first; True if it was.

    ``aw`` is cancelled when ``cancel`` wins; its exception, if it finished,
    propagates.
    """
    task = asyncio.ensure_future(aw)
    if cancel is None:
        await task
        return False
    stopper = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we are being cancelled ourselves
        task.cancel()
        raise
    finally:
        stopper.cancel()
    if task.done():
        task.result()
        return False
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.debug("cancelled operation failed: %r", task.exception())
    return True


async def _exited_or_cancelled(proc: TrackedProcess, cancel: Optional[CancelLike]) -> bool:
    """Wait until the command exits, or until ``cancel`` is set; True if
    cancel came first.  Futures only (no task) for a ``Cancel``."""
    exited = proc.exited
    if exited.done():
        return False
    if cancel is None:
        await asyncio.wait({exited})
        return False
    if not isinstance(cancel, Cancel):
        return await _race(asyncio.wait({exited}), cancel)
    stop = cancel.future()
    try:
        await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cancel.discard(stop)
    return not exited.done()


async def _run_command(
    cmd: str,
    workdir: Path,
    *,
    max_output_bytes: int,
    on_output: Optional[OnOutput],
    cancel: Optional[CancelLike],
    kill_grace: float,
    env: Optional[Mapping[str, str]] = None,
    user: Optional[TaskUser] = None,
    track_ram: bool = True,
    stdin: Optional[bytes] = None,
    box: Optional["Box"] = None,
) -> tuple[CommandOutcome, Usage, float, bool]:
    """Run one command to its end: (outcome, usage, wall seconds, cancelled)."""
    proc = await TrackedProcess.start(cmd, workdir, env=env, user=user, track_ram=track_ram, stdin=stdin, box=box)
    out = _Capture("stdout", max_output_bytes, on_output)
    err = _Capture("stderr", max_output_bytes, on_output)
    readers = [_pump(proc.stdout, out), _pump(proc.stderr, err)]
    try:
        cancelled = await _exited_or_cancelled(proc, cancel)
        if cancelled:
            await proc.terminate(kill_grace)
        usage = await proc.wait()
        await _drain(readers)
    except BaseException:
        proc.kill()  # run_task itself was cancelled, or our machinery broke
        for task in readers:
            task.cancel()
        raise
    ended = proc.ended if proc.ended is not None else time.perf_counter()
    outcome = CommandOutcome(
        cmd=cmd,
        exit_code=usage.exit_code,
        stdout=out.text(),
        stderr=err.text(),
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
    )
    return outcome, usage, ended - proc.started, cancelled


# ------------------------------------------------------------------ stages


def _data_target(workdir: Path, filename: str) -> Optional[Path]:
    """Where a data file goes, or None if its name would leave the workdir."""
    if not filename or "\0" in filename:
        return None
    rel = PurePosixPath(filename)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    root = workdir.resolve()
    target = root / rel
    resolved = target.resolve()  # a symlink in the workdir could point out
    if resolved == root or not resolved.is_relative_to(root):
        return None
    return target


async def _fetch_one(data: DataSpec, workdir: Path, fetch_data: FetchData,
                     user: Optional[TaskUser], cancel: Optional[CancelLike]) -> bool:
    """Write one data file into the task dir (owned by ``user``); True if cancelled."""
    f = await asyncio.to_thread(create_for_writing, workdir, data.filename, user)
    with f:
        return await _race(fetch_data(data, f), cancel)


async def _fetch_stage_data(
    stage: StageSpec,
    workdir: Path,
    fetch_data: FetchData,
    cancel: Optional[CancelLike],
    user: Optional[TaskUser] = None,
) -> Optional[_Failure]:
    for data in stage.data:
        if cancel is not None and cancel.is_set():
            return _cancelled(cancel)
        target = _data_target(workdir, data.filename)
        if target is None:
            return _Failure(
                f"stage {stage.name!r}: data filename {data.filename!r} must be a "
                "relative path inside the work directory"
            )
        try:
            if await _fetch_one(data, workdir, fetch_data, user, cancel):
                return _cancelled(cancel)  # type: ignore[arg-type]
        except Exception as exc:
            return _Failure(
                f"stage {stage.name!r}: fetching data {data.filename!r} failed: "
                f"{_describe_exc(exc)}"
            )
    return None


@dataclass
class Spent:
    """What a task used, measured whether or not its stages track it (rusage
    is free): the hub pays credits by CPU-seconds."""

    cpu_seconds: float = 0.0
    gpu_seconds: Optional[float] = None

    def add(self, cpu: float, wall: float, gpu_util: Optional[float]) -> None:
        self.cpu_seconds += cpu
        if gpu_util is not None:  # the sampler keeps peak %: an upper bound of GPU-busy time
            self.gpu_seconds = (self.gpu_seconds or 0.0) + wall * gpu_util / 100.0


async def _run_stage(
    stage: StageSpec,
    workdir: Path,
    *,
    fetch_data: FetchData,
    on_output: Optional[OnOutput],
    max_output_bytes: int,
    cancel: Optional[CancelLike],
    kill_grace: float,
    env: Optional[Mapping[str, str]] = None,
    user: Optional[TaskUser] = None,
    spent: Optional["Spent"] = None,
    box: Optional["Box"] = None,
) -> tuple[StageOutcome, Optional[_Failure]]:
    outcome = StageOutcome(name=stage.name, status="finished", comment=stage.comment)
    failure = await _fetch_stage_data(stage, workdir, fetch_data, cancel, user)
    if failure is not None:
        outcome.status = "failed"
        if failure.reason is None:
            outcome.note = failure.error
        return outcome, failure

    gpu: Optional[GpuSampler] = None
    if stage.track_gpu:
        gpu = GpuSampler()
        await asyncio.to_thread(gpu.start)
        if not gpu.available:
            outcome.note = NO_GPU_NOTE

    commands: list[CommandOutcome] = []
    stdin = stage.stdin.encode("utf-8") if stage.stdin is not None else None
    cpu_time = 0.0
    peak_ram = 0
    started = time.time()
    t0 = time.perf_counter()
    try:
        for n, cmd in enumerate(stage.cmds):  # from 0, like the results' command_index
            if cancel is not None and cancel.is_set():
                failure = _cancelled(cancel)
                break
            try:
                cmd_outcome, usage, wall, cancelled = await _run_command(
                    cmd,
                    workdir,
                    max_output_bytes=max_output_bytes,
                    on_output=on_output,
                    cancel=cancel,
                    kill_grace=kill_grace,
                    env=env,
                    user=user,
                    track_ram=stage.track_ram,
                    stdin=stdin,
                    box=box,
                )
            except Exception as exc:
                breach = box.breach() if box is not None else None  # no fork left under the limit?
                failure = _Failure(
                    breach or f"stage {stage.name!r} command {n} ({_short(cmd)!r}) could not run: "
                    f"{_describe_exc(exc)}", reason=LIMIT if breach else None,
                )
                commands.append(CommandOutcome(cmd=cmd, exit_code=None))
                break
            if stage.track_time:
                cmd_outcome.duration = wall
            if stage.track_cpu:
                cmd_outcome.cpu_time = usage.cpu_time
            if stage.track_ram:
                cmd_outcome.peak_ram = usage.peak_ram
            commands.append(cmd_outcome)
            cpu_time += usage.cpu_time
            peak_ram = max(peak_ram, usage.peak_ram)
            if cancelled:
                failure = _cancelled(cancel)  # type: ignore[arg-type]
                break
            if usage.exit_code != 0:
                breach = box.breach() if box is not None else None  # killed or refused for a limit?
                failure = _Failure(
                    breach or _exit_error(stage.name, n, cmd, usage.exit_code),
                    exit_code=usage.exit_code, reason=LIMIT if breach else None,
                )
                break
    finally:
        duration = time.perf_counter() - t0
        if gpu is not None:
            util, mem = await asyncio.to_thread(gpu.stop)
            outcome.gpu_util, outcome.gpu_mem = util, mem
        if spent is not None:
            spent.add(cpu_time, duration, outcome.gpu_util)

    outcome.commands = commands
    if failure is not None and failure.reason == LIMIT:
        failure.error = f"stage {stage.name!r} {failure.error}"
        outcome.note = failure.error
    if failure is not None:
        outcome.status = "failed"
    if stage.track_time:
        outcome.started = started
        outcome.duration = duration
    if stage.track_cpu:
        outcome.cpu_time = cpu_time
        outcome.cpu_percent = 100.0 * cpu_time / duration if duration > 0 else 0.0
    if stage.track_ram:
        outcome.peak_ram = peak_ram
    return outcome, failure


async def _notify(on_stage: Optional[OnStage], index: int, stage: StageOutcome) -> None:
    if on_stage is None:
        return
    try:
        result = on_stage(index, stage)
        if inspect.isawaitable(result):
            await result
    except Exception:  # reporting progress must not break the task
        log.exception("on_stage callback failed")


# -------------------------------------------------------------------- task


async def run_task(
    spec: TaskSpec,
    workdir: Path,
    *,
    fetch_data: FetchData,
    upload_artifact: UploadArtifact,
    on_stage: Optional[OnStage] = None,
    on_output: Optional[OnOutput] = None,
    max_output_bytes: int = 65536,
    cancel: Optional[CancelLike] = None,
    kill_grace: float = 3.0,
    user: Optional[TaskUser] = None,
    env: Optional[Mapping[str, str]] = None,
    before_artifacts: Optional[Callable[[], Awaitable[None]]] = None,
    calls: Optional["CallContext"] = None,
    box: Optional["Box"] = None,
) -> TaskOutcome:
    """Run every stage of ``spec`` in ``workdir`` and report how it went.

    ``fetch_data(data, file)`` must write the data's bytes into the open
    ``file``; ``upload_artifact(file, name)`` stores an open artifact file
    and returns its (sha256, size).  Commands run as ``user`` (None: as
    this process) with environment ``env`` (None: this process's);
    ``before_artifacts()`` runs after the last command, so the caller can
    stop what the task left running before its files are read.
    ``on_stage(index, outcome)`` (sync or async) is called once per stage,
    skipped ones included; ``on_output(stream, text)`` receives all output
    live, untruncated.  Stages with a Python ``call`` run on the warm
    worker of ``calls`` (pystage.py); the last call's value (or exception)
    is ``outcome.value``.  ``box``: the namespaces and cgroups the commands
    run in (isolation.py).  The first failing command fails the task and skips
    the rest.  Never raises, except ``CancelledError`` when the calling
    asyncio task itself is cancelled (the running command is killed first).
    """
    workdir = Path(workdir)
    outcome = TaskOutcome(status="finished", exit_code=0, started=time.time())
    failure: Optional[_Failure] = None
    spent = Spent()
    try:
        for index, stage in enumerate(spec.stages):
            if stage.call is not None:
                from . import pystage  # it builds on this module

                stage = pystage.resolve_grid(stage, calls)  # a shell grid handler makes it commands
            if failure is None and cancel is not None and cancel.is_set():
                failure = _cancelled(cancel)
            if failure is not None:
                stage_outcome = StageOutcome(
                    name=stage.name, status="skipped", comment=stage.comment
                )
            elif stage.call is not None:
                stage_outcome, failure, value = await pystage.run_call_stage(
                    stage,
                    workdir,
                    calls=calls,
                    fetch_data=fetch_data,
                    on_output=on_output,
                    max_output_bytes=max_output_bytes,
                    cancel=cancel,
                    env=env,
                    spent=spent,
                )
                if value is not None:
                    outcome.value = value
            elif stage.container is not None:
                from . import containers

                stage_outcome, problem = await containers.run_container_stage(
                    stage.name, stage.container, spec.hardware, cancel)
                if problem is not None:
                    failure = (_cancelled(cancel) if cancel is not None and cancel.is_set()  # type: ignore[arg-type]
                               else _Failure(f"stage {stage.name!r}: {problem}", exit_code=1))
            else:
                stage_outcome, failure = await _run_stage(
                    stage,
                    workdir,
                    fetch_data=fetch_data,
                    on_output=on_output,
                    max_output_bytes=max_output_bytes,
                    cancel=cancel,
                    kill_grace=kill_grace,
                    env=env,
                    user=user,
                    spent=spent,
                    box=box,
                )
            outcome.stages.append(stage_outcome)
            await _notify(on_stage, index, stage_outcome)
    except Exception as exc:  # a bug or an environment problem in our own code
        log.exception("run_task failed")
        failure = _Failure(f"daemon error while running the task: {_describe_exc(exc)}")
        done = len(outcome.stages)
        for stage in spec.stages[done:]:
            outcome.stages.append(
                StageOutcome(name=stage.name, status="skipped", comment=stage.comment)
            )

    if before_artifacts is not None:
        try:
            await before_artifacts()
        except Exception:
            log.exception("before_artifacts callback failed")
    patterns = list(spec.artifacts)
    if outcome.value is not None and outcome.value.artifact is not None:
        patterns.append(outcome.value.artifact)  # a value too large to send inline
    try:
        outcome.artifacts = await collect_artifacts(
            patterns, workdir, upload_artifact, owner=user.uid if user is not None else None
        )
    except Exception as exc:
        log.exception("collecting artifacts failed")
        outcome.artifacts = [
            ArtifactInfo(pattern=p, error=f"artifact collection failed: {_describe_exc(exc)}")
            for p in patterns
        ]

    if failure is not None:
        outcome.status = "lost" if failure.lost else "failed"
        outcome.exit_code = failure.exit_code
        outcome.error = failure.error
        outcome.reason = failure.reason
    outcome.finished = time.time()
    outcome.cpu_seconds = round(spent.cpu_seconds, 6)
    outcome.gpu_seconds = spent.gpu_seconds
    return outcome

"""What a notebook user gets back: tasks, stages, commands and machines.

The hub speaks in protocol structs (``TaskRecord``, ``MachineInfo``); users
want plain objects they can poke at and DataFrames they can plot.  This
module turns the first into the second and does no I/O.

Conventions shared by every DataFrame here, so that plots and aggregates do
not lie:

* a measure that was not tracked is missing, never 0, and missing is one
  marker: pandas' ``<NA>`` (nullable dtypes; ``NaT`` for times);
* units are in the column names: ``_s`` seconds, ``_mb`` MiB, ``_percent``;
* times are epoch-second floats on the objects and UTC Timestamps in frames
  (``started``/``ended`` per task and per stage);
* ``stage`` is an ordered Categorical in the tasks' stage order, so
  ``groupby``/``pivot_table`` list stages as the task runs them;
* an empty result still has every column, so code that selects columns
  works before the first task finishes;
* frames are ``ResultFrame``s: ids display short (``t-1a2b3c4d…``), the
  column keeps the full id (see ``frames.py``).
"""

from __future__ import annotations

import base64
import datetime as _dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, SupportsIndex, Union, overload

import msgspec
import pandas as pd

from hub_server import protocol
from hub_server.protocol import TERMINAL_STATES

from .frames import ResultFrame, build_frame, stage_order
from .pycall import NO_SCALAR, load_scalar, load_value, remote_exception

_MIB = 2**20

# Statuses in lifecycle order, so summaries read from "waiting" to "done".
_STATUS_ORDER = ("queued", "assigned", "running", "retrying", "finished", "failed", "cancelled")


def _utc(ts: Optional[float]) -> Optional[_dt.datetime]:
    return None if ts is None else _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc)


def _span(start: Optional[float], end: Optional[float]) -> Optional[float]:
    return None if start is None or end is None else end - start


# ------------------------------------------------------------------- tasks


@dataclass(slots=True)
class CommandResult:
    """One shell command of a stage, as the daemon ran it."""

    cmd: str
    exit_code: Optional[int]
    stdout: str = ""
    stderr: str = ""
    duration: Optional[float] = None
    cpu_time: Optional[float] = None
    peak_ram: Optional[int] = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def truncated(self) -> bool:
        """True when the daemon cut stdout or stderr to the hub's output limit."""
        return self.stdout_truncated or self.stderr_truncated

    @classmethod
    def from_outcome(cls, out: protocol.CommandOutcome) -> CommandResult:
        return cls(
            cmd=out.cmd,
            exit_code=out.exit_code,
            stdout=out.stdout,
            stderr=out.stderr,
            duration=out.duration,
            cpu_time=out.cpu_time,
            peak_ram=out.peak_ram,
            stdout_truncated=out.stdout_truncated,
            stderr_truncated=out.stderr_truncated,
        )

    def _ran(self) -> bool:
        # A command that never started has no exit code, no timing and no output;
        # one killed by a timeout has no exit code but did run.
        return (
            self.exit_code is not None
            or self.duration is not None
            or bool(self.stdout or self.stderr)
        )


@dataclass(slots=True)
class StageResult:
    """One stage of a task; measures are None where the stage did not track them."""

    name: str
    status: str
    started: Optional[float] = None
    duration: Optional[float] = None
    peak_ram: Optional[int] = None
    cpu_percent: Optional[float] = None
    cpu_time: Optional[float] = None
    gpu_util: Optional[float] = None
    gpu_mem: Optional[int] = None
    comment: str = ""
    note: str = ""
    commands: list[CommandResult] = field(default_factory=list)

    @property
    def ended(self) -> Optional[float]:
        """When the stage ended (epoch seconds): start plus duration."""
        return None if self.started is None or self.duration is None else self.started + self.duration

    @classmethod
    def from_outcome(cls, out: protocol.StageOutcome) -> StageResult:
        return cls(
            name=out.name,
            status=out.status,
            started=out.started,
            duration=out.duration,
            peak_ram=out.peak_ram,
            cpu_percent=out.cpu_percent,
            cpu_time=out.cpu_time,
            gpu_util=out.gpu_util,
            gpu_mem=out.gpu_mem,
            comment=out.comment,
            note=out.note,
            commands=[CommandResult.from_outcome(c) for c in out.commands],
        )


@dataclass(slots=True)
class Artifact:
    """A file a task produced; ``path`` is set once it has been downloaded."""

    pattern: str
    name: Optional[str] = None
    sha256: Optional[str] = None
    size: Optional[int] = None
    error: Optional[str] = None
    path: Optional[Path] = None

    @property
    def ok(self) -> bool:
        """The daemon stored the file in the hub (so it can be downloaded)."""
        return self.error is None and self.sha256 is not None

    @classmethod
    def from_info(cls, info: protocol.ArtifactInfo) -> Artifact:
        return cls(
            pattern=info.pattern,
            name=info.name,
            sha256=info.sha256,
            size=info.size,
            error=info.error,
        )


@dataclass(slots=True)
class Attempt:
    """One try at running a task on a machine; retries add more."""

    attempt: int
    machine: str
    state: str
    assigned: Optional[float] = None
    started: Optional[float] = None
    ended: Optional[float] = None
    reason: Optional[str] = None

    @classmethod
    def from_info(cls, info: protocol.AttemptInfo) -> Attempt:
        return cls(**msgspec.structs.asdict(info))


@dataclass(slots=True)
class PyValueInfo:
    """What a Python call returned (or raised), as the hub reported it; the
    value itself stays pickled until asked for (``TaskResult.value``)."""

    repr: str = ""
    pickled: Optional[str] = None
    artifact: Optional[str] = None
    size: Optional[int] = None
    error_type: Optional[str] = None
    traceback: Optional[str] = None

    @property
    def is_error(self) -> bool:
        return self.error_type is not None

    @classmethod
    def from_value(cls, v: protocol.PyValue) -> PyValueInfo:
        return cls(**msgspec.structs.asdict(v))

    def to_value(self) -> protocol.PyValue:
        return protocol.PyValue(repr=self.repr, pickled=self.pickled, artifact=self.artifact, size=self.size,
                                error_type=self.error_type, traceback=self.traceback)


@dataclass(slots=True, repr=False)
class TaskResult:
    """One task as the hub last reported it (it may still be running)."""

    task_id: str
    session_id: str
    status: str
    exit_code: Optional[int] = None
    machine: Optional[str] = None
    hardware: dict[str, Any] = field(default_factory=dict)
    requested_hardware: dict[str, Any] = field(default_factory=dict)
    submitted: Optional[float] = None
    queued: Optional[float] = None  # last time it entered the queue (later than submitted after a retry)
    started: Optional[float] = None
    finished: Optional[float] = None
    attempts: list[Attempt] = field(default_factory=list)
    error: Optional[str] = None
    reason: Optional[str] = None
    wait_reason: Optional[str] = None
    priority: int = 0
    label: str = ""
    stages: list[StageResult] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    credits: Optional[int] = None  # what its credit slot paid the machine; None until claimed
    py_value: Optional[PyValueInfo] = None  # a Python call's outcome
    # What the task's progress parser read in its output (TaskSpec.parser):
    # percent 0-100 and the frame being rendered; None without a parser line.
    progress: Optional[float] = None
    frame_current: Optional[int] = None

    @classmethod
    def from_record(cls, rec: protocol.TaskRecord) -> TaskResult:
        """Copy a hub record into user objects (the record is not kept)."""
        return cls(
            task_id=rec.task_id,
            session_id=rec.session_id,
            status=rec.status,
            exit_code=rec.exit_code,
            machine=rec.machine,
            hardware=dict(rec.machine_hardware or {}),
            requested_hardware=dict(rec.hardware),
            submitted=rec.submitted,
            queued=rec.queued,
            started=rec.started,
            finished=rec.finished,
            attempts=[Attempt.from_info(a) for a in rec.attempts],
            error=rec.error,
            reason=rec.reason,
            wait_reason=rec.wait_reason,
            priority=rec.priority,
            label=rec.label,
            stages=[StageResult.from_outcome(s) for s in rec.stages],
            artifacts=[Artifact.from_info(a) for a in rec.artifacts],
            credits=rec.credits,
            py_value=None if rec.value is None else PyValueInfo.from_value(rec.value),
            progress=rec.progress,
            frame_current=rec.frame_current,
        )

    @property
    def value(self) -> Any:
        """A Python call's return value (unpickled on each access); raises
        the remote exception (traceback as ``__cause__``) if it raised.

        Values too large to come inline are read from their downloaded
        artifact (``get_result`` downloads it by default).
        """
        v = self.py_value
        if v is None:
            raise ValueError(f"task {self.task_id} has no Python value "
                             f"({'it is not a Python call' if self.done else 'it has not ended'})")
        if v.is_error:
            raise remote_exception(v.to_value())
        if v.pickled is not None:
            return load_value(base64.b64decode(v.pickled))
        for a in self.artifacts:
            if a.name == v.artifact and a.path is not None:
                return load_value(Path(a.path).read_bytes())
        raise ValueError(f"task {self.task_id}: its value is the artifact {v.artifact!r}, which was not "
                         f"downloaded (get_result(..., download=True) fetches it)")

    @property
    def done(self) -> bool:
        """The task will not change any more (finished, failed or cancelled)."""
        return self.status in TERMINAL_STATES

    @property
    def ok(self) -> bool:
        return self.status == "finished"

    @property
    def duration(self) -> Optional[float]:
        """Run time in seconds, from start to finish of the last attempt."""
        return _span(self.started, self.finished)

    @property
    def queue_time(self) -> Optional[float]:
        """Seconds between submission and start: time spent waiting for a machine."""
        return _span(self.submitted, self.started)

    @property
    def submitted_at(self) -> Optional[_dt.datetime]:
        return _utc(self.submitted)

    @property
    def started_at(self) -> Optional[_dt.datetime]:
        return _utc(self.started)

    @property
    def finished_at(self) -> Optional[_dt.datetime]:
        return _utc(self.finished)

    @property
    def output(self) -> str:
        """Stdout of the last command that ran: usually the answer a user wants."""
        for stage in reversed(self.stages):
            for cmd in reversed(stage.commands):
                if cmd._ran():
                    return cmd.stdout
        return ""

    def __repr__(self) -> str:
        tid = self.task_id if len(self.task_id) <= 8 else self.task_id[:8] + "…"
        parts = [f"<TaskResult {tid}"]
        if self.label:
            parts.append(repr(self.label))
        parts.append(self.status)
        if self.status == "failed" and self.exit_code is not None:
            parts.append(f"(exit {self.exit_code})")
        if self.machine:
            parts.append(f"on {self.machine}")
        if self.duration is not None:
            parts.append(f"in {self.duration:.2f}s")
        return " ".join(parts) + ">"


# --------------------------------------------------------------- DataFrames

# Column name -> dtype (see README "DataFrame columns").  Units are in the
# names: seconds ``_s``, RAM and GPU memory ``_mb`` (MiB, 2**20 bytes),
# percentages ``_percent``.  "time" columns hold epoch floats until
# build_frame turns them into UTC Timestamps.  STAGE marks the stage column:
# an ordered Categorical in the tasks' stage order.
STAGE = "stage-category"

_TASK_COLUMNS: dict[str, str] = {
    "task_id": "string",
    "session_id": "string",
    "label": "string",
    "status": "string",
    "exit_code": "Int64",
    "machine": "string",
    "os": "string",
    "cpu": "string",
    "cores": "Int64",
    "ram_mb": "Float64",  # the machine's RAM
    "submitted": "time",
    "queued": "time",
    "started": "time",
    "ended": "time",
    "queue_time_s": "Float64",
    "duration_s": "Float64",
    "attempts": "int64",
    "error": "string",
    "wait_reason": "string",
    "priority": "int64",
    "n_stages": "int64",
    "artifacts": "int64",
    "credits": "Int64",  # what the task's credit slot paid; <NA> until claimed
    "progress_percent": "Float64",  # from the task's progress parser; <NA> without one
    "frame_current": "Int64",
}

_STAGE_COLUMNS: dict[str, str] = {
    "task_id": "string",
    "machine": "string",
    "stage": STAGE,
    "stage_index": "int64",
    "status": "string",
    "started": "time",
    "ended": "time",
    "duration_s": "Float64",
    "peak_ram_mb": "Float64",
    "cpu_percent": "Float64",
    "cpu_time_s": "Float64",
    "gpu_util_percent": "Float64",
    "gpu_mem_mb": "Float64",
    "comment": "string",
    "note": "string",
}

_COMMAND_COLUMNS: dict[str, str] = {
    "task_id": "string",
    "machine": "string",
    "stage": STAGE,
    "stage_index": "int64",
    "command_index": "int64",
    "cmd": "string",
    "exit_code": "Int64",
    "duration_s": "Float64",
    "cpu_time_s": "Float64",
    "peak_ram_mb": "Float64",
    "stdout": "string",
    "stderr": "string",
    "truncated": "boolean",
}

_MACHINE_COLUMNS: dict[str, str] = {
    "machine_id": "string",
    "name": "string",
    "state": "string",
    "os": "string",
    "distro": "string",
    "arch": "string",
    "cpu": "string",
    "cores": "Int64",
    "ram_mb": "Float64",
    "gpus": "string",
    "slots": "int64",
    "running": "int64",
    "tags": "string",
    "owner": "string",
    "credits": "int64",  # what its claimed slots paid (to its owner, or pending)
    "runtimes": "string",
    "load_1m": "Float64",
    "cpu_percent": "Float64",
    "mem_percent": "Float64",
    "disk_percent": "Float64",
    "last_seen": "time",
}


def _mb(n: Optional[int]) -> Optional[float]:
    return None if n is None else n / _MIB


def _frame(rows: list[dict[str, Any]], columns: dict[str, str],
           stages: Optional[list[str]] = None) -> pd.DataFrame:
    """build_frame, with the stage column as an ordered Categorical of ``stages``."""
    dtypes: dict[str, Any] = dict(columns)
    for name, dtype in columns.items():
        if dtype == STAGE:
            dtypes[name] = pd.CategoricalDtype(stages or [], ordered=True)
    return build_frame(rows, dtypes)


def _task_row(t: TaskResult) -> dict[str, Any]:
    hw = t.hardware
    return {
        "task_id": t.task_id,
        "session_id": t.session_id,
        "label": t.label,
        "status": t.status,
        "exit_code": t.exit_code,
        "machine": t.machine,
        "os": hw.get("os"),
        "cpu": hw.get("cpu"),
        "cores": hw.get("cores"),
        "ram_mb": _mb(hw.get("ram")),
        "submitted": t.submitted,
        "queued": t.queued,
        "started": t.started,
        "ended": t.finished,
        "queue_time_s": t.queue_time,
        "duration_s": t.duration,
        "attempts": len(t.attempts),
        "error": t.error,
        "wait_reason": t.wait_reason,
        "priority": t.priority,
        "n_stages": len(t.stages),
        "artifacts": sum(a.ok for a in t.artifacts),
        "credits": t.credits,
        "progress_percent": t.progress,
        "frame_current": t.frame_current,
    }


def _stage_row(t: TaskResult, index: int, s: StageResult) -> dict[str, Any]:
    return {
        "task_id": t.task_id,
        "machine": t.machine,
        "stage": s.name,
        "stage_index": index,
        "status": s.status,
        "started": s.started,
        "ended": s.ended,
        "duration_s": s.duration,
        "peak_ram_mb": _mb(s.peak_ram),
        "cpu_percent": s.cpu_percent,
        "cpu_time_s": s.cpu_time,
        "gpu_util_percent": s.gpu_util,
        "gpu_mem_mb": _mb(s.gpu_mem),
        "comment": s.comment,
        "note": s.note,
    }


def _command_row(
    t: TaskResult, stage_index: int, s: StageResult, index: int, c: CommandResult
) -> dict[str, Any]:
    return {
        "task_id": t.task_id,
        "machine": t.machine,
        "stage": s.name,
        "stage_index": stage_index,
        "command_index": index,
        "cmd": c.cmd,
        "exit_code": c.exit_code,
        "duration_s": c.duration,
        "cpu_time_s": c.cpu_time,
        "peak_ram_mb": _mb(c.peak_ram),
        "stdout": c.stdout,
        "stderr": c.stderr,
        "truncated": c.truncated,
    }


_LEVELS = ("task", "stage", "command")


def _scalar_values(tasks: Sequence[TaskResult]) -> Optional[pd.Series]:
    """The tasks' values as one column, or None when some value is not a
    small scalar (or no task has a value).  Loads only plain scalars, so a
    table never runs code a daemon sent."""
    values: list[Any] = []
    seen = False
    for t in tasks:
        v = t.py_value
        if v is None or v.is_error:
            values.append(None)
            continue
        x = load_scalar(v.pickled)
        if x is NO_SCALAR:
            return None
        seen = True
        values.append(x)
    if not seen:
        return None
    present = [x for x in values if x is not None]
    if all(isinstance(x, bool) for x in present):
        dtype = "boolean"
    elif all(isinstance(x, int) and not isinstance(x, bool) for x in present) and \
            all(-(2**63) <= x < 2**63 for x in present):
        dtype = "Int64"
    elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in present):
        dtype = "Float64"
    elif all(isinstance(x, str) for x in present):
        dtype = "string"
    else:  # mixed kinds: keep the objects, missing as <NA> like every other column
        return pd.Series([pd.NA if x is None else x for x in values], dtype="object")
    return pd.Series(values, dtype=dtype)


class ResultList(list[TaskResult]):
    """The tasks of a run: a plain list, plus summaries and DataFrames."""

    @classmethod
    def from_records(cls, records: Iterable[protocol.TaskRecord]) -> ResultList:
        return cls(TaskResult.from_record(r) for r in records)

    @overload
    def __getitem__(self, index: SupportsIndex) -> TaskResult: ...
    @overload
    def __getitem__(self, index: slice) -> ResultList: ...

    def __getitem__(self, index: Union[SupportsIndex, slice]) -> Union[TaskResult, ResultList]:
        # Slices stay ResultLists so ``results[:10].to_dataframe()`` works.
        item = super().__getitem__(index)
        return ResultList(item) if isinstance(index, slice) else item

    def to_dataframe(self, level: str = "task") -> pd.DataFrame:
        """One row per task, per task x stage, or per task x stage x command.

        Python function tasks add a ``value`` column (task level) when every
        value is a small scalar: a number, a short string, a bool or None."""
        if level == "task":
            frame = _frame([_task_row(t) for t in self], _TASK_COLUMNS)
            values = _scalar_values(self)
            if values is not None:
                frame["value"] = values
            return frame
        if level == "stage":
            rows = [_stage_row(t, i, s) for t in self for i, s in enumerate(t.stages)]
            return _frame(rows, _STAGE_COLUMNS, self.stage_names())
        if level == "command":
            rows = [
                _command_row(t, i, s, j, c)
                for t in self
                for i, s in enumerate(t.stages)
                for j, c in enumerate(s.commands)
            ]
            return _frame(rows, _COMMAND_COLUMNS, self.stage_names())
        raise ValueError(f"unknown level {level!r}; use one of: {', '.join(map(repr, _LEVELS))}")

    def plot_timeline(self, ax: Any = None, *, title: Optional[str] = "stages per machine slot") -> Any:
        """A Gantt chart (matplotlib) of every stage on the machine slot it ran in;
        returns the Axes.  x: seconds since the first start, colour: stage,
        hatched red edge: failed.  See ``timeline.py``."""
        from .timeline import plot_timeline

        return plot_timeline(self, ax, title=title)

    def _repr_html_(self) -> str:
        """A summary card (counts, machines, wall time, first error) above the first tasks."""
        from .cards import results_card

        return results_card(self)

    def stage_names(self) -> list[str]:
        """Every stage name, in the order the tasks run them (the ``stage`` categories)."""
        return stage_order([s.name for s in t.stages] for t in self)

    def by_status(self) -> dict[str, int]:
        """How many tasks are in each status, in lifecycle order."""
        counts: dict[str, int] = {}
        for t in self:
            counts[t.status] = counts.get(t.status, 0) + 1
        rank = {s: i for i, s in enumerate(_STATUS_ORDER)}
        return dict(sorted(counts.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    @property
    def failed(self) -> ResultList:
        return ResultList(t for t in self if t.status == "failed")

    @property
    def ok(self) -> bool:
        """Every task finished successfully (True for an empty list)."""
        return all(t.ok for t in self)


# ----------------------------------------------------------------- machines


@dataclass(slots=True)
class Machine:
    """A daemon in the pool, with the hardware it reported at registration."""

    machine_id: str
    name: str
    state: str
    slots: int
    running: int = 0
    tags: list[str] = field(default_factory=list)
    hardware: dict[str, Any] = field(default_factory=dict)
    load: Optional[dict[str, Any]] = None
    first_seen: Optional[float] = None
    last_seen: Optional[float] = None
    owner: str = ""  # who contributes the machine (its daemon token's owner)
    credits: int = 0  # credits its claimed slots paid (to its owner, or pending)

    @classmethod
    def from_info(cls, info: protocol.MachineInfo) -> Machine:
        return cls(
            machine_id=info.machine_id,
            name=info.name,
            state=info.state,
            slots=info.slots,
            running=info.running,
            tags=list(info.tags),
            hardware=dict(info.hardware),
            load=None if info.load is None else protocol.to_builtins(info.load),
            first_seen=info.first_seen,
            last_seen=info.last_seen,
            owner=info.owner,
            credits=info.credits,
        )

    @property
    def os(self) -> Optional[str]:
        return self.hardware.get("os")

    @property
    def cpu(self) -> Optional[str]:
        return self.hardware.get("cpu")

    @property
    def cores(self) -> Optional[int]:
        return self.hardware.get("cores")

    @property
    def ram(self) -> Optional[int]:
        """Physical RAM in bytes."""
        return self.hardware.get("ram")

    @property
    def gpus(self) -> list[dict[str, Any]]:
        """GPUs as ``{name, memory}`` dicts; empty when the machine has none."""
        return list(self.hardware.get("gpus") or [])


def _machine_row(m: Machine) -> dict[str, Any]:
    hw = m.hardware
    load = m.load or {}
    load_avg = load.get("load_avg") or [None]
    return {
        "machine_id": m.machine_id,
        "name": m.name,
        "state": m.state,
        "os": hw.get("os"),
        "distro": hw.get("distro"),
        "arch": hw.get("arch"),
        "cpu": hw.get("cpu"),
        "cores": m.cores,
        "ram_mb": _mb(m.ram),
        "gpus": ", ".join(str(g.get("name", "?")) for g in m.gpus),
        "slots": m.slots,
        "running": m.running,
        "tags": ", ".join(m.tags),
        "runtimes": ", ".join(str(r) for r in hw.get("runtimes") or []),  # shell, python3.11, docker...
        "owner": m.owner,
        "credits": m.credits,
        "load_1m": load_avg[0],
        "cpu_percent": load.get("cpu_percent"),
        "mem_percent": load.get("mem_percent"),
        "disk_percent": load.get("disk_percent"),
        "last_seen": m.last_seen,
    }


class HardwarePool(Sequence[Machine]):
    """The machines the hub knows, to see what a task could run on."""

    __slots__ = ("_machines",)

    def __init__(self, machines: Iterable[Machine] = ()) -> None:
        self._machines = list(machines)

    @classmethod
    def from_machines(cls, machines: Iterable[protocol.MachineInfo]) -> HardwarePool:
        return cls(Machine.from_info(m) for m in machines)

    @overload
    def __getitem__(self, index: int) -> Machine: ...
    @overload
    def __getitem__(self, index: slice) -> HardwarePool: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[Machine, HardwarePool]:
        if isinstance(index, slice):
            return HardwarePool(self._machines[index])
        return self._machines[index]

    def __len__(self) -> int:
        return len(self._machines)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self._machines]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per machine: hardware, capacity and current load."""
        return _frame([_machine_row(m) for m in self._machines], _MACHINE_COLUMNS)

    def _repr_html_(self) -> str:
        """A card: workers, slots, cores, memory, then one row per machine."""
        from .cards import card, machines_table, pool_rows

        sections = [(f"Machines ({len(self)})", machines_table(self))] if len(self) else []
        return card("HWF hardware pool", pool_rows(self), sections=sections, open_sections=True)

    def __repr__(self) -> str:
        n = len(self._machines)
        noun = "machine" if n == 1 else "machines"
        if not n:
            return "<HardwarePool 0 machines>"
        return f"<HardwarePool {n} {noun}: {', '.join(self.names)}>"

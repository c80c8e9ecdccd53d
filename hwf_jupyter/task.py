"""What a user builds: ``Task``, ``Stage``, ``Data``, ``Artifacts`` (seed names).

Everything is validated when it is built, so a mistake shows up in the cell
that made it, with a message naming the problem, not later on a daemon.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from hub_server import hardware as hw
from hub_server import protocol as p
from hub_server.paths import unsafe_relative_path

TRACK_FLAGS = ("time", "ram", "cpu", "gpu")


class TaskError(ValueError):
    """A Task, Stage, Data or Artifacts was built with bad input."""


class Data:
    """A local file sent with the task, saved as ``filename`` in its working dir."""

    def __init__(self, path: Union[str, os.PathLike], filename: Optional[str] = None) -> None:
        self.path = Path(path).expanduser()
        self.filename = filename if filename is not None else self.path.name
        problem = unsafe_relative_path(self.filename)
        if problem:
            raise TaskError(f"Data filename {self.filename!r} {problem}")

    def check(self) -> None:
        if not self.path.is_file():
            what = "is a directory, not a file" if self.path.is_dir() else "does not exist"
            raise TaskError(f"Data path {str(self.path)!r} {what}")

    def __repr__(self) -> str:
        return f"Data({str(self.path)!r}, {self.filename!r})"


class Stage:
    """Commands run in order by the shell; a failing command fails the task."""

    def __init__(
        self,
        name: str,
        data: Union[Data, Sequence[Data], None] = None,
        cmd: Union[str, Sequence[str]] = (),
        track_time: bool = True,
        track_ram: bool = False,
        track_cpu: bool = False,
        track_gpu: bool = False,
        comment: str = "",
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise TaskError("a Stage needs a non-empty name")
        self.name = name
        if data is None:
            self.data: list[Data] = []
        elif isinstance(data, Data):
            self.data = [data]
        else:
            self.data = list(data)
            for d in self.data:
                if not isinstance(d, Data):
                    raise TaskError(f"Stage {name!r}: data must be Data objects, got {d!r}")
        cmds = [cmd] if isinstance(cmd, str) else list(cmd)
        for c in cmds:
            if not isinstance(c, str):
                raise TaskError(f"Stage {name!r}: commands must be strings, got {c!r}")
        self.cmd = [c for c in cmds if c.strip()]
        if not self.cmd:
            raise TaskError(f"Stage {name!r} has no commands")
        self.track_time = bool(track_time)
        self.track_ram = bool(track_ram)
        self.track_cpu = bool(track_cpu)
        self.track_gpu = bool(track_gpu)
        self.comment = comment

    def spec(self, blobs: Mapping[Path, tuple[str, int]]) -> p.StageSpec:
        return p.StageSpec(
            name=self.name,
            cmds=self.cmd,
            data=[p.DataSpec(d.filename, *blobs[d.path]) for d in self.data],
            track_time=self.track_time,
            track_ram=self.track_ram,
            track_cpu=self.track_cpu,
            track_gpu=self.track_gpu,
            comment=self.comment,
        )

    def __repr__(self) -> str:
        tracks = [f for f in TRACK_FLAGS if getattr(self, f"track_{f}")]
        return f"Stage({self.name!r}, cmd={self.cmd!r}, data={self.data!r}, track={tracks})"


class Artifacts:
    """Files (glob patterns allowed) to bring back after the last stage."""

    def __init__(self, *files: str) -> None:
        flat: list[str] = []
        for f in files:
            flat.extend([f] if isinstance(f, str) else list(f))
        for f in flat:
            problem = unsafe_relative_path(f) if isinstance(f, str) else "is not a string"
            if problem:
                raise TaskError(f"artifact {f!r} {problem}")
        self.files = flat

    def __repr__(self) -> str:
        return f"Artifacts({', '.join(map(repr, self.files))})"


class Task:
    """Stages (run in order), wanted artifacts, and the hardware to run on."""

    def __init__(
        self,
        *actions: Union[Stage, Artifacts],
        hardware: Optional[Mapping[str, Any]] = None,
        label: str = "",
    ) -> None:
        self.stages: list[Stage] = []
        self.artifacts: list[str] = []
        for a in actions:
            if isinstance(a, Stage):
                self.stages.append(a)
            elif isinstance(a, Artifacts):
                self.artifacts.extend(a.files)
            else:
                raise TaskError(f"Task takes Stage and Artifacts objects, got {a!r}")
        if not self.stages:
            raise TaskError("a Task needs at least one Stage")
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise TaskError(f"stage names must be unique in a Task; repeated: {', '.join(dupes)}")
        try:
            hw.normalize(hardware)
        except hw.HardwareError as exc:
            raise TaskError(str(exc)) from None
        self.hardware: dict[str, Any] = dict(hardware or {})
        self.label = label
        for d in self.data_files():
            d.check()

    def data_files(self) -> list[Data]:
        return [d for s in self.stages for d in s.data]

    def pinned_to(self, machine: str) -> "Task":
        """A copy that must run on one named daemon (used by ``across=``)."""
        other = copy.copy(self)
        other.hardware = dict(self.hardware, daemon=machine)
        return other

    def spec(
        self,
        blobs: Mapping[Path, tuple[str, int]],
        *,
        priority: int = 0,
        max_retries: int = 3,
        timeout: Optional[float] = None,
        stream: bool = False,
    ) -> p.TaskSpec:
        return p.TaskSpec(
            stages=[s.spec(blobs) for s in self.stages],
            artifacts=list(self.artifacts),
            hardware=self.hardware,
            priority=priority,
            max_retries=max_retries,
            timeout=timeout,
            label=self.label,
            stream=stream,
        )

    def __repr__(self) -> str:
        parts = [repr(s) for s in self.stages]
        if self.artifacts:
            parts.append(repr(Artifacts(*self.artifacts)))
        if self.hardware:
            parts.append(f"hardware={self.hardware!r}")
        return f"Task({', '.join(parts)})"


def as_task_list(tasks: Union[Task, Iterable[Task]]) -> list[Task]:
    items = [tasks] if isinstance(tasks, Task) else list(tasks)
    for t in items:
        if not isinstance(t, Task):
            raise TaskError(f"dispatch takes Task objects, got {t!r}")
    if not items:
        raise TaskError("nothing to dispatch: no tasks given")
    return items

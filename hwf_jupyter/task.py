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
from hub_server.taskenv import env_problem

TRACK_FLAGS = ("time", "ram", "cpu", "gpu")
MAX_FRAME = 10**9  # the protocol's FrameNumber bound


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


def check_parser(parser: Optional[str]) -> Optional[str]:
    """``parser`` if the daemons know it (or None); else a TaskError naming the allowed ones."""
    if parser is not None and parser not in p.PARSERS:
        allowed = ", ".join(repr(n) for n in p.PARSERS)
        raise TaskError(f"parser must be one of {allowed} (or None), got {parser!r}")
    return parser


def check_env(env: Optional[Mapping[str, str]]) -> dict[str, str]:
    """``env`` as a dict if every name and value is allowed; else a TaskError naming the variable."""
    out = dict(env or {})
    problem = env_problem(out)
    if problem:
        raise TaskError(problem)
    return out


def check_frames(frame_start: Optional[int], frame_end: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """A render's frame range: both whole numbers with start <= end, or neither."""
    if (frame_start is None) != (frame_end is None):
        raise TaskError("frame_start and frame_end go together: give both or neither")
    for name, value in (("frame_start", frame_start), ("frame_end", frame_end)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TaskError(f"{name} must be a whole number, got {value!r}")
        if abs(value) > MAX_FRAME:
            raise TaskError(f"{name} must be within -{MAX_FRAME}..{MAX_FRAME}, got {value}")
    if frame_start is not None and frame_end is not None and frame_start > frame_end:
        raise TaskError(f"frame_start ({frame_start}) must be <= frame_end ({frame_end})")
    return frame_start, frame_end


class Task:
    """Stages (run in order), wanted artifacts, and the hardware to run on.

    ``parser`` ("frames", "percent" or "hwf-progress") makes the daemon read
    progress from the commands' output; ``frame_start``/``frame_end`` (a
    render's frames) turn the frame being rendered into a percent.
    ``env`` adds environment variables to the task's commands (names of
    letters, digits and ``_``; string values).
    """

    def __init__(
        self,
        *actions: Union[Stage, Artifacts],
        hardware: Optional[Mapping[str, Any]] = None,
        label: str = "",
        parser: Optional[str] = None,
        frame_start: Optional[int] = None,
        frame_end: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
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
        self.parser = check_parser(parser)
        self.frame_start, self.frame_end = check_frames(frame_start, frame_end)
        self.env = check_env(env)
        for d in self.data_files():
            d.check()

    def data_files(self) -> list[Data]:
        return [d for s in self.stages for d in s.data]

    def pinned_to(self, machine: str) -> "Task":
        """A copy that must run on one named daemon (used by ``across=``)."""
        other = copy.copy(self)
        other.hardware = dict(self.hardware, daemon=machine)
        return other

    def with_env(self, env: Mapping[str, str], label: Optional[str] = None) -> "Task":
        """A copy with more environment variables (and another label): one copy of a sweep."""
        other = copy.copy(self)
        other.env = check_env({**self.env, **env})
        if label is not None:
            other.label = label
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
            parser=self.parser,  # type: ignore[arg-type]  # checked in __init__
            frame_start=self.frame_start,
            frame_end=self.frame_end,
            env=dict(self.env),
        )

    def __repr__(self) -> str:
        parts = [repr(s) for s in self.stages]
        if self.artifacts:
            parts.append(repr(Artifacts(*self.artifacts)))
        if self.hardware:
            parts.append(f"hardware={self.hardware!r}")
        if self.parser:
            parts.append(f"parser={self.parser!r}")
        if self.env:
            parts.append(f"env={self.env!r}")
        if self.frame_start is not None:
            parts.append(f"frame_start={self.frame_start}, frame_end={self.frame_end}")
        return f"Task({', '.join(parts)})"


def as_task_list(tasks: Union[Task, Iterable[Task]]) -> list[Task]:
    items = [tasks] if isinstance(tasks, Task) else list(tasks)
    for t in items:
        if not isinstance(t, Task):
            raise TaskError(f"dispatch takes Task objects, got {t!r}")
    if not items:
        raise TaskError("nothing to dispatch: no tasks given")
    return items

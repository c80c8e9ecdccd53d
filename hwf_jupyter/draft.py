"""The notebook's task under construction, built up cell by cell by the magics.

A dispatch spends the draft: it stays shown (and can be dispatched again)
until the next edit, which starts a new draft, so stages from an earlier
task never pile into the next one.  A stage named like one already in the
draft replaces it (re-running a cell must not duplicate its stage).
"""

from __future__ import annotations

import html
from typing import Any, Optional

from hub_server import hardware as hw

from .task import Artifacts, Stage, Task, TaskError


class Draft:
    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self.artifacts: list[str] = []
        self.hardware: dict[str, Any] = {}
        self.dispatched_as: Optional[str] = None  # the session it went out in: spent

    def _renew(self) -> Optional[str]:
        """Start a new draft if this one was dispatched; returns that session id."""
        spent = self.dispatched_as
        if spent is not None:
            self.clear()
        return spent

    def add_stage(self, stage: Stage) -> str:
        """Add a stage; one of the same name is replaced.  Says what happened, in words."""
        spent = self._renew()
        note = f"new draft (the previous one went out as session {spent}); " if spent else ""
        for i, s in enumerate(self.stages):
            if s.name == stage.name:
                self.stages[i] = stage
                return f"{note}replaced stage {stage.name!r} (stage {i + 1} of {len(self.stages)})"
        self.stages.append(stage)
        return f"{note}added stage {stage.name!r} (stage {len(self.stages)} of {len(self.stages)})"

    def add_artifacts(self, files: list[str]) -> None:
        Artifacts(*files)  # validates
        self._renew()
        self.artifacts.extend(f for f in files if f not in self.artifacts)

    def set_hardware(self, pairs: dict[str, Any]) -> None:
        base = {} if self.dispatched_as is not None else self.hardware
        merged = {**base, **pairs}
        try:
            hw.normalize(merged)
        except hw.HardwareError as exc:
            raise TaskError(str(exc)) from None
        self._renew()
        self.hardware = merged

    def mark_dispatched(self, session_id: str) -> None:
        """The draft went out: the next edit starts a new one."""
        self.dispatched_as = session_id

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    @property
    def empty(self) -> bool:
        return not self.stages

    def build(self, label: str = "") -> Task:
        if self.empty:
            raise TaskError("the draft task has no stages: add one with %%hwf_stage NAME")
        actions: list[Any] = list(self.stages)
        if self.artifacts:
            actions.append(Artifacts(*self.artifacts))
        return Task(*actions, hardware=self.hardware or None, label=label)

    def text(self) -> str:
        if self.empty and not self.artifacts and not self.hardware:
            return "hwf draft: empty (add stages with %%hwf_stage NAME)"
        lines = [f"hwf draft: {len(self.stages)} stage(s)"]
        if self.dispatched_as is not None:
            lines[0] += (f", dispatched as session {self.dispatched_as}"
                         " (the next %%hwf_stage starts a new draft)")
        for i, s in enumerate(self.stages, 1):
            tracks = ",".join(f for f in ("time", "ram", "cpu", "gpu") if getattr(s, f"track_{f}")) or "-"
            data = ", ".join(f"{d.path}->{d.filename}" for d in s.data)
            lines.append(f"  {i}. {s.name} [track {tracks}]" + (f" data: {data}" if data else "")
                         + (f"  # {s.comment}" if s.comment else ""))
            for c in s.cmd:
                first, *rest = c.rstrip("\n").splitlines() or [""]
                lines.append(f"       $ {first}")
                lines.extend(f"       > {r}" for r in rest)
        if self.artifacts:
            lines.append(f"  artifacts: {', '.join(self.artifacts)}")
        if self.hardware:
            lines.append("  hardware: " + ", ".join(f"{k}={v}" for k, v in self.hardware.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def _repr_html_(self) -> Optional[str]:
        return f"<pre>{html.escape(self.text())}</pre>"

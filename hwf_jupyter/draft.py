"""The notebook's task under construction, built up cell by cell by the magics."""

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

    def add_stage(self, stage: Stage) -> None:
        """Add a stage; a stage of the same name replaces the old one (re-running a cell)."""
        for i, s in enumerate(self.stages):
            if s.name == stage.name:
                self.stages[i] = stage
                return
        self.stages.append(stage)

    def add_artifacts(self, files: list[str]) -> None:
        Artifacts(*files)  # validates
        self.artifacts.extend(f for f in files if f not in self.artifacts)

    def set_hardware(self, pairs: dict[str, Any]) -> None:
        merged = {**self.hardware, **pairs}
        try:
            hw.normalize(merged)
        except hw.HardwareError as exc:
            raise TaskError(str(exc)) from None
        self.hardware = merged

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
        for i, s in enumerate(self.stages, 1):
            tracks = ",".join(f for f in ("time", "ram", "cpu", "gpu") if getattr(s, f"track_{f}")) or "-"
            data = ", ".join(f"{d.path}->{d.filename}" for d in s.data)
            lines.append(f"  {i}. {s.name} [track {tracks}]" + (f" data: {data}" if data else "")
                         + (f"  # {s.comment}" if s.comment else ""))
            lines.extend(f"       $ {c}" for c in s.cmd)
        if self.artifacts:
            lines.append(f"  artifacts: {', '.join(self.artifacts)}")
        if self.hardware:
            lines.append("  hardware: " + ", ".join(f"{k}={v}" for k, v in self.hardware.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def _repr_html_(self) -> Optional[str]:
        return f"<pre>{html.escape(self.text())}</pre>"

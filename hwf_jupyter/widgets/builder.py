"""``TaskBuilder``: a form that builds a Task and dispatches it.

For people who would rather click than write ``Task(Stage(...))``; the form
produces exactly the objects the Python API takes, so ``builder.task()`` is
also a way to learn that API.  Mistakes show as one red line in the form.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..dispatch import Submission, dispatch_sync
from ..task import TRACK_FLAGS, Data, Stage, Task, TaskError
from ._common import as_hub, describe_error, error_html, esc
from .progress import Progress, watch_progress

if TYPE_CHECKING:
    import ipywidgets

    from ..hub import Hub
    from ..results import HardwarePool

ANY = "any"


def parse_data(text: str) -> list[Data]:
    """``"a.csv, in/b.txt:b.txt"`` -> Data objects (``src[:name]``, comma-separated)."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        src, name = item, None
        head, sep, tail = item.rpartition(":")
        # "C:\x" and "dir/x:y/z" are paths, not src:name.
        if sep and head and tail and len(head) > 1 and not any(ch in tail for ch in "/\\"):
            src, name = head, tail
        out.append(Data(src.strip(), name.strip() if name else None))
    return out


def pool_options(pool: "HardwarePool") -> dict[str, list[str]]:
    """Dropdown choices from the machines that exist: os families, architectures, GPU names."""
    oses, arches, gpus = set(), set(), set()
    for m in pool:
        hw = m.hardware
        if hw.get("os"):
            oses.add(str(hw["os"]))
        if hw.get("arch"):
            arches.add(str(hw["arch"]))
        gpus.update(str(g.get("name")) for g in m.gpus if g.get("name"))
    return {
        "os": [ANY, *sorted(oses)],
        "cpu": [ANY, *sorted(arches)],
        "gpu": [ANY, *sorted(gpus), "none"],
    }


class TaskBuilder:
    """Stage name, commands, tracking, hardware and data files -> ``Task`` -> dispatch."""

    def __init__(self, hub: "Hub", *, title: str = "") -> None:
        import ipywidgets as w

        self.hub = as_hub(hub, 'TaskBuilder')
        self.stages: list[Stage] = []
        self.submission: Optional[Submission] = None
        self.progress: Optional[Progress] = None
        self.error: Optional[str] = None
        self._upload_dir: Optional[Path] = None

        wide = w.Layout(width="95%")
        self.stage_name = w.Text(value="stage1", description="Stage", layout=wide)
        self.commands = w.Textarea(placeholder="a bash script, as in %%bash (loops, if, heredocs work)",
                                   description="Commands",
                                   layout=w.Layout(width="95%", height="90px"))
        self.track = {f: w.Checkbox(value=f == "time", description=f, indent=False,
                                    layout=w.Layout(width="70px")) for f in TRACK_FLAGS}
        self.data = w.Text(placeholder="local paths, comma-separated: src[:name]", description="Data",
                           layout=wide)
        self.upload = w.FileUpload(multiple=True, description="Upload")
        self.hw_os = w.Dropdown(options=[ANY], value=ANY, description="os")
        self.hw_cpu = w.Dropdown(options=[ANY], value=ANY, description="cpu")
        self.hw_gpu = w.Dropdown(options=[ANY, "none"], value=ANY, description="gpu")
        self.hw_ram = w.Text(placeholder="e.g. 1GB (blank = any)", description="ram")
        self.repeat = w.BoundedIntText(value=1, min=1, max=100_000, description="repeat")
        self.add_button = w.Button(description="Add stage", icon="plus")
        self.clear_button = w.Button(description="Clear stages")
        self.dispatch_button = w.Button(description="Dispatch", button_style="primary", icon="play")
        self.message = w.HTML()
        self.draft = w.HTML()
        self.output = w.Output()
        self.add_button.on_click(lambda _b: self.click_add_stage())
        self.clear_button.on_click(lambda _b: self.click_clear())
        self.dispatch_button.on_click(lambda _b: self.click_dispatch())
        for widget in (self.stage_name, self.commands, self.data, self.hw_os, self.hw_cpu,
                       self.hw_gpu, self.hw_ram, *self.track.values()):
            widget.observe(lambda _c: self._show_draft(), names="value")

        self.widget: "ipywidgets.VBox" = w.VBox([
            *([w.HTML(f"<b>{esc(title)}</b>")] if title else []),
            self.stage_name,
            self.commands,
            w.HBox([w.Label("track", layout=w.Layout(width="90px")), *self.track.values()]),
            w.HBox([self.data, self.upload]),
            w.HBox([self.hw_os, self.hw_cpu]),
            w.HBox([self.hw_gpu, self.hw_ram]),
            self.repeat,
            w.HBox([self.add_button, self.clear_button, self.dispatch_button]),
            self.message,
            self.draft,
            self.output,
        ])
        self.refresh_options()
        self._show_draft()

    # -- form -> objects ----------------------------------------------------------

    def refresh_options(self) -> None:
        """Fill the hardware dropdowns from the machines the hub knows now."""
        try:
            opts = pool_options(self.hub.get_hardware_pool_sync(include_offline=True))
        except Exception as exc:
            self._fail(exc)
            return
        for dd, key in ((self.hw_os, "os"), (self.hw_cpu, "cpu"), (self.hw_gpu, "gpu")):
            keep = dd.value if dd.value in opts[key] else ANY
            dd.options = opts[key]
            dd.value = keep

    def hardware(self) -> dict[str, Any]:
        """The hardware requirement the form describes ("any" and blanks left out)."""
        hw: dict[str, Any] = {}
        for key, dd in (("os", self.hw_os), ("cpu", self.hw_cpu), ("gpu", self.hw_gpu)):
            if dd.value and dd.value != ANY:
                hw[key] = dd.value
        if self.hw_ram.value.strip():
            hw["ram"] = self.hw_ram.value.strip()
        return hw

    def current_stage(self) -> Optional[Stage]:
        """The stage being typed (its commands one bash script, like %%hwf_stage's), or None while empty."""
        script = self.commands.value.strip("\n")
        if not script.strip():
            return None
        cmds = [script]
        return Stage(
            self.stage_name.value.strip(),
            data=parse_data(self.data.value) + self._uploaded_data(),
            cmd=cmds,
            **{f"track_{f}": cb.value for f, cb in self.track.items()},
        )

    def task(self) -> Task:
        """The Task of the added stages plus the one in the form (if it has commands)."""
        stages = list(self.stages)
        current = self.current_stage()
        if current is not None:
            stages.append(current)
        if not stages:
            raise TaskError("no stages yet: type at least one command")
        return Task(*stages, hardware=self.hardware())

    def _uploaded_data(self) -> list[Data]:
        """Uploaded files, saved to a temporary directory so Data can send them."""
        files = list(self.upload.value or ())
        if not files:
            return []
        if self._upload_dir is None:
            self._upload_dir = Path(tempfile.mkdtemp(prefix="hwf-upload-"))
        out = []
        for f in files:
            path = self._upload_dir / Path(f["name"]).name
            content = bytes(f["content"])
            if not (path.is_file() and path.read_bytes() == content):
                path.write_bytes(content)
            out.append(Data(path, Path(f["name"]).name))
        return out

    # -- buttons ------------------------------------------------------------------

    def click_add_stage(self) -> None:
        """Keep the form's stage and start the next one."""
        try:
            stage = self.current_stage()
            if stage is None:
                raise TaskError("type at least one command before adding the stage")
            Task(*self.stages, stage)  # duplicate names and bad data show up now, not at dispatch
        except Exception as exc:
            self._fail(exc)
            return
        self.stages.append(stage)
        self.commands.value = ""
        self.data.value = ""
        self.upload.value = ()
        self.stage_name.value = f"stage{len(self.stages) + 1}"
        self._ok()

    def click_clear(self) -> None:
        self.stages.clear()
        self.stage_name.value = "stage1"
        self._ok()

    def click_dispatch(self) -> Optional[Submission]:
        """Build the Task, dispatch it and show its progress below the form."""
        try:
            task = self.task()
            sub = dispatch_sync(task, self.hub, repeat=int(self.repeat.value))
        except Exception as exc:
            self._fail(exc)
            return None
        self.submission = sub
        try:
            self.progress = watch_progress(self.hub, sub, title=f"{len(sub)} task(s)", interactive=True)
        except Exception as exc:
            self._fail(exc)
            return sub
        bundle = self.progress._repr_mimebundle_()
        self.output.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)
        self._ok()
        return sub

    # -- showing ----------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        self.error = describe_error(exc)
        self.message.value = error_html(self.error)

    def _ok(self) -> None:
        self.error = None
        self.message.value = ""
        self._show_draft()

    def _show_draft(self) -> None:
        lines = [_stage_line(i, s) for i, s in enumerate(self.stages, 1)]
        try:
            current = self.current_stage()
        except Exception:
            current = None
        if current is not None:
            lines.append(_stage_line(len(self.stages) + 1, current) + " <i>(in the form)</i>")
        hw = self.hardware()
        hw_text = ", ".join(f"{k}={v}" for k, v in hw.items()) or "any machine"
        body = "".join(f"<li>{line}</li>" for line in lines) or "<li><i>no stages yet</i></li>"
        self.draft.value = f"<div><b>Task</b> on {esc(hw_text)}<ol style='margin:0'>{body}</ol></div>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = repr(self)
        return bundle

    def __repr__(self) -> str:
        try:
            return f"<TaskBuilder {self.task()!r}>"
        except Exception:
            return f"<TaskBuilder {len(self.stages)} stage(s)>"


def _stage_line(i: int, s: Stage) -> str:
    tracks = [f for f in TRACK_FLAGS if getattr(s, f"track_{f}")]
    data = f"; data: {', '.join(d.filename for d in s.data)}" if s.data else ""
    return (f"<b>{esc(s.name)}</b>: <code>{esc(' ; '.join(s.cmd))}</code>"
            f" <small>[{esc(', '.join(tracks))}]{esc(data)}</small>")

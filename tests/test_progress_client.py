"""Client side of task progress, no processes: Task/dispatch options and the Progress widget."""

from __future__ import annotations

import time

import pytest

from hub_server import protocol as p
from hwf_jupyter import Stage, Task
from hwf_jupyter.dispatch import progress_fields
from hwf_jupyter.magics import _frames_arg
from hwf_jupyter.task import TaskError
from hwf_jupyter.widgets import Progress


def task(**kw) -> Task:
    return Task(Stage("render", cmd="blender -b scene.blend -a"), **kw)


# ------------------------------------------------------------ Task and dispatch options


def test_task_carries_parser_and_frames_into_its_spec():
    spec = task(parser="frames", frame_start=1, frame_end=250).spec({})
    assert (spec.parser, spec.frame_start, spec.frame_end) == ("frames", 1, 250)
    decoded = p.decode(p.encode(p.Submit(id=1, tasks=[spec])))  # the hub accepts it as sent
    assert decoded.tasks[0].parser == "frames"
    plain = task().spec({})
    assert (plain.parser, plain.frame_start, plain.frame_end) == (None, None, None)
    assert "parser='frames'" in repr(task(parser="frames"))


def test_pinned_copies_keep_the_parser():
    t = task(parser="percent").pinned_to("daemon-1")
    assert t.spec({}).parser == "percent"


@pytest.mark.parametrize("kw, message", [
    ({"parser": "blender"}, r"parser must be one of 'frames', 'percent', 'hwf-progress' \(or None\), got 'blender'"),
    ({"parser": 3}, "parser must be one of"),
    ({"frame_start": 1}, "frame_start and frame_end go together"),
    ({"frame_start": 10, "frame_end": 1}, r"frame_start \(10\) must be <= frame_end \(1\)"),
    ({"frame_start": 1.5, "frame_end": 3}, "frame_start must be a whole number"),
    ({"frame_start": True, "frame_end": 3}, "frame_start must be a whole number"),
    ({"frame_start": 0, "frame_end": 10**12}, "frame_end must be within"),
])
def test_bad_progress_options_are_refused_naming_the_field(kw, message):
    with pytest.raises(TaskError, match=message):
        task(**kw)


def test_dispatch_progress_fields():
    assert progress_fields(None, None) == {}
    assert progress_fields("hwf-progress", None) == {"parser": "hwf-progress"}
    assert progress_fields("frames", (1, 8)) == {"parser": "frames", "frame_start": 1, "frame_end": 8}
    with pytest.raises(TaskError, match="parser must be one of 'frames'"):
        progress_fields("Frames", None)
    with pytest.raises(TaskError, match=r"frames must be a \(start, end\) pair"):
        progress_fields("frames", (1, 2, 3))
    with pytest.raises(TaskError, match=r"frame_start \(8\) must be <= frame_end \(1\)"):
        progress_fields("frames", (8, 1))


def test_magic_frames_argument():
    from IPython.core.error import UsageError

    assert _frames_arg(None) is None
    assert _frames_arg("1:250") == (1, 250)
    for bad in ("250", "a:b", "1:2:3"):
        with pytest.raises(UsageError, match="--frames takes START:END"):
            _frames_arg(bad)


# ------------------------------------------------------------ the Progress widget


def ev(tid: str, status: str, *, progress=None, frame=None) -> p.TaskEvent:
    return p.TaskEvent(watch=1, task_id=tid, status=status, time=time.time(),
                       progress=progress, frame_current=frame)


def test_running_tasks_progress_moves_the_bar():
    prog = Progress(["a", "b", "c", "d"], interactive=True)
    prog.apply_event(ev("a", "finished"))
    prog.apply_event(ev("b", "running"))
    prog.apply_event(ev("b", "running", progress=50.0, frame=5))
    prog.apply_event(ev("c", "running", progress=25.0))
    assert prog.fraction == pytest.approx((1 + 0.5 + 0.25) / 4)
    assert prog.task_progress == {"b": 50.0, "c": 25.0}
    assert prog.frames == {"b": 5}
    prog.flush()
    bar, summary = prog.widget.children[:2]
    assert bar.max == 4 and bar.value == pytest.approx(1.75)
    assert "1/4 done" in summary.value and "43.8%" in summary.value and "frame 5" in summary.value
    assert "frame 5" in prog.text() and "43.8%" in prog.text()


def test_a_status_event_without_progress_keeps_the_last_value():
    prog = Progress(["a"], interactive=False)
    prog.apply_event(ev("a", "running", progress=40.0, frame=3))
    prog.apply_event(ev("a", "running"))  # e.g. a stage finished: no progress fields
    assert prog.task_progress == {"a": 40.0} and prog.frames == {"a": 3}


def test_ended_or_retried_tasks_drop_their_progress():
    prog = Progress(["a", "b"], interactive=False)
    prog.apply_event(ev("a", "running", progress=90.0, frame=9))
    prog.apply_event(ev("b", "running", progress=60.0))
    prog.apply_event(ev("a", "finished"))
    prog.apply_event(ev("b", "retrying"))
    assert prog.task_progress == {} and prog.frames == {}
    assert prog.fraction == pytest.approx(0.5)  # a counts 1, b starts over
    # A progress event that lost the race with the result changes nothing.
    prog.apply_event(ev("a", "running", progress=95.0, frame=10))
    assert prog.statuses["a"] == "finished" and prog.task_progress == {}
    assert prog.fraction == pytest.approx(0.5)


def test_snapshot_brings_running_tasks_progress():
    prog = Progress(interactive=False)
    prog.apply_snapshot([p.TaskBrief(task_id="a", status="running", progress=30.0, frame_current=31),
                         p.TaskBrief(task_id="b", status="queued", progress=None)])
    assert prog.task_progress == {"a": 30.0} and prog.frames == {"a": 31}
    assert prog.fraction == pytest.approx(0.15)


def test_bar_never_passes_its_maximum():
    prog = Progress(["a"], interactive=True)
    prog.apply_event(ev("a", "running", progress=100.0))
    prog.flush()
    bar = prog.widget.children[0]
    assert bar.value <= bar.max == 1

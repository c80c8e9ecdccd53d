"""plot_timeline: the Gantt chart of stages per machine slot (Agg backend, no display)."""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from hub_server import protocol as p  # noqa: E402
from hwf_jupyter.results import ResultList  # noqa: E402
from hwf_jupyter.timeline import NO_STAGE, layout  # noqa: E402

T0 = 1_700_000_000.0


def record(tid: str, machine: str, start: float, stages: list[tuple[str, float, str]],
           status: str = "finished") -> p.TaskRecord:
    """A task on ``machine`` starting at T0+start, its stages back to back."""
    outs, t = [], T0 + start
    for name, dur, st in stages:
        outs.append(p.StageOutcome(name=name, status=st, started=t, duration=dur))
        t += dur
    return p.TaskRecord(task_id=tid, session_id="s-1", status=status, machine=machine,
                        submitted=T0, started=T0 + start, finished=t, stages=outs)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_layout_packs_overlapping_tasks_into_slots_and_keeps_stage_order() -> None:
    results = ResultList.from_records([
        record("t-a", "m1", 0.0, [("zip", 1.0, "finished"), ("build", 2.0, "finished")]),
        record("t-b", "m1", 0.5, [("zip", 1.0, "finished"), ("build", 1.0, "failed")], status="failed"),
        record("t-c", "m1", 3.0, [("zip", 1.0, "finished")]),  # after t-a ended: reuses its slot
        record("t-d", "m2", 1.0, [("zip", 0.5, "finished")]),
        p.TaskRecord(task_id="t-q", session_id="s-1", status="queued"),  # never ran: not drawn
    ])
    bars, labels, stages = layout(results)
    assert labels == ["m1 #1", "m1 #2", "m2"]
    assert stages == ["zip", "build"]  # the tasks' order, not the alphabet
    rows = {b.task_id: b.row for b in bars}
    assert rows["t-a"] == rows["t-c"] == 0 and rows["t-b"] == 1 and rows["t-d"] == 2
    first = [b for b in bars if b.task_id == "t-a"]
    assert [(b.stage, b.start, b.width) for b in first] == [("zip", 0.0, 1.0), ("build", 1.0, 2.0)]
    assert [b.failed for b in bars if b.task_id == "t-b"] == [False, True]
    assert "t-q" not in rows


def test_task_without_stage_timings_is_one_grey_bar() -> None:
    rec = p.TaskRecord(task_id="t-x", session_id="s", status="failed", machine="m",
                       started=T0, finished=T0 + 2.0)
    bars, labels, stages = layout(ResultList.from_records([rec]))
    assert [(b.stage, b.width, b.failed) for b in bars] == [(NO_STAGE, 2.0, True)]
    assert labels == ["m"] and stages == [NO_STAGE]


def test_plot_timeline_draws_bars_legend_and_returns_axes() -> None:
    results = ResultList.from_records([
        record("t-a", "node-1", 0.0, [("prepare", 1.0, "finished"), ("render", 4.0, "finished")]),
        record("t-b", "$x^2$ box", 0.0, [("prepare", 1.0, "finished"), ("render", 2.0, "failed")],
               status="failed"),
    ])
    ax = results.plot_timeline()
    assert ax.get_xlabel() == "seconds since the first start"
    assert [t.get_text() for t in ax.get_yticklabels()] == [r"\$x^2\$ box", "node-1"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["prepare", "render", "failed"]
    polys = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert sum(len(c.get_paths()) for c in polys) == 4
    failed = [c for c in polys if c.get_hatch() == "//"]
    assert len(failed) == 1 and len(failed[0].get_paths()) == 1
    assert ax.get_xlim()[1] >= 5.0
    ax.figure.canvas.draw()  # renders (the $ in a machine name is not read as math)


def test_plot_timeline_on_given_axes_and_empty_results() -> None:
    fig, ax = plt.subplots()
    assert ResultList().plot_timeline(ax=ax) is ax
    assert not ax.collections and ax.get_legend() is None and not ax.get_yticklabels()
    fig.canvas.draw()


def test_plot_timeline_is_quick_for_thousands_of_tasks() -> None:
    recs = [record(f"t-{i:05d}", f"node-{i % 20}", (i // 20) * 1.5,
                   [("fetch", 0.5, "finished"), ("render", 0.8, "failed" if i % 97 == 0 else "finished")],
                   status="failed" if i % 97 == 0 else "finished")
            for i in range(3000)]
    results = ResultList.from_records(recs)
    began = time.perf_counter()
    ax = results.plot_timeline()
    ax.figure.canvas.draw()
    elapsed = time.perf_counter() - began
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"node-{i}" for i in range(20)]  # one row each (no overlap); node-2 before node-10
    assert sum(len(c.get_paths()) for c in ax.collections) == 6000
    assert elapsed < 10, f"took {elapsed:.1f}s"

"""The progress view's logic without a kernel: stderr tails, wait reasons, stage
progress, the elapsed ticker, cancelled colour and the static final snapshot."""

from __future__ import annotations

import time

import pytest

from hub_server import protocol as p
from hwf_jupyter.widgets import Progress
from hwf_jupyter.widgets._snapshot import failure_tail, last_lines

WIDGET = "application/vnd.jupyter.widget-view+json"


def ev(tid, status, *, error=None, index=None, stage=None):
    return p.TaskEvent(watch=1, task_id=tid, status=status, time=time.time(), error=error,
                       stage_index=index, stage=stage)


def failed_stage(stderr: str, *, stdout: str = "") -> p.StageOutcome:
    return p.StageOutcome(name="slow", status="failed", commands=[
        p.CommandOutcome(cmd="echo ok", exit_code=0, stdout="ok\n"),
        p.CommandOutcome(cmd="python3 work.py slow 30", exit_code=2, stderr=stderr, stdout=stdout),
    ])


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def test_last_lines_keeps_the_tail_trimmed():
    text = "\n".join(f"line {i}" for i in range(20)) + "\n\n   \n" + "x" * 500 + "\n"
    tail = last_lines(text)
    assert tail.splitlines()[0] == "line 16" and len(tail.splitlines()) == 5
    assert tail.splitlines()[-1].endswith("…") and len(tail.splitlines()[-1]) == 200


def test_failure_tail_counts_commands_from_zero_and_falls_back_to_stdout():
    info = failure_tail(1, failed_stage("Traceback\npython3: can't open file '/w/work.py'\n"))
    assert info["where"] == "stage 1 'slow', command 1 (exit code 2)"
    assert info["stream"] == "stderr" and info["tail"].endswith("can't open file '/w/work.py'")
    info = failure_tail(0, failed_stage("", stdout="Error: disk full\n"))
    assert info["stream"] == "stdout" and info["tail"] == "Error: disk full"
    assert failure_tail(0, p.StageOutcome(name="s", status="finished")) is None


def test_failed_task_shows_its_stderr_tail_in_widget_text_and_snapshot():
    prog = Progress(["a", "b"], interactive=True, title="run")
    prog.apply_event(ev("a", "running", index=0, stage=failed_stage("boom\npython3: can't open file 'work.py'\n")))
    prog.apply_event(ev("a", "failed", error="stage 'slow' command[1] ('python3 work.py slow 30') exited with code 2"))
    prog.apply_event(ev("b", "finished"))
    prog.flush()
    failed_html = prog.widget.children[3].value
    assert "can&#x27;t open file &#x27;work.py&#x27;" in failed_html and "<pre" in failed_html
    assert "last lines of stderr (stage 0 &#x27;slow&#x27;, command 1 (exit code 2))" in failed_html
    text = prog.text()
    assert "    | python3: can't open file 'work.py'" in text
    assert prog.failure_details["a"]["where"].startswith("stage 0 'slow', command 1")
    assert "can&#x27;t open file" in prog.snapshot_html()
    # a retry forgets the old failure's tail
    prog2 = Progress(["a"], interactive=False)
    prog2.apply_event(ev("a", "running", index=0, stage=failed_stage("old\n")))
    prog2.apply_event(ev("a", "retrying", error="lost"))
    prog2.apply_event(ev("a", "failed", error="again"))
    assert prog2.failure_details == {}


def test_wait_reasons_are_shown_for_queued_tasks_only():
    prog = Progress(["q1", "q2", "r"], interactive=True)
    prog.apply_event(ev("r", "running"))
    reason = "waiting for matching hardware: no connected daemon has ram>=64.0GiB (largest ram: 23.5GiB)"
    prog.apply_wait_reasons({"q1": reason, "q2": reason, "r": "stale: r runs"})
    assert prog.wait_reasons == {"q1": reason, "q2": reason}
    prog.flush()
    summary = prog.widget.children[1].value
    assert "queued 2: " in summary and "largest ram: 23.5GiB" in summary and "stale" not in summary
    assert "  queued 2: waiting for matching hardware" in prog.text()
    prog.apply_event(ev("q1", "running"))  # no longer waits: its reason goes
    assert list(prog.wait_reasons) == ["q2"]
    assert "queued 1: " in prog.text()


def test_stage_progress_moves_the_bar_and_parser_progress_still_counts():
    prog = Progress([], interactive=True)
    prog.apply_snapshot([p.TaskBrief(task_id="a", status="running", n_stages=4),
                         p.TaskBrief(task_id="b", status="running", n_stages=2)])
    assert prog.fraction == 0
    prog.apply_event(ev("a", "running", index=0, stage=p.StageOutcome(name="s0", status="finished")))
    prog.apply_event(ev("a", "running", index=1, stage=p.StageOutcome(name="s1", status="finished")))
    assert prog.fraction == pytest.approx((2 / 4) / 2)
    prog.apply_event(p.TaskEvent(watch=1, task_id="b", status="running", time=0, progress=80.0))
    assert prog.fraction == pytest.approx((0.5 + 0.8) / 2)  # the larger of stages and parser
    prog.flush()
    assert prog.widget.children[0].value == pytest.approx(1.3)
    prog.apply_event(ev("a", "retrying", error="lost"))  # its stages start over
    assert prog.fraction == pytest.approx(0.8 / 2)


def test_cancelled_end_is_grey_and_says_cancelled():
    prog = Progress(["a", "b"], interactive=True)
    prog.apply_event(ev("a", "running"))
    prog.apply_event(ev("b", "running"))
    prog.apply_event(ev("a", "cancelled"))
    prog.apply_event(ev("b", "cancelled"))
    prog.flush()
    bar = prog.widget.children[0]
    assert bar.bar_style == "" and bar.style.bar_color == "#757575"
    assert prog.text().startswith("hwf: 2/2 cancelled [cancelled 2]")
    assert "2/2 cancelled" in prog.widget.children[1].value and "done" not in prog.widget.children[1].value
    snap = prog.snapshot_html()
    assert 'title="cancelled 2"' in snap and "#757575" in snap and "#1565c0" not in snap
    mixed = Progress(["a", "b"], interactive=False)
    mixed.apply_event(ev("a", "finished"))
    mixed.apply_event(ev("b", "cancelled"))
    assert mixed.text().startswith("hwf: 2/2 ended [finished 1, cancelled 1]")


def test_mimebundle_has_widget_and_fallback_until_the_end_then_only_the_fallback():
    prog = Progress(["a", "b"], interactive=True, title="S")
    prog.apply_event(ev("a", "running"))
    live = prog._repr_mimebundle_()
    assert WIDGET in live and "running 1" in live["text/html"] and live["text/plain"].startswith("S: 0/2 done")
    prog.apply_event(ev("a", "cancelled"))
    prog.apply_event(ev("b", "cancelled"))
    final = prog._repr_mimebundle_()
    assert WIDGET not in final, "a saved notebook would say 'model not found'"
    assert final["text/plain"].startswith("S: 2/2 cancelled") and "2/2 cancelled" in final["text/html"]
    assert "<script" not in final["text/html"]


class FakeHandle:
    def __init__(self):
        self.updates = []

    def update(self, obj):
        self.updates.append(obj._repr_mimebundle_())


def test_the_display_is_replaced_once_by_the_final_snapshot():
    prog = Progress(["a"], interactive=True, max_rate=100)
    prog._handle = handle = FakeHandle()
    prog.apply_event(ev("a", "running"))
    prog.flush()
    assert handle.updates == []
    prog.apply_event(ev("a", "finished"))
    wait_for(lambda: handle.updates)  # the coalesced render on the I/O thread publishes it
    prog.flush()
    assert len(handle.updates) == 1
    assert WIDGET not in handle.updates[0] and "1/1 done" in handle.updates[0]["text/plain"]


def test_elapsed_ticks_without_events_and_the_ticker_stops_at_the_end():
    prog = Progress(["a"], interactive=True)
    prog.apply_event(ev("a", "running"))
    assert prog.ticking
    summary = prog.widget.children[1]
    renders, first = prog.renders, summary.value
    wait_for(lambda: prog.renders >= renders + 2, timeout=4)  # no event arrived meanwhile
    assert summary.value != first  # the elapsed time moved
    prog.apply_event(ev("a", "finished"))
    wait_for(lambda: not prog.ticking, timeout=3)
    settled = prog.renders
    time.sleep(1.3)
    assert prog.renders == settled


def test_text_mode_without_hub_does_not_tick():
    prog = Progress(["a"], interactive=False)
    prog.apply_event(ev("a", "running"))
    assert not prog.ticking and prog.renders == 0


def test_snapshot_bar_shows_each_state_and_running_progress():
    prog = Progress([], interactive=False)
    prog.apply_snapshot([p.TaskBrief(task_id="f", status="finished"), p.TaskBrief(task_id="x", status="failed"),
                         p.TaskBrief(task_id="r", status="running", n_stages=2),
                         p.TaskBrief(task_id="q", status="queued")])
    prog.apply_event(ev("r", "running", index=0, stage=p.StageOutcome(name="a", status="finished")))
    snap = prog.snapshot_html()
    for state in ("finished 1", "failed 1", "running 1", "queued 1"):
        assert f'title="{state}"' in snap
    assert "width:25.000%" in snap and "linear-gradient(to right, #1565c0 50.0%" in snap


def test_a_closed_session_view_ends_as_a_snapshot_too():
    prog = Progress(["a"], interactive=True)
    prog.auto_close = False  # a session view stays open for tasks added later
    prog._handle = handle = FakeHandle()
    prog.apply_event(ev("a", "finished"))
    prog.flush()
    assert handle.updates == [] and WIDGET in prog._repr_mimebundle_()
    prog.close()
    assert len(handle.updates) == 1 and WIDGET not in handle.updates[0]


def test_a_session_watch_learns_stage_counts_from_the_queued_event():
    prog = Progress([], interactive=True)  # a session watch: its tasks arrive as events
    prog.apply_event(p.TaskEvent(watch=1, task_id="n", status="queued", time=0, n_stages=4))
    prog.apply_event(ev("n", "running", index=0, stage=p.StageOutcome(name="s0", status="finished")))
    assert prog.fraction == pytest.approx(1 / 4), "one of four stages done moves the bar"

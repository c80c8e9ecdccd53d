"""Widgets: Progress fed by synthetic events, then everything against a real cluster."""

from __future__ import annotations

import datetime
import threading
import time

import ipywidgets as w
import pytest

from hub_server import protocol as p
from hwf_jupyter import Stage, Task, dispatch_sync
from hwf_jupyter._ioloop import io_loop
from hwf_jupyter.widgets import PoolView, Progress, TaskBuilder, watch_progress
from hwf_jupyter.widgets.builder import parse_data


def ev(tid: str, status: str, *, error=None, index=None, stage=None, duration=None, stage_status="finished"):
    outcome = None if stage is None else p.StageOutcome(name=stage, status=stage_status, duration=duration)
    return p.TaskEvent(watch=1, task_id=tid, status=status, time=time.time(), error=error,
                       stage_index=index, stage=outcome)


def brief(tid: str, status: str, **kw):
    return p.TaskBrief(task_id=tid, status=status, **kw)


def wait_for(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def parts(prog: Progress):
    bar, summary, stages, failed = prog.widget.children
    return bar, summary, stages, failed


# ------------------------------------------------------------ unit: Progress


def test_counts_done_and_bar():
    ids = [f"t{i}" for i in range(5)]
    prog = Progress(ids, interactive=True)
    prog.apply_snapshot([brief("t0", "assigned"), brief("t1", "running"), brief("t2", "queued"),
                         brief("t3", "retrying"), brief("t4", "finished")])
    assert prog.counts == {"finished": 1, "failed": 0, "cancelled": 0, "running": 1, "retrying": 1, "queued": 2}
    assert not prog.done
    prog.flush()
    bar, summary, _, _ = parts(prog)
    assert (bar.min, bar.max, bar.value, bar.bar_style) == (0, 5, 1, "")
    assert "1/5 done" in summary.value and "queued 2" in summary.value

    for t in ids[:4]:
        prog.apply_event(ev(t, "running", ))
        prog.apply_event(ev(t, "finished"))
    assert prog.done and prog.counts["finished"] == 5
    prog.flush()
    assert (bar.value, bar.max, bar.bar_style) == (5, 5, "success")
    # elapsed stops when the last task ends
    e = prog.elapsed
    time.sleep(0.05)
    assert prog.elapsed == e


def test_failed_tasks_are_listed_in_red():
    prog = Progress(["a", "b", "c"], interactive=True, title="run")
    prog.apply_event(ev("a", "failed", error="stage 's' command 1 ('exit 2') exited with code 2"))
    prog.apply_event(ev("b", "running"))
    prog.flush()
    bar, _, _, failed = parts(prog)
    assert bar.bar_style == "danger" and bar.value == 1
    assert "color:#c62828" in failed.value and "<b>a</b>" in failed.value
    assert "exited with code 2" in failed.value
    assert prog.failed == {"a": "stage 's' command 1 ('exit 2') exited with code 2"}
    text = prog.text()
    assert text.splitlines()[0].startswith("run: 1/3 done [failed 1, running 1, queued 1]")
    assert "failed a: stage 's'" in text


def test_many_failures_are_capped():
    ids = [f"t{i:02d}" for i in range(25)]
    prog = Progress(ids, interactive=True)
    prog.apply_snapshot([brief(t, "failed", error=f"boom {t}") for t in ids])
    prog.flush()
    html = parts(prog)[3].value
    assert html.count("boom") == 20 and "+5 more" in html
    assert len(prog.text().splitlines()) == 3 and "+24 more failed" in prog.text()


def test_stage_timings():
    prog = Progress(["a", "b"], interactive=True)
    prog.apply_event(ev("a", "running", index=0, stage="prepare", duration=0.5))
    prog.apply_event(ev("b", "running", index=0, stage="prepare", duration=1.5))
    prog.apply_event(ev("a", "running", index=1, stage="train", duration=42.0))
    # a retried attempt replaces the earlier stage timing of its task, it does not add to it
    prog.apply_event(ev("b", "retrying", error="lost"))
    prog.apply_event(ev("b", "running", index=0, stage="prepare", duration=0.25))
    stats = prog.stage_stats()
    assert [(s["stage"], s["done"]) for s in stats] == [("prepare", 2), ("train", 1)]
    assert stats[0]["mean"] == pytest.approx(0.375) and stats[0]["max"] == 0.5
    prog.flush()
    html = parts(prog)[2].value
    for needle in ("prepare", "train", "0.38s", "0.50s", "42.0s"):
        assert needle in html


def test_snapshot_after_events_does_not_undo_a_terminal_state():
    # Events can overtake the snapshot on the I/O thread; terminal states are final.
    prog = Progress(["a"], interactive=False)
    prog.apply_event(ev("a", "finished"))
    prog.apply_snapshot([brief("a", "running")])
    assert prog.counts["finished"] == 1 and prog.done


def test_unknown_tasks_grow_the_total():
    prog = Progress([], interactive=True)
    assert not prog.done and prog.total == 0
    prog.apply_snapshot([brief("a", "finished")])
    assert prog.done and prog.total == 1
    prog.apply_event(ev("b", "queued"))
    assert prog.total == 2 and not prog.done
    prog.flush()
    assert parts(prog)[0].max == 2


def test_renders_are_throttled_and_coalesced():
    ids = [f"t{i}" for i in range(1000)]
    prog = Progress(ids, interactive=True, max_rate=10)
    start, before = time.monotonic(), prog.renders

    def feed():
        for t in ids:
            prog.apply_event(ev(t, "running"))
            prog.apply_event(ev(t, "finished"))

    io_loop().loop.call_soon_threadsafe(feed)  # as the hub's callbacks do
    wait_for(lambda: parts(prog)[0].value == 1000)
    elapsed = time.monotonic() - start
    time.sleep(0.15)  # nothing else is pending
    renders = prog.renders - before
    assert 1 <= renders <= elapsed * 10 + 2
    assert parts(prog)[0].bar_style == "success"


def test_text_mode():
    prog = Progress(["a", "b"], interactive=False)
    prog.apply_event(ev("a", "finished"))
    assert prog.widget is None
    time.sleep(0.05)
    assert prog.renders == 0
    assert repr(prog) == prog.text() == prog.text().splitlines()[0]
    assert prog.text().startswith("hwf: 1/2 done [finished 1, queued 1]")
    assert prog._repr_mimebundle_() == {"text/plain": prog.text()}


def test_interactive_default_follows_environment(monkeypatch):
    monkeypatch.setenv("HWF_NONINTERACTIVE", "1")
    assert Progress(["a"]).widget is None
    monkeypatch.delenv("HWF_NONINTERACTIVE")
    assert Progress(["a"]).widget is None  # no kernel here
    bundle = Progress(["a"], interactive=True)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and bundle["text/plain"].startswith("hwf:")


def test_parse_data(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    got = parse_data(f"{tmp_path}/a.txt, {tmp_path}/a.txt:b.txt")
    assert [(d.path.name, d.filename) for d in got] == [("a.txt", "a.txt"), ("a.txt", "b.txt")]


# ------------------------------------------------------------ end to end


def test_progress_live(hub):
    sub = dispatch_sync(Task(Stage("s", cmd="sleep 0.1")), hub, repeat=20)
    prog = watch_progress(hub, sub, interactive=True)
    assert isinstance(prog.widget, w.VBox) and prog.watcher is not None
    hub.get_result_sync(sub, wait=True)
    wait_for(lambda: prog.done)
    prog.flush()
    bar = prog.widget.children[0]
    assert isinstance(bar, w.FloatProgress)  # running tasks add their parser progress
    assert bar.value == 20 == bar.max and bar.bar_style == "success"
    assert prog.counts["finished"] == 20
    stats = prog.stage_stats()
    assert stats[0]["stage"] == "s" and stats[0]["done"] == 20 and stats[0]["mean"] >= 0.09
    wait_for(lambda: prog.watcher.closed)  # the watch ends by itself


def test_progress_live_failure(hub):
    ok = dispatch_sync(Task(Stage("s", cmd="true")), hub)
    bad = dispatch_sync(Task(Stage("s", cmd="exit 2")), hub, max_retries=0)
    prog = watch_progress(hub, [*ok, *bad], interactive=True, title="mixed")
    hub.get_result_sync([*ok, *bad], wait=True)
    wait_for(lambda: prog.done)
    prog.flush()
    bar, _, _, failed = prog.widget.children
    assert bar.bar_style == "danger" and bar.value == 2
    assert bad[0] in failed.value and "exit 2" in failed.value
    assert bad[0] in prog.text()


def test_progress_session_watch_and_threads(hub):
    first = dispatch_sync(Task(Stage("s", cmd="true")), hub)
    hub.get_result_sync(first, wait=True)
    prog = watch_progress(hub, session=first.session_id, interactive=False)
    wait_for(lambda: prog.total == 1 and prog.done)
    more = dispatch_sync(Task(Stage("s", cmd="sleep 0.1")), hub, repeat=3, session=first.session_id)
    hub.get_result_sync(more, wait=True)
    wait_for(lambda: prog.total == 4 and prog.done)
    assert not prog.watcher.closed  # a session can grow: watch until closed
    prog.close()
    wait_for(lambda: prog.watcher.closed)
    assert threading.current_thread() is threading.main_thread()


def test_pool_view(hub):
    view = PoolView(hub, refresh=None, interactive=True)
    df = view.to_dataframe()
    assert sorted(df["name"]) == ["daemon-1", "daemon-2"]
    html = view.widget.children[1].value
    assert "daemon-1" in html and "daemon-2" in html and "RAM GB" in html
    assert "daemon-1" in view.text() and not view.running
    text_view = PoolView(hub, {"daemon": "daemon-2"}, refresh=None, interactive=False)
    assert list(text_view.to_dataframe()["name"]) == ["daemon-2"] and "daemon-1" not in repr(text_view)


def test_pool_view_auto_refresh(hub):
    view = PoolView(hub, refresh=0.1, interactive=True)
    first = view.updated
    assert view.running
    wait_for(lambda: view.updated != first)
    view.refresh().result(5)  # the button's action: no blocking call on the caller
    view.stop()
    wait_for(lambda: not view.running)


def test_task_builder(hub, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    b = TaskBuilder(hub)
    assert "linux" in b.hw_os.options and "none" in b.hw_gpu.options and b.hw_cpu.options[0] == "any"
    b.stage_name.value = "prep"
    b.commands.value = "cat data.txt\n\necho prepared"
    b.data.value = f"{src}:data.txt"
    b.track["ram"].value = True
    b.click_add_stage()
    assert b.error is None and b.commands.value == "" and b.stage_name.value == "stage2"
    b.commands.value = "echo second"
    b.hw_os.value = "linux"
    b.hw_ram.value = "1MB"
    task = b.task()
    assert [s.name for s in task.stages] == ["prep", "stage2"]
    assert task.stages[0].cmd == ["cat data.txt\n\necho prepared"]  # one script, as %%hwf_stage runs it
    assert task.stages[0].track_ram and task.stages[0].track_time and not task.stages[0].track_gpu
    assert [d.filename for d in task.stages[0].data] == ["data.txt"]
    assert task.hardware == {"os": "linux", "ram": "1MB"}
    assert "prep" in b.draft.value and "(in the form)" in b.draft.value

    sub = b.click_dispatch()
    assert b.error is None and sub is b.submission and len(sub) == 1
    results = sub.results_sync()
    assert results.ok and results[0].stages[0].commands[0].stdout == "hello\nprepared\n"
    assert results[0].output == "second\n"
    wait_for(lambda: b.progress.done)
    assert b.output.outputs and "application/vnd.jupyter.widget-view+json" in b.output.outputs[0]["data"]


def test_task_builder_errors_are_one_red_line(hub):
    b = TaskBuilder(hub)
    assert b.click_dispatch() is None and "no stages" in b.error
    b.commands.value = "true"
    b.hw_ram.value = "lots"
    assert b.click_dispatch() is None
    assert "cannot parse 'lots'" in b.error and "Traceback" not in b.message.value
    assert "color:#c62828" in b.message.value
    b.hw_ram.value = ""
    b.data.value = "/no/such/file"
    b.click_add_stage()
    assert "does not exist" in b.error and b.stages == []
    b.data.value = ""
    b.click_add_stage()
    b.commands.value = "true"
    b.stage_name.value = "stage1"
    b.click_add_stage()
    assert "unique" in b.error and b.message.value
    b.stage_name.value = "other"
    b.click_add_stage()
    assert b.error is None and b.message.value == "" and len(b.stages) == 2


def test_task_builder_upload(hub):
    b = TaskBuilder(hub)
    b.upload.value = ({"name": "up.txt", "type": "text/plain", "size": 3,
                       "content": memoryview(b"up\n"),
                       "last_modified": datetime.datetime.now(datetime.timezone.utc)},)
    b.commands.value = "cat up.txt"
    sub = b.click_dispatch()
    assert b.error is None
    assert sub.results_sync()[0].output == "up\n"


def test_elapsed_counts_from_submission_not_from_the_view():
    import time as _time

    from hub_server import protocol as _p
    from hwf_jupyter.widgets import Progress

    prog = Progress(["t1"], interactive=False)
    prog.apply_snapshot([_p.TaskBrief(task_id="t1", status="running", submitted=_time.time() - 5.0)])
    assert 4.5 < prog.elapsed < 7.0

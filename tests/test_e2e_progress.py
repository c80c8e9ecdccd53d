"""Task progress end to end: a daemon parses a running command's output, the
hub stores it and tells watchers, the client shows it (real processes)."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync

pytestmark = pytest.mark.e2e

# Blender-style frame lines with a pause each, so several throttled
# progress messages (<= 4 a second) go out while the task runs.
RENDER = 'for i in 1 2 3 4 5 6 7 8; do echo "Fra:$i Mem:18.54M (Peak 18.54M) | Time:00:00.$i"; sleep 0.3; done'


class Events:
    """A watcher's events, collected on HWF's I/O thread."""

    def __init__(self) -> None:
        self.items: list = []
        self.ended = threading.Event()

    def __call__(self, ev) -> None:
        self.items.append(ev)
        if ev.status in ("finished", "failed", "cancelled"):
            self.ended.set()

    def progress(self) -> list:
        return [e for e in self.items if e.status == "running" and
                (e.progress is not None or e.frame_current is not None)]


def test_frames_parser_progress_reaches_watchers_while_the_task_runs(hub):
    task = Task(Stage("render", cmd=RENDER), parser="frames", frame_start=1, frame_end=8, label="render")
    sub = dispatch_sync(task, hub)
    events = Events()
    watcher = hub.watch_sync(list(sub), on_event=events)
    try:
        # The stored progress is readable while the task runs, too.
        deadline = time.monotonic() + 30
        mid = None
        while time.monotonic() < deadline:
            r = hub.get_result_sync(list(sub), wait=False, download=False)[0]
            if r.status == "running" and r.frame_current is not None and r.frame_current >= 2:
                mid = r
                break
            assert not r.done, f"ended before any progress was seen: {r.status} {r.error}"
            time.sleep(0.05)
        assert mid is not None, "no progress stored while the task ran"
        assert 0 < mid.progress < 100
        assert mid.progress == pytest.approx((mid.frame_current - 1) / 8 * 100)
        df = hub.get_result_sync(list(sub), wait=False, download=False).to_dataframe()
        assert df["frame_current"][0] >= 2 and df["progress_percent"][0] > 0

        assert events.ended.wait(30), "the task did not end"
        final = hub.get_result_sync(list(sub), wait=True, download=False)[0]
    finally:
        watcher.close_sync()
    assert final.status == "finished", final.error
    live = events.progress()
    frames = [e.frame_current for e in live if e.frame_current is not None]
    assert len(set(frames)) >= 3, f"progress did not advance live: {frames}"
    assert frames == sorted(frames) and set(frames) <= set(range(1, 9))
    percents = [e.progress for e in live if e.progress is not None]
    assert percents == sorted(percents) and 0 <= percents[0] < percents[-1] < 100
    # Every progress event came before the task's end.
    end_at = next(i for i, e in enumerate(events.items) if e.status == "finished")
    assert all(events.items.index(e) < end_at for e in live)
    # The last frame was sent before the result, and a finished task is 100%.
    assert final.frame_current == 8
    assert final.progress == 100.0


def test_hwf_progress_lines_count_without_a_parser(hub):
    task = Task(Stage("work", cmd=["echo start; echo 'hwf-progress: 3/4'; sleep 1", "echo done"]))
    sub = dispatch_sync(task, hub)
    events = Events()
    watcher = hub.watch_sync(list(sub), on_event=events)
    try:
        assert events.ended.wait(30), "the task did not end"
        final = hub.get_result_sync(list(sub), wait=True, download=False)[0]
    finally:
        watcher.close_sync()
    assert final.status == "finished", final.error
    assert [e.progress for e in events.progress()] == [75.0]
    assert final.progress == 75.0 and final.frame_current is None


def test_untrusted_progress_lines_are_ignored_and_output_is_kept_whole(hub):
    lines = ["40%", "hwf-progress: 9/4", "hwf-progress: 1/0", "150%", "-5%", "Fra:99999999999999", "x" * 5000]
    cmd = "; ".join(f"echo '{line}'" for line in lines) + "; exit 3"
    sub = dispatch_sync(Task(Stage("noise", cmd=cmd), parser="percent"), hub, max_retries=0)
    final = hub.get_result_sync(list(sub), wait=True, download=False)[0]
    assert final.status == "failed" and final.exit_code == 3
    assert final.stages[0].commands[0].stdout == "".join(f"{line}\n" for line in lines)
    assert final.progress == 40.0 and final.frame_current is None  # the one valid line


# Through the Manager HTTP API (its own cluster: one daemon).
def test_frame_current_advances_while_the_task_runs_and_hwf_progress_needs_no_parser(tmp_path):
    with LocalCluster(daemons=1, slots=2, state_dir=tmp_path) as c:
        auth = {"Authorization": f"Bearer {c.token}"}
        job = {"type": "frames", "parser": "frames",
               "settings": {"frame_start": 1, "frame_end": 6, "command": "echo Fra:{frame}; sleep 0.6"}}
        task = requests.post(c.http_url + "/tasks", json=job, headers=auth).json()
        plain = requests.post(c.http_url + "/tasks", headers=auth, json={
            "type": "shell", "settings": {"commands": ["echo 'hwf-progress: 3/4'; sleep 3"]}}).json()
        seen, plain_seen = [], None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            t = requests.get(f"{c.http_url}/tasks/{task['id']}", headers=auth).json()
            if t["status"] == "running" and t["frame_current"] is not None and t["frame_current"] not in seen:
                seen.append(t["frame_current"])
            q = requests.get(f"{c.http_url}/tasks/{plain['id']}", headers=auth).json()
            if q["status"] == "running" and q["progress"] is not None:
                plain_seen = q["progress"]
            if t["status"] == "finished" and q["status"] == "finished":
                break
            time.sleep(0.1)
        assert len(seen) >= 3 and seen == sorted(seen), f"frames seen while running: {seen}"
        assert t["frame_current"] == 6 and t["progress"] == 100.0
        assert plain_seen == 75.0

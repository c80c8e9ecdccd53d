"""Parser progress end to end: a running task's frame_current advances live."""

from __future__ import annotations

import time

import pytest
import requests

from hwf_jupyter import LocalCluster

pytestmark = pytest.mark.e2e


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

"""Jobs through ``Hub.submit_job`` on a real LocalCluster: the ``frames`` render
job (24 frames in chunks of 4), a ``shell`` job with Data, and the shipped
render example run as its own process."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hwf_jupyter import CompileError, TaskError

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
RENDERER = ROOT / "examples" / "fractal_frame.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FRAMES_JOB = {
    "frame_start": 1,
    "frame_end": 24,
    "chunk_size": 4,
    "command": "python3 fractal_frame.py {frame} frame_{frame:04d}.png --frames 24 --size 64x48",
    "artifacts": ["*.png"],
    "label": "julia",
}


def test_frames_job_24_frames_in_6_tasks_all_pngs_back(hub):
    ids = hub.submit_job_sync("frames", FRAMES_JOB, data=[RENDERER], priority=3)
    assert len(ids) == 6 and ids.session_id
    results = hub.get_result_sync(list(ids), wait=True, timeout=120)
    assert [r.status for r in results] == ["finished"] * 6, [(r.status, r.error) for r in results]
    by_id = {r.task_id: r for r in results}
    pngs: dict[int, bytes] = {}
    for i, tid in enumerate(ids):  # ids come back in chunk order
        r = by_id[tid]
        first, last = 1 + 4 * i, 4 + 4 * i
        assert r.label == f"julia frames {first}-{last}"
        assert r.priority == 3
        out = "".join(c.stdout for s in r.stages for c in s.commands)
        assert sorted(int(n) for n in re.findall(r"Fra:(\d+) \| Saved", out)) == list(range(first, last + 1))
        for a in r.artifacts:
            assert a.ok and a.path is not None, a.error
            frame = int(re.fullmatch(r"frame_(\d{4})\.png", a.name).group(1))
            assert first <= frame <= last
            pngs[frame] = a.path.read_bytes()
    assert sorted(pngs) == list(range(1, 25))
    assert all(b.startswith(PNG_SIGNATURE) for b in pngs.values())
    digests = {hashlib.sha256(b).hexdigest() for b in pngs.values()}
    assert len(digests) == 24, "every frame of the animation differs"


def test_shell_job_with_a_data_file_and_stages(hub, tmp_path):
    src = tmp_path / "words.txt"
    src.write_text("alpha\nbeta\ngamma\n")
    ids = hub.submit_job_sync("shell", {
        "stages": [{"name": "count", "commands": "set -e\nwc -l < words.txt > n.txt\ncat n.txt"},
                   {"name": "check", "commands": ["test \"$(cat n.txt)\" = 3"]}],
        "artifacts": ["n.txt"],
        "label": "count words",
    }, data=[src], external_id="client-task-1")
    (r,) = hub.get_result_sync(list(ids), wait=True, timeout=60)
    assert r.status == "finished", r.error
    assert [s.name for s in r.stages] == ["count", "check"]
    assert r.artifacts[0].path.read_text().strip() == "3"


def test_failing_shell_job_fails_its_task(hub):
    ids = hub.submit_job_sync("shell", {"commands": ["false"], "max_retries": 0})
    (r,) = hub.get_result_sync(list(ids), wait=True, timeout=60)
    assert r.status == "failed"


def test_bad_jobs_are_refused_before_anything_is_queued(hub, tmp_path):
    before = hub.get_hardware_pool_sync()  # the link is up: refusals below are the client's own
    assert len(before) >= 1
    with pytest.raises(CompileError, match=r"^settings\.command: unknown field\(s\) \{scene\}"):
        hub.submit_job_sync("frames", dict(FRAMES_JOB, command="render {scene}"), data=[RENDERER])
    with pytest.raises(CompileError, match=r"^settings\.data\[0\]: no data file named 'other.py'"):
        hub.submit_job_sync("frames", dict(FRAMES_JOB, data=["other.py"]), data=[RENDERER])
    with pytest.raises(TaskError, match="does not exist"):
        hub.submit_job_sync("shell", {"commands": ["true"]}, data=[tmp_path / "missing.bin"])
    with pytest.raises(TaskError, match="saved as 'a.txt'"):
        (tmp_path / "x").mkdir()
        for d in (tmp_path, tmp_path / "x"):
            (d / "a.txt").write_text(str(d))
        hub.submit_job_sync("shell", {"commands": ["true"]}, data=[tmp_path / "a.txt", tmp_path / "x" / "a.txt"])


def test_settings_cannot_inject_shell_through_frame_numbers(hub):
    """Only integers are substituted: a string frame number is refused, not run."""
    with pytest.raises(CompileError, match=r"^settings\.frame_start: must be a whole number"):
        hub.submit_job_sync("frames", dict(FRAMES_JOB, frame_start="1; touch /tmp/owned"))


def test_render_example_script_makes_its_gif(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "render_frames.py"), "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    gif = Path(re.search(r"^GIF: (.+)$", proc.stdout, re.M).group(1))
    assert gif.is_file() and gif.read_bytes()[:6] in (b"GIF87a", b"GIF89a")
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 24
    assert "24 frames rendered" in proc.stdout

"""Work survives a kernel restart: %hwf_local's farm outlives the kernel and is found again."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from hwf_jupyter import localfarm
from kernel_driver import Kernel

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _usage_error(k, code):
    r = k.run(code, allow_error=True)
    assert r.status == "error" and r.error["ename"] == "UsageError", r.error
    return r.error["evalue"]


@pytest.fixture
def kernel(tmp_path):
    k = Kernel(str(tmp_path), env=dict(os.environ, HWF_NONINTERACTIVE="0"))
    k.run("%load_ext hwf_jupyter")
    yield k
    k.close()  # also stops the farm in k.local_dir, by its recorded pids
    record = localfarm.read_record(Path(k.local_dir))
    assert record is None


def _farm_pids(local_dir) -> list[int]:
    record = localfarm.read_record(Path(local_dir))
    assert record is not None, "the farm is recorded in its dir"
    return record.pids


def test_restart_mid_run_then_reattach_sees_every_task_finish(kernel):
    k = kernel
    out = k.run("%hwf_local --daemons 2").stdout
    assert "started your local farm in " + k.local_dir in out
    pids = _farm_pids(k.local_dir)
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    assert oct(os.stat(k.local_dir).st_mode & 0o777) == "0o700"
    # Each task runs 3 s, then waits for the gate the test opens after re-attaching (at most 60 s),
    # so "mid-run" does not depend on how fast the machine restarts a kernel.
    gate = Path(tempfile.mkdtemp(prefix="hwf-gate-")) / "open"
    os.chmod(gate.parent, 0o755)
    k.run(f"%%hwf_stage work\nsleep 3\nfor i in $(seq 600); do [ -e {gate} ] && break; sleep 0.1; done\n"
          "echo \"finished-$HOSTNAME-ok\"\n")
    shown = k.run("sub = %hwf_dispatch --repeat 3").stdout
    session = re.search(r"session (s-\S+)", shown).group(1)
    assert f"%hwf_results --session {session}" in shown  # what to run after a restart, copyable

    k.restart()  # a graceful restart: ipykernel ends its process group's children
    assert all(_alive(p) for p in pids), "the farm outlives the kernel"
    k.run("%load_ext hwf_jupyter")
    msg = _usage_error(k, f"%hwf_results --session {session}")
    assert "not connected" in msg and "%hwf_local" in msg and "%hwf_connect" in msg

    out = k.run("c = %hwf_local\nprint(sorted(c.pids))").stdout
    assert "attached to your running local farm" in out
    assert out.strip().splitlines()[-1] == str(sorted(pids)), "the same processes, none started anew"
    mid = k.run(f"df = %hwf_results --session {session}\nimport json; print(json.dumps(list(df['status'])))")
    statuses = json.loads(mid.stdout.strip().splitlines()[-1])
    assert len(statuses) == 3 and "finished" not in statuses, f"the restart came while tasks ran: {statuses}"
    gate.touch()
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in mid.outputs), \
        "an unfinished session shows live progress again"
    got = k.run(
        f"df = %hwf_results --session {session} --wait --level command\n"
        f"tasks = %hwf_results --session {session}\n"
        "print(json.dumps({'out': sorted(s.strip() for s in df['stdout'] if s.strip()),"
        " 'status': sorted(set(tasks['status']))}))"
    ).json()
    assert got["status"] == ["finished"]
    assert len(got["out"]) == 3 and all(re.fullmatch(r"finished-.*-ok", o) for o in got["out"])

    # Another shape on the running farm: says what it has and how to change it.
    msg = _usage_error(k, "%hwf_local --daemons 3")
    assert "runs 2 daemon(s) x 2 slot(s)" in msg and "%hwf_local --stop" in msg
    assert all(_alive(p) for p in pids)

    out = k.run("%hwf_local --stop").stdout
    assert "stopped your local farm" in out and all(str(p) in out for p in pids)
    assert _wait_gone(pids) == []
    assert not (Path(k.local_dir) / "farm.json").exists()
    assert "no local farm was running" in k.run("%hwf_local --stop").stdout
    assert "not connected" in _usage_error(k, f"%hwf_results --session {session}")
    shutil.rmtree(gate.parent, ignore_errors=True)


def test_a_killed_farm_restarts_on_its_state_and_keeps_sessions(kernel):
    k = kernel
    k.run("%hwf_local --daemons 1 --slots 1")
    k.run("%%hwf_stage s\necho kept\n")
    session = re.search(r"session (s-\S+)", k.run("sub = %hwf_dispatch --wait").stdout).group(1)
    old = _farm_pids(k.local_dir)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    assert _wait_gone(old) == []
    k.restart(now=True)
    k.run("%load_ext hwf_jupyter")
    out = k.run("c = %hwf_local\nprint(len(c.daemon_processes), c.slots)").stdout
    assert "started your local farm" in out and out.strip().endswith("1 1"), "the recorded shape is kept"
    new = _farm_pids(k.local_dir)
    assert not set(new) & set(old) and all(_alive(p) for p in new)
    got = k.run(f"df = %hwf_results --session {session} --level command\ntasks = %hwf_results --session {session}\n"
                "print(df['stdout'].str.strip().tolist(), tasks['status'].tolist())").stdout
    assert got.strip().splitlines()[-1] == "['kept'] ['finished']"


def test_a_second_kernel_of_the_user_attaches_to_the_same_farm(kernel, tmp_path):
    kernel.run("%hwf_local --daemons 1")
    other = Kernel(str(tmp_path), local_dir=kernel.local_dir)
    try:
        other.run("%load_ext hwf_jupyter")
        assert "attached to your running local farm" in other.run("%hwf_local").stdout
        other.run("%%hwf_stage s\necho from-the-other\n")
        session = re.search(r"session (s-\S+)", other.run("sub = %hwf_dispatch --wait").stdout).group(1)
    finally:
        other.kc.stop_channels()
        other.km.shutdown_kernel(now=False)  # not other.close(): that would stop the shared farm
    got = kernel.run(f"df = %hwf_results --session {session} --level command\n"
                     "print(df['stdout'].str.strip().tolist())").stdout
    assert got.strip().splitlines()[-1] == "['from-the-other']"


def test_reattach_to_an_external_hub_after_restart(cluster, tmp_path):
    k = Kernel(str(tmp_path), env=dict(os.environ, HWF_NONINTERACTIVE="0"))
    try:
        k.run("%load_ext hwf_jupyter")
        k.run(f"%hwf_connect {cluster.address} --token {cluster.token}")
        k.run("%%hwf_stage s\nsleep 3\necho external-ok\n")
        session = re.search(r"session (s-\S+)", k.run("sub = %hwf_dispatch --repeat 2").stdout).group(1)
        k.restart()
        k.run("%load_ext hwf_jupyter")
        token_file = tmp_path / "token"
        token_file.write_text(cluster.token + "\n")
        k.run(f"%hwf_connect {cluster.address} --token-file {token_file}")
        got = k.run(f"df = %hwf_results --session {session} --wait --level command\n"
                    "print(sorted(s.strip() for s in df['stdout'] if s.strip()))").stdout
        assert got.strip().splitlines()[-1] == "['external-ok', 'external-ok']"
    finally:
        k.close()


def test_a_headless_notebook_run_stops_only_the_farm_it_started(tmp_path, monkeypatch):
    import nbformat

    from hwf_jupyter import LocalCluster
    from hwf_jupyter.notebook_runner import execute_notebook

    local_dir = tmp_path / "farm"
    monkeypatch.setenv("HWF_LOCAL_DIR", str(local_dir))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "%load_ext hwf_jupyter\nc = %hwf_local --daemons 1\nprint('pids', *c.pids)")])
    nbformat.write(nb, tmp_path / "nb.ipynb")
    _, done = execute_notebook(tmp_path / "nb.ipynb", widgets=False)
    text = "".join(o.get("text", "") for o in done.cells[0].outputs)
    pids = [int(p) for p in text.split("pids", 1)[1].split()]
    assert len(pids) == 2 and _wait_gone(pids) == [], "nobody can re-attach to a headless run's farm"
    assert localfarm.read_record(local_dir) is None

    mine = LocalCluster(daemons=1, slots=1, persistent=True, state_dir=local_dir)  # the user's own farm
    try:
        _, done = execute_notebook(tmp_path / "nb.ipynb", widgets=False)
        assert "attached to your running local farm" in "".join(o.get("text", "") for o in done.cells[0].outputs)
        assert all(_alive(p) for p in mine.pids) and len(mine.pids) == 2, "a farm that ran before is left alone"
    finally:
        recorded = sorted(_farm_pids(local_dir))
        assert sorted(mine.stop()) == recorded

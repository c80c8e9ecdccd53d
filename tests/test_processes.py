"""No orphan processes: after close, after the parent dies, after Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync


def _gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _tree(pid):
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_close_stops_hub_daemons_and_running_tasks(tmp_path):
    c = LocalCluster(daemons=2, state_dir=tmp_path / "c")
    hub = c.hub()
    dispatch_sync(Task(Stage("s", cmd="sleep 60")), hub, repeat=2)
    def ours():
        return c.pids + [k for p in c.pids for k in _tree(p)]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(
        "sleep" in " ".join(psutil.Process(p).cmdline()) for p in ours() if psutil.pid_exists(p)
    ) < 2:
        time.sleep(0.1)
    pids = ours()
    assert len(pids) >= 5  # hub, 2 daemons, 2 running 'sleep 60' tasks
    hub.close_sync()
    c.close()
    assert _gone(pids)


SCRIPT = textwrap.dedent("""
    import sys, time
    from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync
    c = LocalCluster(daemons=2, state_dir=sys.argv[1])
    dispatch_sync(Task(Stage("s", cmd="sleep 60")), c.hub(), repeat=2)
    time.sleep(1.5)
    print("READY", flush=True)
    time.sleep(120)
""")


def _start_script(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "c")], stdout=subprocess.PIPE,
                            text=True)
    if proc.stdout.readline().strip() != "READY":
        proc.kill()
        raise AssertionError("the script did not start its cluster")
    kids = _tree(proc.pid)
    assert len(kids) >= 3  # hub, 2 daemons (and their sleeps)
    return proc, kids


def test_parent_killed_9_leaves_no_orphans(tmp_path):
    proc, kids = _start_script(tmp_path)
    proc.kill()
    proc.wait()
    assert _gone(kids), [psutil.Process(p).cmdline() for p in kids if psutil.pid_exists(p)]


def test_ctrl_c_leaves_no_orphans(tmp_path):
    proc, kids = _start_script(tmp_path)
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    assert _gone(kids)


def test_hwf_local_cli_ctrl_c(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "hwf_jupyter.cli", "local", "--daemons", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    try:
        lines = [proc.stdout.readline() for _ in range(4)]
        assert lines[0].startswith("hub:    ws://127.0.0.1:")
        kids = _tree(proc.pid)
        assert len(kids) >= 3  # hub, daemon, the daemon's guardian
    finally:
        proc.send_signal(signal.SIGINT)  # also when an assertion failed: leave nothing behind
        proc.wait(30)
    assert _gone(kids)


def test_daemon_killed_9_takes_its_command_trees_with_it(tmp_path):
    with LocalCluster(daemons=1, state_dir=tmp_path / "c") as c:
        hub = c.hub()
        dispatch_sync(Task(Stage("s", cmd="sleep 61 & sleep 62 & wait")), hub)
        daemon = c.daemon_processes["daemon-1"]
        deadline = time.monotonic() + 10
        sleeps = []
        while time.monotonic() < deadline and len(sleeps) < 2:
            sleeps = [p for p in _tree(daemon.pid) if psutil.Process(p).name() == "sleep"]
            time.sleep(0.1)
        assert len(sleeps) == 2
        daemon.kill()
        daemon.wait()
        assert _gone(sleeps, timeout=5)
        hub.close_sync()

"""The sans-I/O parts of a task's walls: how a breach is named, counters, flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from hwf_daemon import cli
from hwf_daemon.cgroups import _counter
from hwf_daemon.isolation import Box, disk_usage

ROOT = Path(__file__).resolve().parents[1]


class _Counters:
    """Stands in for a slot's TaskCgroup: counters the test moves."""

    def __init__(self, memory=200 * 2**20) -> None:
        self.max_pids, self.memory = 50, memory
        self.refused = self.kills = 0
        self.under_oom = False
        self.seen = (0, 0)
        self.procs = ["/x/cgroup.procs"]

    def pids_refused(self) -> int:
        return self.refused

    def oom_kills(self) -> int:
        return self.kills

    def stalled(self) -> bool:
        return self.under_oom


def _box(cg, **kw) -> Box:
    box = Box(key="t1", tmp="/w/t/.hwf-tmp", cgroup=cg, **kw)  # type: ignore[arg-type]
    box._counts = cg.seen
    return box


def test_a_refused_fork_is_the_process_limit_with_its_flag():
    cg = _Counters()
    box = _box(cg)
    assert box.breach() is None
    cg.refused = 3
    assert box.breach() == "hit the task's process limit (50 processes, hwf daemon --task-max-pids)"
    assert cg.seen == (3, 0)  # the next task on the slot starts from here


def test_an_oom_kill_or_a_stall_is_the_memory_limit():
    cg = _Counters()
    cg.seen = (0, 7)  # kills of earlier tasks on the slot are not this one's
    box = _box(cg)
    cg.kills = 7
    assert box.breach() is None
    cg.under_oom = True
    assert box.breach() == "hit the task's memory limit (200 MiB, hwf daemon --task-memory)"


def test_disk_past_the_limit_names_it_and_the_first_breach_stays():
    cg = _Counters()
    box = _box(cg, disk_limit=50 * 2**20)
    assert box.breach(disk=50 * 2**20) is None
    text = box.breach(disk=50 * 2**20 + 1)
    assert text == "hit the task's disk limit (50 MiB in its dir and private /tmp, hwf daemon --task-disk)"
    cg.refused = 1
    assert box.breach() == text


def test_the_spawner_gets_the_box_as_plain_data():
    cg = _Counters()
    box = _box(cg, shared=("/tmp", "/dev/shm"), namespaces=True, rebind="/w/t", home=("/h/cgroup.procs",))
    box.gen = 7
    assert box.wire() == ("t1", (True, "/w/t/.hwf-tmp", ["/tmp", "/dev/shm"], "/w/t", ["/x/cgroup.procs"],
                                 ["/h/cgroup.procs"], 7))


@pytest.mark.skipif(os.geteuid() != 0, reason="building mount namespaces needs root")
def test_a_slots_mounts_are_built_once_and_each_task_gets_a_fresh_ipc_namespace(tmp_path):
    """The slot's box keeps its mount namespace across tasks (mounts per task
    cost most of isolation's time), never its IPC namespace (SysV objects)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("spawnerd_under_test", ROOT / "daemon" / "spawnerd.py")
    spawnerd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spawnerd)
    walls = spawnerd.Walls()
    tmp = tmp_path / "slot-tmp"
    tmp.mkdir()
    try:
        first = walls.box("s0", (True, str(tmp), ["/var/tmp"], str(tmp_path), [], [], 1))
        ino = lambda fd: os.fstat(fd).st_ino  # noqa: E731 - a namespace's identity
        mnt, ipc = ino(first[0]), ino(first[1])
        again = walls.box("s0", (True, str(tmp), ["/var/tmp"], str(tmp_path), [], [], 1))
        assert (ino(again[0]), ino(again[1])) == (mnt, ipc)  # the same task: the same namespaces
        nxt = walls.box("s0", (True, str(tmp), ["/var/tmp"], str(tmp_path), [], [], 2))
        assert ino(nxt[0]) == mnt and ino(nxt[1]) != ipc
        assert os.readlink("/proc/self/ns/ipc") == f"ipc:[{ino(walls._own()[1])}]"  # back in its own
    finally:
        walls.close("s0")


def test_cgroup_counters_are_read_by_name():
    text = "oom_kill_disable 0\nunder_oom 1\noom_kill 4\n"
    assert _counter(text, "oom_kill") == 4 and _counter(text, "under_oom") == 1
    assert _counter("max 12\n", "max") == 12 and _counter("", "max") == 0


def test_disk_usage_counts_blocks_and_follows_no_link(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 100_000)
    (tmp_path / "link").symlink_to("/usr")
    assert 100_000 <= disk_usage(tmp_path) < 1_000_000


@pytest.mark.parametrize("flag, value, problem", [
    ("--task-max-pids", "0", "must be at least 1"),
    ("--task-max-pids", "many", "is not a whole number"),
    ("--task-memory", "lots", "is not a size"),
    ("--task-disk", "0", "must be at least 1 byte"),
])
def test_bad_limit_flags_are_refused_naming_the_flag(flag, value, problem, capsys):
    parser = argparse.ArgumentParser(prog="hwf daemon")
    cli.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--hub", "ws://127.0.0.1:1", flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and problem in err


def test_limit_flags_read_sizes_like_a_tasks_ram():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--hub", "ws://x", "--task-memory", "2GB", "--task-disk", "512MB"])
    assert (args.task_memory, args.task_disk, args.task_max_pids, args.isolation) == (2 * 2**30, 512 * 2**20, 4096,
                                                                                      "auto")

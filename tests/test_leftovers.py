"""daemon.leftovers: what a task leaves as its slot's uid is found and killed, cheaply when nothing is."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from hwf_daemon import leftovers, spawner
from hwf_daemon.accounts import DEFAULT_SLOT_UID_BASE, TaskUser
from hwf_daemon.leftovers import born_since, kill_leftovers, last_pid
from hwf_daemon.tracking import TrackedProcess

ROOT = os.geteuid() == 0
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not ROOT, reason="tasks run as other users only as root"),
    pytest.mark.skipif(last_pid() is None, reason="no /proc/sys/kernel/ns_last_pid on this kernel"),
]

USER = TaskUser(DEFAULT_SLOT_UID_BASE + 4300, DEFAULT_SLOT_UID_BASE + 4300, "hwf-test", per_slot=True)
# A Python the slot uid may run (this one may live in root's home).
SYSTEM_PY = shutil.which("python3", path="/usr/bin:/bin")
# Leaves the group, then makes itself non-dumpable: its /proc entry turns root's.
HIDE = ("import ctypes, os, time; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); "
        "fd = os.open('hidden.pid', os.O_WRONLY | os.O_CREAT, 0o644); "
        "os.write(fd, str(os.getpid()).encode()); os.close(fd); time.sleep(1000)")
ESCAPE_HIDDEN = (f"rm -f hidden.pid; setsid {SYSTEM_PY} -c {shlex.quote(HIDE)} > /dev/null 2>&1 < /dev/null & "
                 "for i in $(seq 500); do [ -s hidden.pid ] && break; sleep 0.01; done; cat hidden.pid")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o777)
    return tmp_path


class Kills:
    def __init__(self, monkeypatch):
        self.count = 0
        real = spawner.Spawner.kill_all

        async def counting(sp, user):
            self.count += 1
            return await real(sp, user)

        monkeypatch.setattr(spawner.Spawner, "kill_all", counting)


async def _run(cmd: str, cwd: Path) -> str:
    proc = await TrackedProcess.start(cmd, cwd, user=USER, track_ram=False)
    out = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.read)
    proc.stdout.close()
    proc.stderr.close()
    assert (await proc.wait()).exit_code == 0
    return out.decode()


def test_a_task_that_leaves_nothing_needs_no_killer(workdir, monkeypatch):
    kills = Kills(monkeypatch)

    async def main():
        since = last_pid()
        await _run("true", workdir)
        await _run("sh -c 'sleep 0.01 & wait'", workdir)
        return await kill_leftovers(USER, since)

    assert asyncio.run(main()) == []
    assert kills.count == 0


@pytest.mark.skipif(SYSTEM_PY is None, reason="no /usr/bin/python3 to hide a process with")
def test_a_non_dumpable_process_left_behind_is_found_and_killed(workdir, monkeypatch):
    kills = Kills(monkeypatch)

    async def main():
        since = last_pid()
        pid = int(await _run(ESCAPE_HIDDEN, workdir))
        # Non-dumpable: its /proc files are root's (on some kernels its /proc
        # dir too), so only what they say, not who owns them, gives it away.
        assert os.stat(f"/proc/{pid}/status").st_uid == 0
        assert born_since(USER.uid, since)
        assert await kill_leftovers(USER, since) == []
        return pid

    pid = asyncio.run(main())
    assert kills.count >= 1
    assert not os.path.exists(f"/proc/{pid}") or re.search(
        r"State:\s+Z", Path(f"/proc/{pid}/status").read_text())


def test_a_birth_during_every_listing_means_maybe(monkeypatch):
    since = last_pid()
    births = iter(range(since, since + 100))  # a process is born during every walk of /proc
    monkeypatch.setattr(leftovers, "last_pid", lambda: next(births))
    assert born_since(USER.uid, since)
    # One walk disturbed by a birth elsewhere, the next one quiet: a definite no.
    answers = iter([since, since + 1, since + 1, since + 1])
    monkeypatch.setattr(leftovers, "last_pid", lambda: next(answers))
    assert not born_since(USER.uid, since)
    monkeypatch.setattr(leftovers, "last_pid", lambda: since)
    assert not born_since(USER.uid, since)
    assert born_since(USER.uid, None)  # unknown start: maybe


def test_pids_wrap_around(monkeypatch):
    # The range after `since` wraps at pid_max: a pid below `since` is new
    # if it is at or below the last one handed out.
    me = os.getpid()
    monkeypatch.setattr(leftovers, "last_pid", lambda: me)
    assert born_since(os.getuid(), me + 1)  # this process counts as born since
    assert not born_since(os.getuid() + 1_000_000, me + 1)

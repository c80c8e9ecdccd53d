"""daemon.tracking: how a command is spawned, reaped and measured."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from hwf_daemon import tracking
from hwf_daemon.accounts import DEFAULT_SLOT_UID_BASE
from hwf_daemon.tracking import TrackedProcess

pytestmark = pytest.mark.e2e  # every test here starts processes

PY = shlex.quote(sys.executable)
BURN = f"{PY} -c " + shlex.quote(
    "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
)


async def _run(cmd: str, cwd: Path, **kw):
    proc = await TrackedProcess.start(cmd, cwd, **kw)
    out = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.read)
    proc.stdout.close()
    proc.stderr.close()
    usage = await proc.wait()
    return proc, usage, out


def test_commands_are_reaped_on_a_pidfd_without_a_thread(tmp_path: Path) -> None:
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no os.pidfd_open on this platform")

    async def main():
        proc = await TrackedProcess.start("sleep 0.3; exit 7", tmp_path, track_ram=False)
        names = [t.name for t in threading.enumerate()]
        usage = await proc.wait()
        return names, usage

    names, usage = asyncio.run(main())
    assert not any(n.startswith("hwf-wait4-") for n in names), names
    assert usage.exit_code == 7


def test_without_pidfd_a_thread_reaps_with_the_same_results(tmp_path: Path, monkeypatch) -> None:
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd, raising=False)

    async def main():
        proc = await TrackedProcess.start(f"{BURN}; kill -TERM $$", tmp_path, track_ram=False)
        names = [t.name for t in threading.enumerate()]
        return names, await proc.wait()

    names, usage = asyncio.run(main())
    assert any(n.startswith("hwf-wait4-") for n in names)
    assert usage.exit_code == -15
    assert usage.cpu_time >= 0.3


@pytest.mark.parametrize("track_ram", [True, False])
def test_rss_is_sampled_only_when_ram_is_tracked(tmp_path: Path, monkeypatch, track_ram: bool) -> None:
    samples = []
    real = tracking._tree_rss

    def counting(proc, *args):
        samples.append(proc.pid)
        return real(proc, *args)

    monkeypatch.setattr(tracking, "_tree_rss", counting)
    _, usage, _ = asyncio.run(_run("sleep 0.2", tmp_path, track_ram=track_ram))
    assert usage.exit_code == 0
    if track_ram:
        assert len(samples) >= 2 and usage.peak_ram > 0
    else:
        assert samples == [] and usage.peak_ram == 0


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_what_is_left_of_the_group_is_killed_when_the_leader_exits(tmp_path: Path) -> None:
    async def main():
        proc, usage, out = await _run("sleep 30 & echo $!", tmp_path, track_ram=False)
        return int(out), usage

    pid, usage = asyncio.run(main())
    assert usage.exit_code == 0
    deadline = time.monotonic() + 2  # SIGKILL is delivered asynchronously
    while not _gone(pid):
        assert time.monotonic() < deadline, "the background sleep survived its command"
        time.sleep(0.01)


STRACED = r"""
import asyncio, os, sys, tempfile
from hwf_daemon.accounts import TaskUser
from hwf_daemon.leftovers import kill_leftovers
from hwf_daemon.tracking import TrackedProcess

async def run(cmd, user=None):
    proc = await TrackedProcess.start(cmd, sys.argv[1], user=user, track_ram=True)
    proc.stdout.read(); proc.stderr.read()
    return (await proc.wait()).exit_code

async def main():
    assert await run("true") == 0 and await run("echo x | cat") == 0
    if os.geteuid() == 0:
        user = TaskUser(int(sys.argv[2]), int(sys.argv[2]), "x", per_slot=True)
        assert await run("true", user) == 0 and await run("echo x | cat", user) == 0
        await kill_leftovers(user)  # the killer, forked by the spawner

asyncio.run(main())
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_the_daemon_never_forks_itself_to_start_a_command(tmp_path: Path) -> None:
    """vfork (no copy of the daemon's memory) for its own user; as another
    user, the spawner forks (a small process), never the daemon."""
    os.chmod(tmp_path, 0o777)
    trace = tmp_path / "trace"
    uid = str(DEFAULT_SLOT_UID_BASE + 4400)
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=clone,clone3,fork,vfork", "-o", str(trace),
                    sys.executable, "-c", STRACED, str(tmp_path), uid], check=True, timeout=120)
    lines = trace.read_text().splitlines()
    daemon = lines[0].split()[0]
    made = [line for line in lines if line.split()[0] == daemon and "CLONE_THREAD" not in line
            and re.search(r"\b(clone3?|fork|vfork)\(", line)]
    assert made, lines
    for line in made:
        assert "vfork(" in line or ("CLONE_VM" in line and "CLONE_VFORK" in line), line
    if os.geteuid() == 0:  # the spawner did fork: that is where the uid switches happen
        assert any(line.split()[0] != daemon and re.search(r"\bclone3?\(.*SIGCHLD", line)
                   and "CLONE_VM" not in line for line in lines)


@pytest.mark.skipif(os.geteuid() != 0, reason="the spawner runs commands as other users, as root")
def test_a_spawner_that_dies_takes_its_commands_and_is_replaced(tmp_path: Path) -> None:
    from hwf_daemon import spawner
    from hwf_daemon.accounts import TaskUser

    os.chmod(tmp_path, 0o777)
    user = TaskUser(DEFAULT_SLOT_UID_BASE + 4500, DEFAULT_SLOT_UID_BASE + 4500, "x", per_slot=True)

    async def main():
        proc = await TrackedProcess.start("sleep 30", tmp_path, user=user, track_ram=False)
        first = spawner.current()
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(spawner.SpawnerDied):
            await asyncio.wait_for(proc.wait(), 10)
        proc.stdout.close()
        proc.stderr.close()
        deadline = time.monotonic() + 5
        while not _gone(proc.pid):  # its group was killed
            assert time.monotonic() < deadline, "the command outlived its spawner"
            await asyncio.sleep(0.01)
        _, usage, out = await _run("echo again", tmp_path, user=user, track_ram=False)
        assert usage.exit_code == 0 and out == b"again\n"
        assert spawner.current() is first and first.pid is not None

    asyncio.run(main())


def test_a_sample_before_exec_is_not_the_parents_ram():
    """A child that has not exec'd yet shows its parent's RSS: the sampler must not take it as the command's."""
    import os
    import time

    import psutil

    from hwf_daemon.tracking import _tree_rss

    ballast = bytearray(200 * 2**20)  # the parent is big
    ballast[::4096] = b"x" * len(ballast[::4096])
    pid = os.fork()
    if pid == 0:  # the child: a copy of the parent, never exec'd
        time.sleep(2)
        os._exit(0)
    try:
        child = psutil.Process(pid)
        me = psutil.Process().cmdline()
        assert _tree_rss(child) > 150 * 2**20, "without the parent's cmdline the copy looks big"
        assert _tree_rss(child, me) == 0
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        del ballast

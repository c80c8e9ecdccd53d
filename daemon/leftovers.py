"""Kill whatever a task left running as its slot's uid.

A task can leave processes behind that its process group does not hold
(``setsid``, a double fork); as the same uid, they could read the slot's
next task.  So after each task on a per-slot uid every process of that
uid is killed, the classic way: a child that becomes the uid and calls
``kill(-1, SIGKILL)``.  kill(-1) reaches every process the caller may
signal (real or saved uid the slot's, however it hides: another session,
a non-dumpable /proc entry) but not the caller, in one pass that the
kernel does not let fork() race, and a SIGKILLed process runs no more
user code.  Its return value cannot tell whether anything was there (it
counts processes it may not signal too), so the child runs after every
task: one fork, awaited on a pidfd rather than in a thread, whose trips
through the GIL would cost several times the fork.  A cheap scan of
/proc owners then waits for the killed ones to be gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .accounts import TaskUser

log = logging.getLogger(__name__)

_OK, _FAILED = 0, 1
_ATTEMPTS = 5


def processes_of(uid: int) -> list[int]:
    """Pids of live (not zombie) processes whose /proc entry ``uid`` owns.

    Cheap (one stat per process, no parsing but for matches).  A process
    that made itself non-dumpable shows as root's and is missed here;
    kill(-1) reaches it all the same.
    """
    pids = []
    try:
        entries = os.scandir("/proc")
    except OSError:
        return pids
    with entries:
        for e in entries:
            if not e.name.isdigit():
                continue
            try:
                if e.stat(follow_symlinks=False).st_uid != uid:
                    continue
                with open(f"/proc/{e.name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue  # gone meanwhile
            if state not in (b"Z", b"X"):
                pids.append(int(e.name))
    return pids


def _start_killer(user: "TaskUser") -> int:
    """Start the child that becomes ``user`` and SIGKILLs all its processes.

    Through setpriv and sh with posix_spawn (vfork: no copy of the daemon)
    where setpriv exists; else a fork that switches user itself."""
    from .tracking import SETPRIV, as_user

    if SETPRIV:
        script = "kill -KILL -1 2>/dev/null; exit 0"  # exits 0 only if setpriv switched
        return os.posix_spawn(SETPRIV, [*as_user(user), "/bin/sh", "-c", script], {})
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = _OK
        try:
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass  # no other process at all
        except BaseException:
            code = _FAILED
        os._exit(code)
    return pid


def _check(user: "TaskUser", status: int) -> None:
    if os.waitstatus_to_exitcode(status) != _OK:
        raise OSError(f"could not switch to uid {user.uid} to kill its processes")


def _wait_until_gone(user: "TaskUser", timeout: float = 1.0) -> list[int]:
    """SIGKILL is delivered asynchronously: wait for the uid's processes to vanish."""
    deadline = time.monotonic() + timeout
    while (left := processes_of(user.uid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def kill_processes_of(user: "TaskUser") -> list[int]:
    """Blocking form (daemon start-up): kill the uid's processes; pids that survived."""
    left: list[int] = []
    for _ in range(_ATTEMPTS):
        _, status = os.waitpid(_start_killer(user), 0)
        _check(user, status)
        if not (left := _wait_until_gone(user)):
            return []
    log.warning("processes of uid %d survived SIGKILL: %s", user.uid, left)
    return left


async def _wait_child(pid: int) -> int:
    """A child's wait status, awaited on a pidfd (Linux 5.3+) or else in a thread."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        return status
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
        # Reap it even if we were cancelled: it exits within milliseconds.
        _, status = os.waitpid(pid, 0)
    return status


async def kill_leftovers(user: "TaskUser") -> list[int]:
    """Kill every process of the slot ``user``; returns pids that survived."""
    left: list[int] = []
    for _ in range(_ATTEMPTS):
        _check(user, await _wait_child(_start_killer(user)))
        if not processes_of(user.uid):  # the common case: nothing was left
            return []
        if not (left := await asyncio.to_thread(_wait_until_gone, user)):
            return []
    log.warning("processes of uid %d survived SIGKILL: %s", user.uid, left)
    return left

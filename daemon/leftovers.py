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
task.  It is a fork of the spawner (spawnerd.py: ~10 MB, no exec), which
costs less than finding out first whether anything is left: reading the
``Uid:`` line of every ``/proc/*/status`` (the only view that also shows
non-dumpable processes, whose /proc entries root owns) took 1.3 ms here
with 70 processes, and grows with the machine's process count; the fork
of the spawner and the kill took 0.5 ms.  A cheap scan of /proc owners
then waits for the killed ones to be gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .accounts import TaskUser

log = logging.getLogger(__name__)

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


def _kill_blocking(user: "TaskUser") -> None:
    """The blocking killer (daemon start-up, before any event loop): a fresh
    small process that becomes the uid and kills every process of it."""
    from .spawner import spawner_argv

    argv = spawner_argv("--kill-as", str(user.uid), str(user.gid))
    _, status = os.waitpid(os.posix_spawn(argv[0], argv, {}), 0)
    if os.waitstatus_to_exitcode(status) != 0:
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
        _kill_blocking(user)
        if not (left := _wait_until_gone(user)):
            return []
    log.warning("processes of uid %d survived SIGKILL: %s", user.uid, left)
    return left


async def kill_leftovers(user: "TaskUser") -> list[int]:
    """Kill every process of the slot ``user``; returns pids that survived."""
    from . import spawner

    left: list[int] = []
    for _ in range(_ATTEMPTS):
        await spawner.current().kill_all(user)
        if not processes_of(user.uid):  # the common case: nothing was left
            return []
        if not (left := await asyncio.to_thread(_wait_until_gone, user)):
            return []
    log.warning("processes of uid %d survived SIGKILL: %s", user.uid, left)
    return left

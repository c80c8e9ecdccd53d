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
counts processes it may not signal too).  The child is a fork of the
spawner (spawnerd.py: ~10 MB, no exec): 1.4 ms of CPU in all here.

Most tasks leave nothing, and that can be known for less (30-60 us for
a short task, 0.1-0.2 ms when many processes were born meanwhile; a scan
of every ``/proc/*/status`` took 1.5 ms with 64 processes, and grows with
the machine), from the processes born since the task began
(``born_since``):

* pids are handed out in order, wrapping at ``pid_max``, and the kernel
  shows the last one given (``/proc/sys/kernel/ns_last_pid``), read when
  the slot takes the task: every process the task ever made has a pid in
  the cyclic range after it.  Every process of the uid was killed before
  the task (by induction: after every task, and at start-up), so only
  those pids can hold one now;
* for each of them (probed one by one when they are few, else found in
  a /proc listing), ``/proc/PID/status`` says its uids (also for a
  non-dumpable process, whose /proc files root owns);
* a walk of /proc is not a snapshot: a process that forks and exits in a
  loop can stay one step behind it (after a wrap, new pids are below
  where the walk is).  So the last pid is read again after the walk: if
  any process was born meanwhile, the answer is "maybe", and the killer
  runs.  With no birth during the walk, the processes it saw are all
  there were, minus some that ended.

Anything unexpected (no ``ns_last_pid``, a read that fails) means
"maybe": the killer runs.  After it, a cheap scan of /proc owners waits
for the killed ones to be gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Optional

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


_LAST_PID = "/proc/sys/kernel/ns_last_pid"
_last_pid_fd: Optional[int] = None


def last_pid() -> Optional[int]:
    """The last pid the kernel handed out in our pid namespace (None: unknown).

    Read with pread on an fd kept open (1.4 us instead of 12 for an open)."""
    global _last_pid_fd
    try:
        if _last_pid_fd is None:
            if os.readlink("/proc/self") != str(os.getpid()):
                return None  # this /proc is another pid namespace's: its pids are not ours
            _last_pid_fd = os.open(_LAST_PID, os.O_RDONLY | os.O_CLOEXEC)
        return int(os.pread(_last_pid_fd, 32, 0))
    except (OSError, ValueError):
        return None


def _uids(pid: str) -> Optional[bytes]:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return b""  # gone (before the open, or before the read)
    except OSError:
        return None
    start = status.find(b"\nUid:")
    if start < 0:
        return None
    end = status.find(b"\n", start + 5)
    return status[start + 5:end]


def _read_pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 22


_PID_MAX = _read_pid_max()  # only root may change it, and nobody does on a running farm
# A range this short is probed pid by pid (a missing pid costs one failed
# open, ~3 us); a longer one is read from a /proc listing (~100 us).
_PROBE_LIMIT = 32


def born_since(uid: int, since: Optional[int], tries: int = 3) -> bool:
    """False only if surely no process of ``uid`` born after pid ``since``
    runs now (see above); True if one may.

    A birth during the walk (any process of the machine) makes the walk
    inconclusive; it is walked again, up to ``tries`` times, before "maybe":
    on a busy machine a "maybe" would kill the slot's warm Python worker too."""
    for _ in range(tries):
        answer = _born_since_once(uid, since)
        if answer is not None:
            return answer
    return True


def _born_since_once(uid: int, since: Optional[int]) -> Optional[bool]:
    """True / False, or None when a birth during the walk leaves it open."""
    if since is None:
        return True
    before = last_pid()
    if before is None:
        return True
    span = before - since if before >= since else before + _PID_MAX - since
    if 0 <= span <= _PROBE_LIMIT:
        candidates = [str((since + k - 1) % _PID_MAX + 1) for k in range(1, span + 1)]
    else:
        try:
            names = os.listdir("/proc")
        except OSError:
            return True
        candidates = [
            n for n in names
            if n.isdigit() and ((since < int(n) <= before) if since <= before else (int(n) > since or int(n) <= before))
        ]
    want = str(uid).encode()
    for name in candidates:
        uids = _uids(name)
        if uids is None or want in uids.split():  # real, effective, saved or fs uid
            return True
    return None if last_pid() != before else False  # a birth meanwhile: it may have been missed


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


async def kill_leftovers(user: "TaskUser", since: Optional[int] = None) -> list[int]:
    """Kill every process of the slot ``user``; returns pids that survived.

    ``since``: ``last_pid()`` before the task began (None: unknown); if no
    process of the uid was born since, there is nothing to kill.
    """
    from . import spawner

    if not born_since(user.uid, since):
        return []
    left: list[int] = []
    for _ in range(_ATTEMPTS):
        await spawner.current().kill_all(user)
        if not processes_of(user.uid):  # the common case: nothing was left
            return []
        if not (left := await asyncio.to_thread(_wait_until_gone, user)):
            return []
    log.warning("processes of uid %d survived SIGKILL: %s", user.uid, left)
    return left


def remove_files_of(uid: int, dirs: "tuple[str, ...] | list[str]") -> list[str]:
    """Remove every entry ``uid`` owns at the top of the shared dirs (``/tmp``,
    ``/dev/shm``...): what a task left there outside its private dirs (a Python
    call, or a daemon without namespaces) is no later task's to read.  In a
    sticky dir a uid can only have made top-level entries (deeper ones sit in
    dirs it owns).  Blocking; returns what was removed."""
    import shutil
    import stat as st

    removed = []
    for d in dirs:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                info = e.stat(follow_symlinks=False)
                if info.st_uid != uid:
                    continue
                if st.S_ISDIR(info.st_mode):
                    shutil.rmtree(e.path)  # fd-based: links inside are not followed
                else:
                    os.unlink(e.path)
                removed.append(e.path)
            except OSError as exc:
                log.warning("could not remove %s (uid %d's): %s", e.path, uid, exc)
    return removed

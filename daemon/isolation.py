"""A task alone on its machine: the walls around each task, and the ones missing.

Per-slot uids (accounts.py) keep tasks of different slots out of each
other's files; what a uid cannot wall off is what every user shares: the
world-writable dirs (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``),
SysV IPC, ``/proc`` (every command line, ``--password=...`` included), and
the machine's processes and memory.  So a daemon running as root starts
each command of a task:

* in its slot's mount namespace, with the slot's private dir (the root's
  ``.hwf-slot-tmp-<k>``, 0700, the slot uid's, emptied between two tasks)
  bound over every shared dir: the task's stages share it, nobody else sees
  it, and it counts toward the task's disk; the slot runs one task at a
  time, so a namespace kept across its tasks walls them in as one per task
  would, without building and tearing down mounts per task (26% of the
  rate of trivial tasks when it did);
* in an IPC namespace of the task's own (fresh at each task);
* with a fresh procfs mounted ``hidepid=2`` on ``/proc``: a task sees its own
  uid's processes only (the spawned pid stays the daemon's to track);
* in its slot's cgroup (cgroups.py): ``--task-max-pids`` processes,
  ``--task-memory`` bytes (at least the task's ``ram`` requirement);

and polls the size of its dir every ``DISK_POLL`` seconds against
``--task-disk``, as HTCondor does.  A task beyond a limit is stopped and
fails with the limit and its flag named.

The spawner builds a slot's namespaces once, inside itself and without a
fork, and forks each command while standing in them (spawnerd.py says why).

Warm Python workers live across tasks (of one user), so they get
namespaces of their own and a hidepid ``/proc`` but keep the host's dirs,
and no cgroup; what their slot uid leaves in the shared dirs is removed
after the task (leftovers.py).

Measured with ``bench/run.py --only hwf,hwf-noiso``: see the README.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Optional

from .cgroups import DaemonCgroups, Layout, TaskCgroup, own_procs

if TYPE_CHECKING:
    from .accounts import TaskAccounts

log = logging.getLogger(__name__)

SHARED_NAMES = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")
DEFAULT_MAX_PIDS = 4096
DEFAULT_DISK = 10 * 2**30
DISK_POLL = 1.0  # s between two looks at a task's disk use (and its cgroup's counters)
Mode = Literal["auto", "none"]


def shared_dirs(names: tuple[str, ...] = SHARED_NAMES) -> tuple[str, ...]:
    """The world-writable dirs of this machine among ``names``, resolved, once each."""
    seen: list[str] = []
    for name in names:
        try:
            real = os.path.realpath(name)
            st = os.stat(real)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and real not in seen:
            seen.append(real)
    return tuple(seen)


def disk_usage(path: Path) -> int:
    """Bytes of disk under ``path`` (allocated blocks; links not followed)."""
    total = 0
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


@dataclass
class Box:
    """What walls in one task's commands; ``wire()`` is what the spawner gets."""

    key: str  # the spawner's name for its namespaces (a slot's, kept across its tasks)
    tmp: Optional[str]  # bound over ``shared`` (None: the shared dirs stay)
    shared: tuple[str, ...] = ()
    namespaces: bool = False
    rebind: Optional[str] = None  # the task dirs' root, bound back at its path if under a shared dir
    gen: int = 0  # the task: each gets a fresh IPC namespace
    cgroup: Optional[TaskCgroup] = None
    home: tuple[str, ...] = ()  # the spawner's own cgroup.procs, to return to
    disk_path: Optional[Path] = None
    tmp_path: Optional[Path] = None  # the slot's private /tmp, counted with the task dir
    disk_limit: Optional[int] = None
    rlimit_as: Optional[int] = None  # the fallback without cgroups: RLIMIT_AS, set just after the start
    _counts: tuple[int, int] = (0, 0)
    breached: Optional[str] = field(default=None)

    def wire(self) -> tuple[str, tuple]:
        cg = self.cgroup
        return (self.key, (self.namespaces, self.tmp, list(self.shared) if self.tmp else [], self.rebind,
                           cg.procs if cg else [], list(self.home) if cg else [], self.gen))

    def disk(self) -> Optional[int]:
        """Bytes the task holds on disk (its dir and private /tmp), or None when unlimited."""
        if self.disk_limit is None or self.disk_path is None:
            return None
        return disk_usage(self.disk_path) + (disk_usage(self.tmp_path) if self.tmp_path is not None else 0)

    def breach(self, disk: Optional[int] = None) -> Optional[str]:
        """The limit the task went past (its text, flag named), or None."""
        if self.breached is None and self.cgroup is not None:
            cg = self.cgroup
            cg.seen = now = (cg.pids_refused(), cg.oom_kills())  # the next task's baseline
            if now[0] > self._counts[0]:
                self.breached = (f"hit the task's process limit ({cg.max_pids} processes, "
                                 "hwf daemon --task-max-pids)")
            elif cg.memory is not None and (now[1] > self._counts[1] or cg.stalled()):
                self.breached = (f"hit the task's memory limit ({_size(cg.memory)}, "
                                 "hwf daemon --task-memory)")
        if self.breached is None and disk is not None and self.disk_limit is not None and disk > self.disk_limit:
            self.breached = (f"hit the task's disk limit ({_size(self.disk_limit)} in its dir and private /tmp, "
                             "hwf daemon --task-disk)")
        return self.breached


class Walls:
    """A daemon's isolation: what it can do here, and each task's ``Box``."""

    def __init__(self, mode: Mode, accounts: "TaskAccounts", daemon: str, *, slots: int,
                 max_pids: int = DEFAULT_MAX_PIDS, memory: Optional[int] = None,
                 disk: Optional[int] = DEFAULT_DISK, total_ram: Optional[int] = None) -> None:
        self.mode = mode
        self.max_pids = max_pids
        self.rlimit_as: Optional[int] = None  # RLIMIT_AS per command, where no cgroup can limit memory
        self.memory = memory if memory is not None else (total_ram // max(slots, 1) if total_ram else None)
        self.disk = disk
        self.shared = shared_dirs()
        self.problems: list[str] = []  # one line per isolation this daemon cannot give
        self.namespaces = False
        self.cgroups: Optional[DaemonCgroups] = None
        self.slots: list[TaskCgroup] = []
        self.home: tuple[str, ...] = ()
        self._boxes = 0
        self._watched: dict[str, tuple[Box, Callable[[str], None]]] = {}
        self._poller: Optional[asyncio.Future] = None
        if mode == "none":
            self.problems.append("isolation is off (--isolation none): tasks share /tmp, /var/tmp and /dev/shm, "
                                 "see every process in /proc, and have no process, memory or disk limit")
            return
        others = accounts.mode != "self"
        if os.geteuid() != 0 or not others:
            why = "this daemon is not root" if os.geteuid() != 0 else "tasks run as the daemon's own user (--run-as self)"
            # Only when asked: RLIMIT_AS counts address space, which some runtimes reserve by the GiB.
            self.rlimit_as = memory
            mem = (f"memory falls back to RLIMIT_AS of {_size(memory)} (--task-memory)" if memory
                   else "memory falls back to RLIMIT_AS only with --task-memory")
            self.problems += [
                f"no private /tmp, /var/tmp, /dev/shm per task ({why}; each task gets its own TMPDIR only): "
                "run the daemon as root, on a kernel with mount namespaces",
                f"tasks see every process of this machine in /proc, command lines included ({why}): "
                "run the daemon as root (procfs hidepid=2 in a mount namespace)",
                f"no per-task process or memory limit in a cgroup ({why}; {mem}, processes are not limited): "
                "run the daemon as root with the pids and memory cgroup controllers",
            ]
            return
        problem = probe_namespaces()
        if problem:
            self.problems += [
                f"no private /tmp, /var/tmp, /dev/shm per task: {problem}; the operator must allow mount "
                "and IPC namespaces (unshare) to root",
                f"tasks see every process of this machine in /proc: {problem}",
            ]
        else:
            self.namespaces = True
        layout, why = Layout.detect()
        if layout is None:
            self.problems.append(f"no per-task process or memory limit: {why}; the operator must mount the "
                                 "pids and memory cgroup controllers (v1 or v2) writable by root")
        else:
            try:
                self.cgroups = DaemonCgroups(layout, daemon)
                self.slots = [self.cgroups.create(f"slot-{k}", max_pids, self.memory) for k in range(slots)]
                self.home = tuple(own_procs(layout))
            except OSError as exc:
                self.problems.append(f"no per-task process or memory limit: cannot make cgroups ({exc})")
                self.cgroups, self.slots = None, []

    def describe(self) -> list[str]:
        """What the daemon does (a log line each)."""
        lines = []
        if self.namespaces:
            lines.append(f"each task has a private {', '.join(self.shared)} and sees only its own processes "
                         "(mount and IPC namespaces, /proc hidepid=2)")
        if self.cgroups is not None:
            mem = _size(self.memory) if self.memory else "no"
            lines.append(f"each task runs in a cgroup (v{self.cgroups.layout.version}): at most {self.max_pids} "
                         f"processes (--task-max-pids), {mem} memory or its ram requirement (--task-memory)")
        if self.disk is not None and self.mode != "none":
            lines.append(f"each task may use {_size(self.disk)} of disk in its dir and private /tmp (--task-disk)")
        return lines

    def box(self, slot: int, taskdir: Path, hardware: Mapping[str, Any], tmp: Optional[Path],
            root: Optional[Path] = None) -> Optional[Box]:
        """The walls of one task on ``slot``, or None when isolation is off.

        ``tmp`` is the slot's private /tmp (emptied by the daemon between two
        tasks) and ``root`` the task dirs' root: a slot's mount namespace is
        built at its first task and kept, since building and tearing down
        mounts per task cost more than the rest of isolation together (one
        task at a time per slot, and the slot is emptied before the next, as
        its cgroup is)."""
        if self.mode == "none":
            return None
        self._boxes += 1
        namespaced = self.namespaces and tmp is not None
        box = Box(key=f"s{slot}" if namespaced else f"t{self._boxes}", tmp=str(tmp) if namespaced else None,
                  shared=self.shared, namespaces=namespaced, rebind=str(root or taskdir), gen=self._boxes,
                  disk_path=taskdir, tmp_path=tmp if namespaced else None, disk_limit=self.disk,
                  rlimit_as=self.rlimit_as, home=self.home)
        if self.slots and tmp is not None:  # commands as the slot's user: through the spawner
            memory = self.memory
            want = _ram_of(hardware)
            if want is not None and (memory is None or want > memory):
                memory = want
            cg = box.cgroup = self.slots[slot]
            cg.set_memory(memory)
            box._counts = cg.seen  # as read at the end of the slot's last task (breach)
        return box

    def worker_box(self) -> Optional[Box]:
        """A warm worker's walls: namespaces and hidepid, the host's dirs.
        One key per worker start: each has namespaces of its own."""
        if not self.namespaces:
            return None
        self._boxes += 1
        return Box(key=f"w{self._boxes}", tmp=None, namespaces=True)

    def watch(self, box: Box, stop: Callable[[str], None]) -> None:
        """Until ``unwatch``: poll the task's disk and cgroup counters every
        ``DISK_POLL`` s and ``stop(text)`` it once past a limit.  One poller
        for every task (a task of its own per task cost 50 us each)."""
        self._watched[box.key] = (box, stop)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll())

    def unwatch(self, box: Box) -> None:
        self._watched.pop(box.key, None)

    async def _poll(self) -> None:
        while self._watched:
            await asyncio.sleep(DISK_POLL)
            boxes = [b for b, _ in self._watched.values()]
            disks = await asyncio.to_thread(lambda: [b.disk() for b in boxes])
            for box, disk in zip(boxes, disks):
                watched = self._watched.get(box.key)
                text = box.breach(disk) if watched is not None else None
                if text is not None:
                    self.unwatch(box)
                    watched[1](text)

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self.cgroups is not None:
            self.cgroups.close()


def _ram_of(hardware: Mapping[str, Any]) -> Optional[int]:
    from hub_server.hardware import parse_size

    value = hardware.get("ram") if hardware else None
    if value is None or value == "any":
        return None
    try:
        return parse_size(value)
    except ValueError:
        return None


def probe_namespaces() -> Optional[str]:
    """None if a child can unshare mount and IPC namespaces and mount a
    hidepid procfs here; else why not."""
    from .spawner import spawner_argv

    try:
        done = subprocess.run(spawner_argv("--probe"), capture_output=True, text=True, timeout=30, env={})
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the probe could not run ({exc})"
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["the probe failed"])[-1]
    return None

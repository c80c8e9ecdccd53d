"""One cgroup per slot: a ceiling on the processes and memory of its task.

A fork bomb or a memory hog must fail its own task, not the machine.  rlimits
cannot do it (RLIMIT_NPROC counts the whole uid, RLIMIT_AS counts address
space, not memory), a cgroup can: every process a command forks stays in
the cgroup it joined before its exec (spawnerd.py writes the child's pid
into ``cgroup.procs``), ``pids.max`` refuses the fork beyond the limit and
the memory controller OOM-kills inside the group only.  A slot runs one
task at a time and is emptied (leftovers.py) before the next, so its
cgroup is reused task after task (limits rewritten, counters compared with
their value at the task's start): making and removing two v1 cgroups per
task cost 0.3 ms of the daemon's loop here.  The kernel counts
each refusal (``pids.events`` ``max``; v1 ``memory.oom_control``
``oom_kill``, v2 ``memory.events`` ``oom_kill``), which is how the daemon
tells the task which limit it hit.

Both layouts are handled: cgroup v1 (one hierarchy per controller, under
``/sys/fs/cgroup/pids`` and ``/sys/fs/cgroup/memory``) and v2 (one
hierarchy, ``/sys/fs/cgroup/cgroup.controllers``, controllers enabled
down the tree in ``cgroup.subtree_control``).  A daemon's tasks live in
``hwf/<daemon>.<pid>/slot-<k>`` under each; the daemon's dir is removed
when it stops, and empty dirs of dead daemons at the next start.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            try:
                return int(parts[1])
            except ValueError:
                return 0
    return 0


def _rmdir_tree(top: Path) -> None:
    """rmdir every (empty) cgroup under and at ``top``, deepest first."""
    if not top.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


class Layout:
    """Where the pids and memory controllers are, and their file names."""

    def __init__(self, version: int, pids: Path, memory: Path) -> None:
        self.version = version
        self.pids = pids  # the hierarchy roots (the same dir on v2)
        self.memory = memory

    @classmethod
    def detect(cls, root: Path = ROOT) -> tuple[Optional["Layout"], str]:
        """The machine's layout, or (None, why not) when the daemon cannot use it."""
        if (root / "cgroup.controllers").is_file():
            have = _read(root / "cgroup.controllers").split()
            missing = [c for c in ("pids", "memory") if c not in have]
            if missing:
                return None, f"cgroup v2 at {root} lacks the {' and '.join(missing)} controller"
            layout = cls(2, root, root)
        elif (root / "pids" / "cgroup.procs").is_file() and (root / "memory" / "cgroup.procs").is_file():
            layout = cls(1, root / "pids", root / "memory")
        else:
            return None, f"no pids and memory cgroup controllers mounted under {root}"
        if not os.access(layout.pids, os.W_OK) or not os.access(layout.memory, os.W_OK):
            return None, f"the cgroups under {root} are not writable by this daemon (uid {os.geteuid()})"
        return layout, ""

    def roots(self) -> list[Path]:
        return [self.pids] if self.version == 2 else [self.pids, self.memory]


class DaemonCgroups:
    """The ``hwf/<daemon>`` dirs of one daemon, and its tasks' cgroups under them."""

    def __init__(self, layout: Layout, daemon: str) -> None:
        self.layout = layout
        self.name = _NAME.sub("_", daemon) or "daemon"
        for root in layout.roots():
            top = root / "hwf"
            if top.is_dir():  # dead daemons' leftovers (named NAME.PID): removed if empty
                for stale in top.iterdir():
                    if stale.is_dir() and stale.name != self.name and not _alive(stale.name):
                        _rmdir_tree(stale)
        self.dirs = []
        for root in layout.roots():
            parent = root
            for part in ("hwf", self.name):
                if layout.version == 2:
                    _enable(parent)
                parent = parent / part
                parent.mkdir(exist_ok=True)
            self.dirs.append(parent)

    def create(self, task: str, max_pids: int, memory: Optional[int]) -> "TaskCgroup":
        """A fresh cgroup (for one slot), its limits set."""
        name = _NAME.sub("_", task)
        made: list[Path] = []
        try:
            for parent in self.dirs:
                if self.layout.version == 2:
                    _enable(parent)
                d = parent / name
                if d.is_dir():
                    _rmdir_tree(d)
                d.mkdir()
                made.append(d)
            return TaskCgroup(self.layout, made, max_pids, memory)
        except BaseException:
            for d in made:
                _rmdir_tree(d)
            raise

    def close(self) -> None:
        for d in self.dirs:
            _rmdir_tree(d)


def _alive(name: str) -> bool:
    """Whether the daemon whose dir is ``name`` (``NAME.PID``) may still run."""
    pid = name.rsplit(".", 1)[-1]
    return not pid.isdigit() or os.path.exists(f"/proc/{pid}")


def own_procs(layout: Layout) -> list[str]:
    """The ``cgroup.procs`` files of this process's own cgroups, in
    ``layout.roots()`` order: where the spawner returns after a fork."""
    found: dict[str, str] = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctrl in parts[1].split(",") or [""]:
                found[ctrl] = parts[2]
    if layout.version == 2:
        names = [""]
    else:
        names = ["pids", "memory"]
    return [str(root / found.get(name, "/").lstrip("/") / "cgroup.procs") for root, name in zip(layout.roots(), names)]


def _enable(parent: Path) -> None:
    """v2: let ``parent``'s children use pids and memory."""
    try:
        (parent / "cgroup.subtree_control").write_text("+pids +memory")
    except OSError as exc:
        log.debug("enabling controllers in %s: %s", parent, exc)


class TaskCgroup:
    """One task's cgroup(s): the limits, what joins, and what was refused."""

    def __init__(self, layout: Layout, dirs: list[Path], max_pids: int, memory: Optional[int]) -> None:
        self.layout = layout
        self.dirs = dirs
        self.max_pids = max_pids
        self.memory = memory
        pids_dir, mem_dir = (dirs[0], dirs[0]) if layout.version == 2 else (dirs[0], dirs[1])
        self._pids_events = pids_dir / "pids.events"
        self._mem_events = mem_dir / ("memory.events" if layout.version == 2 else "memory.oom_control")
        self._mem_dir = mem_dir
        (pids_dir / "pids.max").write_text(str(max_pids))
        self.seen = (self.pids_refused(), 0)  # the counters when last read (isolation.Box.breach)
        self.memory = None
        self.set_memory(memory)
        self.seen = (self.seen[0], self.oom_kills())

    def set_memory(self, memory: Optional[int]) -> None:
        """The memory limit of the next task (written only when it changes)."""
        if memory is None or memory == self.memory:
            return
        mem_dir = self._mem_dir
        if self.layout.version == 2:
            (mem_dir / "memory.max").write_text(str(memory))
            swap = mem_dir / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        else:
            swap = mem_dir / "memory.memsw.limit_in_bytes"
            # memsw may never be below the limit: raise the limit first when growing.
            order = ["memory.limit_in_bytes", swap.name] if self.memory is None or memory < self.memory \
                else [swap.name, "memory.limit_in_bytes"]
            for name in order:
                if (mem_dir / name).exists():
                    try:
                        (mem_dir / name).write_text(str(memory))
                    except OSError:
                        if name == "memory.limit_in_bytes":
                            raise
        self.memory = memory

    @property
    def procs(self) -> list[str]:
        """The ``cgroup.procs`` files a command's process writes itself into."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids_refused(self) -> int:
        """Forks refused so far for the process limit."""
        return _counter(_read(self._pids_events), "max")

    def oom_kills(self) -> int:
        """Processes the kernel killed so far for the memory limit."""
        return _counter(_read(self._mem_events), "oom_kill")

    def stalled(self) -> bool:
        """v1: the group is at its limit with nothing the OOM killer may kill
        (a process that kept the spawner's oom_score_adj, spawnerd.py)."""
        return self.layout.version == 1 and _counter(_read(self._mem_events), "under_oom") > 0

    def remove(self) -> bool:
        """rmdir the task's cgroups (they must be empty); True if all are gone."""
        for d in self.dirs:
            _rmdir_tree(d)
        return not any(d.exists() for d in self.dirs)

"""Task working directories: private to their task, reachable by it.

When tasks run as other users, each task dir is 0700 and owned by the
task's uid, so tasks of other slots cannot look in.  The daemon's own
workdir and ``tasks/`` are 0711: tasks may pass through to their dir but
not list who else runs, and the blob cache beside them stays 0700.

A task reaches its dir by absolute path too (``$PWD``, ``cd "$HOME"``),
which needs every ancestor to be traversable by the task's uid.  A workdir
under a private directory (``/root``, a 0700 test tmp dir) fails that, so
task dirs then live in a fresh ``hwf-tasks-*`` dir in the system temp dir,
removed when the daemon stops.  A daemon killed outright cannot remove
it, so each such dir holds a lock file its daemon keeps locked, and a
daemon starting up removes the ones nobody holds any more.
"""

from __future__ import annotations

import fcntl
import logging
import itertools
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Optional

from .accounts import TaskUser

log = logging.getLogger(__name__)

TMP_NAME = ".hwf-tmp"  # a task's private TMPDIR, inside its dir
SLOT_TMP_PREFIX = ".hwf-slot-tmp-"  # in the root: a slot's private /tmp (isolation.py), emptied after each task
TRASH_NAME = ".hwf-trash"  # in the root: dirs of ended tasks, removed in the background
_ROOT_PREFIX = "hwf-tasks-"
_LOCK_NAME = ".hwf-daemon.lock"  # in a temp root; task dir names never start with "."
_UNLOCKED_GRACE = 60.0  # s: a root this young may be a daemon's that has not locked it yet


class TaskDirError(ValueError):
    """The workdir cannot host isolated tasks; the message says why."""


def traversable_by_others(path: Path) -> bool:
    """True if a user with no special rights can reach ``path`` (every ancestor o+x)."""
    path = path.resolve()
    for p in (path, *path.parents):
        try:
            if not os.stat(p).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _set_mode(path: Path, mode: int) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise TaskDirError(f"{path} is not a directory")
    if st.st_mode & stat.S_IWOTH:
        raise TaskDirError(
            f"{path} is writable by every user: give the daemon a --workdir of its own"
        )
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def _lock_root(root: Path) -> int:
    fd = os.open(root / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_stale_roots(tmp: Path) -> list[Path]:
    """Remove the temp task roots of daemons that died; returns what was removed."""
    removed = []
    for d in tmp.glob(_ROOT_PREFIX + "*"):
        try:
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue  # not ours (and never followed through a link)
            try:
                fd = os.open(d / _LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                if time.time() - st.st_mtime < _UNLOCKED_GRACE:
                    continue
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its daemon is alive
                finally:
                    os.close(fd)
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class TaskDirs:
    """Creates and removes task dirs under one root."""

    def __init__(self, workdir: Path, isolated: bool) -> None:
        self.isolated = isolated
        self._own_root: Optional[Path] = None
        self._lock: Optional[int] = None
        workdir.mkdir(parents=True, exist_ok=True, mode=0o711 if isolated else 0o777)
        root = workdir / "tasks"
        root.mkdir(exist_ok=True, mode=0o711 if isolated else 0o777)
        if isolated:
            _set_mode(workdir, 0o711)
            _set_mode(root, 0o711)
            if not traversable_by_others(root):
                tmp = Path(tempfile.gettempdir())
                for stale in remove_stale_roots(tmp):
                    log.info("removed %s, left by a daemon that is gone", stale)
                self._own_root = Path(tempfile.mkdtemp(prefix=_ROOT_PREFIX, dir=tmp))
                self._lock = _lock_root(self._own_root)
                os.chmod(self._own_root, 0o711)
                log.info("%s is not reachable by other users; task dirs go in %s", root, self._own_root)
                root = self._own_root
                if not traversable_by_others(root):
                    log.warning("%s is not reachable by other users either: tasks using absolute "
                                "paths of their dir will fail", root)
        self.root = root
        self._slot_tmps: set[Path] = set()
        self.trash = root / TRASH_NAME
        self._trashed = 0
        shutil.rmtree(self.trash, ignore_errors=True)  # a dead daemon's

    def _path(self, name: str) -> Path:
        if not name or name.startswith(".") or "/" in name or os.sep in name:
            raise TaskDirError(f"{name!r} cannot name a task dir")
        return self.root / name

    def create(self, name: str, user: Optional[TaskUser]) -> Path:
        """A fresh, empty dir for one attempt, owned by ``user`` (0700)."""
        path = self._path(name)
        if os.path.lexists(path):
            shutil.rmtree(path)
        return self._make(path, user)

    def try_create(self, name: str, user: Optional[TaskUser]) -> Optional[Path]:
        """``create`` in a few syscalls, or None if something already has the
        name (then ``create``, in a thread: it may have a tree to remove)."""
        path = self._path(name)
        try:
            return self._make(path, user)
        except FileExistsError:
            return None

    def _make(self, path: Path, user: Optional[TaskUser]) -> Path:
        os.mkdir(path, 0o700)
        tmp = path / TMP_NAME
        os.mkdir(tmp, 0o700)
        if user is not None:
            os.chown(path, user.uid, user.gid)
            os.chown(tmp, user.uid, user.gid)
        return path

    def slot_tmp(self, slot: int, user: TaskUser) -> Path:
        """The slot's private /tmp (bound over the shared dirs in its mount
        namespace): made once, the slot user's, 0700."""
        path = self.root / f"{SLOT_TMP_PREFIX}{slot}"
        if path in self._slot_tmps:  # a mkdir costs ~60 us: once per slot
            return path
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # an earlier daemon's (it may have died mid-task): emptied first
            self.empty(path, user)
        os.chown(path, user.uid, user.gid)
        os.chmod(path, 0o700)
        self._slot_tmps.add(path)
        return path

    def mountpoint_in_slot_tmp(self, shared: tuple[str, ...]) -> Optional[str]:
        """When the root lies under a shared dir (``/tmp/hwf-tasks-*``), a slot's
        namespace binds it back at its own path, on a dir made (as root) inside
        the slot's private /tmp: the name of that dir, which ``empty`` keeps."""
        for d in shared:
            try:
                return self.root.relative_to(d).parts[0]
            except (ValueError, IndexError):
                continue
        return None

    def empty(self, path: Path, user: TaskUser, keep: Optional[str] = None, at_most: Optional[int] = None) -> bool:
        """Remove everything in ``path`` (links not followed) and give it back
        its mode and owner: the next task of the slot finds it as new.  ``keep``:
        a root-owned dir that is a mountpoint in the slot's namespace (removing
        it would detach the task dirs there).  With ``at_most``: only if it holds
        no more entries than that, else False and nothing removed (the caller
        then empties it in a thread)."""
        with os.scandir(path) as it:
            entries = list(it) if at_most is None else list(itertools.islice(it, at_most + 1))
        if at_most is not None and (len(entries) > at_most
                                    or any(e.is_dir(follow_symlinks=False) and e.name != keep for e in entries)):
            return False
        for entry in entries:
            if (entry.name == keep and entry.is_dir(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_uid == 0):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
        os.chmod(path, 0o700, follow_symlinks=False)
        return True

    def remove(self, path: Path) -> None:
        # rmtree works on fds (no symlink following), so a task's links cannot
        # send the daemon deleting outside its dir.
        shutil.rmtree(path, ignore_errors=True)

    def discard(self, path: Path) -> bool:
        """Move an ended task's dir into the trash (root's alone, 0700), out
        of every task's reach, for ``empty_trash`` to remove later: one rename
        instead of the unlinks and rmdirs, which can wait on the disk
        (ext4 with ``discard`` here: 0.2 ms for an empty dir).  False if it
        cannot be moved (then remove it)."""
        self._trashed += 1
        target = self.trash / f"{path.name}.{self._trashed}"
        try:
            os.rename(path, target)
            return True
        except FileNotFoundError:
            pass  # no trash yet (or no such task dir)
        except OSError:
            return False
        try:
            os.mkdir(self.trash, 0o700)
            os.rename(path, target)
        except OSError:
            return False
        return True

    def empty_trash(self) -> None:
        """Remove what is in the trash (blocking: run it in a thread)."""
        while True:
            try:
                names = os.listdir(self.trash)
            except OSError:
                return
            if not names:
                return
            for name in names:
                shutil.rmtree(self.trash / name, ignore_errors=True)

    def try_remove(self, path: Path) -> bool:
        """Remove a dir its task left as it was made (the common case) in two
        rmdir calls, which follow no links; False if it holds anything more
        (then ``remove``, in a thread)."""
        try:
            try:
                os.rmdir(path / TMP_NAME)
            except FileNotFoundError:
                pass
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError:  # not empty, not a dir (a task's link): the long way
            return False
        return True

    def close(self) -> None:
        """Empty the trash; remove the temp root this daemon made, if any."""
        shutil.rmtree(self.trash, ignore_errors=True)
        if self._own_root is not None:
            shutil.rmtree(self._own_root, ignore_errors=True)
            self._own_root = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

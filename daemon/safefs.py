"""Open files inside a task dir without following the task's symlinks.

The daemon (often root) reads artifacts from and writes Data files into a
directory its task controls.  Checking a path and then opening it by name
leaves a gap in which the task can swap a component for a symlink to
``/etc``.  So paths are walked one component at a time from an fd of the
task dir, every step opened with ``O_NOFOLLOW``: a symlink anywhere makes
the open fail instead of leading out.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Optional

from .accounts import TaskUser

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(OSError):
    """The path is not a plain file reached through plain directories."""


def _parts(rel: str) -> list[str]:
    parts = [p for p in PurePosixPath(rel).parts if p not in ("", ".")]
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise UnsafePath(f"{rel!r} is not a relative path inside the task directory")
    return parts


@contextmanager
def _walk(root: Path, dirs: list[str], create_as: Optional[TaskUser] = None,
          create: bool = False) -> Iterator[int]:
    """An fd of ``root/dirs...``, each step refusing symlinks (creating dirs if asked)."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in dirs:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if create_as is not None:
                    os.fchown(nxt, create_as.uid, create_as.gid)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def open_for_reading(root: Path, rel: str, owner: Optional[int] = None,
                     label: Optional[str] = None) -> BinaryIO:
    """Open ``root/rel`` for reading; it must be a regular file (owned by ``owner``).

    ``O_NONBLOCK`` keeps a FIFO planted by the task from hanging the daemon.
    ``label`` names the file in errors (default: ``rel``).
    """
    label = label or rel
    parts = _parts(rel)
    with _walk(root, parts[:-1]) as dfd:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{label!r} is not a regular file")
        if owner is not None and st.st_uid != owner:
            raise UnsafePath(f"{label!r} is not owned by the task's user")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def create_for_writing(root: Path, rel: str, user: Optional[TaskUser] = None) -> BinaryIO:
    """A new, empty ``root/rel`` (replacing what was there), owned by ``user``.

    Missing directories are created (and given to ``user``); an existing
    name is unlinked first and the file made with ``O_EXCL``, so a link the
    task placed there is replaced, never written through.
    """
    parts = _parts(rel)
    with _walk(root, parts[:-1], create_as=user, create=True) as dfd:
        try:
            os.unlink(parts[-1], dir_fd=dfd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise UnsafePath(f"{rel!r} is a directory") from None
        fd = os.open(parts[-1], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=dfd)
    try:
        if user is not None:
            os.fchown(fd, user.uid, user.gid)
        return os.fdopen(fd, "r+b")
    except BaseException:
        os.close(fd)
        raise

"""Unix socket files the hub listens on: made private before anyone can connect.

A unix socket's file mode decides who may connect, and for CreditPiggy's
line protocol it is the only trust there is; so the socket is bound with a
umask that leaves it 0600 and only then widened to the mode asked for (never
open for an instant in between).  A stale socket file (its process died) is
replaced; a live one (another hub or daemon answers there) or anything that
is not a socket is refused, never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass


class ListenError(OSError):
    """A socket the hub was asked to listen on cannot be used; the text says why."""


# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_PATH_BYTES = 107


@dataclass
class UnixSocketFile:
    """A bound (not yet listening) AF_UNIX stream socket and the file it made."""

    path: str
    sock: socket.socket
    ident: tuple[int, int]  # (st_dev, st_ino) of the file, to remove only our own

    def remove(self) -> None:
        """Close the socket and remove its file if it is still ours: not
        replaced by a newer process (inode numbers are reused, so a file
        someone listens on is never removed either)."""
        self.sock.close()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.ident and not _listening(self.path):
                os.unlink(self.path)


def bind_unix(path: str | os.PathLike, mode: int, what: str = "unix socket") -> UnixSocketFile:
    """Bind an AF_UNIX stream socket at ``path`` with file mode ``mode``."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        raise ListenError(f"{what} path {path!r} must be absolute")
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise ListenError(f"{what} path {path!r} is longer than {MAX_PATH_BYTES} bytes (the kernel's limit)")
    _clear_stale(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)  # the file is born 0600: nobody else connects before chmod
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        st = os.lstat(path)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {what} {path}: {exc.strerror or exc}") from None
    return UnixSocketFile(path, sock, (st.st_dev, st.st_ino))


def _clear_stale(path: str, what: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{what} path {path} exists and is not a socket: not replacing it")
    try:
        live = _listening(path)
    except OSError as exc:
        raise ListenError(f"{what} {path} exists and cannot be probed ({exc}): not replacing it") from None
    if live:
        raise ListenError(f"another process is listening on {what} {path}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale: nobody listens there any more


def _listening(path: str) -> bool:
    """Does a process accept connections on this socket file?"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
        return True
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()

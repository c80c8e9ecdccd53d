"""A secret's first line from a file only its owner can read.

Shared by the daemon's ``--token-file`` and the hub's
``--creditpiggy-secret-file``: as ssh does with a private key, a file that
other users can read is refused rather than used, so the mistake is fixed
instead of silently shipped.
"""

from __future__ import annotations

import os
import stat


class PrivateFileError(ValueError):
    """The secret could not be read safely; the message says what to fix."""


def read_private_line(path: str, label: str, exposes: str) -> str:
    """The first line of ``path``, stripped.  ``label`` names the file in
    errors ("token file"); ``exposes`` says what others could read ("the
    daemon's token")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except OSError as exc:
        raise PrivateFileError(f"cannot read {label} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        st = os.fstat(fd)  # the file we read, not whatever the path names later
        if not stat.S_ISREG(st.st_mode):
            raise PrivateFileError(f"{label} {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise PrivateFileError(
                f"permissions {mode:04o} for {label} {path} are too open: other users "
                f"could read {exposes}. Run: chmod 600 {path}"
            )
        line = f.readline().strip()
    if not line:
        raise PrivateFileError(f"{label} {path} is empty")
    return line

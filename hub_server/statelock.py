"""Who is using a hub's state dir: ``<state_dir>/hub.lock``.

A running hub holds a shared ``flock`` on it for its whole life and writes
its websocket address into it.  ``hwf blobs gc`` tries for the exclusive lock:
if it gets it, no hub runs on that state dir and it may collect on its own
(a hub starting meanwhile waits for it); if not, it asks the hub at the
address in the file.  The kernel drops the lock when a process dies, even
by SIGKILL, so a crashed hub never leaves the dir locked.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Optional

LOCK_FILE = "hub.lock"
log = logging.getLogger("hwf.hub")


class StateLock:
    def __init__(self, state_dir: Path | str) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def hold_shared(self) -> None:
        """For a hub: waits while ``hwf blobs gc`` collects without a hub."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for 'hwf blobs gc' to finish with %s", self.path.parent)
            fcntl.flock(self.fd, fcntl.LOCK_SH)

    def try_exclusive(self) -> bool:
        """True when no hub holds the state dir (and now nobody else can)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def write_address(self, url: str) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (url + "\n").encode(), 0)

    def address(self) -> Optional[str]:
        text = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
        return text or None

    def close(self) -> None:
        os.close(self.fd)  # releases the lock

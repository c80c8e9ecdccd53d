"""Kills a daemon's running commands if the daemon itself dies (even kill -9).

A small process started once per daemon.  The daemon keeps the write end of
a pipe to it and writes ``+PGID`` when a command starts and ``-PGID`` when
it ends.  The pipe reaches EOF only when the daemon is gone (the write end
is not inherited by commands), and the guardian then SIGKILLs every process
group still listed.  One pipe write per command replaces a ``preexec_fn``
with ``PR_SET_PDEATHSIG``, which forces a full ``fork()`` of the daemon for
every command (2 ms each here) and reaches only bash, not its children.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Optional


class Guardian:
    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None

    def start(self) -> "Guardian":
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hwf_daemon.guardian"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # not in the daemon's group: survives killpg and Ctrl-C
        )
        return self

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    def _write(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            os.write(self._proc.stdin.fileno(), line.encode())
        except (BrokenPipeError, OSError):
            pass

    def watch(self, pgid: int) -> None:
        self._write(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._write(f"-{pgid}\n")

    def stop(self) -> None:
        """Close the pipe: the guardian kills what is left and exits."""
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        try:
            sign, pgid = line[:1], int(line[1:])
        except ValueError:
            continue
        if sign == b"+":
            groups.add(pgid)
        elif sign == b"-":
            groups.discard(pgid)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


if __name__ == "__main__":
    main()

"""A python3 that tasks on the test daemons can run.

As root, daemons run tasks as unprivileged per-slot uids, which cannot
reach an interpreter under a private dir (a venv whose python links into
``/root/.pyenv``).  Tests whose commands run Python use the first python3
every user can execute; this one when the daemon runs tasks as ourselves.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Optional

import pytest


def _everyone_can_run(path: Path) -> bool:
    try:
        real = path.resolve(strict=True)
        if not os.stat(real).st_mode & stat.S_IXOTH:
            return False
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def task_python() -> Optional[str]:
    if os.geteuid() != 0:
        return sys.executable
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        candidate = Path(d or ".") / "python3"
        if _everyone_can_run(candidate):
            return str(candidate.resolve())
    return None


TASK_PY: Optional[str] = task_python()

needs_task_python = pytest.mark.skipif(
    TASK_PY is None,
    reason="no python3 that unprivileged users can run: the daemon runs as root, so tasks run "
    "as per-slot uids, and this machine's Python lives under a private directory",
)

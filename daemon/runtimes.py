"""What this daemon can run, and which Python its warm workers use.

A daemon advertises ``runtimes`` with its hardware: ``shell`` always,
``pythonX.Y`` when it found a Python its task users can run (the workers'
major.minor: a pickled function only travels between equal versions),
``grid`` when it has an HTC-Grid handler, and ``docker`` / ``podman`` when
that engine answers ``version`` at start-up (a cheap check, once).

The workers' Python must be executable by the slots' users.  As root,
tasks run as unprivileged per-slot uids, which cannot reach an interpreter
under a private directory (a venv whose python links into ``/root/.pyenv``,
as on this project's machines).  So, unless ``--python PATH`` names one:
the daemon's own interpreter when every user can run it (and always with
``--run-as self``), else a ``python3.X`` of the same version that every
user can run (the daemon's site dirs are then added to its path, so
cloudpickle and the daemon's packages are importable), else any ``python3``
every user can run (which must have cloudpickle itself).
"""

from __future__ import annotations

import logging
import os
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Optional

from .pyworkers import PythonRuntime
from .taskdirs import traversable_by_others

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("pyworker.py")
OWN_VERSION = "%d.%d" % sys.version_info[:2]
_SEARCH_DIRS = ("/usr/local/bin", "/usr/bin", "/bin")


class RuntimeConfigError(ValueError):
    """A runtime option (``--python``, ``--grid-handler``) that cannot work; the text says why."""


def everyone_can_run(path: str) -> bool:
    """True if a user with no special rights can execute ``path`` (after symlinks)."""
    try:
        real = Path(path).resolve(strict=True)
        return bool(os.stat(real).st_mode & stat.S_IXOTH) and traversable_by_others(real.parent)
    except OSError:
        return False


def everyone_can_read(path: Path) -> bool:
    try:
        real = path.resolve(strict=True)
        return bool(os.stat(real).st_mode & stat.S_IROTH) and traversable_by_others(real.parent)
    except OSError:
        return False


def python_version(python: str, timeout: float = 20.0) -> Optional[str]:
    """``"3.11"`` for an interpreter, or None if it does not run."""
    try:
        out = subprocess.run([python, "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text if out.returncode == 0 and text.count(".") == 1 else None


def _candidates(isolated: bool) -> list[str]:
    if not isolated:
        return [sys.executable]
    found = [sys.executable]
    dirs = os.environ.get("PATH", "").split(os.pathsep) + list(_SEARCH_DIRS)
    for name in (f"python{OWN_VERSION}", "python3"):
        for d in dirs:
            if d:
                found.append(os.path.join(d, name))
    return list(dict.fromkeys(found))


def site_dirs() -> list[str]:
    """The daemon's own package dirs (venv or system site-packages), and the
    dirs of its ``PYTHONPATH`` (where an operator puts a grid handler's module;
    workers run ``python -I``, which reads no environment)."""
    extra = [d for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d]
    dirs = extra + [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    with_site = getattr(site, "getsitepackages", lambda: [])()
    paths = sysconfig.get_paths()
    dirs += list(with_site) + [paths.get("purelib", ""), paths.get("platlib", "")]
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def worker_argv(python: str, isolated: bool) -> list[str]:
    """How a worker starts: by the script's path when the task users can read it,
    else with its source on the command line."""
    if not isolated or everyone_can_read(WORKER_SCRIPT):
        return [python, "-I", str(WORKER_SCRIPT)]
    return [python, "-I", "-c", WORKER_SCRIPT.read_text()]


def python_runtime(explicit: Optional[str] = None, *, isolated: bool) -> Optional[PythonRuntime]:
    """The workers' interpreter, or None (with a warning) if no usable one exists.

    ``isolated``: tasks run as other users than the daemon's."""
    if explicit:
        version = python_version(explicit)
        if version is None:
            raise RuntimeConfigError(f"--python {explicit}: not a Python interpreter that runs")
        if isolated and not everyone_can_run(explicit):
            raise RuntimeConfigError(f"--python {explicit}: the task users cannot execute it (a private directory on its path?)")
        chosen = [(explicit, version)]
    else:
        chosen = []
        for cand in _candidates(isolated):
            if not os.path.exists(cand) or (isolated and not everyone_can_run(cand)):
                continue
            version = OWN_VERSION if cand == sys.executable else python_version(cand)
            if version is not None:
                chosen.append((cand, version))
                if version == OWN_VERSION:
                    break
        # Prefer the daemon's own version: its packages (cloudpickle...) then work there too.
        chosen.sort(key=lambda cv: cv[1] != OWN_VERSION)
    if not chosen:
        log.warning("no Python that the task users can run was found: this daemon runs no Python "
                    "function tasks (give one with --python PATH)")
        return None
    python, version = chosen[0]
    paths = site_dirs() if version == OWN_VERSION else [d for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d]
    return PythonRuntime(python=python, version=version, argv=worker_argv(python, isolated), paths=paths)


def engine_answers(engine: str, timeout: float = 5.0) -> bool:
    """True if ``docker version`` (or podman's) answers: a client AND a running engine."""
    exe = shutil.which(engine)
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "version"], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


# Container engines the daemon runs MECA container tasks with (containers.py),
# offered only where ``<engine> version`` answers.
CONTAINER_ENGINES: tuple[str, ...] = ("docker", "podman")


def detect_runtimes(python: Optional[PythonRuntime], *, grid_handler: Optional[str] = None,
                    engines: tuple[str, ...] = CONTAINER_ENGINES) -> list[str]:
    runtimes = ["shell"]
    if python is not None:
        runtimes.append(python.name)
    if grid_handler:
        runtimes.append("grid")
    runtimes += [e for e in engines if engine_answers(e)]
    return runtimes

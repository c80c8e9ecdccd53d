"""Smoke-test HWF as users install it: from its wheel, in a fresh venv, away from the checkout.

    python tests/installed/smoke.py                 # this interpreter's Python
    python tests/installed/smoke.py --pythons all   # every CPython 3.10-3.13 found here

The editable test suite cannot see a wheel that forgot a module, a data file
or an entry point.  This builds the wheel once, then for each Python makes a
new virtual environment outside the checkout, installs the wheel (its
dependencies from the package index) and, from an empty directory with no
PYTHONPATH:

* ``hwf --version``, ``hwf-hub --version``, ``hwf-daemon --version``;
* ``examples/quickstart.py`` (the seed example on a LocalCluster);
* ``hwf local`` for a few seconds, with a client dispatching to it;
* ``notebooks/quickstart.ipynb`` through ``hwf run-notebook`` (loads the extension);
* python-daemon installed beside HWF (its ``daemon`` import name is its own:
  HWF's daemon installs as ``hwf_daemon``), then uninstalled, HWF running a
  task each time.

Prints one line per check and exits non-zero if any failed; a Python that
is not on this machine is reported as skipped, by name.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MINORS = ("3.10", "3.11", "3.12", "3.13")

ONE_TASK = """
import sys
from hwf_jupyter import Hub, LocalCluster, Stage, Task, dispatch_sync
import hwf_daemon
assert "site-packages" in hwf_daemon.__file__, hwf_daemon.__file__
with LocalCluster(daemons=1) as c:
    hub = c.hub()
    r = hub.get_result_sync(dispatch_sync(Task(Stage("s", cmd="echo ok")), hub), wait=True, timeout=120)[0]
    assert r.output == "ok\\n", (r.status, r.error)
    hub.close_sync()
# Python functions: cloudpickle on both sides, a warm worker on the daemon.  As the
# daemon's own user: this venv lives in a private temp dir the per-slot users cannot read.
with LocalCluster(daemons=1, daemon_args=["--run-as", "self"]) as c:
    hub = c.hub()
    assert hub.submit(pow, 2, 10).result(timeout=120) == 1024
    assert hub.gather(hub.map(lambda x: x * 3, range(4)), timeout=120) == [0, 3, 6, 9]
    hub.close_sync()
print("task ok")
"""

CONNECT_TO_LOCAL = """
import sys
from hwf_jupyter import Hub, Stage, Task, dispatch_sync
hub = Hub(sys.argv[1], token=sys.argv[2])
r = hub.get_result_sync(dispatch_sync(Task(Stage("s", cmd="echo via-hwf-local")), hub), wait=True, timeout=120)[0]
assert r.output == "via-hwf-local\\n", (r.status, r.error)
hub.close_sync()
print("hwf local ok")
"""


class Smoke:
    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.failed: list[str] = []

    def check(self, label: str, argv: list[str], cwd: Path, env: dict, timeout: float = 600,
              expect: str = "") -> str:
        t0 = time.monotonic()
        try:
            r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
            out = r.stdout + r.stderr
            ok = r.returncode == 0 and expect in out
        except subprocess.TimeoutExpired as exc:
            out, ok = f"timed out after {timeout}s: {exc}", False
        print(f"  {'ok  ' if ok else 'FAIL'} {label} ({time.monotonic() - t0:.1f}s)", flush=True)
        if not ok:
            self.failed.append(label)
            print("    " + "\n    ".join(out.strip().splitlines()[-25:]), flush=True)
        return out


def find_python(minor: str) -> str | None:
    """A working interpreter of this CPython version: on PATH, in /usr/bin, or under pyenv."""
    candidates = [shutil.which(f"python{minor}"), f"/usr/bin/python{minor}", f"/usr/local/bin/python{minor}"]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/{minor}.*/bin/python{minor}"), reverse=True)
    for c in candidates:
        if not c or not os.path.exists(c):
            continue
        try:
            v = subprocess.run([c, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if v.returncode == 0 and v.stdout.strip() == minor:
            return c
    return None


def source_tree(dest: Path) -> Path:
    """The project's files (tracked, and new ones git does not ignore) copied to ``dest``.

    Building in the checkout itself would reuse setuptools' leftover
    ``build/lib``, so a wheel could still contain a module the project no
    longer packages: exactly what this test is for."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def build_wheel(dest: Path) -> Path:
    src = source_tree(dest.parent / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), str(src)],
                   check=True)
    (wheel,) = dest.glob("hwf-*.whl")
    return wheel


def clean_env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("HWF_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["HWF_NONINTERACTIVE"] = "1"
    return env


def run_hwf_local(smoke: Smoke, bin_: Path, work: Path, env: dict) -> None:
    """``hwf local`` for a few seconds, a client using it, then Ctrl-C."""
    proc = subprocess.Popen([str(bin_ / "hwf"), "local", "--daemons", "1"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = token = None
    deadline = time.monotonic() + 120
    lines = []
    try:
        assert proc.stdout is not None
        while time.monotonic() < deadline and (address is None or token is None):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("hub:"):
                address = line.split()[1]
            elif line.startswith("token:"):
                token = line.split()[1]
        if address and token:
            (work / "connect.py").write_text(CONNECT_TO_LOCAL)
            smoke.check("hwf local serves a client", [str(bin_ / "python"), "connect.py", address, token],
                        work, env, expect="hwf local ok")
        else:
            smoke.failed.append("hwf local printed its address and token")
            print("  FAIL hwf local printed its address and token\n    " + "    ".join(lines))
        time.sleep(2)  # "for a few seconds"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
    label = "hwf local stops on Ctrl-C"
    print(f"  {'ok  ' if code == 0 else 'FAIL'} {label} (exit {code})")
    if code != 0:
        smoke.failed.append(label)


def smoke_one(smoke: Smoke, python: str, wheel: Path, root: Path) -> None:
    minor = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    venv, work = root / f"venv-{minor}", root / f"work-{minor}"
    work.mkdir()
    print(f"Python {minor} ({python}): fresh venv {venv}", flush=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    bin_ = venv / "bin"
    env = clean_env(venv)
    pip = [str(bin_ / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    smoke.check(f"{minor}: pip install the wheel", [*pip, "install", str(wheel)], work, env)
    version = subprocess.run([str(bin_ / "python"), "-c", "import importlib.metadata as m; print(m.version('hwf'))"],
                             capture_output=True, text=True, env=env, cwd=work).stdout.strip()
    for prog in ("hwf", "hwf-hub", "hwf-daemon"):
        smoke.check(f"{minor}: {prog} --version", [str(bin_ / prog), "--version"], work, env,
                    expect=f"{prog} {version} (Python {minor}")
    shutil.copy(REPO / "examples" / "quickstart.py", work / "quickstart.py")
    smoke.check(f"{minor}: the seed example (examples/quickstart.py)", [str(bin_ / "python"), "quickstart.py"],
                work, env, expect="== artifacts ==")
    run_hwf_local(smoke, bin_, work, env)
    shutil.copy(REPO / "notebooks" / "quickstart.ipynb", work / "quickstart.ipynb")
    smoke.check(f"{minor}: a notebook loading the extension (hwf run-notebook)",
                [str(bin_ / "hwf"), "run-notebook", "quickstart.ipynb"], work, env, expect="executed notebook")
    (work / "one_task.py").write_text(ONE_TASK)
    smoke.check(f"{minor}: pip install python-daemon beside HWF", [*pip, "install", "python-daemon"], work, env)
    smoke.check(f"{minor}: python-daemon's 'daemon' is its own",
                [str(bin_ / "python"), "-c", "import daemon, daemon.daemon; print(daemon.DaemonContext.__module__)"],
                work, env, expect="daemon.daemon")
    smoke.check(f"{minor}: HWF runs a task beside python-daemon", [str(bin_ / "python"), "one_task.py"], work, env,
                expect="task ok")
    smoke.check(f"{minor}: pip uninstall python-daemon", [*pip, "uninstall", "-y", "python-daemon"], work, env)
    smoke.check(f"{minor}: HWF still runs a task after it is gone", [str(bin_ / "python"), "one_task.py"],
                work, env, expect="task ok")
    smoke.check(f"{minor}: pip check", [*pip, "check"], work, env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pythons", default="current",
                    help="'current' (the Python running this), 'all' (3.10-3.13 as found), or e.g. 3.12,3.13")
    ap.add_argument("--keep", action="store_true", help="keep the temporary venvs and work dirs")
    args = ap.parse_args()
    if args.pythons == "current":
        wanted = [(f"{sys.version_info[0]}.{sys.version_info[1]}", getattr(sys, "_base_executable", sys.executable))]
    else:
        minors = MINORS if args.pythons == "all" else tuple(args.pythons.split(","))
        wanted = [(m, find_python(m)) for m in minors]
    root = Path(tempfile.mkdtemp(prefix="hwf-installed-"))
    smoke = Smoke(args.keep)
    try:
        wheel = build_wheel(root / "dist")
        print(f"built {wheel.name}", flush=True)
        tested = []
        for minor, python in wanted:
            if python is None:
                print(f"Python {minor}: skipped (no python{minor} on this machine)", flush=True)
                continue
            smoke_one(smoke, python, wheel, root)
            tested.append(minor)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if smoke.failed:
        print(f"FAILED ({len(smoke.failed)}): " + "; ".join(smoke.failed))
        return 1
    if not tested:
        print("FAILED: no Python to test")
        return 1
    print(f"installed wheel OK on Python {', '.join(tested)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

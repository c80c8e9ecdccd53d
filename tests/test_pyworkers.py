"""The daemon's worker pool (daemon/pyworkers.py) with real worker processes,
as the daemon's own user: reuse, replacement, and what a broken worker gives."""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import sys

import cloudpickle
import pytest

from hwf_daemon.pyworkers import PythonRuntime, PyWorkers, WorkerError
from hwf_daemon.runtimes import WORKER_SCRIPT, python_runtime

PY = "%d.%d" % sys.version_info[:2]
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _pid():
    return os.getpid()


def req(folder, fn=_pid):
    return {"cwd": str(folder), "env": None, "python": PY,
            "pickled": base64.b64encode(cloudpickle.dumps((fn, (), {}))).decode()}


def run(coro):
    return asyncio.run(coro)


async def _pids(pool, folder, keys):
    out = []
    for key in keys:
        reply = await pool.call(0, None, key, req(folder))
        out.append(pickle.loads(base64.b64decode(reply.value.pickled)))
    await pool.close()
    return out


def test_a_worker_serves_one_user_key(tmp_path):
    pool = PyWorkers(python_runtime(None, isolated=False))
    a1, a2, b, a3 = run(_pids(pool, tmp_path, ["alice", "alice", "bob", "alice"]))
    assert a1 == a2 and b != a1 and a3 not in (a1, b)  # another user's task never gets a used interpreter
    assert pool.started == 3


def test_a_worker_is_replaced_after_max_tasks(tmp_path):
    pool = PyWorkers(python_runtime(None, isolated=False), max_tasks=2)
    pids = run(_pids(pool, tmp_path, ["k"] * 5))
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


def test_a_python_without_cloudpickle_is_a_clear_start_error(tmp_path):
    # The worker's interpreter without the daemon's site dirs: no cloudpickle there.
    bare = PythonRuntime(python=sys.executable, version=PY, argv=[sys.executable, "-I", "-S", str(WORKER_SCRIPT)])
    pool = PyWorkers(bare)
    with pytest.raises(WorkerError, match="cloudpickle cannot be imported .* --python"):
        run(pool.call(0, None, "k", req(tmp_path)))


def test_a_python_that_does_not_run_is_a_clear_start_error(tmp_path):
    pool = PyWorkers(PythonRuntime(python="/nonexistent/python", version=PY, argv=["/nonexistent/python", "-I"]))
    with pytest.raises(WorkerError, match="could not start the Python worker /nonexistent/python"):
        run(pool.call(0, None, "k", req(tmp_path)))


def test_the_workers_python_is_checked_at_start(tmp_path):
    from hwf_daemon.runtimes import RuntimeConfigError

    with pytest.raises(RuntimeConfigError, match="--python /nonexistent: not a Python interpreter"):
        python_runtime("/nonexistent", isolated=False)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.symlink(sys.executable, private / "python")
    with pytest.raises(RuntimeConfigError, match="the task users cannot execute it"):
        python_runtime(str(private / "python"), isolated=True)
    rt = python_runtime(None, isolated=True)  # found: one every user can run
    from hwf_daemon.runtimes import everyone_can_run
    assert rt is None or everyone_can_run(rt.python)


@pytest.mark.parametrize("argv,message", [
    (["--python", "/nonexistent/python3"], "--python /nonexistent/python3: not a Python interpreter"),
    (["--python-max-tasks", "0"], "--python-max-tasks must be at least 1"),
    (["--grid-handler", " "], "--grid-handler: a grid handler is 'module:function' or a shell command"),
])
def test_bad_runtime_options_stop_the_daemon_with_a_clear_error(tmp_path, argv, message):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "hwf_daemon", "--hub", "ws://127.0.0.1:9", "--token-file", "-",
                           "--workdir", str(tmp_path / "w"), *argv], input="tok\n", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_bad_hub_grid_handler_stops_the_hub_with_a_clear_error(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "hub_server", "--port", "0", "--http-port", "0", "--state-dir", str(tmp_path / "s"),
                           "--grid-handler", "a\nb"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--grid-handler: a grid handler must be one line" in proc.stderr

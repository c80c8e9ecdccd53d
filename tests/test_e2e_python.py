"""Python calls on real daemons: warm workers, their faults, runtimes, HTC-Grid handlers.

Calls are built by hand here (cloudpickle + base64 into ``PyCall``), as a
client would, and submitted over a real websocket; the daemons run them on
their warm workers, as per-slot users when the tests run as root.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import cloudpickle
from hwf_jupyter.pycall import dumps as pycall_dumps
import psutil
import pytest
from task_python import TASK_PY, needs_task_python
from waiting import wait_until

from hub_server import protocol as p
from hwf_jupyter import LocalCluster
from hwf_jupyter._ioloop import io_loop
from hwf_jupyter.grid import GridConnector

PY = "%d.%d" % sys.version_info[:2]
# The daemons cannot import this module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
AS_ROOT = os.geteuid() == 0


def call(fn, *args, python: str = PY, hardware=None, **kw) -> p.TaskSpec:
    # HWF's pickler: cloudpickle >= 3.1.3 alone writes "<dynamic-code>" for the file names.
    pickled = base64.b64encode(pycall_dumps((fn, args, {}))).decode()
    stage = p.StageSpec(name="call", cmds=[], call=p.PyCall(python=python, pickled=pickled),
                        track_cpu=True, track_ram=True)
    return p.TaskSpec(stages=[stage], hardware=hardware if hardware is not None else {"runtime": f"python{python}"},
                      **kw)


def submit(hub, specs) -> list[str]:
    _, ids = io_loop().run_sync(hub._submit(list(specs), None))
    return ids


class Result:
    """A TaskResult (what users get) with the record's raw PyValue beside it."""

    def __init__(self, result, raw_value) -> None:
        self._result, self.raw_value = result, raw_value

    def __getattr__(self, name):
        return getattr(self._result, name)


def value(result) -> object:
    return pickle.loads(base64.b64decode(result.raw_value.pickled))


def results(hub, ids, timeout=120) -> list[Result]:
    res = hub.get_result_sync(ids, wait=True, timeout=timeout)
    records = io_loop().run_sync(_records(hub, ids))
    return [Result(r, rec.value) for r, rec in zip(res, records)]


async def _records(hub, ids):
    link = await hub._connected()
    reply = await link.request(p.GetResults(id=link.next_id(), task_ids=list(ids)))
    return reply.tasks


def _double(x):
    print("doubling", x)
    return 2 * x


def _divide(a, b):
    return a / b


def test_functions_return_values_in_order_with_output_and_tracking(hub):
    ids = submit(hub, [call(_double, i) for i in range(40)])
    res = results(hub, ids)
    assert [r.status for r in res] == ["finished"] * 40
    assert [value(r) for r in res] == [2 * i for i in range(40)]
    cmd = res[7].stages[0].commands[0]
    assert cmd.cmd == "python: _double(...)" and cmd.stdout == "doubling 7\n" and cmd.exit_code == 0
    stage = res[7].stages[0]
    assert stage.duration is not None and stage.cpu_time is not None and stage.peak_ram > 0
    assert "python" + PY in (res[0].hardware.get("runtimes") or [])


def test_a_remote_exception_comes_back_with_its_traceback(hub):
    (tid,) = submit(hub, [call(_divide, 1, 0)])
    (r,) = results(hub, [tid])
    assert r.status == "failed" and "ZeroDivisionError: division by zero" in r.error
    v = r.raw_value
    assert v.error_type == "ZeroDivisionError"
    assert "return a / b" in v.traceback and "in _divide" in v.traceback and "test_e2e_python.py" in v.traceback
    assert isinstance(pickle.loads(base64.b64decode(v.pickled)), ZeroDivisionError)


def test_a_pickle_of_another_python_is_refused_clearly(hub):
    # No runtime requirement: a stale client or daemon gets it to a worker, which refuses it.
    (tid,) = submit(hub, [call(_double, 1, python="3.99", hardware={})])
    (r,) = results(hub, [tid])
    assert r.status == "failed" and r.attempts[-1].state == "failed"
    assert "pickled by Python 3.99" in r.error and f"runs Python {PY}" in r.error


def test_a_runtime_no_daemon_has_waits_with_a_reason(hub):
    (tid,) = submit(hub, [call(_double, 1, hardware={"runtime": "python9.9"})])
    (r,) = hub.get_result_sync([tid])
    assert r.status == "queued"
    assert "runtime=python9.9" in r.wait_reason and f"python{PY}" in r.wait_reason
    hub.cancel_sync([tid])


def test_a_value_too_large_to_inline_comes_back_as_the_value_artifact(hub):
    (tid,) = submit(hub, [call(bytes, 200_000)])
    (r,) = results(hub, [tid])
    assert r.status == "finished" and r.raw_value.artifact == "hwf-value.pkl" and r.raw_value.pickled is None
    (art,) = r.artifacts
    assert art.name == "hwf-value.pkl" and art.path is not None
    assert pickle.loads(art.path.read_bytes()) == bytes(200_000)


@pytest.fixture
def lone(tmp_path):
    """A hub with one daemon of one slot (so its one worker is easy to find)."""
    clusters = []

    def make(*daemon_args: str, **kw) -> LocalCluster:
        c = LocalCluster(daemons=1, slots=kw.pop("slots", 1), state_dir=tmp_path / f"c{len(clusters)}",
                         daemon_args=list(daemon_args), **kw)
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.close()


def _workers_of(daemon_pid: int) -> list[psutil.Process]:
    return [q for q in psutil.Process(daemon_pid).children(recursive=True)
            if _is_worker(q)]


def _is_worker(q: psutil.Process) -> bool:
    return any(Path(part).name == "pyworker.py" for part in q.cmdline()[:3])


def _pid():
    return os.getpid()


def _sleep_on_first_attempt(marker):
    import subprocess
    if os.environ["HWF_ATTEMPT"] == "1":
        subprocess.run(["sleep", marker])  # a child the test can find, under the worker
    return os.environ["HWF_ATTEMPT"]


def test_a_killed_worker_is_replaced_and_its_task_retried(lone):
    c = lone()
    hub = c.hub()
    daemon_pid = c.daemon_processes["daemon-1"].pid
    marker = f"{600 + uuid.uuid4().int % 1000}.{os.getpid()}"
    (tid,) = submit(hub, [call(_sleep_on_first_attempt, marker)])

    def sleeping_child():
        return [q for q in psutil.Process(daemon_pid).children(recursive=True) if q.cmdline()[-1:] == [marker]]

    (child,) = wait_until(sleeping_child, what="the call to start its child")
    worker = child.parent()
    assert _is_worker(worker)
    if AS_ROOT:
        assert worker.uids().real != 0  # the slot's user, not root
    worker.send_signal(signal.SIGKILL)
    (r,) = results(hub, [tid])
    assert r.status == "finished" and value(r) == "2"
    assert [a.state for a in r.attempts] == ["lost", "finished"]
    assert "Python worker" in r.attempts[0].reason and "SIGKILL" in r.attempts[0].reason
    (new,) = wait_until(lambda: _workers_of(daemon_pid), what="a worker")
    assert new.pid != worker.pid
    hub.close_sync()


def test_python_max_tasks_replaces_the_worker(lone):
    c = lone("--python-max-tasks", "3")
    hub = c.hub()
    ids = submit(hub, [call(_pid) for _ in range(7)])
    res = sorted(results(hub, ids), key=lambda r: r.started)
    pids = [value(r) for r in res]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]
    hub.close_sync()


def _hold_secret(shared):
    """Slot A: a secret in its task dir, kept until slot B has tried to read it."""
    from pathlib import Path as P
    P("secret.txt").write_text("s3cret")
    os.chmod("secret.txt", 0o644)  # even readable by others: the dir is what stops them
    P(shared, "ready").write_text(os.getcwd())
    deadline = time.time() + 60
    while not P(shared, "done").exists() and time.time() < deadline:
        time.sleep(0.02)
    return os.getuid()


def _steal_secret(shared):
    from pathlib import Path as P
    deadline = time.time() + 60
    while not P(shared, "ready").exists() and time.time() < deadline:
        time.sleep(0.02)
    try:
        got = P(P(shared, "ready").read_text(), "secret.txt").read_text()
    except PermissionError as exc:
        got = f"refused: {exc.strerror}"
    P(shared, "done").write_text("")
    return os.getuid(), got


@pytest.mark.skipif(not AS_ROOT, reason="per-slot users exist only when the daemon runs as root")
def test_workers_run_as_their_slots_user_and_cannot_read_each_other(lone):
    c = lone(slots=2)
    hub = c.hub()
    shared = tempfile.mkdtemp(prefix="hwf-e2e-shared-")
    os.chmod(shared, 0o1777)
    try:
        ids = submit(hub, [call(_hold_secret, shared), call(_steal_secret, shared)])
        a, b = results(hub, ids)
        assert a.status == b.status == "finished", (a.error, b.error)
        uid_a, (uid_b, got) = value(a), value(b)
        assert uid_a != uid_b and 0 not in (uid_a, uid_b)
        assert got == "refused: Permission denied"
    finally:
        import shutil
        shutil.rmtree(shared, ignore_errors=True)
    hub.close_sync()


# ------------------------------------------------------------------ HTC-Grid


@pytest.fixture
def handler_dir(monkeypatch):
    """A module dir the slot users can read, on the daemons' PYTHONPATH."""
    d = Path(tempfile.mkdtemp(prefix="hwf-grid-handler-"))
    os.chmod(d, 0o755)
    (d / "seed_lambda.py").write_text(
        "def lambda_handler(event, context):\n"
        "    print('computing', event)\n"
        "    return {'sum': sum(event['values']), 'task': context.aws_request_id}\n")
    os.chmod(d / "seed_lambda.py", 0o644)
    monkeypatch.setenv("PYTHONPATH", str(d))
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


SEED_CONFIG = {  # the seed's keys, as an HTC-Grid client has them: no command, no handler
    "grid_storage_service": "REDIS", "s3_bucket": "b", "redis_url": "redis://x:6379",
    "api_gateway_key": "k", "user_pool_id": "u", "cognito_userpool_client_id": "c",
    "dynamodb_results_pull_interval_sec": 1, "task_input_passed_via_external_storage": 1, "region": "eu-west-1",
}


def _run_seed_client(c: LocalCluster) -> dict:
    grid = GridConnector({**SEED_CONFIG, "public_api_gateway_url": c.address, "token": c.token})
    grid.authenticate()
    try:
        sub = grid.send([{"values": [1, 2]}, {"values": [10, 20, 30]}])
        return {"sub": sub, "res": grid.get_results(sub, timeout_sec=120)}
    finally:
        grid.close()


def test_a_seed_grid_config_runs_on_a_daemons_python_handler(lone, handler_dir):
    c = lone("--grid-handler", "seed_lambda:lambda_handler")
    out = _run_seed_client(c)
    res, sub = out["res"], out["sub"]
    assert res["finished"] == sub["task_ids"]
    outputs = [json.loads(o) for o in res["finished_OUTPUT"]]
    assert [o["sum"] for o in outputs] == [3, 60]
    assert [o["task"] for o in outputs] == sub["task_ids"]  # the lambda context names the task


@needs_task_python
def test_a_seed_grid_config_runs_on_the_hubs_shell_handler(lone):
    handler = f"{TASK_PY} -c 'import json,sys; e=json.load(sys.stdin); print(sum(e[\"values\"]))'"
    c = lone(hub_args=["--grid-handler", handler])
    res = _run_seed_client(c)["res"]
    assert [o.strip() for o in res["finished_OUTPUT"]] == ["3", "60"]


def test_a_seed_grid_config_waits_clearly_where_no_handler_exists(hub, cluster):
    grid = GridConnector({**SEED_CONFIG, "public_api_gateway_url": cluster.address, "token": cluster.token})
    grid.authenticate()
    try:
        sub = grid.send([{"values": [1]}])
        (r,) = grid.hub.get_result_sync(sub["task_ids"])
        assert r.status == "queued" and "runtime=grid" in r.wait_reason
        grid.cancel_sessions([sub["session_id"]])
    finally:
        grid.close()


# ------------------------------------------------------------------ attacks and limits


def _forge_reply(kind):
    """Task code writing on its worker's channel to the daemon (it can: same process)."""
    import stat
    import struct
    chan = next(fd for fd in range(3, 64) if _is_socket(fd, stat))
    if kind == "huge":
        os.write(chan, struct.pack(">I", 2**31))
    else:  # well framed, badly typed
        body = json.dumps({"op": "done", "id": "x", "ok": True, "value": {"pickled": 5}}).encode()
        os.write(chan, struct.pack(">I", len(body)) + body)
    time.sleep(30)  # the daemon must not wait for this
    return "unreachable"


def _is_socket(fd, stat):
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


@pytest.mark.parametrize("kind", ["huge", "mistyped"])
def test_a_call_forging_its_workers_reply_fails_alone(hub, kind):
    (tid,) = submit(hub, [call(_forge_reply, kind, max_retries=2)])
    (r,) = results(hub, [tid])
    assert r.status == "failed" and [a.state for a in r.attempts] == ["failed"]  # its own doing: no retry
    assert "the Python worker sent" in r.error
    # The daemon goes on serving calls.
    ids = submit(hub, [call(_double, 21)])
    assert value(results(hub, ids)[0]) == 42


def _sleep(seconds):
    time.sleep(seconds)
    return "woke"


def test_a_call_past_its_timeout_is_killed_and_failed(hub):
    (tid,) = submit(hub, [call(_sleep, 60, timeout=1)])
    (r,) = results(hub, [tid])
    assert r.status == "failed" and r.reason == "timeout" and r.error == "timed out"
    ids = submit(hub, [call(_double, 4)])
    assert value(results(hub, ids)[0]) == 8  # a new worker took over the slot


def test_commands_get_the_stage_stdin(hub):
    big = "x" * (3 * 2**20) + "\n"
    stages = [
        p.StageSpec(name="echo", cmds=["cat", "wc -c"], stdin="hello\n"),
        p.StageSpec(name="big", cmds=["wc -c"], stdin=big),
        p.StageSpec(name="ignores", cmds=["true"], stdin=big),  # never reads it: no hang
    ]
    ids = submit(hub, [p.TaskSpec(stages=stages)])
    (r,) = results(hub, ids)
    assert r.status == "finished", r.error
    echo, wc = r.stages[0].commands
    assert echo.stdout == "hello\n" and wc.stdout.strip() == "6"
    assert r.stages[1].commands[0].stdout.strip() == str(len(big))


def test_a_grid_configs_handler_overrides_the_farms(lone, handler_dir):
    (handler_dir / "other_lambda.py").write_text("def handler(event):\n    return 'other %s' % event['values']\n")
    os.chmod(handler_dir / "other_lambda.py", 0o644)
    c = lone("--grid-handler", "seed_lambda:lambda_handler")
    grid = GridConnector({**SEED_CONFIG, "public_api_gateway_url": c.address, "token": c.token,
                          "handler": "other_lambda:handler"})
    grid.authenticate()
    try:
        sub = grid.send([{"values": [1, 2]}])
        res = grid.get_results(sub, timeout_sec=120)
    finally:
        grid.close()
    assert res["finished_OUTPUT"] == ["other [1, 2]"]


@needs_task_python
def test_a_seed_grid_config_runs_on_a_daemons_shell_handler(lone):
    handler = f"{TASK_PY} -c 'import json,sys; e=json.load(sys.stdin); print(max(e[\"values\"]))'"
    c = lone("--grid-handler", handler)
    res = _run_seed_client(c)["res"]
    assert [o.strip() for o in res["finished_OUTPUT"]] == ["2", "30"]

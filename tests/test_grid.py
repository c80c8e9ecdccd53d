"""GridConnector: the HTC-Grid client API (seed 001) on real hubs and daemons."""

from __future__ import annotations

import time

import psutil
import pytest
from task_python import TASK_PY, needs_task_python

from hwf_jupyter import ConnectError, LocalCluster
from hwf_jupyter.grid import AWSConnector, GridConnector, GridError

PY = TASK_PY or "python3"  # tasks run as unprivileged slot users when we are root
pytestmark = needs_task_python  # nearly every test here runs Python in its tasks
# Doubles e["x"]; exits 1 (with a message on stderr) for negative x.
DOUBLE = (f"{PY} -c 'import json,sys; e=json.load(sys.stdin); "
          f"sys.exit(\"negative\") if e[\"x\"] < 0 else print(e[\"x\"]*2)'")
MARKER = "hwf-grid-test-sleeper"


def sleeper(seconds: float) -> str:
    """A command that sleeps; MARKER in its argv lets psutil find it."""
    return f"{PY} -c 'import time; time.sleep({seconds})' {MARKER}"


@pytest.fixture
def connect(cluster, monkeypatch):
    """Authenticated connectors on the shared cluster, closed afterwards."""
    monkeypatch.delenv("INTRA_VPC", raising=False)
    made: list[GridConnector] = []

    def make(command: str = DOUBLE, c: LocalCluster = cluster, **extra) -> GridConnector:
        g = GridConnector({"hub_url": c.address, "token": c.token, "command": command, **extra})
        g.authenticate()
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def test_send_and_get_results_in_input_order(connect):
    g = connect(grid_storage_service="REDIS", redis_url="redis://nowhere:6379", region="eu-west-1",
                dynamodb_results_pull_interval_sec=0.5)
    tasks = [{"x": 1}, {"x": 5}, {"x": 5}, {"x": 10}]  # identical dicts share one blob
    sub = g.send(tasks)
    assert set(sub) == {"session_id", "task_ids"}
    assert len(sub["task_ids"]) == 4 and len(set(sub["task_ids"])) == 4
    assert g.hub.session_sync(sub["session_id"]).task_ids == sub["task_ids"]

    res = g.get_results(sub, timeout_sec=None)
    assert set(res) == {"finished", "finished_OUTPUT", "metadata"}
    assert res["finished"] == sub["task_ids"]
    assert [o.strip() for o in res["finished_OUTPUT"]] == ["2", "10", "10", "20"]
    assert res["metadata"] == {"tasks_in_response": 4}


def test_seed_aliases(cluster, monkeypatch):
    monkeypatch.setenv("HWF_TOKEN", cluster.token)
    monkeypatch.delenv("INTRA_VPC", raising=False)
    g = AWSConnector(client_config_data={"public_api_gateway_url": cluster.address, "command": DOUBLE,
                                         "username": "u", "password": "p"})
    try:
        g.authenticate()  # token from HWF_TOKEN
        res = g.get_results(g.send([{"x": 21}]), timeout_sec=30)
        assert res["finished_OUTPUT"] == ["42\n"]
    finally:
        g.close()


def test_failed_tasks_carry_error_text(connect):
    g = connect()
    sub = g.send([{"x": 1}, {"x": -1}, {"x": 2}, {"x": -2}])
    ids = sub["task_ids"]
    res = g.get_results(sub, timeout_sec=30)
    assert res["finished"] == [ids[0], ids[2]]
    assert [o.strip() for o in res["finished_OUTPUT"]] == ["2", "4"]
    assert res["failed"] == [ids[1], ids[3]]
    assert len(res["failed_OUTPUT"]) == 2
    for text in res["failed_OUTPUT"]:
        assert "exited with code 1" in text and "lambda" in text
    assert "cancelled" not in res and res["metadata"] == {"tasks_in_response": 4}


def test_get_results_timeout_returns_partial(connect):
    g = connect(command=sleeper(5))
    sub = g.send([{"i": 0}, {"i": 1}])
    try:
        t0 = time.monotonic()
        res = g.get_results(sub, timeout_sec=1)
        took = time.monotonic() - t0
        assert 0.9 <= took < 1.8, took
        assert res == {"metadata": {"tasks_in_response": 0}}
        t0 = time.monotonic()
        assert g.get_results(sub) == {"metadata": {"tasks_in_response": 0}}  # 0: no wait at all
        assert time.monotonic() - t0 < 0.5
    finally:
        g.cancel_sessions([sub["session_id"]])  # free the shared cluster's slots


def _sleepers(c: LocalCluster) -> list[psutil.Process]:
    """The sleeper commands running under the cluster's daemons."""
    found = []
    for proc in c.daemon_processes.values():
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for k in kids:
            try:
                argv = k.cmdline()  # the python itself, not the bash around it
                if argv and argv[-1] == MARKER and k.status() != psutil.STATUS_ZOMBIE:
                    found.append(k)
            except psutil.NoSuchProcess:
                pass
    return found


def _wait_for(cond, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_cancel_sessions_kills_processing_and_counts_pending(tmp_path, connect):
    # Own cluster: 2 daemons x 2 slots, so 6 tasks are exactly 4 running + 2 queued.
    with LocalCluster(daemons=2, slots=2, state_dir=tmp_path / "c") as c:
        g = connect(command=sleeper(30), c=c)
        sub = g.send([{"i": i} for i in range(6)])
        ids = sub["task_ids"]

        def states() -> list[str]:
            return [r.status for r in g.hub.get_result_sync(ids, download=False)]

        assert _wait_for(lambda: states().count("running") == 4), states()
        assert sorted(states()) == ["queued"] * 2 + ["running"] * 4
        assert _wait_for(lambda: len(_sleepers(c)) == 4), _sleepers(c)

        other = g.send([{"i": "other"}])  # queued behind the 6: a second session
        t0 = time.monotonic()
        # `other` first: once `sub` is cancelled its task could start on a freed slot.
        out = g.cancel_sessions([other["session_id"], sub["session_id"]])
        assert out == {
            sub["session_id"]: {"cancelled_retrying": 0, "cancelled_pending": 2,
                                "cancelled_processing": 4, "total_cancelled_tasks": 6},
            other["session_id"]: {"cancelled_retrying": 0, "cancelled_pending": 1,
                                  "cancelled_processing": 0, "total_cancelled_tasks": 1},
        }
        assert _wait_for(lambda: not _sleepers(c), timeout=8.0), _sleepers(c)
        assert time.monotonic() - t0 < 8.0

        res = g.get_results(sub, timeout_sec=5)
        assert set(res) == {"cancelled", "cancelled_OUTPUT", "metadata"}
        assert res["cancelled"] == ids
        assert res["cancelled_OUTPUT"] == ["cancelled"] * 6
        assert res["metadata"] == {"tasks_in_response": 6}

        again = g.cancel_sessions([sub["session_id"]])  # nothing left to cancel
        assert again[sub["session_id"]]["total_cancelled_tasks"] == 0


def test_authenticate_needs_a_token_or_intra_vpc(cluster, monkeypatch):
    monkeypatch.delenv("HWF_TOKEN", raising=False)
    monkeypatch.delenv("INTRA_VPC", raising=False)
    g = GridConnector({"hub_url": cluster.address, "command": DOUBLE})
    with pytest.raises(GridError, match="HWF_TOKEN") as err:
        g.authenticate()
    assert "intra_vpc" in str(err.value)
    with pytest.raises(GridError, match="authenticate"):
        g.send([{"x": 1}])
    g.close()


def test_wrong_token_fails_at_authenticate(cluster, monkeypatch):
    monkeypatch.delenv("INTRA_VPC", raising=False)
    g = GridConnector({"hub_url": cluster.address, "token": "not-a-token", "command": DOUBLE})
    with pytest.raises(ConnectError, match="invalid token"):
        g.authenticate()
    g.close()


def test_intra_vpc_needs_a_trust_loopback_hub(cluster, monkeypatch):
    monkeypatch.delenv("HWF_TOKEN", raising=False)
    g = GridConnector({"hub_url": cluster.address, "command": DOUBLE, "intra_vpc": True})
    with pytest.raises(ConnectError, match="trust-loopback"):
        g.authenticate()
    g.close()


def test_intra_vpc_without_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HWF_TOKEN", "stale-token")  # intra_vpc does not read it
    monkeypatch.setenv("INTRA_VPC", "1")
    with LocalCluster(daemons=1, trust_loopback=True, state_dir=tmp_path / "c") as c:
        with GridConnector({"hub_url": c.address, "command": DOUBLE}) as g:
            assert g.intra_vpc
            g.authenticate()
            res = g.get_results(g.send([{"x": 4}]), timeout_sec=30)
            assert res["finished_OUTPUT"] == ["8\n"]


def test_bad_input_is_rejected_clearly(connect):
    g = connect()
    with pytest.raises(GridError, match=r"tasks_list\[0\] is not JSON-serialisable"):
        g.send([{"a": object()}])
    with pytest.raises(GridError, match=r"tasks_list\[1\] must be a dict"):
        g.send([{"x": 1}, [1, 2]])
    with pytest.raises(GridError, match="empty"):
        g.send([])
    with pytest.raises(GridError, match="'task_ids'"):
        g.get_results({"session_id": "s-x"})
    with pytest.raises(GridError, match="list of session id"):
        g.cancel_sessions("s-x")
    with pytest.raises(GridError, match="'command'"):
        GridConnector({"hub_url": "127.0.0.1", "command": " "})
    with pytest.raises(GridError, match="'handler' must be 'module:function'"):
        GridConnector({"hub_url": "127.0.0.1", "handler": "rm -rf /"})
    with pytest.raises(GridError, match="not both"):
        GridConnector({"hub_url": "127.0.0.1", "handler": "m:f", "command": "cat"})
    with pytest.raises(GridError, match="'hub_url'"):
        GridConnector({"command": "cat"})

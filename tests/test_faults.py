"""Faults injected with real signals into real hub and daemon processes.

Every test ends by checking the store itself: each task has exactly one
terminal transition, a terminal status, and (when finished) one result.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time

import psutil
import pytest

from hub_server import auth
from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync

TERMINAL = ("finished", "failed", "cancelled")


def assert_exactly_once(cluster: LocalCluster, ids: list[str]) -> dict[str, int]:
    """Read the hub's SQLite store: one terminal state per task, no task lost."""
    db = sqlite3.connect(f"file:{cluster.state_dir / auth.DB_FILE}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(ids))
        rows = dict(db.execute(f"SELECT task_id, status FROM tasks WHERE task_id IN ({marks})", ids))
        assert set(rows) == set(ids), f"{len(set(ids) - set(rows))} task(s) lost"
        assert all(s in TERMINAL for s in rows.values()), {s for s in rows.values()}
        twice = db.execute(
            f"SELECT task_id, count(*) FROM transitions WHERE state IN ('finished','failed','cancelled') "
            f"AND task_id IN ({marks}) GROUP BY task_id HAVING count(*) != 1", ids).fetchall()
        assert not twice, f"tasks with != 1 terminal transition: {twice[:5]}"
        no_result = db.execute(
            f"SELECT count(*) FROM tasks WHERE status='finished' AND result_attempt IS NULL "
            f"AND task_id IN ({marks})", ids).fetchone()[0]
        assert no_result == 0
        no_reason = db.execute(
            f"SELECT task_id FROM tasks WHERE status='failed' AND (error IS NULL OR error='') "
            f"AND task_id IN ({marks})", ids).fetchall()
        assert not no_reason, f"failures without a reason: {no_reason[:5]}"
        counts: dict[str, int] = {}
        for s in rows.values():
            counts[s] = counts.get(s, 0) + 1
        return counts
    finally:
        db.close()


def _wait_running(hub, ids, n, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = hub.get_result_sync(ids)
        running = [r for r in res if r.status == "running"]
        if len(running) >= n:
            return running
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} tasks running after {timeout}s")


def _procs_named(pids, name):
    out = []
    for pid in pids:
        try:
            out += [c for c in psutil.Process(pid).children(recursive=True) if c.name() == name]
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(procs):
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_daemon_killed_9_tasks_retry_elsewhere(tmp_path):
    with LocalCluster(daemons=2, slots=2, state_dir=tmp_path / "c") as c:
        hub = c.hub()
        ids = dispatch_sync(Task(Stage("s", cmd="sleep 1.5; echo done")), hub, repeat=4)
        running = _wait_running(hub, ids, 4)
        victims = {r.task_id for r in running if r.machine == "daemon-1"}
        assert victims
        c.daemon_processes["daemon-1"].kill()
        res = hub.get_result_sync(ids, wait=True, timeout=60)
        assert all(r.status == "finished" and r.output == "done\n" for r in res)
        for r in res:
            if r.task_id in victims:
                assert [a.state for a in r.attempts] == ["lost", "finished"]
                assert r.attempts[0].machine == "daemon-1" and r.machine == "daemon-2"
                assert "connection lost" in r.attempts[0].reason
        assert_exactly_once(c, list(ids))
        hub.close_sync()


def test_stopped_heartbeats_retry_and_the_late_result_is_ignored(tmp_path):
    with LocalCluster(daemons=2, slots=1, state_dir=tmp_path / "c", heartbeat_timeout=2.0) as c:
        hub = c.hub()
        ids = dispatch_sync(Task(Stage("s", cmd="sleep 3; echo ok")), hub, repeat=2)
        running = _wait_running(hub, ids, 2)
        frozen_task = next(r.task_id for r in running if r.machine == "daemon-1")
        frozen = c.daemon_processes["daemon-1"]
        os.kill(frozen.pid, signal.SIGSTOP)  # alive, connected, silent
        try:
            res = {r.task_id: r for r in hub.get_result_sync(ids, wait=True, timeout=30)}
            moved = res[frozen_task]
            assert moved.ok and moved.machine == "daemon-2"
            assert [a.state for a in moved.attempts] == ["lost", "finished"]
            assert "heartbeats stopped" in moved.attempts[0].reason
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        # the daemon comes back; its late result for the lost attempt is acked and ignored
        c.wait_for_daemons(names=["daemon-1"], timeout=30)
        time.sleep(1.0)
        again = hub.get_result_sync([frozen_task])[0]
        assert again.machine == "daemon-2" and [a.state for a in again.attempts][0] in ("lost", "cancelled")
        after = dispatch_sync(Task(Stage("s", cmd="echo x"), hardware={"daemon": "daemon-1"}), hub)
        assert hub.get_result_sync(after, wait=True, timeout=20)[0].ok  # its slot is free again
        assert_exactly_once(c, [*ids, *after])
        hub.close_sync()


def test_timeout_kills_the_process_group_and_fails_with_reason(tmp_path, cluster):
    hub = cluster.hub()
    ids = dispatch_sync(Task(Stage("s", cmd="sleep 31 & sleep 32 & wait")), hub, timeout=1.0)
    r = hub.get_result_sync(ids, wait=True, timeout=30)[0]
    assert r.status == "failed" and r.reason == "timeout" and "timed out" in r.error
    assert len(r.attempts) == 1  # a timeout is not retried
    time.sleep(0.5)
    assert not _alive([p for p in _procs_named(cluster.pids, "sleep")
                       if " ".join(p.cmdline()) in ("sleep 31", "sleep 32")])
    hub.close_sync()


def test_cancel_pending_running_and_retrying(tmp_path):
    with LocalCluster(daemons=2, slots=1, state_dir=tmp_path / "c") as c:
        hub = c.hub()
        first = dispatch_sync(Task(Stage("s", cmd="sleep 30")), hub, repeat=2)
        running = _wait_running(hub, first, 2)
        on_1 = next(r.task_id for r in running if r.machine == "daemon-1")
        more = dispatch_sync(Task(Stage("s", cmd="sleep 30")), hub, repeat=2, session=first.session_id)
        c.daemon_processes["daemon-1"].kill()  # its task goes back to the queue: retrying
        deadline = time.monotonic() + 20
        while hub.get_result_sync([on_1])[0].status != "queued" and time.monotonic() < deadline:
            time.sleep(0.1)
        sleeps = _procs_named(c.pids, "sleep")
        assert sleeps
        t0 = time.monotonic()
        out = hub.cancel_sync(session=first.session_id)
        assert out["by_state"] == {"running": 1, "retrying": 1, "queued": 2}
        assert sorted(out["cancelled"]) == sorted([*first, *more])
        grace = 3.0 + 2.0
        while _alive(sleeps) and time.monotonic() - t0 < grace:
            time.sleep(0.05)
        assert not _alive(sleeps), "running processes survived the cancel grace period"
        res = hub.get_result_sync([*first, *more], wait=True, timeout=10)
        assert {r.status for r in res} == {"cancelled"}
        assert all(r.reason == "cancelled" for r in res)
        # the freed slot takes new work, and cancelled tasks never come back
        after = dispatch_sync(Task(Stage("s", cmd="echo next")), hub)
        assert hub.get_result_sync(after, wait=True, timeout=20)[0].output == "next\n"
        assert {r.status for r in hub.get_result_sync([*first, *more])} == {"cancelled"}
        assert_exactly_once(c, [*first, *more, *after])
        hub.close_sync()


def test_sigterm_drains_the_daemon(tmp_path):
    with LocalCluster(daemons=2, slots=1, state_dir=tmp_path / "c") as c:
        hub = c.hub()
        ids = dispatch_sync(Task(Stage("s", cmd="sleep 1.5; echo finished-here"),
                                 hardware={"daemon": "daemon-1"}), hub)
        _wait_running(hub, ids, 1)
        c.stop_daemon("daemon-1", sig=signal.SIGTERM, wait=False)
        time.sleep(0.3)
        pool = {m.name: m.state for m in hub.get_hardware_pool_sync(include_offline=True)}
        assert pool["daemon-1"] == "draining"
        later = dispatch_sync(Task(Stage("s", cmd="echo later")), hub, repeat=3)
        r = hub.get_result_sync(ids, wait=True, timeout=20)[0]
        assert r.ok and r.machine == "daemon-1" and len(r.attempts) == 1
        assert {x.machine for x in hub.get_result_sync(later, wait=True, timeout=20)} == {"daemon-2"}
        c.daemon_processes["daemon-1"].wait(20)  # it exits by itself once drained
        assert_exactly_once(c, [*ids, *later])
        hub.close_sync()


def test_hub_killed_9_during_1000_tasks(tmp_path):
    with LocalCluster(daemons=2, slots=2, state_dir=tmp_path / "c", reconnect_grace=3.0) as c:
        hub = c.hub()
        ids = dispatch_sync(Task(Stage("s", cmd="echo $((6*7))")), hub, repeat=1000)
        waiter_result: dict = {}

        def wait_all():  # a get_result already waiting when the hub dies carries on
            waiter_result["res"] = hub.get_result_sync(ids, wait=True, timeout=120)

        waiter = threading.Thread(target=wait_all)
        waiter.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = sum(r.done for r in c.hub().get_result_sync(ids[:50]))
            if done >= 10:
                break
            time.sleep(0.05)
        c.hub_process.kill()
        c.hub_process.wait()
        time.sleep(0.5)
        c.restart_hub()
        waiter.join(150)
        res = waiter_result["res"]
        assert len(res) == 1000 and all(r.status == "finished" and r.output == "42\n" for r in res)
        counts = assert_exactly_once(c, list(ids))
        assert counts == {"finished": 1000}
        hub.close_sync()


@pytest.mark.soak
def test_soak_random_daemon_kills_and_a_hub_restart(tmp_path):
    n = int(os.environ.get("HWF_SOAK_TASKS", "400"))
    rng = random.Random(int(os.environ.get("HWF_SOAK_SEED", "7")))
    with LocalCluster(daemons=3, slots=2, state_dir=tmp_path / "c", reconnect_grace=3.0,
                      heartbeat_timeout=4.0) as c:
        hub = c.hub()
        tasks = [Task(Stage("s", cmd=f"sleep 0.0{rng.randint(0, 5)}; echo {k}")) for k in range(n)]
        ids = dispatch_sync(tasks, hub, max_retries=5)
        outcome: dict = {}
        waiter = threading.Thread(target=lambda: outcome.update(res=hub.get_result_sync(ids, wait=True, timeout=600)))
        waiter.start()
        restarted_hub = False
        kills = 0
        while waiter.is_alive():
            time.sleep(rng.uniform(0.3, 1.2))
            name = rng.choice(list(c.daemon_processes))
            proc = c.daemon_processes[name]
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                kills += 1
                c.add_daemon(name, wait=False)  # same name, new process
            if not restarted_hub and kills >= 2:
                c.hub_process.kill()
                c.hub_process.wait()
                c.restart_hub()
                restarted_hub = True
            if kills > 40:
                break
        waiter.join(600)
        res = outcome["res"]
        assert restarted_hub and kills >= 2
        assert len(res) == n
        for k, r in enumerate(res):
            assert r.done
            if r.status == "finished":
                assert r.output == f"{k}\n"
            else:
                assert r.error, r
        counts = assert_exactly_once(c, list(ids))
        assert counts.get("finished", 0) >= n * 0.9, counts
        hub.close_sync()

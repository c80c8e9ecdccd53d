"""The hub's bookkeeping over a real SQLite store, without sockets."""

from __future__ import annotations

import time

from hub_server import protocol as p
from hub_server.auth import Principal
from hub_server.blobs import BlobStore
from hub_server.core import HubCore
from hub_server.store import Store

HW = p.MachineHardware(os="linux", arch="x86_64", cpu="x", cores=2, ram=2**33)
ALICE = Principal("tok-a", "client", "alice")
OWNER = Principal("tok-d", "daemon", "owner")


def _core(tmp_path):
    return HubCore(Store(tmp_path / "hub.sqlite3"), BlobStore(tmp_path / "blobs"), p.Limits())


def _spec(**kw):
    return p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["true"])], **kw)


def _register(core, name, instance, running=()):
    return core.register(p.Register(id=1, name=name, hardware=HW, slots=2, instance=instance,
                                    running=list(running)), time.time(), OWNER)


def test_restart_keeps_attempt_numbers_and_queue(tmp_path):
    core = _core(tmp_path)
    sub = core.submit(p.Submit(id=1, tasks=[_spec(), _spec()]), ALICE)
    _register(core, "d1", "aaa")
    assigned = core.schedule()
    assert [a.attempt for _, a in assigned] == [1, 1]
    core.store.close()

    core = _core(tmp_path)  # the hub restarted
    assert set(core.active) == set(sub.task_ids)
    # the same daemon process comes back without the tasks: the hub never sent them
    _register(core, "d1", "aaa")
    again = core.schedule()
    assert sorted(a.attempt for _, a in again) == [2, 2]
    rec = core.records([sub.task_ids[0]], ALICE)[0]
    assert [a.state for a in rec.attempts] == ["lost", "assigned"]
    assert "not delivered" in rec.attempts[0].reason


def test_resent_submit_with_key_is_not_queued_twice(tmp_path):
    core = _core(tmp_path)
    first = core.submit(p.Submit(id=1, tasks=[_spec()], key="k1"), ALICE)
    second = core.submit(p.Submit(id=2, tasks=[_spec()], key="k1"), ALICE)
    assert second.task_ids == first.task_ids and len(core.active) == 1


def test_result_recorded_once_per_attempt(tmp_path):
    core = _core(tmp_path)
    tid = core.submit(p.Submit(id=1, tasks=[_spec()]), ALICE).task_ids[0]
    _register(core, "d1", "aaa")
    core.schedule()
    done = p.TaskDone(id=5, task_id=tid, attempt=1, outcome=p.TaskOutcome(status="finished", exit_code=0))
    assert core.task_done("d1", done, time.time()) is True
    assert core.task_done("d1", done, time.time()) is False  # a resend
    n = core.store.db.execute("SELECT count(*) FROM transitions WHERE task_id=? AND state='finished'",
                              (tid,)).fetchone()[0]
    assert n == 1


def test_lost_daemon_process_is_excluded_but_its_restart_is_not(tmp_path):
    core = _core(tmp_path)
    tid = core.submit(p.Submit(id=1, tasks=[_spec()]), ALICE).task_ids[0]
    _register(core, "d1", "first")
    core.schedule()
    core.disconnect("d1", time.time(), "daemon connection lost")
    assert core.active[tid].status == "queued"
    assert core.active[tid].excluded == {"d1#first"}
    _register(core, "d1", "second")  # same name, new process
    assert [a.task_id for _, a in core.schedule()] == [tid]


def test_cancel_counts_by_prior_state_and_frees_slot_only_when_killed(tmp_path):
    core = _core(tmp_path)
    ids = core.submit(p.Submit(id=1, tasks=[_spec(), _spec(), _spec()]), ALICE).task_ids
    _register(core, "d1", "aaa")
    core.schedule()  # two run (2 slots), one stays queued
    reply, kills = core.cancel(p.Cancel(id=2, task_ids=ids), time.time(), ALICE)
    assert reply.by_state == {"assigned": 2, "queued": 1}
    assert len(kills) == 2
    new = core.submit(p.Submit(id=3, tasks=[_spec()]), ALICE).task_ids[0]
    assert core.schedule() == []  # slots still busy until the kills are confirmed
    t, attempt = kills[0][1].task_id, kills[0][1].attempt
    core.task_done("d1", p.TaskDone(id=9, task_id=t, attempt=attempt,
                                    outcome=p.TaskOutcome(status="failed", reason="cancelled")), time.time())
    assert [a.task_id for _, a in core.schedule()] == [new]


def test_oversized_result_is_trimmed_to_fit_the_message_limit():
    from hwf_daemon.agent import fit_message

    cmds = [p.CommandOutcome(cmd=f"c{i}", exit_code=0, stdout="x" * 65536, stderr="y" * 65536) for i in range(300)]
    done = p.TaskDone(id=1, task_id="t", attempt=1, outcome=p.TaskOutcome(
        status="finished", stages=[p.StageOutcome(name="s", status="finished", commands=cmds)]))
    limit = p.Limits().max_message_bytes
    assert len(p.encode(done)) > limit
    fitted = fit_message(done, limit)
    assert len(p.encode(fitted)) <= limit
    c = fitted.outcome.stages[0].commands[0]
    assert c.stdout_truncated and c.stderr_truncated and c.stdout.startswith("x")


def test_submit_is_split_by_size_and_count():
    from hwf_jupyter.hub import _submit_chunks

    big = p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["echo " + "z" * 100_000])])
    limits = p.Limits(max_message_bytes=1_000_000, max_tasks_per_submit=7)
    chunks = _submit_chunks([big] * 30, limits)
    assert sum(map(len, chunks)) == 30
    assert all(len(p.encode(p.Submit(id=1, tasks=c))) < 1_000_000 and len(c) <= 7 for c in chunks)

"""The hub's state machine over a real SQLite store, without sockets or a clock.

Each test feeds ``HubCore.handle`` events and compares the instructions it
returns with the ones expected.
"""

from __future__ import annotations

import pytest

from hub_server import protocol as p
from hub_server.auth import Principal
from hub_server.blobs import BlobStore
from hub_server.core import CANCEL_CHUNK, HubCore
from hub_server.events import (
    CancelContinued, Close, Connected, Disconnected, Later, Received, Send, StreamBlob, Tick, TokensRevoked,
)
from hub_server.store import Store

HW = p.MachineHardware(os="linux", arch="x86_64", cpu="x", cores=2, ram=2**33)
ALICE = Principal("tok-a", "client", "alice")
BOB = Principal("tok-b", "client", "bob")
OWNER = Principal("tok-d", "daemon", "owner")
T0 = 1_000_000.0
CLIENT, DAEMON, OTHER = 1, 2, 3


class Farm:
    """A core plus the clock and peer ids a server would give it."""

    def __init__(self, tmp_path, now: float = T0, **kw) -> None:
        self.now = now
        self.core = HubCore(Store(tmp_path / "hub.sqlite3"), BlobStore(tmp_path / "blobs"), p.Limits(),
                            now=now, **kw)
        self._rid = 100

    def handle(self, *events, now=None):
        if now is not None:
            self.now = now
        out = self.core.handle(*events, now=self.now)
        self.core.validate_state()  # the invariants hold after every batch
        return out

    def rid(self) -> int:
        self._rid += 1
        return self._rid

    def connect(self, peer: int, who: Principal, version: int = p.PROTOCOL_VERSION):
        return self.handle(Connected(peer, who, version))

    def submit(self, *specs, peer: int = CLIENT, **kw) -> p.Submitted:
        out = self.handle(Received(peer, p.Submit(id=self.rid(), tasks=list(specs), **kw)))
        (reply,) = [i.msg for i in out if i.peer == peer and isinstance(i.msg, (p.Submitted, p.Error))]
        assert isinstance(reply, p.Submitted), reply
        self.last = out
        return reply

    def register(self, name: str, instance: str, peer: int = DAEMON, running=(), slots: int = 2):
        return self.handle(Received(peer, p.Register(id=self.rid(), name=name, hardware=HW, slots=slots,
                                                     instance=instance, running=list(running))))


def spec(**kw) -> p.TaskSpec:
    return p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["true"])], **kw)


def assigned(out) -> list[p.Assign]:
    got = []
    for i in out:
        if isinstance(i, Send) and isinstance(i.msg, p.Assignments):
            got += i.msg.items
        elif isinstance(i, Send) and isinstance(i.msg, p.Assign):
            got.append(i.msg)
    return got


def done(task_id: str, attempt: int, status: str = "finished", **kw) -> p.TaskDone:
    return p.TaskDone(id=9, task_id=task_id, attempt=attempt, outcome=p.TaskOutcome(status=status, **kw))


def test_submit_replies_and_assigns_in_one_batch(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    reg = f.register("d1", "aaa")
    assert reg == [Send(DAEMON, p.Registered(id=f._rid, machine_id="d1", heartbeat_interval=2.0))]
    sub = f.submit(spec(), spec(), spec())
    # One reply to the client, then one message carrying both assignments (2 slots).
    assert f.last[0] == Send(CLIENT, sub)
    (msg,) = [i for i in f.last if i.peer == DAEMON]
    assert isinstance(msg.msg, p.Assignments) and [a.task_id for a in msg.msg.items] == sub.task_ids[:2]


def test_a_protocol_1_daemon_gets_one_assign_per_task(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER, version=1)
    f.register("d1", "aaa")
    sub = f.submit(spec(), spec())
    to_daemon = [i.msg for i in f.last if i.peer == DAEMON]
    assert [type(m) for m in to_daemon] == [p.Assign, p.Assign]
    assert [m.task_id for m in to_daemon] == sub.task_ids


def test_restart_keeps_attempt_numbers_and_queue(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    f.register("d1", "aaa")
    sub = f.submit(spec(), spec())
    assert [a.attempt for a in assigned(f.last)] == [1, 1]
    f.core.store.close()

    g = Farm(tmp_path, now=T0 + 5)  # the hub restarted
    assert set(g.core.active) == set(sub.task_ids)
    g.connect(DAEMON, OWNER)
    # the same daemon process comes back without the tasks: the hub never sent them
    out = g.register("d1", "aaa")
    assert sorted(a.attempt for a in assigned(out)) == [2, 2]
    g.connect(CLIENT, ALICE)
    res = g.handle(Received(CLIENT, p.GetResults(id=5, task_ids=[sub.task_ids[0]])))
    rec = res[0].msg.tasks[0]
    assert [a.state for a in rec.attempts] == ["lost", "assigned"]
    assert "not delivered" in rec.attempts[0].reason


def test_absent_daemon_loses_its_attempts_after_the_grace_period(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    f.register("d1", "aaa")
    sub = f.submit(spec())
    f.core.store.close()
    g = Farm(tmp_path, now=T0 + 1, reconnect_grace=15)
    assert g.handle(Tick(), now=T0 + 10) == []  # still within the grace period
    g.handle(Tick(), now=T0 + 17)
    assert g.core.active[sub.task_ids[0]].status == "queued"
    g.connect(DAEMON, OWNER)
    out = g.register("d2", "bbb")
    assert [(a.task_id, a.attempt) for a in assigned(out)] == [(sub.task_ids[0], 2)]


def test_resent_submit_with_key_is_not_queued_twice(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    first = f.submit(spec(), key="k1")
    second = f.submit(spec(), key="k1")
    assert second.task_ids == first.task_ids and len(f.core.active) == 1
    f.connect(OTHER, BOB)  # another user's key is just a new key
    third = f.submit(spec(), key="k1", peer=OTHER)
    assert third.task_ids != first.task_ids


def test_result_recorded_once_per_attempt_and_waiters_woken_in_the_same_batch(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    f.register("d1", "aaa")
    tid = f.submit(spec()).task_ids[0]
    assert f.handle(Received(CLIENT, p.GetResults(id=7, task_ids=[tid], wait=True))) == []
    out = f.handle(Received(DAEMON, done(tid, 1, exit_code=0)))
    replies = {type(i.msg): i for i in out}
    assert replies[p.Ok] == Send(DAEMON, p.Ok(id=9))
    results = replies[p.Results]
    assert results.peer == CLIENT and results.msg.id == 7 and results.msg.tasks[0].status == "finished"
    again = f.handle(Received(DAEMON, done(tid, 1, exit_code=0)))  # a resend
    assert again == [Send(DAEMON, p.Ok(id=9))]
    n = f.core.store.db.execute("SELECT count(*) FROM transitions WHERE task_id=? AND state='finished'",
                                (tid,)).fetchone()[0]
    assert n == 1


def test_a_wait_times_out_on_a_tick(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    tid = f.submit(spec()).task_ids[0]
    assert f.handle(Received(CLIENT, p.GetResults(id=7, task_ids=[tid], wait=True, timeout=2))) == []
    assert f.handle(Tick(), now=T0 + 1) == []
    (out,) = f.handle(Tick(), now=T0 + 2.5)
    assert out.peer == CLIENT and out.msg.timed_out and out.msg.tasks[0].status == "queued"


def test_lost_daemon_process_is_excluded_but_its_restart_is_not(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    f.register("d1", "first")
    tid = f.submit(spec()).task_ids[0]
    f.handle(Disconnected(DAEMON))
    assert f.core.active[tid].status == "queued"
    assert f.core.active[tid].excluded == {"d1#first"}
    f.connect(DAEMON + 10, OWNER)
    out = f.register("d1", "second", peer=DAEMON + 10)  # same name, new process
    assert [a.task_id for a in assigned(out)] == [tid]


def test_missed_heartbeats_drop_the_daemon_and_retry_elsewhere(tmp_path):
    f = Farm(tmp_path, heartbeat_timeout=10)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    f.register("d1", "aaa")
    tid = f.submit(spec()).task_ids[0]
    f.handle(Received(DAEMON, p.Heartbeat(load=p.Load())), now=T0 + 8)
    assert f.handle(Tick(), now=T0 + 15) == []
    out = f.handle(Tick(), now=T0 + 19)
    assert Close(DAEMON, 1011, "heartbeat timeout") in out
    assert f.core.active[tid].status == "queued" and f.core.active[tid].attempt == 1


def test_cancel_counts_by_prior_state_and_frees_slot_only_when_killed(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    f.register("d1", "aaa")
    ids = f.submit(spec(), spec(), spec()).task_ids  # two run (2 slots), one stays queued
    out = f.handle(Received(CLIENT, p.Cancel(id=2, task_ids=ids)))
    kills = [i.msg for i in out if i.peer == DAEMON]
    assert sorted((k.task_id, k.attempt) for k in kills) == sorted((t, 1) for t in ids[:2])
    (reply,) = [i.msg for i in out if i.peer == CLIENT]
    assert reply.by_state == {"assigned": 2, "queued": 1} and reply.task_ids == ids
    new = f.submit(spec()).task_ids[0]
    assert assigned(f.last) == []  # slots still busy until the kills are confirmed
    out = f.handle(Received(DAEMON, done(kills[0].task_id, 1, status="failed", reason="cancelled")))
    assert [a.task_id for a in assigned(out)] == [new]


def test_a_big_cancel_continues_in_later_batches(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    n = CANCEL_CHUNK * 2 + 5
    sid = f.submit(*[spec()] * n).session_id
    out = f.handle(Received(CLIENT, p.Cancel(id=2, session_id=sid)))
    (later,) = out
    assert isinstance(later, Later) and isinstance(later.event, CancelContinued)
    assert len(later.event.remaining) == n - CANCEL_CHUNK
    # Meanwhile other requests are answered between the chunks.
    assert f.handle(Received(CLIENT, p.GetPool(id=3))) == [Send(CLIENT, p.Pool(id=3, machines=[]))]
    out = f.handle(later.event)
    out = f.handle(out[0].event)
    (reply,) = out
    assert reply.msg.by_state == {"queued": n} and len(reply.msg.task_ids) == n and reply.msg.id == 2


def test_watchers_get_events_and_output_they_missed(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    f.register("d1", "aaa")
    tid = f.submit(spec(stream=True)).task_ids[0]
    f.handle(Received(DAEMON, p.TaskStarted(task_id=tid, attempt=1, time=T0)))
    f.handle(Received(DAEMON, p.Output(task_id=tid, attempt=1, stream="stdout", text="early line\n")))
    f.connect(OTHER, ALICE)  # a second connection of the same user watches late
    out = f.handle(Received(OTHER, p.Watch(id=4, task_ids=[tid], output=True)))
    assert [type(i.msg) for i in out] == [p.Watching, p.Output]
    assert out[1].msg == p.Output(task_id=tid, attempt=1, stream="stdout", text="early line\n", watch=4)
    out = f.handle(Received(DAEMON, p.Output(task_id=tid, attempt=1, stream="stderr", text="later\n")))
    assert out == [Send(OTHER, p.Output(task_id=tid, attempt=1, stream="stderr", text="later\n", watch=4))]
    out = f.handle(Received(DAEMON, done(tid, 1, exit_code=0)))
    events = [i.msg for i in out if i.peer == OTHER]
    assert [(e.task_id, e.status) for e in events] == [(tid, "finished")]


def test_another_users_ids_get_the_unknown_id_answer(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(OTHER, BOB)
    sub = f.submit(spec())
    fake = "t-" + "0" * 16
    for make in (lambda i: p.GetResults(id=1, task_ids=[i]), lambda i: p.Watch(id=1, task_ids=[i]),
                 lambda i: p.Cancel(id=1, task_ids=[i])):
        (real,) = f.handle(Received(OTHER, make(sub.task_ids[0])))
        (unknown,) = f.handle(Received(OTHER, make(fake)))
        assert real.msg.code == unknown.msg.code == "not_found"
        assert real.msg.message.replace(sub.task_ids[0], "X") == unknown.msg.message.replace(fake, "X")
    (s1,) = f.handle(Received(OTHER, p.GetSession(id=1, session_id=sub.session_id)))
    assert s1.msg.code == "not_found"


def test_revoked_tokens_close_their_connections(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(OTHER, BOB)
    assert f.handle(TokensRevoked(frozenset({"tok-b"}))) == [Close(OTHER, 1008, "token revoked")]


def test_blob_reads_are_checked_by_the_core(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(OTHER, BOB)
    sha = f.core.blobs.put_file(__file__)[0]
    from hub_server.events import BlobStored
    assert f.handle(BlobStored(CLIENT, 12, sha)) == [Send(CLIENT, p.Ok(id=12))]
    assert f.handle(Received(CLIENT, p.BlobGet(id=13, sha256=sha))) == [StreamBlob(CLIENT, 13, sha)]
    (refused,) = f.handle(Received(OTHER, p.BlobGet(id=14, sha256=sha)))
    assert refused.msg.code == "not_found"


def test_one_bad_event_does_not_spoil_its_batch(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    out = f.handle(
        Received(CLIENT, p.Submit(id=1, tasks=[spec(hardware={"ram": "lots"})])),
        Received(CLIENT, p.Submit(id=2, tasks=[spec()])),
    )
    assert out[0].msg.code == "bad_hardware" and isinstance(out[1].msg, p.Submitted)
    assert len(f.core.active) == 1


def test_oversized_result_is_trimmed_to_fit_the_message_limit():
    from hwf_daemon.agent import fit_message

    cmds = [p.CommandOutcome(cmd=f"c{i}", exit_code=0, stdout="x" * 65536, stderr="y" * 65536) for i in range(300)]
    done_ = p.TaskDone(id=1, task_id="t", attempt=1, outcome=p.TaskOutcome(
        status="finished", stages=[p.StageOutcome(name="s", status="finished", commands=cmds)]))
    limit = p.Limits().max_message_bytes
    assert len(p.encode(done_)) > limit
    fitted = fit_message(done_, limit)
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


def test_a_stored_out_of_bounds_load_does_not_stop_the_hub_starting(tmp_path):
    """0.2 stored whatever load a daemon sent; 0.3 bounds it, and must still start on such a store."""
    f = Farm(tmp_path)
    f.connect(DAEMON, OWNER)
    f.register("d1", "aaa")
    with f.core.store.transaction():
        f.core.store.set_machine_state("d1", "online", T0, {"load_avg": [1e308, 0, 0], "cpu_percent": 1e308})
    f.core.store.close()
    g = Farm(tmp_path, now=T0 + 5)
    assert "d1" in g.core.machines and g.core.machines["d1"].load is None

"""The credit ledger's rules, through HubCore.handle over a real SQLite store:
no sockets, no clock.  (CreditPiggy's slots: alloc, claim, discard, counters,
meta, link; and the farm's own tasks accounted automatically.)"""

from __future__ import annotations

import pytest

from hub_server import protocol as p
from hub_server.auth import Principal
from hub_server.events import Received, Send, Tick
from hub_server.ledger import DEFAULT_EXPIRE, clamp, task_credits

from test_core import ALICE, BOB, CLIENT, DAEMON, OTHER, OWNER, T0, Farm, assigned, done, spec

ADMIN = Principal("tok-x", "admin", "admin")
# A CreditPiggy job manager is its user's client: it claims its own slots.
JOB_PEER = CLIENT
ADMIN_PEER, DAEMON_PEER = 4, 5
ROGUE = Principal("tok-m", "daemon", "owner-m")


def ask(f: Farm, peer: int, msg_type, **kw):
    """One request; returns its single reply."""
    rid = f.rid()
    out = f.handle(Received(peer, msg_type(id=rid, **kw)))
    replies = [i.msg for i in out if isinstance(i, Send) and i.peer == peer and getattr(i.msg, "id", None) == rid]
    assert len(replies) == 1, out
    return replies[0]


def ok(f, peer, msg_type, **kw):
    reply = ask(f, peer, msg_type, **kw)
    assert isinstance(reply, (p.Ok, p.CreditClaimed, p.CreditLinked, p.CreditTally, p.CreditSlots)), reply
    return reply


def refused(f, peer, msg_type, code, **kw) -> str:
    reply = ask(f, peer, msg_type, **kw)
    assert isinstance(reply, p.Error) and reply.code == code, reply
    return reply.message


@pytest.fixture
def f(tmp_path):
    farm = Farm(tmp_path)
    farm.connect(CLIENT, ALICE)
    farm.connect(OTHER, BOB)
    farm.connect(ADMIN_PEER, ADMIN)
    farm.connect(DAEMON_PEER, ROGUE)
    return farm


def slot(f, name, user=None):
    """A slot as the admin sees it: a task's by its id, a user's as USER/NAME."""
    key = name if user is None and name.startswith("t-") else f"{user or 'alice'}/{name}"
    (row,) = ok(f, ADMIN_PEER, p.GetCreditSlots, slots=[key]).slots
    return row


def tally(f, by, peer=ADMIN_PEER):
    return {r.key: r for r in ok(f, peer, p.GetCreditTally, by=by).rows}


def test_clamp_and_fixed_wins():
    assert clamp(50, None, 10, 20) == 20
    assert clamp(5, None, 10, 20) == 10
    assert clamp(15, None, 10, 20) == 15
    assert clamp(999, 7, 10, 20) == 7  # fixed credits win over the range
    assert task_credits(None, 0.001) == 1  # at least 1
    assert task_credits(None, 2.2) == 3  # CPU-seconds rounded up
    assert task_credits(p.CreditSpec(min=5, max=8), 2.2) == 5
    assert task_credits(p.CreditSpec(credits=40, min=5, max=8), 2.2) == 40


def test_claim_clamps_into_the_range_and_fixed_wins(f):
    ok(f, CLIENT, p.CreditAlloc, slot="r", min=10, max=20)
    ok(f, CLIENT, p.CreditAlloc, slot="x", credits=7)
    assert ok(f, JOB_PEER, p.CreditClaim, slot="r", machine="m1", credits=50).credits == 20
    assert ok(f, JOB_PEER, p.CreditClaim, slot="x", machine="m1", credits=50).credits == 7
    ok(f, CLIENT, p.CreditAlloc, slot="low", min=10, max=20)
    assert ok(f, JOB_PEER, p.CreditClaim, slot="low", machine="m1", credits=1).credits == 10
    assert slot(f, "r").state == "claimed" and slot(f, "r").machine == "m1"


def test_double_claim_and_claims_of_ended_slots_are_refused(f):
    ok(f, CLIENT, p.CreditAlloc, slot="a", credits=3)
    ok(f, JOB_PEER, p.CreditClaim, slot="a", machine="m1")
    assert "already claimed" in refused(f, JOB_PEER, p.CreditClaim, "slot_not_allocated", slot="a", machine="m2")
    ok(f, CLIENT, p.CreditAlloc, slot="d", credits=3)
    ok(f, CLIENT, p.CreditDiscard, slot="d", reason="invalid")
    assert "already discarded" in refused(f, JOB_PEER, p.CreditClaim, "slot_not_allocated", slot="d", machine="m1")
    assert slot(f, "d").reason == "invalid"
    refused(f, CLIENT, p.CreditDiscard, "slot_not_allocated", slot="d")
    refused(f, JOB_PEER, p.CreditClaim, "unknown_slot", slot="nope", machine="m1")
    refused(f, CLIENT, p.CreditCounters, "unknown_slot", slot="nope", counters={"a": 1})
    refused(f, CLIENT, p.CreditAlloc, "slot_exists", slot="a", credits=1)
    # Nothing of the first claim was lost by the refusals.
    assert tally(f, "machine")["m1"].credits == 3


def test_bad_credits_are_refused_with_the_problem_named(f):
    assert "min=5 is above max=2" in refused(f, CLIENT, p.CreditAlloc, "bad_credits", slot="b", min=5, max=2)
    ok(f, CLIENT, p.CreditAlloc, slot="open")
    assert "give credits" in refused(f, JOB_PEER, p.CreditClaim, "bad_credits", slot="open", machine="m")
    assert ok(f, JOB_PEER, p.CreditClaim, slot="open", machine="m", credits=4).credits == 4


def test_expiry(f):
    ok(f, CLIENT, p.CreditAlloc, slot="soon", credits=1, expire=60)
    ok(f, CLIENT, p.CreditAlloc, slot="later", credits=1)
    f.handle(Tick(), now=T0 + 59)
    assert slot(f, "soon").state == "allocated"
    f.handle(Tick(), now=T0 + 61)
    assert slot(f, "soon").state == "expired" and slot(f, "soon").reason == "expired"
    assert slot(f, "later").expires == pytest.approx(T0 + DEFAULT_EXPIRE)
    assert "expired" in refused(f, JOB_PEER, p.CreditClaim, "slot_not_allocated", slot="soon", machine="m")


def test_counters_are_summed_on_claim_and_meta_stays_on_the_slot(f):
    for name in ("c1", "c2"):
        ok(f, CLIENT, p.CreditAlloc, slot=name, credits=2)
        ok(f, CLIENT, p.CreditCounters, slot=name, counters={"frames": 10, "hours": 1.5})
        ok(f, CLIENT, p.CreditMeta, slot=name, meta={"scene": name})
    ok(f, CLIENT, p.CreditAlloc, slot="c3", credits=2)
    ok(f, CLIENT, p.CreditCounters, slot="c3", counters={"frames": 99})  # never claimed: not counted
    ok(f, JOB_PEER, p.CreditClaim, slot="c1", machine="m1")
    ok(f, JOB_PEER, p.CreditClaim, slot="c2", machine="m1")
    row = tally(f, "machine")["m1"]
    assert (row.credits, row.slots, row.counters) == (4, 2, {"frames": 20, "hours": 3.0})
    assert "scene" not in row.counters
    assert slot(f, "c2").meta == {"scene": "c2"} and slot(f, "c2").counters == {"frames": 10, "hours": 1.5}
    # Counters cannot change once the slot is claimed (the totals would move).
    refused(f, CLIENT, p.CreditCounters, "slot_not_allocated", slot="c1", counters={"frames": 1})


def test_pending_credits_are_paid_when_the_machine_is_linked(f):
    ok(f, CLIENT, p.CreditAlloc, slot="p1", credits=5)
    ok(f, CLIENT, p.CreditAlloc, slot="p2", credits=6)
    assert ok(f, JOB_PEER, p.CreditClaim, slot="p1", machine="volunteer-7").owner is None
    assert tally(f, "machine")["volunteer-7"].pending == 5
    assert tally(f, "owner")[None].pending == 5
    linked = ok(f, ADMIN_PEER, p.CreditLink, machine="volunteer-7", user="carol")
    assert (linked.paid_credits, linked.paid_slots) == (5, 1)
    assert tally(f, "owner")["carol"].credits == 5 and None not in tally(f, "owner")
    # Later claims go straight to the linked owner.
    assert ok(f, JOB_PEER, p.CreditClaim, slot="p2", machine="volunteer-7").owner == "carol"
    assert tally(f, "owner")["carol"].credits == 11 and tally(f, "machine")["volunteer-7"].pending == 0


def test_another_users_slot_is_an_unknown_slot(f):
    ok(f, CLIENT, p.CreditAlloc, slot="mine", credits=1)
    theirs = refused(f, OTHER, p.CreditDiscard, "unknown_slot", slot="mine")
    nothing = refused(f, OTHER, p.CreditDiscard, "unknown_slot", slot="nothing-here")
    assert theirs.replace("mine", "X") == nothing.replace("nothing-here", "X")
    refused(f, OTHER, p.CreditCounters, "unknown_slot", slot="mine", counters={"a": 1})
    refused(f, OTHER, p.CreditMeta, "unknown_slot", slot="mine", meta={"a": "b"})
    assert ok(f, OTHER, p.GetCreditSlots).slots == []
    assert slot(f, "mine").state == "allocated"


def test_a_client_claims_its_own_slots_and_only_admin_links(f):
    ok(f, CLIENT, p.CreditAlloc, slot="s", credits=1)
    refused(f, OTHER, p.CreditClaim, "unknown_slot", slot="s", machine="m")
    refused(f, CLIENT, p.CreditLink, "forbidden", machine="m", user="eve")
    assert slot(f, "s").state == "allocated"
    assert ok(f, CLIENT, p.CreditClaim, slot="s", machine="m").credits == 1
    ok(f, ADMIN_PEER, p.CreditAlloc, slot="alice/by-admin", credits=2)  # admin: USER/NAME
    assert ok(f, ADMIN_PEER, p.CreditClaim, slot="alice/by-admin", machine="m").credits == 2
    assert slot(f, "by-admin").user == "alice"
    assert tally(f, "machine", peer=CLIENT)["m"].credits == 3


def test_a_daemon_token_writes_no_slot(f):
    """Issue 18 row 2: a daemon token cannot alloc, claim, discard, count or meta."""
    ok(f, CLIENT, p.CreditAlloc, slot="theirs", credits=5)
    tid = f.submit(spec()).task_ids[0]
    for name in ("theirs", tid, "minted"):
        for msg_type, kw in ((p.CreditAlloc, {"credits": 10**12}), (p.CreditClaim, {"machine": "m", "credits": 10**12}),
                             (p.CreditDiscard, {}), (p.CreditCounters, {"counters": {"cpu_seconds": 1e12}}),
                             (p.CreditMeta, {"meta": {"a": "b"}})):
            text = refused(f, DAEMON_PEER, msg_type, "forbidden", slot=name, **kw)
            assert "daemon token cannot allocate, claim, discard, count or meta" in text
    assert slot(f, "theirs").state == "allocated" and slot(f, tid).state == "allocated"
    assert tally(f, "owner") == {}


def test_task_slots_are_the_hubs_alone(f):
    """No request touches a task's slot: its user gets ``task_slot``, another
    user the unknown answer (for alloc: a slot of its own)."""
    tid = f.submit(spec(hardware={"ram": "1TB"})).task_ids[0]
    for peer in (CLIENT, ADMIN_PEER):
        refused(f, peer, p.CreditAlloc, "task_slot", slot=tid, credits=1)
        refused(f, peer, p.CreditClaim, "task_slot", slot=tid, machine="m", credits=9)
        refused(f, peer, p.CreditDiscard, "task_slot", slot=tid)
        refused(f, peer, p.CreditCounters, "task_slot", slot=tid, counters={"cpu_seconds": 1})
        refused(f, peer, p.CreditMeta, "task_slot", slot=tid, meta={"a": "b"})
    unknown = refused(f, OTHER, p.CreditDiscard, "unknown_slot", slot="t-never")
    assert refused(f, OTHER, p.CreditDiscard, "unknown_slot", slot=tid) == unknown.replace("t-never", tid)
    ok(f, OTHER, p.CreditAlloc, slot=tid, credits=2)  # bob's own slot of that name
    assert ok(f, OTHER, p.CreditClaim, slot=tid, machine="m").credits == 2
    assert slot(f, tid).state == "allocated" and slot(f, tid, "bob").state == "claimed"
    assert slot(f, tid, "bob").task_id is None


def test_slot_names_are_per_user(f):
    """Issue 18 row 10: bob cannot squat alice's names, nor see hers."""
    ok(f, OTHER, p.CreditAlloc, slot="job-17", credits=9)
    ok(f, CLIENT, p.CreditAlloc, slot="job-17", credits=4)
    refused(f, OTHER, p.CreditAlloc, "slot_exists", slot="job-17", credits=1)
    assert ok(f, CLIENT, p.CreditClaim, slot="job-17", machine="m").credits == 4
    assert slot(f, "job-17", "bob").state == "allocated"
    assert [(r.slot, r.state) for r in ok(f, CLIENT, p.GetCreditSlots).slots] == [("job-17", "claimed")]
    assert [(r.slot, r.state) for r in ok(f, OTHER, p.GetCreditSlots).slots] == [("job-17", "allocated")]
    assert {r.slot for r in ok(f, ADMIN_PEER, p.GetCreditSlots).slots} == {"alice/job-17", "bob/job-17"}


def test_a_clients_tally_covers_its_own_slots_only(f):
    ok(f, CLIENT, p.CreditAlloc, slot="a1", credits=3)
    ok(f, OTHER, p.CreditAlloc, slot="b1", credits=4)
    ok(f, JOB_PEER, p.CreditClaim, slot="a1", machine="m")
    ok(f, OTHER, p.CreditClaim, slot="b1", machine="m")
    assert tally(f, "machine", peer=CLIENT)["m"].credits == 3
    assert tally(f, "machine", peer=OTHER)["m"].credits == 4
    assert tally(f, "machine")["m"].credits == 7
    assert set(tally(f, "user")) == {"alice", "bob"}


def run_one(f, task_spec, outcome_status="finished", **outcome):
    f.connect(DAEMON, OWNER)
    f.register("d1", "aaa")
    sub = f.submit(task_spec)
    (a,) = assigned(f.last)
    f.handle(Received(DAEMON, done(a.task_id, a.attempt, outcome_status, **outcome)), now=T0 + 10)
    return sub.task_ids[0]


def test_a_finished_task_is_claimed_for_its_machine_with_counters(f):
    tid = run_one(f, spec(), cpu_seconds=2.5, started=T0, finished=T0 + 4)
    s = slot(f, tid)
    assert (s.state, s.machine, s.owner, s.credits, s.user) == ("claimed", "d1", "owner", 3, "alice")
    assert s.counters == {"tasks": 1, "cpu_seconds": 2.5, "wall_seconds": 4.0}
    (rec,) = ask(f, CLIENT, p.GetResults, task_ids=[tid]).tasks
    assert rec.credits == 3
    (machine,) = ask(f, CLIENT, p.GetPool).machines
    assert machine.credits == 3
    assert tally(f, "owner")["owner"].credits == 3
    assert tally(f, "session")[s.session_id].credits == 3


def test_task_credits_from_dispatch_win(f):
    tid = run_one(f, spec(credits=p.CreditSpec(credits=42)), cpu_seconds=100.0)
    assert slot(f, tid).credits == 42


def test_failed_and_cancelled_tasks_are_discarded_with_the_reason(f):
    tid = run_one(f, spec(), "failed", exit_code=1, error="exit 1")
    assert (slot(f, tid).state, slot(f, tid).reason) == ("discarded", "failed")
    sub = f.submit(spec(hardware={"ram": "1TB"}))  # never runs
    assert isinstance(ask(f, CLIENT, p.Cancel, task_ids=sub.task_ids), p.Cancelled)
    assert (slot(f, sub.task_ids[0]).state, slot(f, sub.task_ids[0]).reason) == ("discarded", "cancelled")
    assert tally(f, "machine") == {}


def test_a_retried_task_is_credited_once_to_the_machine_that_finished_it(f):
    from hub_server.events import Disconnected
    f.connect(DAEMON, OWNER)
    f.register("d1", "first")
    tid = f.submit(spec()).task_ids[0]
    f.handle(Disconnected(DAEMON))  # the attempt on d1 is lost; retried
    assert slot(f, tid).state == "allocated"
    other = Principal("tok-e", "daemon", "erin")
    f.connect(DAEMON + 10, other)
    (a,) = assigned(f.register("d2", "x", peer=DAEMON + 10))
    f.handle(Received(DAEMON + 10, done(a.task_id, a.attempt, cpu_seconds=0.2)))
    f.handle(Received(DAEMON + 10, done(a.task_id, a.attempt, cpu_seconds=0.2)))  # a resend
    s = slot(f, tid)
    assert (s.state, s.machine, s.owner, s.credits) == ("claimed", "d2", "erin", 1)
    assert tally(f, "machine").keys() == {"d2"} and tally(f, "owner")["erin"].slots == 1


def test_a_task_lost_more_often_than_its_retries_is_discarded_as_lost(f):
    from hub_server.events import Disconnected
    f.connect(DAEMON, OWNER)
    f.register("d1", "first")
    tid = f.submit(spec(max_retries=0)).task_ids[0]
    f.handle(Disconnected(DAEMON))
    assert (slot(f, tid).state, slot(f, tid).reason) == ("discarded", "lost")


def test_cpu_and_gpu_seconds_are_bounded_by_the_attempts_wall_time_and_the_machines_cores(f):
    """Issue 18 row 2: 1e11 CPU-seconds reported after 10 s on a 2-core machine
    pay 20, and a machine with no GPU earns no GPU-seconds."""
    tid = run_one(f, spec(), cpu_seconds=1e11, gpu_seconds=1e11, started=T0 - 1e6, finished=T0 + 10)
    s = slot(f, tid)
    assert (s.state, s.credits) == ("claimed", 20)
    assert s.counters == {"tasks": 1, "cpu_seconds": 20.0, "wall_seconds": 10.0, "gpu_seconds": 0.0}
    assert tally(f, "owner")["owner"].credits == 20


def test_task_counters_bounds():
    from hub_server.ledger import Usage, task_counters

    out = p.TaskOutcome(status="finished", cpu_seconds=50.0, gpu_seconds=9.0, started=100.0, finished=130.0)
    assert task_counters(out, None) == {"tasks": 1, "cpu_seconds": 50.0, "wall_seconds": 30.0, "gpu_seconds": 9.0}
    assert task_counters(out, Usage(wall=20.0, cores=2, gpus=0)) == {
        "tasks": 1, "cpu_seconds": 40.0, "wall_seconds": 20.0, "gpu_seconds": 0.0}
    assert task_counters(out, Usage(wall=100.0, cores=4, gpus=1)) == {
        "tasks": 1, "cpu_seconds": 50.0, "wall_seconds": 30.0, "gpu_seconds": 9.0}
    assert task_counters(p.TaskOutcome(status="finished"), Usage(wall=1.0, cores=1)) == {"tasks": 1}
    assert task_counters(None, None) == {"tasks": 1}


def test_a_refused_result_ends_its_attempt_and_the_task_runs_again(f):
    """A result that failed validation (ResultsRefused, from the server) is not
    a stuck task: the attempt is lost, the task retried on another machine,
    the daemon told which field was wrong; a stale or foreign pair is ignored."""
    from hub_server.events import ResultsRefused

    f.connect(DAEMON, OWNER)
    f.register("d1", "first")
    tid = f.submit(spec()).task_ids[0]
    (a,) = assigned(f.last)
    problem = "invalid message: Expected `float` <= 1000000000000.0 - at `$.outcome.cpu_seconds`"
    out = f.handle(ResultsRefused(DAEMON, 77, ((tid, a.attempt), ("t-not-mine", 1)), problem))
    assert Send(DAEMON, p.Error(id=77, code="bad_message", message=problem)) in out
    (rec,) = ask(f, CLIENT, p.GetResults, task_ids=[tid]).tasks
    assert rec.status == "queued" and [(x.state, x.machine) for x in rec.attempts] == [("lost", "d1")]
    assert "result refused" in rec.attempts[0].reason and "cpu_seconds" in rec.attempts[0].reason
    assert slot(f, tid).state == "allocated"
    other = Principal("tok-e", "daemon", "erin")
    f.connect(DAEMON + 10, other)
    (b,) = assigned(f.register("d2", "x", peer=DAEMON + 10))
    assert (b.task_id, b.attempt) == (tid, 2)
    f.handle(Received(DAEMON + 10, done(b.task_id, b.attempt, cpu_seconds=0.5)), now=T0 + 5)
    s = slot(f, tid)
    assert (s.state, s.machine, s.owner, s.credits) == ("claimed", "d2", "erin", 1)

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
JOBMGR = Principal("tok-j", "daemon", "jobs")
ADMIN_PEER, JOB_PEER = 4, 5


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
    farm.connect(JOB_PEER, JOBMGR)
    return farm


def slot(f, name):
    (row,) = ok(f, ADMIN_PEER, p.GetCreditSlots, slots=[name]).slots
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


def test_only_admin_and_daemons_claim_and_only_admin_links(f):
    ok(f, CLIENT, p.CreditAlloc, slot="s", credits=1)
    refused(f, CLIENT, p.CreditClaim, "forbidden", slot="s", machine="m")
    refused(f, JOB_PEER, p.CreditLink, "forbidden", machine="m", user="eve")
    refused(f, CLIENT, p.CreditLink, "forbidden", machine="m", user="eve")
    assert slot(f, "s").state == "allocated"


def test_a_clients_tally_covers_its_own_slots_only(f):
    ok(f, CLIENT, p.CreditAlloc, slot="a1", credits=3)
    ok(f, OTHER, p.CreditAlloc, slot="b1", credits=4)
    ok(f, JOB_PEER, p.CreditClaim, slot="a1", machine="m")
    ok(f, JOB_PEER, p.CreditClaim, slot="b1", machine="m")
    assert tally(f, "machine", peer=CLIENT)["m"].credits == 3
    assert tally(f, "machine", peer=OTHER)["m"].credits == 4
    assert tally(f, "machine")["m"].credits == 7
    assert set(tally(f, "user")) == {"alice", "bob"}


def run_one(f, task_spec, outcome_status="finished", **outcome):
    f.connect(DAEMON, OWNER)
    f.register("d1", "aaa")
    sub = f.submit(task_spec)
    (a,) = assigned(f.last)
    f.handle(Received(DAEMON, done(a.task_id, a.attempt, outcome_status, **outcome)))
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

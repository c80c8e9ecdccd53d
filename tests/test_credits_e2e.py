"""The credit ledger end to end: a real hub and daemons of different owners,
requests over real websockets (``hub_server.link.Link``)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import pytest

from hub_server import protocol as p
from hub_server.link import Link, RemoteError
from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync

pytestmark = pytest.mark.e2e


def ask(cluster: LocalCluster, token: str, make) -> Any:
    async def go():
        link = Link(cluster.address, token, agent="test")
        await link.connect()
        try:
            return await link.request(make(link.next_id()), timeout=60)
        finally:
            await link.close()
    return asyncio.run(go())


def tally(c, by, token=None):
    return {r.key: r for r in ask(c, token or c.admin_token, lambda i: p.GetCreditTally(id=i, by=by)).rows}


def slots(c, token=None, **kw):
    return ask(c, token or c.admin_token, lambda i: p.GetCreditSlots(id=i, **kw)).slots


def records(c, ids):
    out = []
    for i in range(0, len(ids), 500):
        part = list(ids[i:i + 500])
        out += ask(c, c.admin_token, lambda r: p.GetResults(id=r, task_ids=part)).tasks
    return out


@pytest.fixture(scope="module")
def farm():
    with LocalCluster(daemons=0, slots=2) as c:
        c.add_daemon("ann-box", token=c.create_token("daemon", "ann"))
        c.add_daemon("ben-box", token=c.create_token("daemon", "ben"))
        yield c


def test_tallies_equal_the_claimed_slots_and_the_task_credits(farm):
    c = farm
    hub = c.hub()
    ok = dispatch_sync(Task(Stage("s", cmd="true")), hub, repeat=80)
    bad = dispatch_sync(Task(Stage("s", cmd="exit 3")), hub, repeat=10)
    slow = dispatch_sync(Task(Stage("s", cmd="sleep 30")), hub, repeat=10)
    hub.get_result_sync(list(ok) + list(bad), wait=True, timeout=120)
    hub.cancel_sync(list(slow))
    recs = {r.task_id: r for r in records(c, list(ok) + list(bad) + list(slow))}
    assert all(recs[t].status == "finished" and recs[t].credits >= 1 for t in ok)
    assert all(recs[t].status == "failed" and recs[t].credits is None for t in bad)
    assert all(recs[t].status == "cancelled" and recs[t].credits is None for t in slow)

    claimed = [s for s in slots(c) if s.state == "claimed"]
    assert {s.slot for s in claimed} >= set(ok)
    mine = [s for s in claimed if s.slot in recs]
    by_machine, by_owner = tally(c, "machine"), tally(c, "owner")
    for key, field in ((by_machine, "machine"), (by_owner, "owner")):
        for name, row in key.items():
            assert row.credits == sum(s.credits for s in claimed if getattr(s, field) == name)
    assert set(by_owner) >= {"ann", "ben"}  # both daemons worked
    assert by_machine["ann-box"].counters["tasks"] + by_machine["ben-box"].counters["tasks"] == len(claimed)
    user = tally(c, "user")[c.user]
    assert user.credits == sum(s.credits for s in claimed if s.user == c.user)
    assert sum(recs[t].credits for t in ok) == sum(s.credits for s in mine)
    reasons = {s.slot: s.reason for s in slots(c, state="discarded")}
    assert all(reasons[t] == "failed" for t in bad) and all(reasons[t] == "cancelled" for t in slow)
    pool = {m.name: m for m in ask(c, c.token, lambda i: p.GetPool(id=i)).machines}
    assert pool["ann-box"].credits == by_machine["ann-box"].credits
    hub.close_sync()


def test_a_task_retried_after_kill_9_is_credited_once(farm):
    c = farm
    hub = c.hub()
    vic = c.create_token("daemon", "vic")
    victim = c.add_daemon("victim", token=vic, slots=1)
    ids = dispatch_sync(Task(Stage("s", cmd="sleep 2"), hardware={"daemon": victim}), hub, max_retries=3)
    deadline = time.monotonic() + 30
    while hub.get_result_sync(ids)[0].status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c.stop_daemon(victim, signal.SIGKILL)
    c.add_daemon(victim, token=vic, slots=1)  # the machine comes back (a new daemon process)
    (r,) = hub.get_result_sync(ids, wait=True, timeout=60)
    assert r.status == "finished" and len(r.attempts) == 2
    (s,) = slots(c, slots=list(ids))
    assert (s.state, s.machine, s.counters["tasks"]) == ("claimed", victim, 1)
    assert tally(c, "machine")[victim].slots == 1
    hub.close_sync()


def test_four_clients_allocating_and_claiming_at_once_leave_exact_totals(farm):
    c = farm
    users = [f"u{i}" for i in range(4)]
    tokens = [c.create_token("client", u) for u in users]
    per_user = 250

    async def one(token: str, u: str) -> int:
        # each user's job manager claims that user's own slots, on a second connection
        client, daemon = Link(c.address, token), Link(c.address, token)
        await client.connect()
        await daemon.connect()
        total = 0
        try:
            for i in range(per_user):
                slot = f"{u}-{i}"
                await client.request(p.CreditAlloc(id=client.next_id(), slot=slot, min=1, max=10))
                claim = await daemon.request(p.CreditClaim(id=daemon.next_id(), slot=slot, machine=f"m{i % 3}",
                                                           credits=i % 13))
                total += claim.credits
        finally:
            await client.close()
            await daemon.close()
        return total

    async def all_at_once():
        return await asyncio.gather(*(one(t, u) for t, u in zip(tokens, users)))

    totals = asyncio.run(all_at_once())
    by_user = tally(c, "user")
    for u, total in zip(users, totals):
        assert by_user[u].credits == total and by_user[u].slots == per_user
    assert sum(r.credits for k, r in tally(c, "machine").items() if k in ("m0", "m1", "m2")) == sum(totals)
    assert by_user["u0"].pending == by_user["u0"].credits  # m0..m2 have no owner yet
    linked = ask(c, c.admin_token, lambda i: p.CreditLink(id=i, machine="m0", user="zoe"))
    assert linked.paid_credits == tally(c, "owner")["zoe"].credits > 0


def test_attacks_are_refused_and_leave_the_ledger_alone(farm):
    c = farm
    alice, bob = c.create_token("client", "alice-a"), c.create_token("client", "bob-a")
    ask(c, alice, lambda i: p.CreditAlloc(id=i, slot="alice-slot", credits=5))
    with pytest.raises(RemoteError, match="daemon token cannot allocate, claim"):
        ask(c, c.daemon_token, lambda i: p.CreditClaim(id=i, slot="alice-slot", machine="m"))
    with pytest.raises(RemoteError, match="unknown slot 'alice-slot'"):
        ask(c, bob, lambda i: p.CreditDiscard(id=i, slot="alice-slot"))
    with pytest.raises(RemoteError, match="unknown slot 'alice-slot'"):
        ask(c, bob, lambda i: p.CreditClaim(id=i, slot="alice-slot", machine="m"))
    with pytest.raises(RemoteError, match="link|forbidden|not allowed"):
        ask(c, alice, lambda i: p.CreditLink(id=i, machine="ann-box", user="alice-a"))
    with pytest.raises(RemoteError, match="min=9 is above max=2"):
        ask(c, alice, lambda i: p.CreditAlloc(id=i, slot="bad", min=9, max=2))
    with pytest.raises(RemoteError, match="credits"):
        ask(c, alice, lambda i: p.CreditAlloc(id=i, slot="neg", credits=-1))
    with pytest.raises(RemoteError, match="counters"):
        ask(c, alice, lambda i: p.CreditCounters(id=i, slot="alice-slot", counters={"x": 10**18}))
    (s,) = slots(c, slots=["alice-a/alice-slot"])  # an admin names a user's slot USER/NAME
    assert (s.state, s.credits, s.counters) == ("allocated", 5, {})
    assert slots(c, token=bob) == [] or all(x.user == "bob-a" for x in slots(c, token=bob))


def test_hub_sigkill_mid_run_loses_and_doubles_no_credit(tmp_path):
    with LocalCluster(daemons=2, slots=2, state_dir=tmp_path / "farm") as c:
        hub = c.hub()
        ids = dispatch_sync(Task(Stage("s", cmd="sleep 0.05")), hub, repeat=300)
        deadline = time.monotonic() + 60
        while sum(r.done for r in hub.get_result_sync(list(ids))) < 40:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c.hub_process.kill()
        c.hub_process.wait()
        c.restart_hub()
        hub2 = c.hub()
        res = hub2.get_result_sync(list(ids), wait=True, timeout=180)
        assert all(r.status == "finished" for r in res)
        claimed = {s.slot: s for s in slots(c, state="claimed", limit=1000)}
        assert set(claimed) == set(ids)  # every finished task claimed exactly once (slot id = task id)
        recs = records(c, list(ids))
        assert sum(r.credits for r in recs) == sum(s.credits for s in claimed.values())
        assert sum(r.slots for r in tally(c, "machine").values()) == len(ids)
        assert sum(r.counters["tasks"] for r in tally(c, "machine").values()) == len(ids)
        hub.close_sync()
        hub2.close_sync()

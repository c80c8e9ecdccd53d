"""The credit ledger's rules (CreditPiggy's slots), over the hub's store.

A slot is allocated with fixed ``credits`` or a ``min``/``max`` range, then
ends exactly once: ``claimed`` by a machine (credits clamped into the range;
fixed credits win), ``discarded`` with a reason, or ``expired``.  Counters
set on a slot are summed into tallies when it is claimed; meta stays on the
slot.  A claim records the machine's owner at that moment; with no owner the
credits are *pending* until the machine is linked to a user, which pays them.

Credits come only from work done.  A task's slot (slot id = task id) is
settled by the hub alone, in the transaction that ends the task, from the
result of the attempt it assigned; CPU- and GPU-seconds are bounded there
by the attempt's wall time (as the hub saw it) x the machine's cores or
GPUs, whatever the daemon reported.  No request touches a task's slot.

A user's own slots (CreditPiggy job managers) are named per user: the
store keys them ``USER/NAME`` (user names hold no ``/``; task ids neither),
so user-b's ``job-17`` is not user-a's.  A client addresses its slots by
NAME and may alloc, claim, discard, count and meta them; an admin addresses
any user's as ``USER/NAME``.  Another user's slot or task id answers
exactly as a never-used name (``unknown_slot``, or a new slot for alloc).

Tallies are computed from claimed slots, so a total can never drift from the
claims it sums.  Every change runs inside the hub's batch transaction: a
crash loses or doubles nothing.  No I/O here but the store; no clock (``now``
is passed in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import protocol as p
from .auth import Principal
from .requests import RequestError
from .store import Store

DEFAULT_EXPIRE = 24 * 3600.0
SLOT_STATES = ("allocated", "claimed", "discarded", "expired")


def check_range(credits: Optional[int], lo: Optional[int], hi: Optional[int], where: str) -> None:
    """Fixed credits, or a min/max range with min <= max (fixed wins when both)."""
    if credits is None and lo is not None and hi is not None and lo > hi:
        raise RequestError("bad_credits", f"{where}: min={lo} is above max={hi}")


def clamp(value: int, credits: Optional[int], lo: Optional[int], hi: Optional[int]) -> int:
    """The credits a claim gives: fixed wins, else ``value`` within [lo, hi]."""
    if credits is not None:
        return credits
    if lo is not None:
        value = max(value, lo)
    if hi is not None:
        value = min(value, hi)
    return value


@dataclass(frozen=True)
class Usage:
    """What the hub itself knows of an attempt: it bounds what the daemon reports."""

    wall: float  # seconds from the hub's assignment to the result's arrival
    cores: int  # the machine's logical cores
    gpus: int = 0


def task_counters(outcome: Optional[p.TaskOutcome], usage: Optional[Usage]) -> dict[str, float]:
    """A finished task's counters: the daemon's numbers (finite and >= 0 since
    decoding), each capped by what the attempt could have used: CPU-seconds by
    wall x cores, GPU-seconds by wall x GPUs, wall-seconds by the wall time."""
    counters: dict[str, float] = {"tasks": 1}
    if outcome is None:
        return counters
    cpu, gpu = outcome.cpu_seconds, outcome.gpu_seconds
    wall = None
    if outcome.started is not None and outcome.finished is not None:
        wall = max(0.0, outcome.finished - outcome.started)
    if usage is not None:
        limit = max(0.0, usage.wall)
        cpu = None if cpu is None else min(cpu, limit * max(1, usage.cores))
        gpu = None if gpu is None else min(gpu, limit * usage.gpus)
        wall = None if wall is None else min(wall, limit)
    for name, value in (("cpu_seconds", cpu), ("wall_seconds", wall), ("gpu_seconds", gpu)):
        if value is not None:
            counters[name] = round(value, 3)
    return counters


def display_name(key: str, task_id: Optional[str], who: Principal) -> str:
    """The id ``who`` addresses a stored slot by: a task's id; a user slot's
    NAME for its user, ``USER/NAME`` for an admin."""
    if task_id is not None or who.is_admin:
        return key
    return key.split("/", 1)[-1]


def task_credits(spec: Optional[p.CreditSpec], cpu_seconds: Optional[float]) -> int:
    """A finished task's credits: fixed, else its CPU-seconds rounded up (>= 1),
    clamped into the task's range."""
    measured = max(1, math.ceil(cpu_seconds or 0.0))
    if spec is None:
        return measured
    return clamp(measured, spec.credits, spec.min, spec.max)


class Ledger:
    """Credit slots: allocation, claims, discards, counters, meta, links, tallies."""

    def __init__(self, store: Store, owner_of: Callable[[str], Optional[str]]) -> None:
        self.store = store
        # The owner HWF knows for a machine id (its daemon token's owner), if any.
        self._owner_of = owner_of
        self._next_expiry: Optional[float] = store.next_credit_expiry()

    # -- requests -----------------------------------------------------------

    def alloc(self, msg: p.CreditAlloc, who: Principal, now: float) -> None:
        check_range(msg.credits, msg.min, msg.max, f"slot {msg.slot!r}")
        self._refuse_task_slot(msg.slot, who)
        key = self._key(msg.slot, who)
        if self.store.credit_slot(key) is not None:
            raise RequestError("slot_exists", f"slot {msg.slot!r} already exists")
        expires = now + (msg.expire if msg.expire is not None else DEFAULT_EXPIRE)
        user = key.split("/", 1)[0]
        self.store.add_credit_slots([(key, user, None, None, msg.credits, msg.min, msg.max, now, expires)])
        self._note_expiry(expires)

    def discard(self, msg: p.CreditDiscard, who: Principal, now: float) -> None:
        row = self._allocated(self._own(msg.slot, who))
        self.store.end_credit_slot(row["slot"], "discarded", msg.reason or "discarded", now)

    def counters(self, msg: p.CreditCounters, who: Principal) -> None:
        row = self._allocated(self._own(msg.slot, who))
        self.store.set_credit_counters(row["slot"], dict(msg.counters))

    def meta(self, msg: p.CreditMeta, who: Principal) -> None:
        row = self._own(msg.slot, who)  # meta is kept on the slot, whatever its state
        self.store.set_credit_meta(row["slot"], dict(msg.meta))

    def claim(self, msg: p.CreditClaim, who: Principal, now: float) -> p.CreditClaimed:
        row = self._allocated(self._own(msg.slot, who))
        if row["credits"] is None and row["min"] is None and row["max"] is None and msg.credits is None:
            raise RequestError("bad_credits", f"slot {msg.slot!r} has no credits: give credits in the claim")
        credits = clamp(msg.credits or 0, row["credits"], row["min"], row["max"])
        owner = self.owner(msg.machine)
        self.store.claim_credit_slot(row["slot"], msg.machine, credits, owner, now, {})
        return p.CreditClaimed(id=msg.id, slot=msg.slot, credits=credits, owner=owner)

    def link(self, msg: p.CreditLink, now: float) -> p.CreditLinked:
        credits, slots = self.store.link_credit_machine(msg.machine, msg.user, now)
        return p.CreditLinked(id=msg.id, machine=msg.machine, user=msg.user,
                              paid_credits=credits, paid_slots=slots)

    def tally(self, msg: p.GetCreditTally, who: Principal) -> p.CreditTally:
        rows = self.store.credit_tally(msg.by, user=None if who.is_admin else who.user)
        rows.sort(key=lambda r: (-r["credits"], str(r["key"])))
        return p.CreditTally(id=msg.id, by=msg.by, rows=[p.CreditTallyRow(**r) for r in rows])

    def slots(self, msg: p.GetCreditSlots, who: Principal) -> p.CreditSlots:
        keys = [k for name in msg.slots for k in (name, self._key(name, who))]
        rows = self.store.credit_slots(
            user=None if who.is_admin else who.user, state=msg.state, session_id=msg.session_id,
            machine=msg.machine, slots=list(dict.fromkeys(keys)), limit=msg.limit)
        for r in rows:  # each slot under the id its viewer addresses it by
            r["slot"] = display_name(r["slot"], r["task_id"], who)
        return p.CreditSlots(id=msg.id, slots=[p.CreditSlotInfo(**r) for r in rows])

    # -- the farm's own tasks -----------------------------------------------

    def open_task_slots(self, rows: list[tuple[str, str, str, Optional[p.CreditSpec]]], now: float) -> None:
        """One slot per submitted task (slot id = task id); resolved when the task ends."""
        self.store.add_credit_slots(
            (tid, user, session_id, tid, *(_spec_tuple(spec)), now, None)
            for tid, user, session_id, spec in rows)

    def settle_task(self, task_id: str, status: str, reason: Optional[str], machine: Optional[str],
                    spec: Optional[p.CreditSpec], outcome: Optional[p.TaskOutcome], now: float,
                    usage: Optional["Usage"] = None) -> None:
        """Claim a finished task's slot for its machine, or discard it with why.
        The only way a task's slot ends.  ``usage``: what the hub knows of the
        attempt (its wall time, the machine's cores and GPUs), which bounds
        what the daemon reported.  One guarded UPDATE, no read first (this
        runs for every task): a slot that is missing (a task from before the
        ledger) or already settled is left alone."""
        if status == "finished" and machine is not None:
            counters = task_counters(outcome, usage)
            credits = task_credits(spec, counters.get("cpu_seconds"))
            self.store.claim_credit_slot(task_id, machine, credits, self.owner(machine), now, counters)
        else:
            why = "cancelled" if status == "cancelled" else (reason if reason in ("timeout", "lost") else "failed")
            self.store.end_credit_slot(task_id, "discarded", why, now)

    def validate_tasks(self, active: set[str]) -> None:
        """Invariant (HubCore.validate_state): a task's slot stays allocated
        while the task is unfinished and is settled when it ends -- so it
        cannot be settled twice."""
        open_slots = {r["task_id"] for r in self.store.credit_slots(state="allocated", limit=1 << 30) if r["task_id"]}
        if open_slots - active:
            raise AssertionError(f"ledger invariant broken: ended tasks with open slots {sorted(open_slots - active)[:5]}")
        settled = {r["task_id"] for r in self.store.credit_slots(slots=sorted(active), limit=1 << 30)
                   if r["task_id"] and r["state"] != "allocated"} if active else set()
        if settled:
            raise AssertionError(f"ledger invariant broken: unfinished tasks with settled slots {sorted(settled)[:5]}")

    def expire(self, now: float) -> int:
        """Allocated slots past their expiry become ``expired`` (cheap when none is due)."""
        if self._next_expiry is None or self._next_expiry > now:
            return 0
        n = self.store.expire_credit_slots(now)
        self._next_expiry = self.store.next_credit_expiry()
        return n

    def owner(self, machine: str) -> Optional[str]:
        return self.store.credit_link(machine) or self._owner_of(machine) or None

    # -- helpers ------------------------------------------------------------

    @staticmethod
    def _key(name: str, who: Principal) -> str:
        """Where a user slot's NAME is stored: ``USER/NAME``; an admin's
        ``USER/NAME`` is that user's slot."""
        return name if who.is_admin and "/" in name else f"{who.user}/{name}"

    def _own(self, name: str, who: Principal) -> Any:
        """The caller's user slot called ``name``; a task's slot is refused; anything
        else (another user's slot or task id, a never-used name) is unknown."""
        row = self.store.credit_slot(self._key(name, who))
        if row is not None and row["task_id"] is None and (who.is_admin or row["user"] == who.user):
            return row
        self._refuse_task_slot(name, who)
        raise RequestError("unknown_slot", f"unknown slot {name!r}")  # same words either way

    def _refuse_task_slot(self, name: str, who: Principal) -> None:
        row = self.store.credit_slot(name)
        if row is not None and row["task_id"] is not None and (who.is_admin or row["user"] == who.user):
            raise RequestError("task_slot", f"slot {name!r} is task {name}'s: only the hub settles it, "
                                            "from the task's result (use another name for your own slot)")

    @staticmethod
    def _allocated(row: Any) -> Any:
        if row["state"] != "allocated":
            name = row["slot"].split("/", 1)[-1]
            raise RequestError("slot_not_allocated", f"slot {name!r} is already {row['state']}")
        return row

    def _note_expiry(self, at: float) -> None:
        if self._next_expiry is None or at < self._next_expiry:
            self._next_expiry = at


def _spec_tuple(spec: Optional[p.CreditSpec]) -> tuple[Optional[int], Optional[int], Optional[int]]:
    if spec is None:
        return None, None, None
    return spec.credits, spec.min, spec.max

"""The credit ledger's rules (CreditPiggy's slots), over the hub's store.

A slot is allocated with fixed ``credits`` or a ``min``/``max`` range, then
ends exactly once: ``claimed`` by a machine (credits clamped into the range;
fixed credits win), ``discarded`` with a reason, or ``expired``.  Counters
set on a slot are summed into tallies when it is claimed; meta stays on the
slot.  A claim records the machine's owner at that moment; with no owner the
credits are *pending* until the machine is linked to a user, which pays them.

Tallies are computed from claimed slots, so a total can never drift from the
claims it sums.  Every change runs inside the hub's batch transaction: a
crash loses or doubles nothing.  No I/O here but the store; no clock (``now``
is passed in).
"""

from __future__ import annotations

import math
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
        if self.store.credit_slot(msg.slot) is not None:
            # Slot ids are one namespace per hub (one CreditPiggy project).
            raise RequestError("slot_exists", f"slot {msg.slot!r} already exists")
        expires = now + (msg.expire if msg.expire is not None else DEFAULT_EXPIRE)
        self.store.add_credit_slots([(msg.slot, who.user, None, None, msg.credits, msg.min, msg.max, now, expires)])
        self._note_expiry(expires)

    def discard(self, msg: p.CreditDiscard, who: Principal, now: float) -> None:
        self._allocated(self._own(msg.slot, who))
        self.store.end_credit_slot(msg.slot, "discarded", msg.reason or "discarded", now)

    def counters(self, msg: p.CreditCounters, who: Principal) -> None:
        self._allocated(self._own(msg.slot, who))
        self.store.set_credit_counters(msg.slot, dict(msg.counters))

    def meta(self, msg: p.CreditMeta, who: Principal) -> None:
        self._own(msg.slot, who)  # meta is kept on the slot, whatever its state
        self.store.set_credit_meta(msg.slot, dict(msg.meta))

    def claim(self, msg: p.CreditClaim, now: float) -> p.CreditClaimed:
        row = self.store.credit_slot(msg.slot)
        if row is None:
            raise RequestError("unknown_slot", f"unknown slot {msg.slot!r}")
        self._allocated(row)
        if row["credits"] is None and row["min"] is None and row["max"] is None and msg.credits is None:
            raise RequestError("bad_credits", f"slot {msg.slot!r} has no credits: give credits in the claim")
        credits = clamp(msg.credits or 0, row["credits"], row["min"], row["max"])
        owner = self.owner(msg.machine)
        self.store.claim_credit_slot(msg.slot, msg.machine, credits, owner, now, {})
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
        rows = self.store.credit_slots(
            user=None if who.is_admin else who.user, state=msg.state, session_id=msg.session_id,
            machine=msg.machine, slots=msg.slots, limit=msg.limit)
        return p.CreditSlots(id=msg.id, slots=[p.CreditSlotInfo(**r) for r in rows])

    # -- the farm's own tasks -----------------------------------------------

    def open_task_slots(self, rows: list[tuple[str, str, str, Optional[p.CreditSpec]]], now: float) -> None:
        """One slot per submitted task (slot id = task id); resolved when the task ends."""
        self.store.add_credit_slots(
            (tid, user, session_id, tid, *(_spec_tuple(spec)), now, None)
            for tid, user, session_id, spec in rows)

    def settle_task(self, task_id: str, status: str, reason: Optional[str], machine: Optional[str],
                    spec: Optional[p.CreditSpec], outcome: Optional[p.TaskOutcome], now: float) -> None:
        """Claim a finished task's slot for its machine, or discard it with why.
        One guarded UPDATE, no read first (this runs for every task): a slot that
        is missing (a task from before the ledger) or already settled is left alone."""
        if status == "finished" and machine is not None:
            cpu = outcome.cpu_seconds if outcome else None
            counters: dict[str, float] = {"tasks": 1}
            if cpu is not None:
                counters["cpu_seconds"] = round(cpu, 3)
            if outcome is not None and outcome.started and outcome.finished:
                counters["wall_seconds"] = round(max(0.0, outcome.finished - outcome.started), 3)
            if outcome is not None and outcome.gpu_seconds is not None:
                counters["gpu_seconds"] = round(outcome.gpu_seconds, 3)
            self.store.claim_credit_slot(task_id, machine, task_credits(spec, cpu), self.owner(machine), now, counters)
        else:
            why = "cancelled" if status == "cancelled" else (reason if reason in ("timeout", "lost") else "failed")
            self.store.end_credit_slot(task_id, "discarded", why, now)

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

    def _own(self, slot: str, who: Principal) -> Any:
        row = self.store.credit_slot(slot)
        if row is None or not (who.is_admin or row["user"] == who.user):
            raise RequestError("unknown_slot", f"unknown slot {slot!r}")  # same words either way
        return row

    @staticmethod
    def _allocated(row: Any) -> None:
        if row["state"] != "allocated":
            raise RequestError("slot_not_allocated", f"slot {row['slot']!r} is already {row['state']}")

    def _note_expiry(self, at: float) -> None:
        if self._next_expiry is None or at < self._next_expiry:
            self._next_expiry = at


def _spec_tuple(spec: Optional[p.CreditSpec]) -> tuple[Optional[int], Optional[int], Optional[int]]:
    if spec is None:
        return None, None, None
    return spec.credits, spec.min, spec.max

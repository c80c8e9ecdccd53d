"""Matches queued tasks to free daemon slots.  Sans-I/O: no sockets, no clock.

Queued tasks are grouped by requirement (equal hardware dicts and equal
excluded machines share a group); inside a group each user has a heap
ordered by priority (high first) then submission order.  ``schedule()``
repeatedly takes the machine with the most free slots and gives it the best
task among the groups it matches, so work spreads over daemons.

"Best" is: higher priority first; at equal priority, the user with the
fewest tasks running now (fair share, as HTCondor's user priorities do over
time), then submission order.  So one user's 10,000 queued tasks do not keep
another user's single task waiting: it takes the next free slot.

Short tasks (``prefetch=True``: Python calls on warm workers) may also
take a machine's ``extra`` places: assigned beyond its slots, they wait on
the daemon for a slot and start the moment one frees, instead of after a
round trip to the hub (what caps trivial tasks, as dask's workers keep a
few tasks queued).  Other tasks take real slots only, and a machine's real
free slots go before its extra places.

Matching is cached per (group, machine), so the cost per assignment is the
number of (group, user) heads, not the queue length.  A pass is
all-or-nothing: if anything in it fails, every task taken goes back and every
slot is freed before the error propagates.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from . import hardware as hw

log = logging.getLogger("hwf.scheduler")


@dataclass
class _Machine:
    machine_id: str
    facts: dict[str, Any]  # hardware plus name, machine_id, tags
    slots: int
    busy: int = 0
    accepting: bool = True
    extra: int = 0  # places for prefetched tasks, beyond the slots

    @property
    def free(self) -> int:
        return self.slots - self.busy if self.accepting else 0

    def free_for(self, prefetch: bool) -> int:
        if not self.accepting:
            return 0
        return self.slots + (self.extra if prefetch else 0) - self.busy

    def rank(self) -> tuple[int, int]:
        """Heap key: most free slots first, then most free places."""
        return (-self.free, -self.free_for(True))


@dataclass
class _Group:
    req: dict[str, Any]
    excluded: frozenset[str]
    prefetch: bool = False
    heaps: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)  # by user
    live: int = 0


class Scheduler:
    def __init__(self) -> None:
        self._machines: dict[str, _Machine] = {}
        self._groups: dict[tuple, _Group] = {}
        self._task_group: dict[str, tuple] = {}
        self._match_cache: dict[tuple[tuple, str], bool] = {}
        self._seq = itertools.count()
        self._user_of: dict[str, str] = {}  # queued or assigned task -> user
        self._running: Counter[str] = Counter()  # user -> tasks assigned and not done

    # -- machines -----------------------------------------------------------

    def add_machine(
        self,
        machine_id: str,
        hardware: Mapping[str, Any],
        slots: int,
        *,
        name: str = "",
        tags: list[str] | None = None,
        busy: int = 0,
        instance_key: str | None = None,
        extra: int = 0,
    ) -> None:
        facts = dict(hardware)
        facts.update(machine_id=machine_id, name=name or machine_id, tags=list(tags or []),
                     instance_key=instance_key or machine_id)
        self._machines[machine_id] = _Machine(machine_id, facts, slots, busy, extra=max(0, extra))
        self._forget_matches(machine_id)

    def remove_machine(self, machine_id: str) -> None:
        self._machines.pop(machine_id, None)
        self._forget_matches(machine_id)

    def set_accepting(self, machine_id: str, accepting: bool) -> None:
        m = self._machines.get(machine_id)
        if m:
            m.accepting = accepting

    def release(self, machine_id: str) -> None:
        """A slot on this machine became free."""
        m = self._machines.get(machine_id)
        if m and m.busy > 0:
            m.busy -= 1

    def machines(self) -> list[str]:
        return list(self._machines)

    def done(self, task_id: str) -> None:
        """An assigned task left its slot (ended, lost or cancelled): its
        user's fair-share count drops.  Freeing the slot is ``release``."""
        user = self._user_of.pop(task_id, None)
        if user is not None and task_id not in self._task_group:
            self._running[user] -= 1
            if self._running[user] <= 0:
                del self._running[user]

    def running_by_user(self) -> dict[str, int]:
        return dict(self._running)

    def note_assigned(self, task_id: str, user: str) -> None:
        """A task assigned before a restart counts for its user's fair share
        again (``done`` takes it off when it ends)."""
        if task_id not in self._user_of and task_id not in self._task_group:
            self._user_of[task_id] = user
            self._running[user] += 1

    def busy(self) -> dict[str, int]:
        """Busy slots per machine (for HubCore.validate_state)."""
        return {mid: m.busy for mid, m in self._machines.items()}

    def queued_ids(self) -> set[str]:
        return set(self._task_group)

    def _forget_matches(self, machine_id: str) -> None:
        for key in [k for k in self._match_cache if k[1] == machine_id]:
            del self._match_cache[key]

    # -- tasks --------------------------------------------------------------

    def enqueue(
        self,
        task_id: str,
        requirements: Mapping[str, Any],
        priority: int = 0,
        *,
        exclude: frozenset[str] | set[str] = frozenset(),
        order: Optional[int] = None,
        user: str = "",
        prefetch: bool = False,
    ) -> None:
        """Queue a task. ``requirements`` must already be hw.normalize()d;
        ``prefetch``: it may wait on a daemon for a slot (a short task)."""
        self.done(task_id)  # a requeued task no longer counts as running
        excluded = frozenset(exclude)
        gkey = (hw.canonical_key(requirements), excluded, prefetch)
        group = self._groups.get(gkey)
        if group is None:
            group = self._groups[gkey] = _Group(dict(requirements), excluded, prefetch)
        seq = next(self._seq) if order is None else order
        heapq.heappush(group.heaps.setdefault(user, []), (-priority, seq, task_id))
        group.live += 1
        self._task_group[task_id] = gkey
        self._user_of[task_id] = user

    def remove(self, task_id: str) -> bool:
        """Take a task out: a queued one leaves the queue (False if it was not
        queued); an assigned one stops counting for its user's fair share."""
        gkey = self._task_group.pop(task_id, None)
        if gkey is None:
            self.done(task_id)
            return False
        self._user_of.pop(task_id, None)
        self._groups[gkey].live -= 1  # its heap entry is skipped lazily
        return True

    def is_queued(self, task_id: str) -> bool:
        return task_id in self._task_group

    def queued_count(self) -> int:
        return len(self._task_group)

    def _matches(self, gkey: tuple, group: _Group, m: _Machine) -> bool:
        ck = (gkey, m.machine_id)
        hit = self._match_cache.get(ck)
        if hit is None:
            try:
                hit = m.facts["instance_key"] not in group.excluded and hw.matches(group.req, m.facts)
            except Exception:  # odd facts from a daemon: it matches nothing, others go on
                log.exception("matching %s against machine %s failed", group.req, m.machine_id)
                hit = False
            self._match_cache[ck] = hit
        return hit

    def _best_head(self, gkey: tuple, group: _Group) -> Optional[tuple[tuple[int, int, int], str]]:
        """The group's next task: ((-priority, user's running count, seq), user)."""
        best = None
        for user, heap in list(group.heaps.items()):
            while heap and self._task_group.get(heap[0][2]) != gkey:
                heapq.heappop(heap)  # removed or re-queued elsewhere
            if not heap:
                del group.heaps[user]
                continue
            prio, seq, _ = heap[0]
            key = (prio, self._running.get(user, 0), seq)
            if best is None or key < best[0]:
                best = (key, user)
        return best

    def schedule(self) -> list[tuple[str, str]]:
        """Assign as many queued tasks as free slots allow: [(task_id, machine_id)]."""
        taken: list[tuple[tuple, _Group, str, tuple[int, int, str], str]] = []
        try:
            self._schedule_into(taken)
        except BaseException:
            self._undo(taken)
            raise
        return [(entry[2], mid) for _, _, _, entry, mid in taken]

    def _schedule_into(self, taken: list) -> None:
        machines = [(m.rank(), m.machine_id) for m in self._machines.values() if m.free_for(True) > 0]
        heapq.heapify(machines)
        self._drop_empty_groups()
        while machines and self._groups:
            _, mid = heapq.heappop(machines)
            m = self._machines[mid]
            best = None
            for gkey, group in self._groups.items():
                if m.free_for(group.prefetch) <= 0 or not self._matches(gkey, group, m):
                    continue
                head = self._best_head(gkey, group)
                if head is not None and (best is None or head[0] < best[0][0]):
                    best = (head, gkey, group)
            if best is None:
                continue  # nothing this machine can run; drop it this round
            (_, user), gkey, group = best
            entry = heapq.heappop(group.heaps[user])
            del self._task_group[entry[2]]
            group.live -= 1
            if group.live == 0:
                del self._groups[gkey]
            m.busy += 1
            self._running[user] += 1
            taken.append((gkey, group, user, entry, mid))
            if m.free_for(True) > 0:
                heapq.heappush(machines, (m.rank(), mid))

    def _undo(self, taken: list) -> None:
        """Put a failed pass's tasks back in their queues, their slots freed."""
        for gkey, group, user, entry, mid in reversed(taken):
            self.release(mid)
            self._running[user] -= 1
            if self._running[user] <= 0:
                del self._running[user]
            self._groups.setdefault(gkey, group)
            heapq.heappush(group.heaps.setdefault(user, []), entry)
            group.live += 1
            self._task_group[entry[2]] = gkey

    def _drop_empty_groups(self) -> None:
        for gkey in [k for k, g in self._groups.items() if g.live <= 0]:
            del self._groups[gkey]
            for ck in [ck for ck in self._match_cache if ck[0] == gkey]:
                del self._match_cache[ck]

    # -- explanations -------------------------------------------------------

    def wait_reason(self, task_id: str) -> Optional[str]:
        """Why a queued task is not running yet (None if it is not queued)."""
        gkey = self._task_group.get(task_id)
        if gkey is None:
            return None
        group = self._groups.get(gkey)
        if group is None:
            return None
        fits = [m for m in self._machines.values() if self._matches(gkey, group, m)]
        if not fits:
            what = hw.describe(group.req)
            if group.excluded:
                what += f" (excluding {', '.join(sorted(group.excluded))}, which lost it)"
            reason = f"waiting for matching hardware: no connected daemon has {what}"
            hints = hw.unmet_hints(group.req, [m.facts for m in self._machines.values()])
            if hints and not group.excluded:
                reason += f" ({'; '.join(hints)})"
            if "runtime" in group.req and self._machines:
                offered = sorted({r for m in self._machines.values() for r in hw.machine_runtimes(m.facts)})
                reason += f" (connected daemons run: {', '.join(offered)})"
            return reason
        if not any(m.accepting for m in fits):
            return "waiting: every matching daemon is draining"
        return f"waiting for a free slot on {len(fits)} matching daemon(s)"

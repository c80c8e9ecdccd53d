"""Matches queued tasks to free daemon slots.  Sans-I/O: no sockets, no clock.

Queued tasks are grouped by requirement (equal hardware dicts and equal
excluded machines share a group); each group is a heap ordered by priority
(high first) then submission order.  ``schedule()`` repeatedly takes the
machine with the most free slots and gives it the best head among the groups
it matches, so work spreads over daemons and priority is honoured across
groups.  Matching is cached per (group, machine), so the cost per assignment
is the number of distinct requirement groups, not the queue length.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from . import hardware as hw


@dataclass
class _Machine:
    machine_id: str
    facts: dict[str, Any]  # hardware plus name, machine_id, tags
    slots: int
    busy: int = 0
    accepting: bool = True

    @property
    def free(self) -> int:
        return self.slots - self.busy if self.accepting else 0


@dataclass
class _Group:
    req: dict[str, Any]
    excluded: frozenset[str]
    heap: list[tuple[int, int, str]] = field(default_factory=list)
    live: int = 0


class Scheduler:
    def __init__(self) -> None:
        self._machines: dict[str, _Machine] = {}
        self._groups: dict[tuple, _Group] = {}
        self._task_group: dict[str, tuple] = {}
        self._match_cache: dict[tuple[tuple, str], bool] = {}
        self._seq = itertools.count()

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
    ) -> None:
        facts = dict(hardware)
        facts.update(machine_id=machine_id, name=name or machine_id, tags=list(tags or []),
                     instance_key=instance_key or machine_id)
        self._machines[machine_id] = _Machine(machine_id, facts, slots, busy)
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
    ) -> None:
        """Queue a task. ``requirements`` must already be hw.normalize()d."""
        excluded = frozenset(exclude)
        gkey = (hw.canonical_key(requirements), excluded)
        group = self._groups.get(gkey)
        if group is None:
            group = self._groups[gkey] = _Group(dict(requirements), excluded)
        seq = next(self._seq) if order is None else order
        heapq.heappush(group.heap, (-priority, seq, task_id))
        group.live += 1
        self._task_group[task_id] = gkey

    def remove(self, task_id: str) -> bool:
        """Take a queued task out (cancelled); False if it was not queued."""
        gkey = self._task_group.pop(task_id, None)
        if gkey is None:
            return False
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
            hit = m.facts["instance_key"] not in group.excluded and hw.matches(group.req, m.facts)
            self._match_cache[ck] = hit
        return hit

    def _head(self, gkey: tuple, group: _Group) -> Optional[tuple[int, int, str]]:
        heap = group.heap
        while heap and self._task_group.get(heap[0][2]) != gkey:
            heapq.heappop(heap)  # removed or re-queued elsewhere
        return heap[0] if heap else None

    def schedule(self) -> list[tuple[str, str]]:
        """Assign as many queued tasks as free slots allow: [(task_id, machine_id)]."""
        out: list[tuple[str, str]] = []
        machines = [(-m.free, m.machine_id) for m in self._machines.values() if m.free > 0]
        heapq.heapify(machines)
        self._drop_empty_groups()
        while machines and self._groups:
            _, mid = heapq.heappop(machines)
            m = self._machines[mid]
            best = None
            for gkey, group in self._groups.items():
                if not self._matches(gkey, group, m):
                    continue
                head = self._head(gkey, group)
                if head is not None and (best is None or head < best[0]):
                    best = (head, gkey, group)
            if best is None:
                continue  # nothing this machine can run; drop it this round
            head, gkey, group = best
            heapq.heappop(group.heap)
            del self._task_group[head[2]]
            group.live -= 1
            if group.live == 0:
                del self._groups[gkey]
            m.busy += 1
            out.append((head[2], mid))
            if m.free > 0:
                heapq.heappush(machines, (-m.free, mid))
        return out

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
        group = self._groups[gkey]
        fits = [m for m in self._machines.values() if self._matches(gkey, group, m)]
        if not fits:
            what = hw.describe(group.req)
            if group.excluded:
                what += f" (excluding {', '.join(sorted(group.excluded))}, which lost it)"
            return f"waiting for matching hardware: no connected daemon has {what}"
        if not any(m.accepting for m in fits):
            return "waiting: every matching daemon is draining"
        return f"waiting for a free slot on {len(fits)} matching daemon(s)"

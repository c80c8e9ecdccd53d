"""The hub's state machine: tasks, attempts, machines, watches, waiters.

``HubCore.handle(*events, now=...) -> list[Instruction]`` is the only way
hub state changes (see ``events.py``).  No sockets and no clock here: the
websocket layer (``server.py``) turns frames into events, hands a loop
iteration's worth of them to ``handle`` as one batch, and carries out the
instructions it gets back.  A batch is one SQLite transaction (each event a
savepoint in it), committed before ``handle`` returns, so nothing is acked,
assigned or published before it is stored.  Handlers are chosen by event
and message type from tables, not by chains of ifs.

Tenancy lives here too: every request carries the caller's ``Principal``.
A client sees only its own user's sessions, tasks and blobs; another user's
ids are answered exactly as unknown ids are, so nothing leaks whether they
exist.  Admins see everything.  A daemon is bound to its token's owner: a
machine name belongs to the owner that first registered it.
"""

from __future__ import annotations

import collections
import heapq
import hmac
import itertools
import logging
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import msgspec

from . import blobgc
from . import gridcall
from . import hardware as hw
from . import protocol as p
from . import task_state
from .auth import Principal
from .blobs import BlobStore
from .events import (
    BlobsScanned, BlobStored, CancelContinued, Close, Connected, Disconnected, Event, Instruction, Later,
    Received, ResultsRefused, ScanBlobs, Send, StreamBlob, Tick, TokensRevoked,
)
from .paths import unsafe_relative_path
from .scheduler import Scheduler
from .store import Store, dumps, loads
from .taskenv import env_problem
from .ledger import Ledger, Usage, check_range
from .requests import RequestError
from msgspec.structs import replace as msgspec_replace


log = logging.getLogger("hwf.hub")

# Output of a running attempt kept for watchers that subscribe late.
OUTPUT_REPLAY_BYTES = 64 * 2**10
# Tasks cancelled per batch: a huge cancellation leaves room for other work.
CANCEL_CHUNK = 100
# A task record's fields beside its spec and result, for sizing a reply before it is built.
RECORD_OVERHEAD = 1024


_PYTHON_VERSION = re.compile(r"^[0-9]{1,2}\.[0-9]{1,3}$")


def _stage_problem(stage: p.StageSpec) -> Optional[str]:
    """What is wrong with a stage's shape (commands, a Python call or a container), or None."""
    kinds = bool(stage.cmds) + (stage.call is not None) + (stage.container is not None)
    if kinds == 0:
        return "has no commands (nor a Python call or a container)"
    if kinds > 1:
        return "has more than one of commands, a Python call and a container: give one"
    if stage.stdin is not None and not stage.cmds:
        return "has stdin but no commands to give it to"
    call = stage.call
    if call is None:
        return None
    if not _PYTHON_VERSION.match(call.python):
        return f"call: python {call.python[:20]!r} is not a major.minor version like '3.11'"
    if (call.pickled is not None) + (call.pickled_file is not None) + (call.ref is not None) != 1:
        return "call: give exactly one of pickled, pickled_file and ref"
    if call.pickled_file is not None and call.pickled_file not in {d.filename for d in stage.data}:
        return f"call: pickled_file {call.pickled_file[:200]!r} is not one of the stage's data files"
    if call.ref is not None:
        problem = gridcall.check_ref(call.ref)
        if problem:
            return f"call: {problem}"
    elif call.arg is not None:
        return "call: arg goes with ref (a pickled call carries its own arguments)"
    return None


def _prefetchable(spec: p.TaskSpec) -> bool:
    """Python calls only (warm workers: short, no start-up): a daemon may hold
    them beyond its slots, to start each the moment a slot frees."""
    return all(st.call is not None and not gridcall.needs_handler(st) for st in spec.stages)


def instance_key(machine_id: str, instance: Optional[str]) -> str:
    """What a lost attempt excludes: this daemon process, not the name forever."""
    return f"{machine_id}#{instance}" if instance else machine_id


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(8)}"


@dataclass
class ActiveTask:
    """A task not yet in a terminal state, kept in memory for scheduling."""

    task_id: str
    session_id: str
    seq: int
    spec: p.TaskSpec
    requirements: dict[str, Any]
    status: str
    user: str = ""
    attempt: int = 0
    machine: Optional[str] = None
    excluded: set[str] = field(default_factory=set)
    stages: dict[int, p.StageOutcome] = field(default_factory=dict)
    assigned_at: Optional[float] = None  # the current attempt's, by the hub's clock (None: before a restart)


@dataclass
class MachineState:
    machine_id: str
    name: str
    hardware: dict[str, Any]
    slots: int
    tags: list[str]
    connected: bool = False
    draining: bool = False
    load: Optional[p.Load] = None
    last_seen: float = 0.0
    first_seen: float = 0.0
    running: set[str] = field(default_factory=set)  # task ids
    instance: str = ""  # the daemon process: a restart is a new instance
    owner: str = ""  # the daemon token's owner: the name is bound to it
    admin_status: str = "enabled"  # set_machine: enabled, disabled or drain (kept across restarts)
    address: Optional[str] = None  # the daemon connection's IP
    # Cancelled attempts still being killed: their slots stay busy until the
    # daemon reports them ended.
    cancelling: set[tuple[str, int]] = field(default_factory=set)


@dataclass(eq=False)
class _Waiter:
    """A get_results(wait=True) still waiting: answered when ``remaining`` hits 0
    or at ``deadline``."""

    peer: int
    rid: int
    who: Principal
    task_ids: list[str]
    remaining: int
    deadline: Optional[float] = None
    done: bool = False
    held: int = 0  # task ids counted against its user (released when it ends)


@dataclass(eq=False)
class _Sub:
    """One client's watch: events for some tasks or a whole session."""

    peer: int
    wid: int
    output: bool
    task_ids: set[str]
    session_id: Optional[str]
    user: str = ""
    held: int = 0  # task ids counted against its user (released when it is dropped)


@dataclass
class _PeerState:
    who: Principal
    version: int
    address: Optional[str] = None
    machine_id: Optional[str] = None
    subs: dict[int, _Sub] = field(default_factory=dict)
    waiters: list[_Waiter] = field(default_factory=list)


class _Replay:
    """The recent live output of one running attempt, bounded in bytes."""

    __slots__ = ("attempt", "chunks", "size", "dropped")

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.chunks: collections.deque[tuple[str, str]] = collections.deque()
        self.size = 0
        self.dropped = 0

    def add(self, stream: str, text: str) -> None:
        self.chunks.append((stream, text))
        self.size += len(text)
        while self.size > OUTPUT_REPLAY_BYTES and len(self.chunks) > 1:
            _, old = self.chunks.popleft()
            self.size -= len(old)
            self.dropped += len(old)


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise AssertionError(f"hub core invariant broken: {problem}")


def _stored_load(raw: Optional[str]) -> Optional[p.Load]:
    """A machine's last load as stored; one an older hub accepted out of bounds
    (1e308 % CPU) is dropped, not allowed to stop the hub from starting."""
    if not raw:
        return None
    try:
        return p.convert(loads(raw), p.Load)
    except msgspec.ValidationError:
        return None


class HubCore:
    def __init__(self, store: Store, blobs: BlobStore, limits: p.Limits, *, now: float,
                 heartbeat_interval: float = 2.0, heartbeat_timeout: float = 10.0,
                 reconnect_grace: float = 15.0, grid_handler: Optional[str] = None,
                 prefetch: int = 1, trusted_owners: Iterable[str] = ()) -> None:
        self.store = store
        # Python-call tasks a daemon may hold per slot beyond its slots (scheduler.py).
        self.prefetch = max(0, prefetch)
        # Owners whose machines may run anyone's Python calls.  A call's value
        # (or exception) is a pickle the client loads: only machines of the
        # submitting user or of these owners may produce it.
        self.trusted_owners = frozenset(trusted_owners)
        # HTC-Grid tasks that leave the handler to the farm get this one on
        # daemons without their own (gridcall.py).
        self.grid_handler = grid_handler.strip() if grid_handler and grid_handler.strip() else None
        self.blobs = blobs
        self.limits = limits
        # Daemons beat often enough that several beats fit in the timeout: a
        # short --heartbeat-timeout must not drop a daemon for one late beat.
        self.heartbeat_interval = min(heartbeat_interval, heartbeat_timeout / 4)
        self.heartbeat_timeout = heartbeat_timeout
        self.scheduler = Scheduler()
        self.active: dict[str, ActiveTask] = {}
        self.machines: dict[str, MachineState] = {}
        self.peers: dict[int, _PeerState] = {}
        self.daemon_peer: dict[str, int] = {}  # machine -> its connection
        # task -> the waiters on it (a dict as an ordered set: a gone peer's are removed in O(1))
        self._waiters: dict[str, dict[_Waiter, None]] = {}
        # user -> [waiters, watches, task ids they hold]: bounded per user (Limits.max_*_per_user)
        self._holds: dict[str, list[int]] = {}
        self._deadlines: list[tuple[float, int, _Waiter]] = []
        self._tiebreak = itertools.count()
        self._subs_by_task: dict[str, set[_Sub]] = {}
        self._subs_by_session: dict[str, set[_Sub]] = {}
        self._replay: dict[str, _Replay] = {}
        self._seq = store.max_seq()
        self.active_by_user: Counter[str] = Counter()  # unfinished tasks per user
        self._now = now
        self._out: list[Instruction] = []
        self._ended: list[str] = []  # tasks the current event ended (_settle_ended)
        self.reconnect_grace = reconnect_grace
        self._dirty = True  # a scheduling pass is due at the end of the batch
        self.hub_id = store.meta("hub_id") or self._init_hub_id()
        self.ledger = Ledger(store, owner_of=lambda mid: m.owner if (m := self.machines.get(mid)) else None)
        self._user_keys: dict[str, str] = {}
        self._key_secret = (store.meta("user_key_secret") or self._init_key_secret()).encode()
        self.store.mark_all_machines_offline()
        self._load_machines()
        self._load_active()
        self._fill_blob_sizes()
        # After a restart, daemons get this long to come back for their attempts.
        self._grace_until: Optional[float] = (
            now + reconnect_grace
            if any(t.status in ("assigned", "running") for t in self.active.values()) else None
        )

    def _fill_blob_sizes(self) -> None:
        """Stores from before blob quotas: learn each listed blob's size once."""
        missing = self.store.blobs_without_size()
        if missing:
            with self.store.transaction():
                self.store.set_blob_sizes({s: self.blobs.size(s) if self.blobs.has(s) else 0 for s in missing})

    # -- the one way in -------------------------------------------------------

    def handle(self, *events: Event, now: float) -> list[Instruction]:
        """Apply a batch of events in one transaction; return what to do about them.

        Each event is all or nothing (``_handle_one``).  If the batch's commit
        itself fails (disk full, an I/O error), nothing of the batch is kept:
        memory is rebuilt from the store and every request in the batch is
        answered with an ``unavailable`` error instead -- nothing is acked
        that is not stored, and no client waits for a reply that never comes."""
        self._now = now
        self._out = out = []
        try:
            with self.store.transaction():
                for ev in events:
                    self._handle_one(ev)
                if self._dirty:
                    self._dirty = False
                    self._atomically(self._schedule)
        except Exception as exc:
            log.exception("storing a batch of %d event(s) failed; none of it was kept", len(events))
            self._out = []
            self._rebuild()
            out = self._refuse_batch(events, exc)
        finally:
            self._out = []
            self._ended = []
        return out

    def _handle_one(self, ev: Event) -> None:
        """One event: its store writes (a savepoint), memory changes and
        instructions all happen, or none do.

        A ``RequestError`` refuses a request before anything changed (the
        handlers check first; ``validate_state`` holds them to it).  Any other
        exception is a bug or a failing store: the savepoint is rolled back,
        the event's instructions dropped, and memory rebuilt from the store,
        which is the truth.  Waiters and watches of tasks the event ended are
        settled only once the event succeeded (``_settle_ended``)."""
        rid = getattr(ev.msg, "id", None) if isinstance(ev, Received) else None
        mark = len(self._out)
        self._ended = []
        try:
            with self.store.transaction():  # a savepoint: a failing event undoes only itself
                self._EVENTS[type(ev)](self, ev)
        except RequestError as exc:
            del self._out[mark:]
            if isinstance(ev, Received):
                self._send(ev.peer, p.Error(id=rid, code=exc.code, message=str(exc)))
        except Exception as exc:  # a bug must not take the hub (or the batch) down, nor leave it inconsistent
            log.exception("error handling %r; rebuilding the hub's memory from its store", ev)
            del self._out[mark:]
            self._rebuild()
            if isinstance(ev, Received):
                self._send(ev.peer, p.Error(id=rid, code="internal", message=f"hub error: {exc!r}"))
        else:
            self._settle_ended()
        finally:
            self._ended = []

    def _atomically(self, step: Callable[[], None]) -> None:
        """A step of the core's own (a scheduling pass) with an event's all-or-nothing."""
        mark = len(self._out)
        try:
            with self.store.transaction():
                step()
        except Exception:
            log.exception("error in %s; rebuilding the hub's memory from its store", step.__name__)
            del self._out[mark:]
            self._rebuild()

    def _settle_ended(self) -> None:
        """After an event that ended tasks: wake their waiters, close their watches' entries."""
        for tid in self._ended:
            self._subs_by_task.pop(tid, None)
            self._replay.pop(tid, None)
            for w in self._waiters.pop(tid, {}):
                w.remaining -= 1
                if w.remaining == 0:
                    self._answer(w, timed_out=False)

    def _refuse_batch(self, events: Sequence[Event], exc: Exception) -> list[Instruction]:
        """Answer every request of a batch that could not be stored, and forget
        the waits and watches it opened (their requests failed)."""
        out: list[Instruction] = []
        message = f"the hub could not store this request ({exc!r}); nothing of it was kept: try again"
        for ev in events:
            rid = ev.rid if isinstance(ev, BlobStored) else getattr(ev.msg, "id", None) if isinstance(ev, Received) else None
            ps = self.peers.get(getattr(ev, "peer", -1))
            if ps is None or rid is None:
                continue
            for w in [w for w in ps.waiters if w.rid == rid and not w.done]:
                self._end_waiter(w)
            if isinstance(ev, Received) and isinstance(ev.msg, p.Watch) and ps.subs.get(rid) is not None:
                self._drop_sub(ps.subs[rid])
            out.append(Send(ev.peer, p.Error(id=rid, code="unavailable", message=message)))
        return out

    def _send(self, peer: Optional[int], msg: Any) -> None:
        if peer is not None:
            self._out.append(Send(peer, msg))

    def _emit(self, t: ActiveTask, status: str, **info: Any) -> None:
        """Publish a transition (or a finished stage) to the task's watchers."""
        subs = self._subs_for(t.task_id, t.session_id)
        if subs:
            for sub in subs:
                self._send(sub.peer, p.TaskEvent(watch=sub.wid, task_id=t.task_id, status=status,  # type: ignore[arg-type]
                                                 time=self._now, **info))

    # -- start-up -----------------------------------------------------------

    def _init_hub_id(self) -> str:
        hub_id = new_id("hub-")
        self.store.set_meta("hub_id", hub_id)
        return hub_id

    def _init_key_secret(self) -> str:
        secret = secrets.token_hex(32)
        self.store.set_meta("user_key_secret", secret)
        return secret

    def user_key(self, user: str) -> str:
        """The opaque key of a user that daemons see (their warm Python workers
        serve one key): stable, but not the name, nor guessable from it."""
        key = self._user_keys.get(user)
        if key is None:
            key = self._user_keys[user] = hmac.new(self._key_secret, user.encode(), "sha256").hexdigest()[:32]
        return key

    def _load_machines(self) -> None:
        for row in self.store.machines():
            self.machines[row["machine_id"]] = MachineState(
                machine_id=row["machine_id"],
                name=row["name"],
                hardware=loads(row["hardware"]),
                slots=row["slots"],
                tags=loads(row["tags"]),
                last_seen=row["last_seen"],
                first_seen=row["first_seen"],
                load=_stored_load(row["load"]),
                instance=row["instance"] or "",
                owner=row["owner"] or "",
                admin_status=row["admin_status"] or "enabled",
            )

    def _load_active(self) -> None:
        """Rebuild the queue after a restart; running attempts wait for their daemon."""
        excluded: dict[str, set[str]] = {}
        for row in self.store.lost_attempt_exclusions():
            excluded.setdefault(row[0], set()).add(instance_key(row[1], row[2]))
        for row in self.store.active_tasks():
            spec = p.convert(loads(row["spec"]), p.TaskSpec)
            t = ActiveTask(
                task_id=row["task_id"],
                session_id=row["session_id"],
                seq=row["seq"],
                spec=spec,
                requirements=loads(row["requirements"]),
                status=row["status"],
                user=row["user"],
                attempt=row["attempt"],
                machine=row["machine"],
                excluded=excluded.get(row["task_id"], set()),
            )
            self.active[t.task_id] = t
            self.active_by_user[t.user] += 1
            if t.status in ("queued", "retrying"):
                self._requeue(t, self._now, note_transition=t.status == "retrying")
            else:
                self.scheduler.note_assigned(t.task_id, t.user)
                if t.machine in self.machines:
                    self.machines[t.machine].running.add(t.task_id)

    def _rebuild(self) -> None:
        """Memory from the store, keeping the live connections: what a restart
        does, without dropping anyone.

        Called when an event or a batch failed half-way: its store writes were
        rolled back, its memory changes may not have been, and the store is
        the truth.  What only memory knows -- who is connected, their waits
        and watches, attempts being killed -- is kept and re-derived."""
        old_machines, old_active = self.machines, self.active
        self.scheduler = Scheduler()
        self.active, self.machines = {}, {}
        self.active_by_user = Counter()
        self._seq = self.store.max_seq()
        self._load_machines()
        for mid, peer in list(self.daemon_peer.items()):
            m, was = self.machines.get(mid), old_machines.get(mid)
            if m is None or peer not in self.peers or was is None:
                del self.daemon_peer[mid]
                if peer in self.peers:
                    self.peers[peer].machine_id = None
                continue
            m.connected, m.draining, m.load, m.last_seen, m.address = True, was.draining, was.load, was.last_seen, was.address
        self._load_active()
        for tid, t in self.active.items():
            before = old_active.get(tid)
            if before is not None and before.attempt == t.attempt:
                t.stages, t.assigned_at = before.stages, before.assigned_at
        for mid, m in self.machines.items():
            was = old_machines.get(mid)
            if not m.connected or was is None:
                continue
            if was.cancelling:  # still being killed, as the store says
                rows = self.store.attempts(sorted({tid for tid, _ in was.cancelling}))
                m.cancelling = {(tid, a) for tid, a in was.cancelling
                                if any(r["attempt"] == a and r["state"] == "cancelling" and r["machine"] == mid
                                       for r in rows.get(tid, []))}
            self._offer_slots(m)
        if any(t.status in ("assigned", "running") and t.machine not in self.daemon_peer
               for t in self.active.values()):
            # Attempts of a daemon whose disconnect was undone: lost unless it returns.
            until = self._now + self.reconnect_grace
            self._grace_until = until if self._grace_until is None else min(self._grace_until, until)
        self._rebuild_registry()
        self._dirty = True

    def _rebuild_registry(self) -> None:
        """Waits, watches and holds re-derived from the live peers and the active tasks."""
        self._subs_by_task, self._subs_by_session, self._waiters, self._holds = {}, {}, {}, {}
        ready: list[_Waiter] = []
        for ps in self.peers.values():
            for sub in ps.subs.values():
                if sub.session_id is not None:
                    self._subs_by_session.setdefault(sub.session_id, set()).add(sub)
                else:
                    for tid in sub.task_ids:
                        if tid in self.active:
                            self._subs_by_task.setdefault(tid, set()).add(sub)
                if sub.user:
                    held = self._holds.setdefault(sub.user, [0, 0, 0])
                    held[1] += 1
                    held[2] += sub.held
            ps.waiters = [w for w in ps.waiters if not w.done]
            for w in ps.waiters:
                pending = [tid for tid in dict.fromkeys(w.task_ids) if tid in self.active]
                for tid in pending:
                    self._waiters.setdefault(tid, {})[w] = None
                w.remaining = len(pending)
                held = self._holds.setdefault(w.who.user, [0, 0, 0])
                held[0] += 1
                held[2] += w.held
                if not pending:
                    ready.append(w)
        self._replay = {tid: r for tid, r in self._replay.items()
                        if (t := self.active.get(tid)) is not None and t.attempt == r.attempt}
        for w in ready:
            self._answer(w, timed_out=False)

    def validate_state(self) -> None:
        """Check the core's invariants against the store; raise AssertionError
        naming the first one broken (dask's ``validate_state``).  Tests call
        it after every batch; it reads the whole active set, so not the hub."""
        rows = {r["task_id"]: r for r in self.store.active_tasks()}
        _check(set(rows) == set(self.active),
               f"active tasks differ from the store: memory-only {sorted(set(self.active) - set(rows))[:5]}, "
               f"store-only {sorted(set(rows) - set(self.active))[:5]}")
        queued = self.scheduler.queued_ids()
        running_users: Counter[str] = Counter()
        on_machine: dict[str, set[str]] = {}
        for tid, t in self.active.items():
            r = rows[tid]
            _check((r["status"], r["attempt"], r["user"], r["session_id"]) == (t.status, t.attempt, t.user, t.session_id),
                   f"task {tid}: memory {t.status}/{t.attempt}/{t.user} but store {r['status']}/{r['attempt']}/{r['user']}")
            _check(t.status in ("queued", "assigned", "running"), f"task {tid} rests in state {t.status}")
            _check((tid in queued) == (t.status == "queued"), f"task {tid} is {t.status} but "
                                                               f"{'' if tid in queued else 'not '}in the scheduler's queue")
            if t.status != "queued":
                _check(r["machine"] == t.machine, f"task {tid}: on {t.machine} in memory, {r['machine']} in the store")
                running_users[t.user] += 1
                on_machine.setdefault(t.machine or "", set()).add(tid)
        _check(queued <= set(self.active), "the scheduler queues ended tasks")
        _check(Counter({u: n for u, n in self.active_by_user.items() if n}) == Counter(t.user for t in self.active.values()),
               "active_by_user differs from the active tasks")
        _check(self.scheduler.running_by_user() == dict(running_users),
               f"fair-share counts {self.scheduler.running_by_user()} differ from the assigned tasks {dict(running_users)}")
        busy = self.scheduler.busy()
        for mid, m in self.machines.items():
            _check(m.running == on_machine.get(mid, set()), f"machine {mid} runs {sorted(m.running)[:3]} in memory, "
                                                            f"{sorted(on_machine.get(mid, set()))[:3]} by its tasks")
            peer = self.daemon_peer.get(mid)
            _check(m.connected == (peer is not None), f"machine {mid}: connected={m.connected} but peer {peer}")
            if peer is not None:
                _check(peer in self.peers and self.peers[peer].machine_id == mid, f"machine {mid}'s peer {peer} is gone")
                _check(busy.get(mid) == len(m.running) + len(m.cancelling),
                       f"machine {mid}: {busy.get(mid)} busy slots for {len(m.running)} running + "
                       f"{len(m.cancelling)} cancelling attempts")
        _check(set(busy) == set(self.daemon_peer), "the scheduler's machines are not the connected ones")
        _check(set(on_machine) <= set(self.machines), "a task is on an unknown machine")
        holds: dict[str, list[int]] = {}
        for peer, ps in self.peers.items():
            for wid, sub in ps.subs.items():
                _check(sub.peer == peer and sub.wid == wid and bool(sub.user), f"watch {wid} of peer {peer} is stale")
                h = holds.setdefault(sub.user, [0, 0, 0])
                h[1] += 1
                h[2] += sub.held
            for w in ps.waiters:
                if not w.done:
                    h = holds.setdefault(w.who.user, [0, 0, 0])
                    h[0] += 1
                    h[2] += w.held
                    pending = {tid for tid in w.task_ids if tid in self.active}
                    _check(w.remaining == len(pending) > 0, f"waiter {w.rid} of peer {peer}: remaining "
                                                            f"{w.remaining} for {len(pending)} unfinished tasks")
        _check(holds == self._holds, f"holds {self._holds} differ from the live waits and watches {holds}")
        for tid, ws in self._waiters.items():
            _check(tid in self.active, f"waiters kept for ended task {tid}")
            for w in ws:
                _check(not w.done and w.peer in self.peers and w in self.peers[w.peer].waiters,
                       f"task {tid} has a waiter of a gone peer")
        for tid, subs in self._subs_by_task.items():
            _check(tid in self.active, f"watches kept for ended task {tid}")
            for sub in subs:
                _check(sub.peer in self.peers and self.peers[sub.peer].subs.get(sub.wid) is sub,
                       f"task {tid} has a watch of a gone peer")
        for sid, subs in self._subs_by_session.items():
            for sub in subs:
                _check(sub.peer in self.peers and self.peers[sub.peer].subs.get(sub.wid) is sub,
                       f"session {sid} has a watch of a gone peer")
        _check(set(self._replay) <= set(self.active), "output kept for ended tasks")
        self.ledger.validate_tasks(set(self.active))

    # -- submission ---------------------------------------------------------

    def _submit(self, msg: p.Submit, who: Principal) -> p.Submitted:
        user = who.user
        if msg.key is not None:
            # Keys are per user: another user's key is just a new key.
            key = f"{user}\x00{msg.key}"
            before = self.store.submitted_before(key)
            if before is not None:  # a resend: the first one was accepted
                return p.Submitted(id=msg.id, session_id=before[0], task_ids=before[1])
        if not msg.tasks:
            raise RequestError("bad_request", "submit carries no tasks")
        if len(msg.tasks) > self.limits.max_tasks_per_submit:
            raise RequestError(
                "limit",
                f"{len(msg.tasks)} tasks in one submit exceeds max_tasks_per_submit="
                f"{self.limits.max_tasks_per_submit}",
            )
        mine = self.active_by_user[user]
        if mine + len(msg.tasks) > self.limits.max_queued_per_user:
            raise RequestError(
                "queue_full",
                f"user {user!r} has {mine} unfinished tasks; {len(msg.tasks)} more would exceed "
                f"max_queued_per_user={self.limits.max_queued_per_user}",
            )
        queued = self.scheduler.queued_count()
        if queued + len(msg.tasks) > self.limits.max_queued_tasks:
            raise RequestError(
                "queue_full",
                f"queue holds {queued} tasks; {len(msg.tasks)} more would exceed "
                f"max_queued_tasks={self.limits.max_queued_tasks}",
            )
        reqs = [self._validate(i, spec, who) for i, spec in enumerate(msg.tasks)]
        now = self._now
        if msg.session_id is not None:
            self._own_session(msg.session_id, who)
            session_id = msg.session_id
        else:
            session_id = new_id("s-")
        ids = [new_id("t-") for _ in msg.tasks]
        first = self._seq + 1
        self._seq += len(ids)
        rows = [
            (first + i, tid, session_id, dumps(spec), dumps(req), spec.priority, spec.max_retries, user,
             spec.external_id, spec.job_id, now)
            for i, (tid, spec, req) in enumerate(zip(ids, msg.tasks, reqs))
        ]
        with self.store.transaction():
            self.store.add_session(session_id, now, user)
            self.store.insert_tasks(rows)
            self.ledger.open_task_slots(
                [(tid, user, session_id, spec.credits) for tid, spec in zip(ids, msg.tasks)], now)
            if msg.key is not None:
                self.store.remember_submit(key, session_id, ids, now)
        for i, (tid, spec, req) in enumerate(zip(ids, msg.tasks, reqs)):
            t = ActiveTask(tid, session_id, first + i, spec, req, "queued", user=user)
            self.active[tid] = t
            self._enqueue(t)
            self._emit(t, "queued", n_stages=len(spec.stages))
        self.active_by_user[user] += len(ids)
        self._dirty = True
        return p.Submitted(id=msg.id, session_id=session_id, task_ids=ids)

    def _own_session(self, session_id: str, who: Principal) -> Any:
        """The session's row if ``who`` may see it; else exactly 'unknown session'."""
        row = self.store.session(session_id)
        if row is None or not (who.is_admin or row["user"] == who.user):
            raise RequestError("not_found", f"unknown session {session_id!r}")
        return row

    def _validate(self, index: int, spec: p.TaskSpec, who: Principal) -> dict[str, Any]:
        where = f"task {index}"
        try:
            req = hw.normalize(spec.hardware)
        except hw.HardwareError as exc:
            raise RequestError("bad_hardware", f"{where}: {exc}") from None
        if not spec.stages:
            raise RequestError("bad_task", f"{where}: a task needs at least one stage")
        if spec.max_retries < 0:
            raise RequestError("bad_task", f"{where}: max_retries must be >= 0")
        if spec.timeout is not None and spec.timeout <= 0:
            raise RequestError("bad_task", f"{where}: timeout must be > 0 seconds")
        for stage in spec.stages:
            problem = _stage_problem(stage)
            if problem:
                raise RequestError("bad_task", f"{where}: stage {stage.name!r} {problem}")
            for d in stage.data:
                problem = unsafe_relative_path(d.filename)
                if problem:
                    raise RequestError("bad_path", f"{where}: data filename {d.filename!r} {problem}")
                if not self._usable(who, d.sha256):
                    raise RequestError(
                        "missing_blob",
                        f"{where}: data {d.filename!r} (sha256 {d.sha256[:12]}…) was not uploaded",
                    )
        for pattern in spec.artifacts:
            problem = unsafe_relative_path(pattern)
            if problem:
                raise RequestError("bad_path", f"{where}: artifact {pattern!r} {problem}")
        problem = env_problem(spec.env)
        if problem:
            raise RequestError("bad_task", f"{where}: {problem}")
        if spec.credits is not None:
            check_range(spec.credits.credits, spec.credits.min, spec.credits.max, f"{where} credits")
        if (spec.frame_start is None) != (spec.frame_end is None):
            raise RequestError("bad_task", f"{where}: give frame_start and frame_end together")
        if spec.frame_start is not None and spec.frame_end is not None and spec.frame_start > spec.frame_end:
            raise RequestError("bad_task", f"{where}: frame_start {spec.frame_start} is after frame_end {spec.frame_end}")
        if any(gridcall.needs_handler(s) for s in spec.stages):
            # Only daemons that can run the farm's handler: their own, or the hub's.
            need = gridcall.handler_runtime(self.grid_handler)
            if need is not None:
                req = hw.normalize({**req, "runtime": ",".join(filter(None, [req.get("runtime"), need]))})
        if any(s.call is not None for s in spec.stages):  # after normalize: users cannot set it
            req = {**req, "owners": sorted({who.user, *self.trusted_owners})}
        return req

    # -- scheduling ---------------------------------------------------------

    def _schedule(self) -> None:
        """Assign queued tasks to free slots; store it; send each daemon its share
        (one ``assignments`` message per daemon where its protocol has it).

        Runs ``_atomically``: if a write fails, memory is rebuilt from the
        store, so the tasks are queued again and the slots free.
        """
        pairs = self.scheduler.schedule()
        if not pairs:
            return
        now = self._now
        for task_id, machine_id in pairs:
            t = self.active[task_id]
            task_state.check(t.status, "assigned")
            self.store.add_attempt(task_id, t.attempt + 1, machine_id, self.machines[machine_id].instance, now)
            self.store.set_status(task_id, "assigned", now, attempt=t.attempt + 1, machine=machine_id)
        by_machine: dict[str, list[p.Assign]] = {}
        for task_id, machine_id in pairs:
            t = self.active[task_id]
            t.attempt += 1
            t.status = "assigned"
            t.machine = machine_id
            t.assigned_at = now
            self.machines[machine_id].running.add(task_id)
            spec = t.spec
            if self.grid_handler is not None and "grid" not in hw.machine_runtimes(self.machines[machine_id].hardware):
                spec = gridcall.spec_with_handler(spec, self.grid_handler)
            by_machine.setdefault(machine_id, []).append(
                p.Assign(task_id=task_id, attempt=t.attempt, spec=spec, user_key=self.user_key(t.user)))
            self._emit(t, "assigned", machine=machine_id)
        for machine_id, assigns in by_machine.items():
            peer = self.daemon_peer.get(machine_id)
            if peer is None:
                continue  # cannot happen: only connected machines get slots
            if self.peers[peer].version >= 2:
                self._send(peer, p.Assignments(items=assigns))
            else:
                for a in assigns:
                    self._send(peer, a)

    def _requeue(self, t: ActiveTask, now: float, *, note_transition: bool = True) -> None:
        if note_transition:
            task_state.check(t.status, "queued")
            t.status = "queued"
            self.store.set_status(t.task_id, "queued", now, attempt=t.attempt, queued=now, machine=None)
            self._emit(t, "queued")
        t.machine = None
        self._enqueue(t)

    def _enqueue(self, t: ActiveTask) -> None:
        self.scheduler.enqueue(t.task_id, t.requirements, t.spec.priority, exclude=t.excluded, order=t.seq,
                               user=t.user, prefetch=self.prefetch > 0 and _prefetchable(t.spec))

    # -- daemons ------------------------------------------------------------

    def _register(self, msg: p.Register, now: float, who: Principal, address: Optional[str] = None) -> p.Registered:
        name = msg.name.strip()
        if not name:
            raise RequestError("bad_request", "a daemon needs a name")
        m = self.machines.get(name)
        if m is not None and m.owner and m.owner != who.user:
            # A name is bound to its owner: nobody else can squat it while
            # the real machine is briefly away.
            raise RequestError("conflict", f"machine name {name!r} is registered to another owner")
        if m is not None and m.connected:
            raise RequestError("conflict", f"a daemon named {name!r} is already connected")
        tags = sorted({t.lower() for t in msg.tags})
        hardware = p.to_builtins(msg.hardware)
        self.store.upsert_machine(name, name, hardware, msg.slots, tags, now, msg.instance, who.user)
        running_before = m.running if m else set()
        same_process = m is not None and bool(msg.instance) and m.instance == msg.instance
        previous = m
        m = MachineState(name, name, hardware, msg.slots, tags, connected=True,
                         last_seen=now, first_seen=m.first_seen if m else now,
                         running=set(), instance=msg.instance, owner=who.user,
                         admin_status=m.admin_status if m else "enabled", address=address)
        self.machines[name] = m
        # Attempts the hub believed were on this machine but the daemon no
        # longer has (and did not finish) were lost with its previous life.
        still = {tid for tid, att in msg.running if self._is_current(tid, att, name)}
        lost = [tid for tid in running_before if tid not in still]
        m.running = set(still)
        # A daemon can only claim attempts the hub gave to this machine: the
        # rest of what it reports is ignored, not cancelled on its word.
        reported = self._own_attempts(name, msg.running)
        if lost and same_process:
            # The same daemon process never got these (the hub went down
            # before sending them): not the machine's fault, no exclusion.
            self._lose_attempts(name, lost, now, reason="not delivered (hub restart)", exclude=False)
        elif lost:
            self._lose_attempts(name, lost, now, reason=f"daemon {name} restarted without it",
                               instance=previous.instance if previous else "")
        m.cancelling = reported - {(tid, self.active[tid].attempt) for tid in still}
        self._offer_slots(m)
        self._dirty = True
        return p.Registered(id=msg.id, machine_id=name, heartbeat_interval=self.heartbeat_interval)

    def _offer_slots(self, m: MachineState) -> None:
        """A connected machine's slots to the scheduler, the busy ones counted."""
        self.scheduler.add_machine(m.machine_id, {**m.hardware, "owner": m.owner}, m.slots, name=m.name,
                                   tags=m.tags, busy=len(m.running) + len(m.cancelling),
                                   instance_key=instance_key(m.machine_id, m.instance),
                                   extra=m.slots * self.prefetch)
        if m.admin_status != "enabled" or m.draining:
            self.scheduler.set_accepting(m.machine_id, False)

    def _own_attempts(self, machine: str, reported: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        return {(tid, att) for tid, att in reported if self.store.attempt_machine(tid, att) == machine}

    def _is_current(self, task_id: str, attempt: int, machine: str) -> bool:
        t = self.active.get(task_id)
        return t is not None and t.attempt == attempt and t.machine == machine

    def _heartbeat(self, machine_id: str, msg: p.Heartbeat, now: float) -> None:
        m = self.machines.get(machine_id)
        if m is None:
            return
        m.load = msg.load
        m.last_seen = now
        self.store.set_machine_state(machine_id, "draining" if m.draining else "online", now, msg.load)

    def _set_draining(self, machine_id: str, now: float) -> None:
        m = self.machines.get(machine_id)
        if m is not None:
            m.draining = True
            self.scheduler.set_accepting(machine_id, False)
            self.store.set_machine_state(machine_id, "draining", now)

    def _disconnect(self, machine_id: str, now: float, reason: str) -> None:
        """The daemon's connection is gone: its attempts are lost."""
        m = self.machines.get(machine_id)
        if m is None or not m.connected:
            return
        m.connected = False
        self._dirty = True
        self.scheduler.remove_machine(machine_id)
        with self.store.transaction():
            self.store.set_machine_state(machine_id, "offline", now)
            self._lose_attempts(machine_id, list(m.running), now, reason=reason)
        m.running.clear()

    def _lose_attempts(self, machine_id: str, task_ids: Iterable[str], now: float, reason: str,
                      *, exclude: bool = True, instance: Optional[str] = None) -> None:
        """Attempts died with their daemon: retry them (elsewhere) or fail them."""
        m = self.machines.get(machine_id)
        inst = instance if instance is not None else (m.instance if m else "")
        key = instance_key(machine_id, inst)
        exclude = exclude and bool(inst)  # unknown process: no lasting exclusion
        for tid in task_ids:
            t = self.active.get(tid)
            if t is None or t.machine != machine_id or task_state.is_terminal(t.status):
                continue
            self.store.update_attempt(tid, t.attempt, state="lost", ended=now, reason=reason)
            self._replay.pop(tid, None)
            self._dirty = True
            if exclude:
                t.excluded.add(key)
            nxt = task_state.after_loss(t.attempt, t.spec.max_retries)
            if nxt == "retrying":
                task_state.check(t.status, "retrying")
                t.status = "retrying"
                self.store.set_status(tid, "retrying", now, attempt=t.attempt, reason=reason)
                self._emit(t, "retrying", error=reason)
                t.stages.clear()
                self._requeue(t, now)
            else:
                msg = f"lost {t.attempt} time(s), max_retries={t.spec.max_retries}: {reason}"
                self._finish(t, "failed", now, error=msg, reason="lost")

    def _started(self, machine_id: str, msg: p.TaskStarted) -> None:
        t = self.active.get(msg.task_id)
        if t is None or not self._is_current(msg.task_id, msg.attempt, machine_id):
            return
        if t.status == "assigned":
            task_state.check(t.status, "running")
            t.status = "running"
            with self.store.transaction():
                self.store.update_attempt(t.task_id, t.attempt, state="running", started=msg.time)
                self.store.set_status(t.task_id, "running", msg.time, attempt=t.attempt, started=msg.time)
            self._emit(t, "running", machine=machine_id)

    def _stage_done(self, machine_id: str, msg: p.StageDone) -> None:
        t = self.active.get(msg.task_id)
        if (t is not None and self._is_current(msg.task_id, msg.attempt, machine_id)
                and msg.index < len(t.spec.stages)):  # a daemon cannot grow this map
            t.stages[msg.index] = msg.stage
            self._emit(t, t.status, machine=machine_id, stage_index=msg.index, stage=msg.stage)

    def _task_done(self, machine_id: str, msg: p.TaskDone, now: float) -> bool:
        """Record an attempt's outcome exactly once; False when it was stale."""
        m = self.machines.get(machine_id)
        if m is not None and (msg.task_id, msg.attempt) in m.cancelling:
            m.cancelling.discard((msg.task_id, msg.attempt))
            self.scheduler.release(machine_id)
            self._dirty = True
            self.store.update_attempt(msg.task_id, msg.attempt, state="cancelled", ended=now,
                                      reason="cancelled")
            return False
        t = self.active.get(msg.task_id)
        if t is None or not self._is_current(msg.task_id, msg.attempt, machine_id):
            return False
        o = msg.outcome
        self.machines[machine_id].running.discard(t.task_id)
        self.scheduler.release(machine_id)
        self._dirty = True
        if o.status == "lost":  # its worker died, not the task: retried like a lost daemon's
            reason = (o.error or "the attempt was lost on its daemon")[:1000]
            self._lose_attempts(machine_id, [t.task_id], now, reason=reason, exclude=False)
            return True
        with self.store.transaction():
            self.store.update_attempt(
                t.task_id, t.attempt, state=o.status, ended=o.finished or now, reason=o.reason,
                **({"started": o.started} if t.status == "assigned" and o.started else {}),
            )
            self._finish(
                t, o.status, o.finished or now, error=o.error, reason=o.reason,
                exit_code=o.exit_code, result=dumps(o), result_attempt=t.attempt,
                started=o.started, outcome=o,
            )
        return True

    def _finish(self, t: ActiveTask, status: str, now: float, *,
                outcome: Optional[p.TaskOutcome] = None, **fields: Any) -> None:
        task_state.check(t.status, status)
        if fields.get("started") is None:
            fields.pop("started", None)
        reason = fields.pop("reason", None)
        self.store.set_status(
            t.task_id, status, now, attempt=t.attempt, reason=reason, finished=now, **fields
        )
        # The task's credit slot settles in the same transaction as its end,
        # from this attempt's result, bounded by what the hub saw of it.
        usage = self._usage(t) if outcome is not None else None
        self.ledger.settle_task(t.task_id, status, reason, t.machine, t.spec.credits, outcome, now, usage)
        t.status = status
        self.scheduler.remove(t.task_id)
        del self.active[t.task_id]
        self.active_by_user[t.user] -= 1
        if self.active_by_user[t.user] <= 0:
            del self.active_by_user[t.user]
        self._emit(t, status, machine=t.machine, error=fields.get("error"))
        self._ended.append(t.task_id)  # its waiters and watches settle once the event succeeded

    def _usage(self, t: ActiveTask) -> Optional[Usage]:
        """The attempt's wall time by the hub's clock and its machine's cores:
        the most CPU-seconds it can have used, whatever the daemon says."""
        m = self.machines.get(t.machine or "")
        if m is None:
            return None
        assigned = t.assigned_at
        if assigned is None:  # assigned before a hub restart: read it back
            rows = self.store.attempts([t.task_id]).get(t.task_id, [])
            assigned = next((r["assigned"] for r in rows if r["attempt"] == t.attempt), None)
        if assigned is None:
            return None
        cores = m.hardware.get("cores")
        return Usage(wall=max(0.0, self._now - assigned), cores=cores if isinstance(cores, int) else 1,
                     gpus=len(m.hardware.get("gpus") or ()))

    def _on_results_refused(self, ev: ResultsRefused) -> None:
        """A daemon's result that failed validation (a bad number, named in
        ``problem``): its attempt is over -- lost, retried on another machine
        (or failed after max_retries) -- so no task waits for a result that
        will never decode.  The daemon is told which field was wrong."""
        ps = self.peers.get(ev.peer)
        if ps is None:
            return
        machine = ps.machine_id
        for tid, attempt in ev.results:
            if machine is None or not self._is_current(tid, attempt, machine):
                continue
            self.machines[machine].running.discard(tid)
            self.scheduler.release(machine)
            self._dirty = True
            self._lose_attempts(machine, [tid], self._now, reason=f"result refused: {ev.problem[:500]}")
        self._send(ev.peer, p.Error(id=ev.rid, code="bad_message", message=ev.problem))

    # -- cancellation -------------------------------------------------------

    def _cancel_targets(self, msg: p.Cancel, who: Principal) -> list[str]:
        """The unfinished tasks a cancel request names (checked: the caller's own)."""
        if msg.session_id is not None:
            self._own_session(msg.session_id, who)
            sid = msg.session_id  # in memory: only unfinished tasks can be cancelled
            return [t.task_id for t in self.active.values() if t.session_id == sid]
        ids = list(dict.fromkeys(msg.task_ids))
        self._check_known(ids, who)
        return [tid for tid in ids if tid in self.active]

    def _cancel_some(self, peer: int, rid: int, ids: list[str], by_state: dict[str, int], done: list[str]) -> None:
        """Cancel up to CANCEL_CHUNK tasks now; the rest in a later batch, so
        cancelling 200,000 tasks never holds the hub for long."""
        now = self._now
        for tid in ids[:CANCEL_CHUNK]:
            t = self.active.get(tid)
            if t is None:
                continue  # already ended: nothing to cancel
            prior = "retrying" if t.status == "queued" and t.attempt > 0 else t.status
            if t.status in ("assigned", "running") and t.machine in self.machines:
                m = self.machines[t.machine]
                m.running.discard(tid)
                if m.connected:
                    m.cancelling.add((tid, t.attempt))
                    self._send(self.daemon_peer.get(t.machine), p.CancelTask(task_id=tid, attempt=t.attempt))
                self.store.update_attempt(tid, t.attempt, state="cancelling", ended=None)
            self._finish(t, "cancelled", now, error="cancelled", reason="cancelled")
            by_state[prior] = by_state.get(prior, 0) + 1
            done.append(tid)
        rest = ids[CANCEL_CHUNK:]
        if rest:
            self._out.append(Later(CancelContinued(peer, rid, tuple(rest), tuple(by_state.items()), tuple(done))))
        else:
            self._send(peer, p.Cancelled(id=rid, task_ids=done, by_state=by_state))

    # -- queries ------------------------------------------------------------

    def _visible(self, task_id: str, row_user: Optional[str], who: Principal) -> bool:
        return who.is_admin or row_user == who.user

    def _answer(self, w: _Waiter, timed_out: bool) -> None:
        if w.done:
            return
        if w.peer in self.peers:
            try:
                self._send(w.peer, p.Results(id=w.rid, tasks=self._records(w.task_ids, w.who), timed_out=timed_out))
            except RequestError as exc:
                self._send(w.peer, p.Error(id=w.rid, code=exc.code, message=str(exc)))
        self._end_waiter(w)

    # -- what one user may hold: waiters and watches ---------------------------

    _HOLDS = {0: ("get_results(wait=True) requests waiting", "max_waiters_per_user"),
              1: ("watches open", "max_watches_per_user")}

    def _hold(self, user: str, kind: int, ids: int) -> None:
        """Count a waiter (kind 0) or watch (1) over ``ids`` task ids against ``user``,
        or refuse it naming the flag: one user's waits cannot fill the hub's memory."""
        held = self._holds.setdefault(user, [0, 0, 0])
        what, limit_name = self._HOLDS[kind]
        limit = getattr(self.limits, limit_name)
        if held[kind] >= limit:
            raise RequestError("limit", f"user {user!r} has {held[kind]} {what} "
                                        f"(--{limit_name.replace('_', '-')}={limit}); let some end first")
        ids_limit = self.limits.max_waited_ids_per_user
        if held[2] + ids > ids_limit:
            raise RequestError("limit", f"user {user!r} has waits and watches over {held[2]} task ids; "
                                        f"{ids} more would pass --max-waited-ids-per-user={ids_limit}")
        held[kind] += 1
        held[2] += ids

    def _release(self, user: str, kind: int, ids: int) -> None:
        held = self._holds.get(user)
        if held is None:
            return
        held[kind] -= 1
        held[2] -= ids
        if held == [0, 0, 0]:
            del self._holds[user]

    def _end_waiter(self, w: _Waiter) -> None:
        """A waiter answered or abandoned: off every task's list, its ids freed."""
        if w.done:
            return
        w.done = True
        for tid in w.task_ids:
            waiting = self._waiters.get(tid)
            if waiting is not None:
                waiting.pop(w, None)
                if not waiting:
                    del self._waiters[tid]
        w.task_ids = []
        self._release(w.who.user, 0, w.held)

    def _check_reply_size(self, task_ids: list[str]) -> None:
        """Refuse, before building it, a reply that would pass --max-message-bytes."""
        limit = self.limits.max_message_bytes
        size = self.store.reply_bytes(task_ids) + RECORD_OVERHEAD * len(task_ids)
        if size > limit:
            fit = max(1, len(task_ids) * limit // size // 2)
            raise RequestError("limit", f"the records of these {len(task_ids)} tasks take about {size} bytes, "
                                        f"over --max-message-bytes={limit}: ask for fewer at a time "
                                        f"(about {fit} fit)")

    def _check_known(self, task_ids: list[str], who: Principal) -> None:
        """Refuse oversized requests and unknown ids before any waiting.

        Another user's ids are unknown ids: same error, same text."""
        if len(task_ids) > self.limits.max_results_per_request:
            raise RequestError(
                "limit",
                f"{len(task_ids)} ids exceed max_results_per_request={self.limits.max_results_per_request}",
            )
        missing = []
        stored: list[str] = []
        for tid in task_ids:
            t = self.active.get(tid)
            if t is None:
                stored.append(tid)
            elif not self._visible(tid, t.user, who):
                missing.append(tid)
        if stored:
            users = self.store.task_users(stored)  # not whole rows: they hold every command's output
            missing += [tid for tid in stored
                        if tid not in users or not self._visible(tid, users[tid], who)]
        if missing:
            missing.sort(key=task_ids.index)
            raise RequestError("not_found", f"unknown task id(s): {', '.join(missing[:5])}")

    def _visible_rows(self, task_ids: list[str], who: Principal) -> dict[str, Any]:
        rows = self.store.tasks(task_ids)
        missing = [tid for tid in task_ids if tid not in rows or not self._visible(tid, rows[tid]["user"], who)]
        if missing:
            raise RequestError("not_found", f"unknown task id(s): {', '.join(missing[:5])}")
        return rows

    def _records(self, task_ids: list[str], who: Principal) -> list[p.TaskRecord]:
        self._check_reply_size(task_ids)
        rows = self._visible_rows(task_ids, who)
        attempts = self.store.attempts(task_ids)
        credits = self.store.claimed_credits(task_ids)
        return [self._record(rows[tid], attempts.get(tid, []), credits.get(tid)) for tid in task_ids]

    def _record(self, row: Any, attempts: list[Any], credits: Optional[int] = None, *,
                brief: bool = False) -> p.TaskRecord:
        tid = row["task_id"]
        t = self.active.get(tid)
        spec = loads(row["spec"])
        outcome = p.convert(loads(row["result"]), p.TaskOutcome) if row["result"] else None
        machine = row["machine"]
        m = self.machines.get(machine) if machine else None
        if outcome is not None:
            stages, artifacts = outcome.stages, outcome.artifacts
        elif t is not None and t.stages and not brief:
            stages, artifacts = [t.stages[i] for i in sorted(t.stages)], []
        else:
            stages, artifacts = [], []
        return p.TaskRecord(
            task_id=tid,
            session_id=row["session_id"],
            status=row["status"],
            priority=row["priority"],
            label=spec.get("label", ""),
            hardware=spec.get("hardware") or {},
            submitted=row["submitted"],
            queued=row["queued"],
            started=row["started"],
            finished=row["finished"],
            machine=machine,
            machine_hardware=m.hardware if m else None,
            exit_code=row["exit_code"],
            error=row["error"],
            reason=row["reason"],
            wait_reason=self.scheduler.wait_reason(tid) if t is not None else None,
            attempts=[
                p.AttemptInfo(
                    attempt=a["attempt"], machine=a["machine"], state=a["state"],
                    assigned=a["assigned"], started=a["started"], ended=a["ended"], reason=a["reason"],
                )
                for a in attempts
            ],
            stages=stages,
            artifacts=artifacts,
            credits=credits,
            value=outcome.value if outcome is not None else None,
            user=row["user"],
            parser=spec.get("parser"),
            progress=100.0 if row["status"] == "finished" and spec.get("parser") else row["progress"],
            frame_start=spec.get("frame_start"),
            frame_end=spec.get("frame_end"),
            frame_current=row["frame_current"],
            job_id=row["job_id"],
            external_id=row["external_id"],
            hidden=bool(row["hidden"]),
        )

    def _briefs(self, task_ids: list[str], who: Principal) -> list[p.TaskBrief]:
        """Current state of tasks, for a watch snapshot."""
        out = []
        rows = self._visible_rows(task_ids, who)
        for tid in task_ids:
            row = rows[tid]
            t = self.active.get(tid)
            spec = loads(row["spec"])
            if t is not None:
                stages = [t.stages[i] for i in sorted(t.stages)]
            elif row["result"]:
                stages = p.convert(loads(row["result"]), p.TaskOutcome).stages
            else:
                stages = []
            out.append(p.TaskBrief(task_id=tid, status=row["status"], machine=row["machine"],
                                   error=row["error"], n_stages=len(spec["stages"]), stages=stages,
                                   submitted=row["submitted"], progress=row["progress"],
                                   frame_current=row["frame_current"]))
        return out

    def _session(self, session_id: str, rid: int, who: Principal) -> p.SessionInfo:
        row = self._own_session(session_id, who)
        ids = self.store.session_task_ids(session_id)
        counts = self.store.session_counts(session_id)
        return p.SessionInfo(id=rid, session_id=session_id, created=row["created"], task_ids=ids, counts=counts)

    # -- blobs --------------------------------------------------------------

    def blob_readable(self, who: Principal, sha256: str, machine_id: Optional[str] = None) -> bool:
        """May ``who`` read (or build on) this blob?  Its own uploads and its
        tasks' artifacts; for a daemon also the Data of tasks running on it.
        Existence of anyone else's blob is not revealed."""
        if who.is_admin or self.store.blob_ref_exists(sha256, who.blob_scope):
            return True
        m = self.machines.get(machine_id) if machine_id else None
        if who.role == "daemon" and m is not None:
            for tid in m.running:
                t = self.active.get(tid)
                if t is not None and any(d.sha256 == sha256 for st in t.spec.stages for d in st.data):
                    return True
        return False

    def _usable(self, who: Principal, sha256: str, machine_id: Optional[str] = None) -> bool:
        """Is the blob stored and may ``who`` build on it?  A yes is a use:
        the blob is touched, so garbage collection spares it for its grace
        period while the caller submits what refers to it (blobgc.py)."""
        if self.blobs.has(sha256) and self.blob_readable(who, sha256, machine_id):
            self.blobs.touch(sha256)
            return True
        return False

    def blob_quota_refusal(self, who: Principal, sha256: str, size: int, pending: int = 0) -> Optional[str]:
        """Why storing ``size`` more bytes for ``who`` would exceed its blob
        quota (``pending``: bytes of its uploads still open), or None.
        Daemons are not charged: the artifacts they upload count against
        the task's user when the result arrives (``_accept_artifacts``)."""
        if who.role != "client" or self.store.blob_ref_exists(sha256, who.blob_scope):
            return None
        return self._over_quota(who.user, self.store.blob_bytes(who.blob_scope) + pending, size)

    def _over_quota(self, user: str, used: int, size: int) -> Optional[str]:
        cap = self.limits.max_blob_bytes_per_user
        if used + size <= cap:
            return None
        return (f"user {user!r} stores {used} bytes of blobs; {size} more would exceed "
                f"max_blob_bytes_per_user={cap} (flag --max-blob-bytes-per-user)")

    def _grant_blob(self, who: Principal, sha256: str, size: Optional[int] = None) -> None:
        """``who`` uploaded this blob: it may use and read it from now on."""
        if size is None and self.blobs.has(sha256):
            size = self.blobs.size(sha256)
        self.store.add_blob_refs([(sha256, who.blob_scope, size)])

    def _accept_artifacts(self, machine_id: str, who: Principal, msg: p.TaskDone) -> None:
        """Check what a daemon says it collected before anyone downloads it:
        a safe relative name, and a blob this daemon's owner uploaded.  The
        task's user may then download it."""
        t = self.active.get(msg.task_id)
        grants = []
        used = self.store.blob_bytes(f"u:{t.user}") if t is not None else 0
        for a in msg.outcome.artifacts:
            if a.name is not None:
                problem = unsafe_relative_path(a.name)
                if problem:
                    a.error = f"refused artifact name {a.name[:200]!r}: it {problem}"
                    a.name, a.sha256, a.size = None, None, None
                    continue
            if a.sha256 is None:
                continue
            # The daemon must hold the blob: its owner uploaded it, or it is the
            # Data of a task it runs (a copy it already has the bytes of).
            if not self._usable(who, a.sha256, machine_id):
                a.error = a.error or "artifact was not uploaded to the hub"
                a.sha256 = None
                continue
            if t is not None and self._is_current(msg.task_id, msg.attempt, machine_id):
                size = self.blobs.size(a.sha256)
                if not self.store.blob_ref_exists(a.sha256, f"u:{t.user}"):
                    over = self._over_quota(t.user, used, size)
                    if over:
                        a.error, a.sha256 = f"artifact not kept: {over}", None
                        continue
                    used += size
                grants.append((a.sha256, f"u:{t.user}", size))
        if grants:
            self.store.add_blob_refs(grants)

    def _pool(self, msg: p.GetPool, who: Optional[Principal] = None) -> list[p.MachineInfo]:
        try:
            reqs = [hw.normalize(h) for h in msg.hardware]
        except hw.HardwareError as exc:
            raise RequestError("bad_hardware", str(exc)) from None
        out = []
        earned = self.store.machine_credits()
        for m in sorted(self.machines.values(), key=lambda m: m.name):
            if not m.connected and not msg.include_offline:
                continue
            facts = dict(m.hardware, name=m.name, machine_id=m.machine_id, tags=m.tags)
            if reqs and not any(hw.matches(r, facts) for r in reqs):
                continue
            draining = m.draining or m.admin_status == "drain"
            state = "offline" if not m.connected else ("draining" if draining else "online")
            out.append(
                p.MachineInfo(
                    machine_id=m.machine_id, name=m.name, state=state, hardware=m.hardware,
                    slots=m.slots, running=len(m.running), tags=m.tags, load=m.load,
                    first_seen=m.first_seen, last_seen=m.last_seen, owner=m.owner,
                    credits=earned.get(m.machine_id, 0), enabled=m.admin_status == "enabled",
                    current_tasks=sorted(tid for tid in m.running if who is None or who.is_admin
                                         or ((t := self.active.get(tid)) is not None and t.user == who.user)),
                    ip_address=m.address,
                )
            )
        return out

    # -- watches and live output --------------------------------------------

    def _subs_for(self, task_id: str, session_id: Optional[str]) -> set[_Sub]:
        subs = self._subs_by_task.get(task_id, set())
        if session_id is not None and session_id in self._subs_by_session:
            subs = subs | self._subs_by_session[session_id]
        return subs

    def _drop_sub(self, sub: _Sub) -> None:
        if sub.user:
            self._release(sub.user, 1, sub.held)
            sub.user = ""
        ps = self.peers.get(sub.peer)
        if ps is not None and ps.subs.get(sub.wid) is sub:
            del ps.subs[sub.wid]
        if sub.session_id is not None:
            self._subs_by_session.get(sub.session_id, set()).discard(sub)
        for tid in sub.task_ids:
            subs = self._subs_by_task.get(tid)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs_by_task[tid]

    def _output(self, machine_id: str, msg: p.Output) -> None:
        """A daemon's live output: kept (bounded) for late watchers, sent to current ones."""
        t = self.active.get(msg.task_id)
        if t is None or t.attempt != msg.attempt or t.machine != machine_id:
            return
        r = self._replay.get(t.task_id)
        if r is None or r.attempt != t.attempt:
            r = self._replay[t.task_id] = _Replay(t.attempt)
        r.add(msg.stream, msg.text)
        for sub in self._subs_for(t.task_id, t.session_id):
            if sub.output:
                self._send(sub.peer, p.Output(task_id=msg.task_id, attempt=msg.attempt, stream=msg.stream,
                                              text=msg.text, watch=sub.wid))

    def _replay_to(self, peer: int, wid: int, task_ids: Iterable[str]) -> None:
        """What running tasks printed before this watch began: nothing is lost
        to a watcher that subscribes after the submit."""
        for tid in task_ids:
            r = self._replay.get(tid)
            if r is None:
                continue
            if r.dropped:
                self._send(peer, p.Output(task_id=tid, attempt=r.attempt, stream="stdout", watch=wid,
                                          text=f"[hwf: {r.dropped} earlier bytes of output not kept]\n"))
            for stream, text in r.chunks:
                self._send(peer, p.Output(task_id=tid, attempt=r.attempt, stream=stream, text=text,  # type: ignore[arg-type]
                                          watch=wid))

    # -- event handlers -------------------------------------------------------

    def _on_connected(self, ev: Connected) -> None:
        self.peers[ev.peer] = _PeerState(ev.who, ev.version, ev.address)

    def _on_disconnected(self, ev: Disconnected) -> None:
        ps = self.peers.pop(ev.peer, None)
        if ps is None:
            return
        for sub in list(ps.subs.values()):
            self._drop_sub(sub)
        for w in ps.waiters:
            self._end_waiter(w)
        if len(self._deadlines) > 2 * sum(len(x) for x in self._waiters.values()) + 1024:
            # Abandoned waiters' deadlines: drop them rather than keep them for their 30 days.
            self._deadlines = [d for d in self._deadlines if not d[2].done]
            heapq.heapify(self._deadlines)
        if ps.machine_id is not None and self.daemon_peer.get(ps.machine_id) == ev.peer:
            del self.daemon_peer[ps.machine_id]
            self._disconnect(ps.machine_id, self._now, "daemon connection lost")

    def _on_received(self, ev: Received) -> None:
        ps = self.peers.get(ev.peer)
        if ps is not None:  # else it raced its own disconnect
            self._MESSAGES[type(ev.msg)](self, ev.peer, ps, ev.msg)

    def _on_blob_stored(self, ev: BlobStored) -> None:
        ps = self.peers.get(ev.peer)
        if ps is None:
            return
        size = self.blobs.size(ev.sha256)
        over = self.blob_quota_refusal(ps.who, ev.sha256, size)
        if over:  # checked at the announcement too; this also covers HTTP uploads and races
            self._send(ev.peer, p.Error(id=ev.rid, code="quota", message=over))
            return
        self._grant_blob(ps.who, ev.sha256, size)
        self._send(ev.peer, p.Ok(id=ev.rid))

    def _on_blobs_scanned(self, ev: BlobsScanned) -> None:
        """The last step of a garbage collection, here where nothing runs beside
        it: spare what unfinished tasks hold and what was used since the scan."""
        cutoff = self._now - ev.grace
        held = {d.sha256 for t in self.active.values() for st in t.spec.stages for d in st.data}
        gone = [s for s in ev.candidates
                if s not in held and (mtime := self.blobs.mtime(s)) is not None and mtime < cutoff]
        if not ev.dry_run:
            for sha in gone:
                self.blobs.delete(sha)
            self.store.drop_blob_refs(gone)
        deleted, freed, kept, kept_bytes = blobgc.totals(ev.listing, gone)
        if deleted or ev.peer is not None:
            log.info("blob gc%s: %d blob(s) of %d bytes %s; %d of %d bytes kept", " (dry run)" if ev.dry_run else "",
                     deleted, freed, "to delete" if ev.dry_run else "deleted", kept, kept_bytes)
        if ev.peer is not None:
            self._send(ev.peer, p.BlobGcReport(id=ev.rid, dry_run=ev.dry_run, deleted=deleted, deleted_bytes=freed,
                                               kept=kept, kept_bytes=kept_bytes))

    def _on_tick(self, ev: Tick) -> None:
        now = self._now
        stale = now - self.heartbeat_timeout
        for machine_id, peer in list(self.daemon_peer.items()):
            m = self.machines.get(machine_id)
            if m is not None and m.last_seen < stale:
                log.warning("daemon %s missed heartbeats; dropping it", machine_id)
                del self.daemon_peer[machine_id]
                self.peers[peer].machine_id = None
                self._disconnect(machine_id, now, "daemon heartbeats stopped")
                self._out.append(Close(peer, 1011, "heartbeat timeout"))
        while self._deadlines and self._deadlines[0][0] <= now:
            self._answer(heapq.heappop(self._deadlines)[2], timed_out=True)
        self.ledger.expire(now)
        if self._grace_until is not None and now >= self._grace_until:
            self._grace_until = None
            self._expire_absent_daemons(now)

    def _expire_absent_daemons(self, now: float) -> None:
        """After a restart: attempts whose daemon never came back are lost."""
        absent: dict[str, list[str]] = {}
        for t in self.active.values():
            if t.status in ("assigned", "running") and t.machine not in self.daemon_peer:
                absent.setdefault(t.machine or "?", []).append(t.task_id)
        for machine_id, tids in absent.items():
            self._lose_attempts(machine_id, tids, now, "daemon did not return after hub restart")
            m = self.machines.get(machine_id)
            if m is not None:
                m.running.difference_update(tids)

    def _on_tokens_revoked(self, ev: TokensRevoked) -> None:
        for peer, ps in self.peers.items():
            if ps.who.token_id in ev.token_ids:
                self._out.append(Close(peer, 1008, "token revoked"))

    def _on_cancel_continued(self, ev: CancelContinued) -> None:
        self._cancel_some(ev.peer, ev.rid, list(ev.remaining), dict(ev.by_state), list(ev.done))

    _EVENTS: dict[type, Callable[..., None]] = {
        Connected: _on_connected,
        Disconnected: _on_disconnected,
        Received: _on_received,
        BlobStored: _on_blob_stored,
        BlobsScanned: _on_blobs_scanned,
        Tick: _on_tick,
        TokensRevoked: _on_tokens_revoked,
        CancelContinued: _on_cancel_continued,
        ResultsRefused: _on_results_refused,
    }

    # -- message handlers: (peer, its state, message) --------------------------

    def _m_submit(self, peer: int, ps: _PeerState, msg: p.Submit) -> None:
        self._send(peer, self._submit(msg, ps.who))

    def _m_get_results(self, peer: int, ps: _PeerState, msg: p.GetResults) -> None:
        self._check_known(msg.task_ids, ps.who)
        pending = [tid for tid in dict.fromkeys(msg.task_ids) if tid in self.active] if msg.wait else []
        if not pending or msg.timeout == 0:
            self._send(peer, p.Results(id=msg.id, tasks=self._records(msg.task_ids, ps.who),
                                       timed_out=bool(pending)))
            return
        deadline = None if msg.timeout is None else self._now + msg.timeout
        self._check_reply_size(msg.task_ids)  # its answer must fit, whenever it comes
        self._hold(ps.who.user, 0, len(msg.task_ids))
        w = _Waiter(peer, msg.id, ps.who, list(msg.task_ids), len(pending), deadline, held=len(msg.task_ids))
        for tid in pending:
            self._waiters.setdefault(tid, {})[w] = None
        if len(ps.waiters) > 64:
            ps.waiters = [x for x in ps.waiters if not x.done]
        ps.waiters.append(w)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._tiebreak), w))

    def _m_get_pool(self, peer: int, ps: _PeerState, msg: p.GetPool) -> None:
        self._send(peer, p.Pool(id=msg.id, machines=self._pool(msg, ps.who)))

    def _m_blobs_missing(self, peer: int, ps: _PeerState, msg: p.BlobsMissing) -> None:
        # "Present" only for blobs this caller may use: whether anyone else
        # stored a file is not revealed (a re-upload is cheap).
        missing = [s for s in msg.sha256 if not self._usable(ps.who, s, ps.machine_id)]
        self._send(peer, p.BlobsMissingReply(id=msg.id, missing=missing))

    def _m_blob_get(self, peer: int, ps: _PeerState, msg: p.BlobGet) -> None:
        # Someone else's blob answers exactly like a missing one.
        if not (self.blobs.has(msg.sha256) and self.blob_readable(ps.who, msg.sha256, ps.machine_id)):
            raise RequestError("not_found", f"no blob {msg.sha256[:12]}… on the hub")
        self._out.append(StreamBlob(peer, msg.id, msg.sha256))

    def _m_watch(self, peer: int, ps: _PeerState, msg: p.Watch) -> None:
        if msg.session_id is not None:
            ids = self._session(msg.session_id, msg.id, ps.who).task_ids
        else:
            ids = list(dict.fromkeys(msg.task_ids))
        limit = self.limits.max_results_per_request
        if len(ids) > limit:
            raise RequestError("limit", f"a watch covers at most {limit} tasks, got {len(ids)}")
        briefs = self._briefs(ids, ps.who)
        if msg.id in ps.subs:
            self._drop_sub(ps.subs[msg.id])
        sub = _Sub(peer, msg.id, msg.output, set(ids), msg.session_id)
        self._hold(ps.who.user, 1, len(ids))
        sub.user, sub.held = ps.who.user, len(ids)
        ps.subs[msg.id] = sub
        if msg.session_id is not None:
            self._subs_by_session.setdefault(msg.session_id, set()).add(sub)
        else:
            for b in briefs:
                if b.status not in p.TERMINAL_STATES:
                    self._subs_by_task.setdefault(b.task_id, set()).add(sub)
        self._send(peer, p.Watching(id=msg.id, tasks=briefs))
        if msg.output:
            self._replay_to(peer, msg.id, ids)

    def _m_unwatch(self, peer: int, ps: _PeerState, msg: p.Unwatch) -> None:
        sub = ps.subs.get(msg.watch)
        if sub is not None:
            self._drop_sub(sub)
        self._send(peer, p.Ok(id=msg.id))

    def _m_cancel(self, peer: int, ps: _PeerState, msg: p.Cancel) -> None:
        self._cancel_some(peer, msg.id, self._cancel_targets(msg, ps.who), {}, [])

    def _m_get_session(self, peer: int, ps: _PeerState, msg: p.GetSession) -> None:
        self._send(peer, self._session(msg.session_id, msg.id, ps.who))

    def _m_register(self, peer: int, ps: _PeerState, msg: p.Register) -> None:
        if ps.machine_id is not None:
            raise RequestError("bad_request", f"this connection is already registered as {ps.machine_id!r}")
        reply = self._register(msg, self._now, ps.who, ps.address)
        ps.machine_id = reply.machine_id
        self.daemon_peer[reply.machine_id] = peer
        self._send(peer, reply)
        for tid, attempt in sorted(self.machines[reply.machine_id].cancelling):
            self._send(peer, p.CancelTask(task_id=tid, attempt=attempt))  # stale work: stop it

    @staticmethod
    def _machine_of(ps: _PeerState) -> str:
        if ps.machine_id is None:
            raise RequestError("not_registered", "register before sending task messages")
        return ps.machine_id

    def _m_heartbeat(self, peer: int, ps: _PeerState, msg: p.Heartbeat) -> None:
        self._heartbeat(self._machine_of(ps), msg, self._now)

    def _m_draining(self, peer: int, ps: _PeerState, msg: p.Draining) -> None:
        if ps.machine_id is not None:
            self._set_draining(ps.machine_id, self._now)

    def _m_task_started(self, peer: int, ps: _PeerState, msg: p.TaskStarted) -> None:
        self._started(self._machine_of(ps), msg)

    def _m_stage_done(self, peer: int, ps: _PeerState, msg: p.StageDone) -> None:
        self._stage_done(self._machine_of(ps), msg)

    def _m_task_done(self, peer: int, ps: _PeerState, msg: p.TaskDone) -> None:
        machine = self._machine_of(ps)
        self._accept_artifacts(machine, ps.who, msg)
        self._task_done(machine, msg, self._now)
        self._send(peer, p.Ok(id=msg.id))  # acked whether new or a resend

    def _m_tasks_done(self, peer: int, ps: _PeerState, msg: p.TasksDone) -> None:
        machine = self._machine_of(ps)
        for done in msg.done:
            self._accept_artifacts(machine, ps.who, done)
            self._task_done(machine, done, self._now)
        self._send(peer, p.Ok(id=msg.id))

    def _m_output(self, peer: int, ps: _PeerState, msg: p.Output) -> None:
        if ps.machine_id is not None:
            self._output(ps.machine_id, msg)

    # -- the Manager API's requests (http_api.py speaks them for HTTP callers) -

    def _m_list_tasks(self, peer: int, ps: _PeerState, msg: p.ListTasks) -> None:
        who = ps.who
        if not who.is_admin and msg.user not in (None, who.user):
            self._send(peer, p.TaskList(id=msg.id, tasks=[], total=0))  # another user's: as if none
            return
        user = msg.user if who.is_admin else who.user
        rows, total = self.store.list_tasks(
            user=user, statuses=msg.status, session_id=msg.session_id, machine=msg.machine,
            job_id=msg.job_id, external_id=msg.external_id, include_hidden=msg.include_hidden,
            offset=msg.offset, limit=msg.limit, brief=msg.brief)
        ids = [r["task_id"] for r in rows]
        if not msg.brief:
            self._check_reply_size(ids)
        attempts = {} if msg.brief else self.store.attempts(ids)
        credits = self.store.claimed_credits(ids)
        records = [self._record(r, attempts.get(r["task_id"], []), credits.get(r["task_id"]), brief=msg.brief)
                   for r in rows]
        self._send(peer, p.TaskList(id=msg.id, tasks=records, total=total))

    def _m_list_sessions(self, peer: int, ps: _PeerState, msg: p.ListSessions) -> None:
        rows = self.store.sessions_of(None if ps.who.is_admin else ps.who.user, msg.limit)
        self._send(peer, p.SessionList(id=msg.id, sessions=[p.SessionSummary(**r) for r in rows]))

    def _m_update_task(self, peer: int, ps: _PeerState, msg: p.UpdateTask) -> None:
        row = self._visible_rows([msg.task_id], ps.who)[msg.task_id]
        if msg.priority is not None and msg.priority != row["priority"]:
            t = self.active.get(msg.task_id)
            if t is None or t.status not in ("queued", "retrying") or not self.scheduler.is_queued(t.task_id):
                raise RequestError("not_queued", f"task {msg.task_id} is {row['status']}: "
                                                 "its priority can change only while it is queued")
            self.scheduler.remove(t.task_id)
            t.spec = msgspec_replace(t.spec, priority=msg.priority)
            self.store.set_task_fields(t.task_id, priority=msg.priority, spec=dumps(t.spec))
            self._enqueue(t)
            self._dirty = True
        if msg.hidden is not None:
            self.store.set_task_fields(msg.task_id, hidden=int(msg.hidden))
        self._send(peer, p.Ok(id=msg.id))

    def _m_set_machine(self, peer: int, ps: _PeerState, msg: p.SetMachine) -> None:
        if not ps.who.is_admin:
            raise RequestError("forbidden", "only an admin token may enable, disable or drain machines")
        m = self.machines.get(msg.machine_id)
        if m is None:
            raise RequestError("not_found", f"unknown machine {msg.machine_id!r}")
        m.admin_status = msg.status
        self.store.set_machine_admin_status(m.machine_id, msg.status)
        if m.connected:
            self.scheduler.set_accepting(m.machine_id, msg.status == "enabled" and not m.draining)
            self._dirty = True
        self._send(peer, p.Ok(id=msg.id))

    def _m_put_job_file(self, peer: int, ps: _PeerState, msg: p.PutJobFile) -> None:
        if not self._usable(ps.who, msg.sha256):
            raise RequestError("missing_blob", f"job {msg.job_id!r}: its file (sha256 {msg.sha256[:12]}…) "
                                               "was not uploaded")
        self.store.set_job_file(ps.who.user, msg.job_id, msg.sha256, self._now)
        self._send(peer, p.Ok(id=msg.id))

    def _m_get_job_file(self, peer: int, ps: _PeerState, msg: p.GetJobFile) -> None:
        sha = self.store.job_file(ps.who.user, msg.job_id)
        self._send(peer, p.JobFile(id=msg.id, job_id=msg.job_id, sha256=sha))

    def _m_progress(self, peer: int, ps: _PeerState, msg: p.Progress) -> None:
        """A daemon's word on a running attempt's progress: only for an attempt
        it runs, frames only inside the task's range (it is untrusted input)."""
        machine = self._machine_of(ps)
        if not self._is_current(msg.task_id, msg.attempt, machine):
            return
        t = self.active[msg.task_id]
        frame = msg.frame_current
        if frame is not None and t.spec.frame_start is not None and t.spec.frame_end is not None:
            if not t.spec.frame_start <= frame <= t.spec.frame_end:
                frame = None
        if frame is None and msg.percent is None:
            return
        fields: dict[str, Any] = {}
        if msg.percent is not None:
            fields["progress"] = round(msg.percent, 3)
        if frame is not None:
            fields["frame_current"] = frame
        self.store.set_task_fields(t.task_id, **fields)
        self._emit(t, t.status, progress=fields.get("progress"), frame_current=frame)

    # -- credits (rules in ledger.py) ---------------------------------------

    def _m_credit_alloc(self, peer: int, ps: _PeerState, msg: p.CreditAlloc) -> None:
        self.ledger.alloc(msg, self._credit_writer(ps, msg), self._now)
        self._send(peer, p.Ok(id=msg.id))

    def _m_credit_discard(self, peer: int, ps: _PeerState, msg: p.CreditDiscard) -> None:
        self.ledger.discard(msg, self._credit_writer(ps, msg), self._now)
        self._send(peer, p.Ok(id=msg.id))

    def _m_credit_counters(self, peer: int, ps: _PeerState, msg: p.CreditCounters) -> None:
        self.ledger.counters(msg, self._credit_writer(ps, msg))
        self._send(peer, p.Ok(id=msg.id))

    def _m_credit_meta(self, peer: int, ps: _PeerState, msg: p.CreditMeta) -> None:
        self.ledger.meta(msg, self._credit_writer(ps, msg))
        self._send(peer, p.Ok(id=msg.id))

    def _m_credit_claim(self, peer: int, ps: _PeerState, msg: p.CreditClaim) -> None:
        self._send(peer, self.ledger.claim(msg, self._credit_writer(ps, msg), self._now))

    @staticmethod
    def _credit_writer(ps: _PeerState, msg: Any) -> Principal:
        """Clients and admins write credit slots; a daemon never does (the
        server refuses it already, by protocol.ALLOWED; checked here too, for
        peers that reach the core another way)."""
        if ps.who.role not in ("client", "admin"):
            raise RequestError("forbidden", p.forbidden_text(ps.who.role, msg))
        return ps.who

    def _m_blob_gc(self, peer: int, ps: _PeerState, msg: p.BlobGc) -> None:
        if not ps.who.is_admin:
            raise RequestError("forbidden", "only an admin token may collect blobs")
        self._out.append(ScanBlobs(peer, msg.id, msg.dry_run))

    def _m_credit_link(self, peer: int, ps: _PeerState, msg: p.CreditLink) -> None:
        if not ps.who.is_admin:
            raise RequestError("forbidden", "only an admin token may link machines to users")
        self._send(peer, self.ledger.link(msg, self._now))

    def _m_get_credit_tally(self, peer: int, ps: _PeerState, msg: p.GetCreditTally) -> None:
        self._send(peer, self.ledger.tally(msg, ps.who))

    def _m_get_credit_slots(self, peer: int, ps: _PeerState, msg: p.GetCreditSlots) -> None:
        self._send(peer, self.ledger.slots(msg, ps.who))

    _MESSAGES: dict[type, Callable[..., None]] = {
        p.Submit: _m_submit,
        p.GetResults: _m_get_results,
        p.GetPool: _m_get_pool,
        p.BlobsMissing: _m_blobs_missing,
        p.BlobGet: _m_blob_get,
        p.Watch: _m_watch,
        p.Unwatch: _m_unwatch,
        p.Cancel: _m_cancel,
        p.GetSession: _m_get_session,
        p.Register: _m_register,
        p.Heartbeat: _m_heartbeat,
        p.Draining: _m_draining,
        p.TaskStarted: _m_task_started,
        p.StageDone: _m_stage_done,
        p.TaskDone: _m_task_done,
        p.TasksDone: _m_tasks_done,
        p.Output: _m_output,
        p.CreditAlloc: _m_credit_alloc,
        p.CreditDiscard: _m_credit_discard,
        p.CreditCounters: _m_credit_counters,
        p.CreditMeta: _m_credit_meta,
        p.CreditClaim: _m_credit_claim,
        p.CreditLink: _m_credit_link,
        p.BlobGc: _m_blob_gc,
        p.GetCreditTally: _m_get_credit_tally,
        p.GetCreditSlots: _m_get_credit_slots,
        p.ListTasks: _m_list_tasks,
        p.ListSessions: _m_list_sessions,
        p.UpdateTask: _m_update_task,
        p.SetMachine: _m_set_machine,
        p.PutJobFile: _m_put_job_file,
        p.GetJobFile: _m_get_job_file,
        p.Progress: _m_progress,
    }

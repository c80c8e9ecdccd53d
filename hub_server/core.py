"""The hub's bookkeeping: tasks, attempts, machines, waiters.

No sockets here: the websocket layer (``server.py``) calls these methods with
decoded messages and sends whatever they return.  Every state change is
written to the store in the same call, before anyone is told about it.

Tenancy lives here too: every request carries the caller's ``Principal``.
A client sees only its own user's sessions, tasks and blobs; another user's
ids are answered exactly as unknown ids are, so nothing leaks whether they
exist.  Admins see everything.  A daemon is bound to its token's owner: a
machine name belongs to the owner that first registered it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from . import hardware as hw
from . import protocol as p
from . import task_state
from .auth import Principal
from .blobs import BlobStore
from .paths import unsafe_relative_path
from .scheduler import Scheduler
from .store import Store, dumps, loads


class RequestError(Exception):
    """A client or daemon asked for something invalid; ``code`` + message go back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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
    # Cancelled attempts still being killed: their slots stay busy until the
    # daemon reports them ended.
    cancelling: set[tuple[str, int]] = field(default_factory=set)


class _Waiter:
    __slots__ = ("remaining", "future")

    def __init__(self, remaining: int, future: asyncio.Future) -> None:
        self.remaining = remaining
        self.future = future


Send = Callable[[str, p.Assign], None]  # (machine_id, message)


class HubCore:
    def __init__(self, store: Store, blobs: BlobStore, limits: p.Limits) -> None:
        self.store = store
        self.blobs = blobs
        self.limits = limits
        self.scheduler = Scheduler()
        self.active: dict[str, ActiveTask] = {}
        self.machines: dict[str, MachineState] = {}
        self._waiters: dict[str, list[_Waiter]] = {}
        # Called as listener(task_id, session_id, status, info) on every
        # transition and finished stage; the server routes them to watchers.
        self.listeners: list[Callable[[str, str, str, dict[str, Any]], None]] = []
        self._seq = store.max_seq()
        self.active_by_user: Counter[str] = Counter()  # unfinished tasks per user
        self.hub_id = store.meta("hub_id") or self._init_hub_id()
        self._load_machines()
        self._load_active()

    def _emit(self, t: ActiveTask, status: str, **info: Any) -> None:
        for listener in self.listeners:
            listener(t.task_id, t.session_id, status, info)

    # -- start-up -----------------------------------------------------------

    def _init_hub_id(self) -> str:
        hub_id = new_id("hub-")
        self.store.set_meta("hub_id", hub_id)
        return hub_id

    def _load_machines(self) -> None:
        self.store.mark_all_machines_offline()
        for row in self.store.machines():
            self.machines[row["machine_id"]] = MachineState(
                machine_id=row["machine_id"],
                name=row["name"],
                hardware=loads(row["hardware"]),
                slots=row["slots"],
                tags=loads(row["tags"]),
                last_seen=row["last_seen"],
                first_seen=row["first_seen"],
                load=p.convert(loads(row["load"]), p.Load) if row["load"] else None,
                instance=row["instance"] or "",
                owner=row["owner"] or "",
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
                self._requeue(t, time.time(), note_transition=t.status == "retrying")
            elif t.machine in self.machines:
                self.machines[t.machine].running.add(t.task_id)

    # -- submission ---------------------------------------------------------

    def submit(self, msg: p.Submit, who: Principal) -> p.Submitted:
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
        now = time.time()
        if msg.session_id is not None:
            self._own_session(msg.session_id, who)
            session_id = msg.session_id
        else:
            session_id = new_id("s-")
        ids = [new_id("t-") for _ in msg.tasks]
        first = self._seq + 1
        self._seq += len(ids)
        rows = [
            (first + i, tid, session_id, dumps(spec), dumps(req), spec.priority, spec.max_retries, user, now)
            for i, (tid, spec, req) in enumerate(zip(ids, msg.tasks, reqs))
        ]
        with self.store.transaction():
            self.store.add_session(session_id, now, user)
            self.store.insert_tasks(rows)
            if msg.key is not None:
                self.store.remember_submit(key, session_id, ids, now)
        for i, (tid, spec, req) in enumerate(zip(ids, msg.tasks, reqs)):
            t = ActiveTask(tid, session_id, first + i, spec, req, "queued", user=user)
            self.active[tid] = t
            self.scheduler.enqueue(tid, req, spec.priority, order=t.seq, user=user)
            self._emit(t, "queued")
        self.active_by_user[user] += len(ids)
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
            if not stage.cmds:
                raise RequestError("bad_task", f"{where}: stage {stage.name!r} has no commands")
            for d in stage.data:
                problem = unsafe_relative_path(d.filename)
                if problem:
                    raise RequestError("bad_path", f"{where}: data filename {d.filename!r} {problem}")
                if not (self.blobs.has(d.sha256) and self.blob_readable(who, d.sha256)):
                    raise RequestError(
                        "missing_blob",
                        f"{where}: data {d.filename!r} (sha256 {d.sha256[:12]}…) was not uploaded",
                    )
        for pattern in spec.artifacts:
            problem = unsafe_relative_path(pattern)
            if problem:
                raise RequestError("bad_path", f"{where}: artifact {pattern!r} {problem}")
        return req

    # -- scheduling ---------------------------------------------------------

    def schedule(self) -> list[tuple[str, p.Assign]]:
        """Assign queued tasks to free slots; store it; return messages to send.

        Memory changes only after the commit: if the write fails, the tasks go
        back to the queue untouched and the slots are freed again.
        """
        pairs = self.scheduler.schedule()
        if not pairs:
            return []
        now = time.time()
        try:
            with self.store.transaction():
                for task_id, machine_id in pairs:
                    t = self.active[task_id]
                    task_state.check(t.status, "assigned")
                    self.store.add_attempt(task_id, t.attempt + 1, machine_id,
                                           self.machines[machine_id].instance, now)
                    self.store.set_status(task_id, "assigned", now, attempt=t.attempt + 1, machine=machine_id)
        except Exception:
            for task_id, machine_id in pairs:
                self.scheduler.release(machine_id)
                t = self.active[task_id]
                self.scheduler.enqueue(task_id, t.requirements, t.spec.priority, exclude=t.excluded, order=t.seq,
                                       user=t.user)
            raise
        out = []
        for task_id, machine_id in pairs:
            t = self.active[task_id]
            t.attempt += 1
            t.status = "assigned"
            t.machine = machine_id
            self.machines[machine_id].running.add(task_id)
            out.append((machine_id, p.Assign(task_id=task_id, attempt=t.attempt, spec=t.spec)))
            self._emit(t, "assigned", machine=machine_id)
        return out

    def _requeue(self, t: ActiveTask, now: float, *, note_transition: bool = True) -> None:
        if note_transition:
            task_state.check(t.status, "queued")
            t.status = "queued"
            self.store.set_status(t.task_id, "queued", now, attempt=t.attempt, queued=now, machine=None)
            self._emit(t, "queued")
        t.machine = None
        self.scheduler.enqueue(t.task_id, t.requirements, t.spec.priority, exclude=t.excluded, order=t.seq,
                               user=t.user)

    # -- daemons ------------------------------------------------------------

    def register(self, msg: p.Register, now: float, who: Principal) -> p.Registered:
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
                         running=set(), instance=msg.instance, owner=who.user)
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
            self.lose_attempts(name, lost, now, reason="not delivered (hub restart)", exclude=False)
        elif lost:
            self.lose_attempts(name, lost, now, reason=f"daemon {name} restarted without it",
                               instance=previous.instance if previous else "")
        m.cancelling = reported - {(tid, self.active[tid].attempt) for tid in still}
        self.scheduler.add_machine(name, hardware, msg.slots, name=name, tags=tags,
                                   busy=len(still) + len(m.cancelling),
                                   instance_key=instance_key(name, msg.instance))
        return p.Registered(id=msg.id, machine_id=name, heartbeat_interval=0.0)

    def _own_attempts(self, machine: str, reported: Iterable[tuple[str, int]]) -> set[tuple[str, int]]:
        return {(tid, att) for tid, att in reported if self.store.attempt_machine(tid, att) == machine}

    def _is_current(self, task_id: str, attempt: int, machine: str) -> bool:
        t = self.active.get(task_id)
        return t is not None and t.attempt == attempt and t.machine == machine

    def heartbeat(self, machine_id: str, msg: p.Heartbeat, now: float) -> None:
        m = self.machines.get(machine_id)
        if m is None:
            return
        m.load = msg.load
        m.last_seen = now
        self.store.set_machine_state(machine_id, "draining" if m.draining else "online", now, msg.load)

    def set_draining(self, machine_id: str, now: float) -> None:
        m = self.machines.get(machine_id)
        if m is not None:
            m.draining = True
            self.scheduler.set_accepting(machine_id, False)
            self.store.set_machine_state(machine_id, "draining", now)

    def disconnect(self, machine_id: str, now: float, reason: str) -> None:
        """The daemon's connection is gone: its attempts are lost."""
        m = self.machines.get(machine_id)
        if m is None or not m.connected:
            return
        m.connected = False
        self.scheduler.remove_machine(machine_id)
        with self.store.transaction():
            self.store.set_machine_state(machine_id, "offline", now)
            self.lose_attempts(machine_id, list(m.running), now, reason=reason)
        m.running.clear()

    def lose_attempts(self, machine_id: str, task_ids: Iterable[str], now: float, reason: str,
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

    def started(self, machine_id: str, msg: p.TaskStarted) -> None:
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

    def stage_done(self, machine_id: str, msg: p.StageDone) -> None:
        t = self.active.get(msg.task_id)
        if (t is not None and self._is_current(msg.task_id, msg.attempt, machine_id)
                and msg.index < len(t.spec.stages)):  # a daemon cannot grow this map
            t.stages[msg.index] = msg.stage
            self._emit(t, t.status, machine=machine_id, stage_index=msg.index, stage=msg.stage)

    def task_done(self, machine_id: str, msg: p.TaskDone, now: float) -> bool:
        """Record an attempt's outcome exactly once; False when it was stale."""
        m = self.machines.get(machine_id)
        if m is not None and (msg.task_id, msg.attempt) in m.cancelling:
            m.cancelling.discard((msg.task_id, msg.attempt))
            self.scheduler.release(machine_id)
            self.store.update_attempt(msg.task_id, msg.attempt, state="cancelled", ended=now,
                                      reason="cancelled")
            return False
        t = self.active.get(msg.task_id)
        if t is None or not self._is_current(msg.task_id, msg.attempt, machine_id):
            return False
        o = msg.outcome
        self.machines[machine_id].running.discard(t.task_id)
        self.scheduler.release(machine_id)
        with self.store.transaction():
            self.store.update_attempt(
                t.task_id, t.attempt, state=o.status, ended=o.finished or now, reason=o.reason,
                **({"started": o.started} if t.status == "assigned" and o.started else {}),
            )
            self._finish(
                t, o.status, o.finished or now, error=o.error, reason=o.reason,
                exit_code=o.exit_code, result=dumps(o), result_attempt=t.attempt,
                started=o.started,
            )
        return True

    def _finish(self, t: ActiveTask, status: str, now: float, **fields: Any) -> None:
        task_state.check(t.status, status)
        if fields.get("started") is None:
            fields.pop("started", None)
        reason = fields.pop("reason", None)
        self.store.set_status(
            t.task_id, status, now, attempt=t.attempt, reason=reason, finished=now, **fields
        )
        t.status = status
        self.scheduler.remove(t.task_id)
        del self.active[t.task_id]
        self.active_by_user[t.user] -= 1
        if self.active_by_user[t.user] <= 0:
            del self.active_by_user[t.user]
        self._emit(t, status, machine=t.machine, error=fields.get("error"))
        for w in self._waiters.pop(t.task_id, ()):
            w.remaining -= 1
            if w.remaining == 0 and not w.future.done():
                w.future.set_result(None)

    # -- cancellation -------------------------------------------------------

    def cancel_targets(self, msg: p.Cancel, who: Principal) -> list[str]:
        """The unfinished tasks a cancel request names (checked: the caller's own)."""
        if msg.session_id is not None:
            self._own_session(msg.session_id, who)
            sid = msg.session_id  # in memory: only unfinished tasks can be cancelled
            return [t.task_id for t in self.active.values() if t.session_id == sid]
        ids = list(dict.fromkeys(msg.task_ids))
        self.check_known(ids, who)
        return [tid for tid in ids if tid in self.active]

    def cancel_tasks(self, ids: list[str], now: float) -> tuple[dict[str, int], list[str], list[tuple[str, p.CancelTask]]]:
        """Cancel these tasks in one transaction: (counts by prior state, ids, kill orders).

        The server calls this in chunks, so cancelling 200,000 tasks never
        holds the event loop for long."""
        by_state: dict[str, int] = {}
        done: list[str] = []
        kills: list[tuple[str, p.CancelTask]] = []
        with self.store.transaction():
            for tid in ids:
                t = self.active.get(tid)
                if t is None:
                    continue  # already ended: nothing to cancel
                prior = "retrying" if t.status == "queued" and t.attempt > 0 else t.status
                if t.status in ("assigned", "running") and t.machine in self.machines:
                    m = self.machines[t.machine]
                    m.running.discard(tid)
                    if m.connected:
                        m.cancelling.add((tid, t.attempt))
                        kills.append((t.machine, p.CancelTask(task_id=tid, attempt=t.attempt)))
                    self.store.update_attempt(tid, t.attempt, state="cancelling", ended=None)
                self._finish(t, "cancelled", now, error="cancelled", reason="cancelled")
                by_state[prior] = by_state.get(prior, 0) + 1
                done.append(tid)
        return by_state, done, kills

    def cancel(self, msg: p.Cancel, now: float, who: Principal) -> tuple[p.Cancelled, list[tuple[str, p.CancelTask]]]:
        """Cancel in one go (tests and small requests); returns the reply and kill orders."""
        by_state, done, kills = self.cancel_tasks(self.cancel_targets(msg, who), now)
        return p.Cancelled(id=msg.id, task_ids=done, by_state=by_state), kills

    # -- queries ------------------------------------------------------------

    def _visible(self, task_id: str, row_user: Optional[str], who: Principal) -> bool:
        return who.is_admin or row_user == who.user

    def wait_for(self, task_ids: list[str]) -> Optional[asyncio.Future]:
        """A future done when all of ``task_ids`` are terminal (None if they are)."""
        pending = [tid for tid in dict.fromkeys(task_ids) if tid in self.active]
        if not pending:
            return None
        fut = asyncio.get_running_loop().create_future()
        w = _Waiter(len(pending), fut)
        for tid in pending:
            self._waiters.setdefault(tid, []).append(w)
        return fut

    def drop_waiter(self, fut: asyncio.Future) -> None:
        for tid in list(self._waiters):
            ws = [w for w in self._waiters[tid] if w.future is not fut]
            if ws:
                self._waiters[tid] = ws
            else:
                del self._waiters[tid]

    def check_known(self, task_ids: list[str], who: Principal) -> None:
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
            rows = self.store.tasks(stored)
            missing += [tid for tid in stored
                        if tid not in rows or not self._visible(tid, rows[tid]["user"], who)]
        if missing:
            missing.sort(key=task_ids.index)
            raise RequestError("not_found", f"unknown task id(s): {', '.join(missing[:5])}")

    def _visible_rows(self, task_ids: list[str], who: Principal) -> dict[str, Any]:
        rows = self.store.tasks(task_ids)
        missing = [tid for tid in task_ids if tid not in rows or not self._visible(tid, rows[tid]["user"], who)]
        if missing:
            raise RequestError("not_found", f"unknown task id(s): {', '.join(missing[:5])}")
        return rows

    def records(self, task_ids: list[str], who: Principal) -> list[p.TaskRecord]:
        rows = self._visible_rows(task_ids, who)
        attempts = self.store.attempts(task_ids)
        return [self._record(rows[tid], attempts.get(tid, [])) for tid in task_ids]

    def _record(self, row: Any, attempts: list[Any]) -> p.TaskRecord:
        tid = row["task_id"]
        t = self.active.get(tid)
        spec = loads(row["spec"])
        outcome = p.convert(loads(row["result"]), p.TaskOutcome) if row["result"] else None
        machine = row["machine"]
        m = self.machines.get(machine) if machine else None
        if outcome is not None:
            stages, artifacts = outcome.stages, outcome.artifacts
        elif t is not None and t.stages:
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
        )

    def briefs(self, task_ids: list[str], who: Principal) -> list[p.TaskBrief]:
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
                                   submitted=row["submitted"]))
        return out

    def session(self, session_id: str, rid: int, who: Principal) -> p.SessionInfo:
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

    def grant_blob(self, who: Principal, sha256: str) -> None:
        """``who`` uploaded this blob: it may use and read it from now on."""
        self.store.add_blob_refs([(sha256, who.blob_scope)])

    def accept_artifacts(self, machine_id: str, who: Principal, msg: p.TaskDone) -> None:
        """Check what a daemon says it collected before anyone downloads it:
        a safe relative name, and a blob this daemon's owner uploaded.  The
        task's user may then download it."""
        t = self.active.get(msg.task_id)
        grants = []
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
            if not (self.blobs.has(a.sha256) and self.blob_readable(who, a.sha256, machine_id)):
                a.error = a.error or "artifact was not uploaded to the hub"
                a.sha256 = None
                continue
            if t is not None and self._is_current(msg.task_id, msg.attempt, machine_id):
                grants.append((a.sha256, f"u:{t.user}"))
        if grants:
            self.store.add_blob_refs(grants)

    def pool(self, msg: p.GetPool) -> list[p.MachineInfo]:
        try:
            reqs = [hw.normalize(h) for h in msg.hardware]
        except hw.HardwareError as exc:
            raise RequestError("bad_hardware", str(exc)) from None
        out = []
        for m in sorted(self.machines.values(), key=lambda m: m.name):
            if not m.connected and not msg.include_offline:
                continue
            facts = dict(m.hardware, name=m.name, machine_id=m.machine_id, tags=m.tags)
            if reqs and not any(hw.matches(r, facts) for r in reqs):
                continue
            state = "offline" if not m.connected else ("draining" if m.draining else "online")
            out.append(
                p.MachineInfo(
                    machine_id=m.machine_id, name=m.name, state=state, hardware=m.hardware,
                    slots=m.slots, running=len(m.running), tags=m.tags, load=m.load,
                    first_seen=m.first_seen, last_seen=m.last_seen, owner=m.owner,
                )
            )
        return out

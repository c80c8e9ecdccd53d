"""The daemon's life: connect to the hub, register, run what it assigns.

Results go into an outbox and are resent after every reconnect until the hub
acknowledges them, so work that finished while the hub was away is not lost
(the hub records each attempt's result once, however often it arrives).

What a task may reach is decided here and in the modules named: the
account it runs as and its environment (accounts.py), its private dir
(taskdirs.py), the blob cache it is copied from (blobcache.py), what it
may hand back as artifacts (artifacts.py) and how much of its output may
wait in the daemon's memory (output.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional

from hub_server import gridcall
from hub_server import protocol as p
from hub_server.blobs import fileobj_sha256
from hub_server.link import ConnectError, HubError, Link, LinkClosed, RemoteError

from . import spawner as spawners
from . import tracking
from .accounts import DEFAULT_SLOT_UID_BASE, SAME_USER_WARNING, TaskAccounts, TaskUser, task_env
from .blobcache import copy_verified, open_cache
from .guardian import Guardian
from .hardware import detect_hardware
from .isolation import DEFAULT_DISK, DEFAULT_MAX_PIDS, Box, Walls
from .leftovers import kill_leftovers, last_pid, remove_files_of
from .load import sample_load
from .output import OutputPump
from .parsers import ProgressParser, Update
from .progress import ProgressReporter, fan_out
from .pystage import CallContext
from .pyworkers import PyWorkers
from .runtimes import CONTAINER_ENGINES, RuntimeConfigError, detect_runtimes, python_runtime
from .runner import LIMIT, Cancel, cancel_error, run_task
from .taskdirs import TMP_NAME, TaskDirs

log = logging.getLogger("hwf.daemon")

# Results finishing in the same loop iteration share one tasks_done message:
# an idle daemon sends at once, a busy one batches what piled up meanwhile.
RESULT_COALESCE = 0.0
# A task of Python calls only is reported running after this long (if it
# still runs): a trivial call's result arrives first and says when it started.
STARTED_DELAY = 0.05


@dataclass
class DaemonConfig:
    hub: str
    token: Optional[str]
    workdir: Path
    slots: int = 1
    name: str = field(default_factory=socket.gethostname)
    tags: list[str] = field(default_factory=list)
    keep_workdirs: bool = False
    parent_pid: Optional[int] = None
    max_backoff: float = 10.0
    kill_grace: float = 3.0
    # SIGTERM: take no new tasks, let running ones finish for up to this long.
    drain_timeout: float = 300.0
    # None: per-slot uids when root, else the daemon's own user; "self"; a user.
    run_as: Optional[str] = None
    slot_uid_base: int = DEFAULT_SLOT_UID_BASE
    # wss:// hubs: trust this CA file (default: the system's CAs).
    ca_file: Optional[str] = None
    # The warm Python workers: their interpreter (None: found, see runtimes.py)
    # and how many calls one serves before it is replaced.
    python: Optional[str] = None
    python_max_tasks: int = 1000
    # HTC-Grid tasks that leave the handler to the farm: "module:function" or a shell command.
    grid_handler: Optional[str] = None
    containers: bool = False  # offer docker/podman (MECA container tasks) where they answer
    # An artifact upload the hub refuses as busy (or drops) is tried this many
    # times, backing off 0.5 s doubling to 8 s, before its artifact is lost.
    artifact_upload_tries: int = 8
    # What walls in each task (isolation.py): "auto" (all this machine allows) or "none".
    isolation: str = "auto"
    task_max_pids: int = DEFAULT_MAX_PIDS
    task_memory: Optional[int] = None  # None: the machine's RAM / slots (or the task's ram requirement)
    task_disk: Optional[int] = DEFAULT_DISK


# Hub refusals that pass: its upload slots are taken, or the upload was dropped.
TRANSIENT_REFUSALS = frozenset({"busy", "limit", "timeout"})


@dataclass
class _Running:
    task_id: str
    attempt: int
    cancel: Cancel
    task: asyncio.Task
    slot: Optional[int] = None  # the slot it holds, once it has one


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.workdir = Path(config.workdir).resolve()
        self.accounts = TaskAccounts.configure(config.run_as, config.slots, config.slot_uid_base)
        try:
            self.taskdirs = TaskDirs(self.workdir, isolated=self.accounts.isolated)
            self.cache = open_cache(self.workdir / "blob-cache")
        except BaseException:
            self.accounts.close()
            raise
        if self.accounts.isolated:
            log.info("%s", self.accounts.describe())
        else:
            log.warning(SAME_USER_WARNING, os.geteuid())
        self._free_slots: asyncio.Queue[int] = asyncio.Queue()
        self._slot_waiters = 0
        for k in range(config.slots):
            self._free_slots.put_nowait(k)
        try:
            problem = gridcall.check_handler(config.grid_handler) if config.grid_handler is not None else None
            if problem:
                raise RuntimeConfigError(f"--grid-handler: {problem}")
            runtime = python_runtime(config.python, isolated=self.accounts.isolated)
        except RuntimeConfigError:
            self.close()
            raise
        self.hardware = detect_hardware()
        self.walls = Walls(config.isolation, self.accounts, f"{config.name}.{os.getpid()}",  # type: ignore[arg-type]
                           slots=config.slots, max_pids=config.task_max_pids, memory=config.task_memory,
                           disk=config.task_disk, total_ram=self.hardware.get("ram"))
        for line in self.walls.problems:
            log.warning("cannot isolate: %s", line)
        for line in self.walls.describe():
            log.info("%s", line)
        self.pyworkers = (PyWorkers(runtime, max_tasks=config.python_max_tasks, boxes=self.walls.worker_box)
                          if runtime is not None else None)
        self.hardware["runtimes"] = detect_runtimes(runtime, grid_handler=config.grid_handler,
                                                    engines=CONTAINER_ENGINES if config.containers else ())
        if runtime is not None:
            log.info("Python tasks run on warm workers of %s (%s)", runtime.python, runtime.name)
        self.link: Optional[Link] = None
        self.connected = asyncio.Event()
        self.running: dict[tuple[str, int], _Running] = {}
        self._cleaning: set[asyncio.Task] = set()  # slots being cleaned after their task
        self._trash_job: Optional[asyncio.Future] = None
        self._unclean: set[int] = set()  # slots whose last cleaning failed: kill without asking next time
        # What tasks inherit (task_env drops HWF_*), read once: iterating
        # os.environ decodes every variable (30 us a task).
        self._environ = dict(os.environ)
        self.outbox: dict[tuple[str, int], p.TaskDone] = {}
        self._sending: set[tuple[str, int]] = set()  # results in a batch awaiting the hub's ack
        self._results_ready = asyncio.Event()
        self._fetching: dict[str, asyncio.Future] = {}
        self._stop = asyncio.Event()
        self.draining = False
        self.instance = secrets.token_hex(6)
        self.heartbeat_interval = 2.0

    # -- main loop ----------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, self._stop.set)
            loop.add_signal_handler(signal.SIGTERM, self.drain)
        watchers = [asyncio.ensure_future(self._watch_parent())] if self.config.parent_pid else []
        guardian = Guardian().start()
        tracking.set_guardian(guardian)
        spawner: Optional[spawners.Spawner] = None
        delay = 0.2
        try:
            # Commands as other users (and the leftover killer) go through it.
            spawner = spawners.Spawner().start() if self.accounts.isolated else None
            spawners.set_spawner(spawner)
            while not self._stop.is_set():
                try:
                    await self._session()
                    delay = 0.2
                except ConnectError as exc:
                    log.warning("%s", exc)
                except (LinkClosed, HubError, OSError) as exc:
                    log.warning("hub connection lost: %s", exc)
                if self._stop.is_set():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay * (0.5 + random.random()))
                delay = min(delay * 2, self.config.max_backoff)
        finally:
            for w in watchers:
                w.cancel()
            await self._shutdown()
            tracking.set_guardian(None)
            guardian.stop()
            if spawner is not None:
                spawners.set_spawner(None)
                spawner.close()
            self.close()

    def close(self) -> None:
        """Release the slot uids, the cgroups and the temp task root (if this daemon made one)."""
        self.accounts.close()
        if hasattr(self, "walls"):
            self.walls.close()
        if not self.config.keep_workdirs:
            self.taskdirs.close()
        elif self.taskdirs.root != self.workdir / "tasks":
            log.info("task dirs kept in %s until another daemon starts on this machine", self.taskdirs.root)

    async def _session(self) -> None:
        link = Link(self.config.hub, self.config.token, agent="hwf-daemon", on_message=self._on_message,
                    ssl=self.config.ca_file)
        await link.connect()
        try:
            reply = await link.request(
                p.Register(
                    id=link.next_id(),
                    name=self.config.name,
                    hardware=self.hardware,
                    slots=self.config.slots,
                    tags=self.config.tags,
                    running=[*self.running.keys(), *self.outbox.keys()],
                    instance=self.instance,
                )
            )
            self.heartbeat_interval = reply.heartbeat_interval or 2.0
            self.link = link
            self.connected.set()
            log.info("registered with %s as %s", link.url, reply.machine_id)
            if self.draining:
                await link.send(p.Draining())
            self._sending.clear()
            if self.outbox:
                self._results_ready.set()
            beat = asyncio.ensure_future(self._heartbeats(link))
            flush = asyncio.ensure_future(self._flush_results(link))
            stop = asyncio.ensure_future(self._stop.wait())
            assert link.closed is not None
            await asyncio.wait([link.closed, stop], return_when=asyncio.FIRST_COMPLETED)
            beat.cancel()
            flush.cancel()
            stop.cancel()
        finally:
            self.connected.clear()
            self.link = None
            await link.close()

    async def _heartbeats(self, link: Link) -> None:
        while link.is_open:
            load = await asyncio.to_thread(sample_load, self.workdir)
            with contextlib.suppress(LinkClosed):
                await link.send(p.Heartbeat(load=load, running=len(self.running)))
            await asyncio.sleep(self.heartbeat_interval)

    def drain(self) -> None:
        """Stop taking tasks; exit once running ones end (or drain_timeout passes)."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d running task(s), up to %.0fs", len(self.running), self.config.drain_timeout)
        asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        if self.link is not None:
            with contextlib.suppress(HubError):
                await self.link.send(p.Draining())
        deadline = time.monotonic() + self.config.drain_timeout
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # Results of finished work go out before we leave (briefly: the hub
        # may be away; whatever stays undelivered is retried by the hub).
        deliver_by = time.monotonic() + 10
        while self.outbox and self.link is not None and time.monotonic() < deliver_by:
            await asyncio.sleep(0.05)
        self._stop.set()

    async def _watch_parent(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if os.getppid() != self.config.parent_pid:
                log.warning("parent process %s is gone; stopping", self.config.parent_pid)
                self._stop.set()
                return

    async def _shutdown(self) -> None:
        for r in list(self.running.values()):
            r.cancel.set("daemon stopped")
        if self.running:
            await asyncio.wait([r.task for r in self.running.values()], timeout=self.config.kill_grace + 2)
        if self.pyworkers is not None:
            await self.pyworkers.close()
        if self._cleaning:  # leftovers are killed and task dirs removed before we go
            await asyncio.wait(list(self._cleaning), timeout=10)
        if self._trash_job is not None:
            await asyncio.wait([self._trash_job], timeout=10)

    # -- assignments --------------------------------------------------------

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, p.Assignments):  # protocol 2: several at once
            for item in msg.items:
                self._on_message(item)
        elif isinstance(msg, p.Assign):
            key = (msg.task_id, msg.attempt)
            if key in self.running or key in self.outbox:
                return  # a duplicate after a reconnect
            if len(self.running) >= self.config.slots:  # prefetched (a Python call), or a hub's error
                log.debug("task %s assigned with every slot busy: it waits for a slot", msg.task_id)
            cancel = Cancel()
            task = asyncio.ensure_future(self._run(msg, cancel))
            self.running[key] = _Running(msg.task_id, msg.attempt, cancel, task)
        elif isinstance(msg, p.CancelTask):
            r = self.running.get((msg.task_id, msg.attempt))
            if r is not None:
                r.cancel.set("cancelled")
        elif isinstance(msg, p.Error):
            log.warning("hub error %s: %s", msg.code, msg.message)

    async def _take_slot(self, cancel: Cancel) -> Optional[int]:
        """A free slot index, or None if the task is cancelled while waiting."""
        if cancel.is_set():
            return None
        if not self._slot_waiters and not self._free_slots.empty():
            return self._free_slots.get_nowait()  # no task waits before this one
        self._slot_waiters += 1
        get = asyncio.ensure_future(self._free_slots.get())
        stop = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._slot_waiters -= 1
            stop.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            slot = get.result()
            if not cancel.is_set():
                return slot
            self._free_slots.put_nowait(slot)
        return None

    async def _clean_slot(self, slot: int, user: Optional[TaskUser], since: Optional[int]) -> None:
        """Kill what a task left running as its slot's uid (never a shared account).

        ``since``: the last pid handed out before the task began."""
        if user is not None and user.per_slot:
            try:
                survivors = await kill_leftovers(user, since)
            except Exception:  # the slot stays usable; say loudly that it may not be clean
                log.exception("could not kill the processes left by uid %d", user.uid)
                survivors = [-1]
            # Only a clean slot lets the next cleaning look at new pids alone.
            if survivors:
                self._unclean.add(slot)
            else:
                self._unclean.discard(slot)

    async def _run(self, msg: p.Assign, cancel: Cancel) -> None:
        key = (msg.task_id, msg.attempt)
        slot = await self._take_slot(cancel)
        if slot is None:
            reason = cancel.reason or "cancelled"
            outcome = p.TaskOutcome(status="failed", error=cancel_error(reason), reason=reason,
                                    finished=time.time())
            await self._finish(key, outcome)
            return
        if key in self.running:
            self.running[key].slot = slot
        user = self.accounts.user(slot)
        if self.pyworkers is not None:
            # Nothing of another user may stay on the slot's uid, shell tasks included.
            await self.pyworkers.keep_only(slot, msg.user_key)
        if self.pyworkers is not None and any(st.call is not None for st in msg.spec.stages):
            # Started before ``since``: a warm worker is not this task's leftover.
            try:
                await self.pyworkers.ensure(slot, user, msg.user_key)
            except Exception as exc:  # the stage reports it when it runs
                log.warning("python worker for slot %d: %s", slot, exc)
        # Every process this task makes is born after this pid (leftovers.py).
        since = last_pid() if user is not None and user.per_slot and slot not in self._unclean else None
        timer = None
        announce: Optional[asyncio.TimerHandle] = None
        pump: Optional[OutputPump] = None
        progress: Optional[ProgressReporter] = None
        taskdir: Optional[Path] = None
        box: Optional[Box] = None
        cleaned = False

        async def clean() -> None:
            # Once the commands are over nothing new starts as the slot's
            # uid, so one pass (before artifacts are read) is enough.
            nonlocal cleaned
            if not cleaned:
                await self._clean_slot(slot, user, since)
                cleaned = True

        try:
            name = f"{msg.task_id}.{msg.attempt}"
            taskdir = self.taskdirs.try_create(name, user)
            if taskdir is None:
                taskdir = await asyncio.to_thread(self.taskdirs.create, name, user)
            env = task_env(self._environ, task_id=msg.task_id, attempt=msg.attempt, user=user,
                           home=taskdir, tmpdir=taskdir / TMP_NAME, extra=msg.spec.env)
            private_tmp = None
            if user is not None and self.walls.namespaces:
                private_tmp = self.taskdirs.slot_tmp(slot, user)
            elif user is not None:
                private_tmp = taskdir / TMP_NAME
            box = self.walls.box(slot, taskdir, msg.spec.hardware, private_tmp, root=self.taskdirs.root)
            if box is not None:
                self.walls.watch(box, lambda text: cancel.set(LIMIT, text))
            began = p.TaskStarted(task_id=msg.task_id, attempt=msg.attempt, time=time.time())
            if all(st.call is not None for st in msg.spec.stages):
                # Most calls end within milliseconds: their result says when they
                # started, and one message (and hub transaction) less per task counts.
                loop = asyncio.get_running_loop()
                announce = loop.call_later(STARTED_DELAY, lambda: asyncio.ensure_future(self._send_quietly(began)))
            else:
                await self._send_quietly(began)
            if msg.spec.timeout:
                timer = asyncio.get_running_loop().call_later(msg.spec.timeout, cancel.set, "timeout")

            async def on_stage(index: int, stage: p.StageOutcome) -> None:
                await self._send_quietly(
                    p.StageDone(task_id=msg.task_id, attempt=msg.attempt, index=index, stage=stage)
                )

            async def send_output(stream: str, text: str) -> None:
                await self._send_quietly(
                    p.Output(task_id=msg.task_id, attempt=msg.attempt, stream=stream, text=text)  # type: ignore[arg-type]
                )

            async def send_progress(update: Update) -> None:
                await self._send_quietly(p.Progress(task_id=msg.task_id, attempt=msg.attempt,
                                                    percent=update.percent, frame_current=update.frame_current))

            pump = OutputPump(send_output) if msg.spec.stream else None
            # Commands' output is read for progress (hwf-progress lines count without
            # a parser); Python calls print no progress lines worth the decoding.
            if not all(st.call is not None for st in msg.spec.stages):
                progress = ProgressReporter(
                    ProgressParser(msg.spec.parser, msg.spec.frame_start, msg.spec.frame_end), send_progress)
            outcome = await run_task(
                msg.spec,
                taskdir,
                fetch_data=self._fetch_data,
                upload_artifact=self._upload_artifact,
                on_stage=on_stage,
                on_output=fan_out(pump, progress),
                max_output_bytes=self.limits.max_output_bytes,
                cancel=cancel,
                kill_grace=self.config.kill_grace,
                user=user,
                env=env,
                # Artifacts are read from a dir nothing of the task still writes to.
                before_artifacts=clean if msg.spec.artifacts else None,
                calls=CallContext(self.pyworkers, slot, user, msg.user_key, self.config.grid_handler),
                box=box,
            )
            if box is not None:
                # A task quicker than the poll: one look at what it left (and the
                # counters read now are the slot's next baseline).
                self.walls.unwatch(box)
                text = box.breach(box.disk())
                if text is not None and outcome.status == "finished":
                    last = outcome.stages[-1].name if outcome.stages else "?"
                    outcome.status, outcome.exit_code, outcome.reason = "failed", None, LIMIT
                    outcome.error = f"stage {last!r} {text}"
        except Exception as exc:  # never lose a task to a daemon bug
            log.exception("task %s failed inside the daemon", msg.task_id)
            outcome = p.TaskOutcome(status="failed", error=f"daemon error: {exc!r}", reason="daemon_error",
                                    finished=time.time())
        finally:
            if box is not None:
                self.walls.unwatch(box)
            if timer is not None:
                timer.cancel()
            if announce is not None:
                announce.cancel()
            try:
                if pump is not None:
                    try:
                        await pump.close()
                    except Exception:  # live output is best effort; the result is not
                        log.exception("output pump of task %s failed", msg.task_id)
                if progress is not None:
                    try:  # the last progress goes out before the result
                        await progress.close()
                    except Exception:
                        log.exception("progress of task %s failed", msg.task_id)
            finally:
                # The outcome is known: it goes out now, while the slot is
                # cleaned.  The slot (its uid) takes no task before that is
                # done, so nothing this task left runs beside the next one.
                # Python calls ran outside the private dirs: what they left there goes too.
                outside = box is None or box.tmp is None or any(st.call is not None for st in msg.spec.stages)
                self._release(slot, user, since, taskdir, cleaned, box, outside)
        await self._finish(key, outcome)

    def _release(self, slot: int, user: Optional[TaskUser], since: Optional[int], taskdir: Optional[Path],
                 cleaned: bool, box: Optional[Box] = None, outside: bool = False) -> None:
        task = asyncio.ensure_future(self._clean_and_free(slot, user, since, taskdir, cleaned, box, outside))
        self._cleaning.add(task)
        task.add_done_callback(self._cleaning.discard)

    def _empty_trash_soon(self) -> None:
        """One background job at a time removes the dirs of ended tasks."""
        if self._trash_job is None or self._trash_job.done():
            self._trash_job = asyncio.ensure_future(asyncio.to_thread(self.taskdirs.empty_trash))

    async def _clean_and_free(self, slot: int, user: Optional[TaskUser], since: Optional[int],
                              taskdir: Optional[Path], cleaned: bool, box: Optional[Box] = None,
                              outside: bool = False) -> None:
        try:
            if not cleaned:
                await self._clean_slot(slot, user, since)
            if box is not None and box.tmp_path is not None and user is not None:
                keep = self.taskdirs.mountpoint_in_slot_tmp(self.walls.shared)
                # The slot keeps its namespaces; its /tmp is emptied (in a thread when
                # there is more than a few entries: most tasks leave nothing there).
                if not self.taskdirs.empty(box.tmp_path, user, keep, at_most=8):
                    await asyncio.to_thread(self.taskdirs.empty, box.tmp_path, user, keep)
            elif box is not None and user is not None:
                spawners.current().unbox(box.key)
            if user is not None and user.per_slot and outside and self.walls.mode != "none":
                await asyncio.to_thread(remove_files_of, user.uid, self.walls.shared)
            if taskdir is not None and not self.config.keep_workdirs:
                if self.taskdirs.discard(taskdir):
                    self._empty_trash_soon()
                elif not self.taskdirs.try_remove(taskdir):
                    await asyncio.to_thread(self.taskdirs.remove, taskdir)
        except Exception:
            log.exception("cleaning slot %d failed", slot)
        finally:
            self._free_slots.put_nowait(slot)

    async def _finish(self, key: tuple[str, int], outcome: p.TaskOutcome) -> None:
        self.running.pop(key, None)
        done = p.TaskDone(id=0, task_id=key[0], attempt=key[1], outcome=outcome)
        self.outbox[key] = fit_message(done, self.limits.max_message_bytes)
        self._results_ready.set()

    @property
    def limits(self) -> p.Limits:
        return self.link.limits if self.link is not None else p.Limits()

    async def _flush_results(self, link: Link) -> None:
        """Send finished results in batches; each stays in the outbox until acked.

        Results that finish in the same loop iteration (many, when the loop is
        busy) share one ``tasks_done``: one hub transaction, one ack.
        A batch is not awaited before the next is sent: no head-of-line wait.
        """
        batched = link.welcome is not None and link.welcome.version >= 2
        while link.is_open:
            await self._results_ready.wait()
            await asyncio.sleep(RESULT_COALESCE)
            self._results_ready.clear()
            ready = [key for key in self.outbox if key not in self._sending]
            if not batched:
                for key in ready:
                    self._send_results(link, [key])
                continue
            for keys in batch_by_size(ready, self.outbox, self.limits.max_message_bytes):
                self._send_results(link, keys)

    def _send_results(self, link: Link, keys: list[tuple[str, int]]) -> None:
        self._sending.update(keys)
        if len(keys) == 1:
            msg: Any = self.outbox[keys[0]]
            msg.id = link.next_id()
        else:
            msg = p.TasksDone(id=link.next_id(), done=[self.outbox[k] for k in keys])
        asyncio.ensure_future(self._await_ack(link, msg, keys))

    async def _await_ack(self, link: Link, msg: Any, keys: list[tuple[str, int]]) -> None:
        try:
            await link.request(msg)
        except HubError:
            return  # still in the outbox: resent after the next reconnect
        finally:
            self._sending.difference_update(keys)
        for key in keys:
            self.outbox.pop(key, None)

    async def _send_quietly(self, msg: Any) -> None:
        link = self.link
        if link is not None:
            with contextlib.suppress(LinkClosed):
                await link.send(msg)

    # -- blobs --------------------------------------------------------------

    async def _connected_link(self, timeout: float = 60.0) -> Link:
        await asyncio.wait_for(self.connected.wait(), timeout)
        assert self.link is not None
        return self.link

    async def _cached(self, sha256: str) -> None:
        """Make sure the blob is in the cache, downloading it once per daemon."""
        if not self.cache.has(sha256):
            fut = self._fetching.get(sha256)
            if fut is None:
                fut = asyncio.ensure_future(self._download(sha256))
                self._fetching[sha256] = fut
                fut.add_done_callback(lambda _f, s=sha256: self._fetching.pop(s, None))
            await asyncio.shield(fut)

    async def _fetch_data(self, data: p.DataSpec, out: BinaryIO) -> None:
        """Copy a Data blob into the task's file, checking its hash as it is copied.

        A copy, not a hard link: a task that edits its input must not
        corrupt the cache for the next task.  A cache entry whose bytes no
        longer match its hash is deleted and downloaded again.
        """
        sha = data.sha256
        for _ in range(3):
            await self._cached(sha)
            try:
                if await asyncio.to_thread(copy_verified, self.cache.path(sha), out, sha):
                    return
            except FileNotFoundError:
                continue  # another task found it corrupt and deleted it meanwhile
            log.warning("blob cache entry %s does not match its sha256: deleting it and "
                        "downloading it again", sha)
            self.cache.path(sha).unlink(missing_ok=True)
        raise HubError(f"blob {sha[:12]}… does not match its sha256 even after a fresh download")

    async def _with_link(self, op: Any, tries: int = 5, refusals: frozenset[str] = frozenset()) -> Any:
        """Run ``op(link)``, waiting out short hub outages (a reconnect) and
        the hub refusals named in ``refusals``, with a doubling backoff."""
        delay = 0.5
        for attempt in range(tries):
            link = await self._connected_link()
            try:
                return await op(link)
            except (LinkClosed, RemoteError) as exc:
                if attempt == tries - 1 or (isinstance(exc, RemoteError) and exc.code not in refusals):
                    raise
                log.warning("retrying in %.1fs after: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 8.0)

    async def _download(self, sha256: str) -> None:
        await self._with_link(lambda link: link.download(sha256, self.cache.path(sha256)))

    async def _upload_artifact(self, f: BinaryIO, name: str) -> tuple[str, int]:
        """Upload an artifact from the file the runner opened (never by its path)."""

        sha = await asyncio.to_thread(fileobj_sha256, f)

        async def upload(link: Link) -> tuple[str, int]:
            if await link.missing_blobs([sha]):
                return await link.upload(f, sha, name=name)
            return sha, os.fstat(f.fileno()).st_size

        # A finished task's artifact is not given up because the hub is busy.
        return await self._with_link(upload, self.config.artifact_upload_tries, TRANSIENT_REFUSALS)


def batch_by_size(keys: list[tuple[str, int]], outbox: dict[tuple[str, int], p.TaskDone],
                  limit: int, max_count: int = 1000) -> list[list[tuple[str, int]]]:
    """Split results into batches whose encoded size stays under 90% of ``limit``."""
    batches: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    size = 0
    for key in keys:
        n = len(p.encode(outbox[key])) + 1
        if current and (size + n > limit * 0.9 or len(current) >= max_count):
            batches.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    if current:
        batches.append(current)
    return batches


def fit_message(done: p.TaskDone, limit: int) -> p.TaskDone:
    """Trim command output until the result fits the hub's message limit.

    A result the hub must refuse would be resent forever; a shorter one,
    flagged as truncated, is what the user gets instead.
    """
    budget = 1 << 16
    while len(p.encode(done)) > limit * 0.9 and budget >= 64:
        budget //= 4
        for stage in done.outcome.stages:
            for c in stage.commands:
                if len(c.stdout) > budget:
                    c.stdout, c.stdout_truncated = c.stdout[:budget], True
                if len(c.stderr) > budget:
                    c.stderr, c.stderr_truncated = c.stderr[:budget], True
    return done


def run_daemon(config: DaemonConfig) -> None:
    asyncio.run(Daemon(config).run())

"""The daemon's warm Python workers (pyworker.py): one per slot, reused.

A slot's worker is started on the slot's first Python task, through the
spawner, as the slot's user (like a command), and then serves call after
call, so a trivial function costs a message round trip, not an
interpreter start.  It is replaced:

* after ``max_tasks`` calls (``--python-max-tasks``: what a long-lived
  interpreter accumulates, leaks and caches, is dropped now and then);
* when it dies: mid-call that is the attempt's loss (``WorkerDied``; the
  hub retries the task), while idle it is simply started again;
* on timeout or cancel: the call cannot be interrupted politely, so the
  worker's process group is SIGKILLed;
* when the next task is another user's (``user_key``), be it a call or a
  shell task (``keep_only``, before the task runs): a warm interpreter
  carries state from one call to the next (modules, monkeypatches, threads,
  secrets in its memory), which one user may use for itself but must not
  leave to another; it is SIGKILLed and reaped first.  Workers also make
  themselves non-dumpable (pyworker.py), so no other process of the uid may
  ptrace them or read their ``/proc/PID/mem``.

A per-slot uid's leftovers are killed after every task by ``kill(-1)``
as that uid (leftovers.py), which spares nothing of the uid: the agent
therefore starts (``ensure``) the slot's worker before it notes the
task's first pid, so a worker that makes no process during a call is not
a leftover and stays warm; one whose call started processes is killed
with them and started again for the next task.

The worker runs the user's code, so what it sends back is untrusted:
replies are bounded in size and decoded strictly into typed structs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol

import msgspec

from hub_server.protocol import PyValue

from . import spawner as spawners
from .runner import exit_text

if TYPE_CHECKING:
    from .accounts import TaskUser
    from .isolation import Box

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
MAX_REPLY_BYTES = 4 * 2**20  # an inline value (64 KiB) and a traceback (64 KiB) fit many times over
START_TIMEOUT = 60.0
_READ_CHUNK = 65536


class WorkerError(RuntimeError):
    """The worker could not be started or broke the protocol; the text says why."""


class WorkerDied(RuntimeError):
    """The worker process ended during a call (not the task's own failure)."""


class Sink(Protocol):
    def feed(self, chunk: bytes) -> None: ...


class CallReply(msgspec.Struct):
    """A worker's answer to one call, as the daemon accepts it (typed, strict)."""

    op: str
    id: int
    ok: bool = False
    describe: str = "python: ?"
    value: Optional[PyValue] = None
    error: Optional[str] = None
    wall: float = 0.0
    cpu: float = 0.0
    peak_ram: Optional[int] = None


class _Ready(msgspec.Struct):
    op: str
    python: str
    pid: int
    error: Optional[str] = None


_reply_decoder = msgspec.json.Decoder(CallReply)
_ready_decoder = msgspec.json.Decoder(_Ready)
_encoder = msgspec.json.Encoder()


@dataclass
class PythonRuntime:
    """How this daemon starts workers: the interpreter, its version, and the
    site dirs (the daemon's packages: cloudpickle, numpy...) it adds."""

    python: str
    version: str  # "3.11"
    argv: list[str]
    paths: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"python{self.version}"


def _exit_text(status: Optional[int]) -> str:
    return "ended" if status is None else exit_text(os.waitstatus_to_exitcode(status))


class Worker:
    """One worker process and its channel."""

    def __init__(self, slot: int, user_key: str, pid: int, exited: asyncio.Future,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter, out_fd: int, err_fd: int) -> None:
        self.slot = slot
        self.user_key = user_key
        self.pid = pid
        self.exited = exited
        self.reader = reader
        self.writer = writer
        self.served = 0
        self._fds = [out_fd, err_fd]
        self._sinks: list[Optional[Sink]] = [None, None]
        self._ids = 0
        loop = asyncio.get_running_loop()
        for i, fd in enumerate(self._fds):
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._readable, i)

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    # -- output ---------------------------------------------------------------

    def _readable(self, i: int) -> None:
        self._read(i, limit=4)

    def _read(self, i: int, limit: Optional[int] = None) -> None:
        fd = self._fds[i]
        n = 0
        while fd >= 0 and (limit is None or n < limit):
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:  # the worker is gone
                self._close_fd(i)
                return
            n += 1
            sink = self._sinks[i]
            if sink is not None:
                sink.feed(chunk)
            else:
                log.debug("worker %d (slot %d) wrote between calls: %r", self.pid, self.slot, chunk[:200])

    def attach(self, out: Optional[Sink], err: Optional[Sink]) -> None:
        self._sinks = [out, err]

    def detach(self) -> None:
        """Take what the call wrote: all of it is in the pipes before its reply."""
        for i in range(2):
            self._read(i)
        self._sinks = [None, None]

    def _close_fd(self, i: int) -> None:
        fd = self._fds[i]
        if fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
            self._fds[i] = -1

    # -- ending ---------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the worker's process group (it leads its own session)."""
        if self.alive:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Close the channel: an idle worker exits by itself."""
        self.writer.close()
        for i in range(2):
            self._close_fd(i)

    async def died(self, timeout: float = 5.0) -> str:
        """Why the worker ended (waits briefly for its exit status)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        status = None
        if self.exited.done() and not self.exited.cancelled() and self.exited.exception() is None:
            status = self.exited.result()[0]
        return f"the Python worker (pid {self.pid}) {_exit_text(status)}"


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    head = await reader.readexactly(_HEADER.size)
    (size,) = _HEADER.unpack(head)
    if size > limit:
        raise WorkerError(f"the Python worker sent a {size}-byte reply, above the {limit}-byte limit")
    return await reader.readexactly(size)


def _write_frame(writer: asyncio.StreamWriter, obj: Any) -> None:
    data = _encoder.encode(obj)
    writer.write(_HEADER.pack(len(data)) + data)


class PyWorkers:
    """The warm workers of one daemon, by slot."""

    def __init__(self, runtime: PythonRuntime, *, max_tasks: int = 1000,
                 env: Optional[Mapping[str, str]] = None,
                 boxes: Optional[Callable[[], Optional["Box"]]] = None) -> None:
        if max_tasks < 1:
            raise ValueError("max_tasks must be at least 1")
        self.runtime = runtime
        self.boxes = boxes  # each worker's walls (isolation.py): namespaces and a hidepid /proc
        self.max_tasks = max_tasks
        base = dict(os.environ) if env is None else dict(env)
        self._env = {k: v for k, v in base.items() if not k.startswith("HWF_")}
        self._workers: dict[int, Worker] = {}
        self.started = 0  # workers started so far (for tests and logs)

    def worker(self, slot: int) -> Optional[Worker]:
        w = self._workers.get(slot)
        return w if w is not None and w.alive else None

    async def ensure(self, slot: int, user: Optional["TaskUser"], user_key: str = "") -> Worker:
        """The slot's live worker for this user, started if needed."""
        w = self._workers.get(slot)
        if w is not None and w.alive and w.user_key == user_key and w.served < self.max_tasks:
            return w
        if w is not None:
            await self._retire(w, kill=w.user_key != user_key)
        w = await self._start(slot, user, user_key)
        self._workers[slot] = w
        return w

    async def keep_only(self, slot: int, user_key: str) -> bool:
        """Before any task runs on ``slot``: retire its worker (killed and
        reaped) unless it is this user's (an empty key is nobody's); True
        if one was retired.  A shell task of another user on the slot's uid
        must find no process of the previous user there."""
        w = self._workers.get(slot)
        if w is None or (w.user_key == user_key and user_key):
            return False
        await self._retire(w, kill=True)
        return True

    async def _retire(self, w: Worker, kill: bool = False) -> None:
        """Stop ``w``: close its channel (an idle worker leaves by itself) or,
        with ``kill``, SIGKILL it at once; either way wait until it is reaped."""
        self._workers.pop(w.slot, None)
        if kill:
            w.kill()
        w.close()
        if w.alive:
            try:
                await asyncio.wait_for(asyncio.shield(w.exited), 2.0)
            except Exception:
                w.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(w.exited), 5.0)

    async def _start(self, slot: int, user: Optional["TaskUser"], user_key: str) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        box = self.boxes() if self.boxes is not None and user is not None else None
        try:
            sp = spawners.current()
            spawned = await sp.spawn(self.runtime.argv[0], self.runtime.argv, self._env, "/", user,
                                     [theirs.fileno(), out_w, err_w], box=box)
        except BaseException as exc:
            ours.close()
            os.close(out_r)
            os.close(err_r)
            if isinstance(exc, OSError):
                raise WorkerError(f"could not start the Python worker {self.runtime.python}: {exc}") from None
            raise
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        spawned.exited.add_done_callback(_ignore)
        if box is not None:  # its namespaces end with it
            spawned.exited.add_done_callback(lambda _: sp.unbox(box.key))
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_REPLY_BYTES + 1024)
        w = Worker(slot, user_key, spawned.pid, spawned.exited, reader, writer, out_r, err_r)
        self.started += 1
        try:
            _write_frame(writer, {"op": "init", "paths": self.runtime.paths})
            await writer.drain()
            ready = await asyncio.wait_for(self._ready(w), START_TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError):
            reason = await w.died()
            w.close()
            raise WorkerError(f"{reason} while starting ({self.runtime.python})") from None
        except BaseException:
            w.kill()
            w.close()
            raise
        if ready.error:
            w.kill()
            w.close()
            raise WorkerError(ready.error)
        log.info("python worker %d started for slot %d (%s)", w.pid, slot, self.runtime.name)
        return w

    async def _ready(self, w: Worker) -> _Ready:
        frame = await _read_frame(w.reader, MAX_REPLY_BYTES)
        try:
            return _ready_decoder.decode(frame)
        except msgspec.MsgspecError as exc:
            raise WorkerError(f"the Python worker's first message is not valid: {exc}") from None

    async def call(self, slot: int, user: Optional["TaskUser"], user_key: str, request: dict[str, Any], *,
                   cancel: Any = None, out: Optional[Sink] = None, err: Optional[Sink] = None) -> Optional[CallReply]:
        """Run one call on the slot's worker; its reply, or None if ``cancel``
        was set first (the worker is then killed).  Raises WorkerDied if the
        worker ended mid-call, WorkerError if it could not start or sent
        something invalid (it is killed)."""
        w = await self.ensure(slot, user, user_key)
        request = dict(request, op="call", id=w.next_id())
        w.attach(out, err)
        reply_fut = asyncio.ensure_future(_read_frame(w.reader, MAX_REPLY_BYTES))
        stop = cancel.future() if cancel is not None and hasattr(cancel, "future") else None
        waits: set[asyncio.Future] = {reply_fut, w.exited}
        if stop is not None:
            waits.add(stop)
        elif cancel is not None:
            waits.add(asyncio.ensure_future(cancel.wait()))
        try:
            _write_frame(w.writer, request)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not reply_fut.done() and not w.alive:
                # It may have answered just before it ended: the reply is in the socket.
                await asyncio.wait({reply_fut}, timeout=2.0)
            if reply_fut.done():
                try:
                    frame = reply_fut.result()
                except (asyncio.IncompleteReadError, ConnectionError):
                    raise WorkerDied(await w.died()) from None
                try:
                    reply = _reply_decoder.decode(frame)
                except msgspec.MsgspecError as exc:
                    raise WorkerError(f"the Python worker sent an invalid reply: {exc}") from None
                if reply.op != "done" or reply.id != request["id"]:
                    raise WorkerError("the Python worker answered another call than the one sent")
                w.detach()
                w.served += 1
                if w.served >= self.max_tasks:
                    await self._retire(w)
                return reply
            if not w.alive:
                raise WorkerDied(await w.died())
            w.kill()  # cancelled or timed out: the call cannot be stopped otherwise
            await w.died()
            return None
        except BaseException:  # it broke the protocol, or we are cancelled: it cannot serve on
            w.kill()
            w.detach()
            w.close()
            if self._workers.get(slot) is w:
                del self._workers[slot]
            raise
        finally:
            if not reply_fut.done():
                reply_fut.cancel()
            if stop is not None:
                cancel.discard(stop)
            for f in waits:
                if f is not reply_fut and f is not w.exited and f is not stop and not f.done():
                    f.cancel()
            if not w.alive:
                w.detach()
                w.close()
                if self._workers.get(slot) is w:
                    del self._workers[slot]

    async def close(self) -> None:
        """Stop every worker (the daemon is leaving)."""
        for w in list(self._workers.values()):
            w.kill()
            w.close()
        self._workers.clear()


def _ignore(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()

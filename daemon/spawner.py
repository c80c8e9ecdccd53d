"""The daemon's end of its spawner process (spawnerd.py says why it exists).

``Spawner`` starts the process, sends it spawn and kill requests and
turns its replies into futures, all on the event loop (one reader on one
socket, no thread).  If the spawner process dies under the daemon, the
commands it had started are SIGKILLed by process group, their waiters
get ``SpawnerDied``, and the next request starts a new spawner.

``current()`` is the spawner of the running event loop: the daemon's own
(``set_spawner``), or one started on first use and stopped with the loop
(for ``run_task`` used as a library, and tests).
"""

from __future__ import annotations

import array
import asyncio
import logging
import marshal
import os
import signal
import socket
import struct
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from .accounts import TaskUser
    from .isolation import Box

log = logging.getLogger(__name__)

SPAWNERD = str(Path(__file__).with_name("spawnerd.py"))
_HEADER = struct.Struct(">I")


class SpawnerDied(RuntimeError):
    """The spawner process went away before it answered."""


@dataclass
class Spawned:
    """A command the spawner started: its pid (the leader of its own group)."""

    pid: int
    exited: asyncio.Future  # -> (wait status, ru_utime, ru_stime, ru_maxrss in bytes)
    fell_back: bool  # the direct exec failed and the fallback (bash) runs instead
    floor: int  # the spawner's RSS high-water at the fork: ru_maxrss starts there


def spawner_argv(*args: str) -> list[str]:
    return [sys.executable, "-I", "-S", SPAWNERD, *args]


class Spawner:
    """Start with ``start()``; use from one event loop; ``close()`` when done."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._sock: Optional[socket.socket] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._rid = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._exits: dict[int, asyncio.Future] = {}
        self._inbuf = bytearray()
        self._outq: list[list[Any]] = []  # [bytes left, fds to send with them]
        self._writing = False
        self.closed = False

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> "Spawner":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Popen without user=: the cheap vfork path.  Its own session,
            # so Ctrl-C and killpg of the daemon's group do not reach it.
            self._proc = subprocess.Popen(
                spawner_argv(str(theirs.fileno())), pass_fds=(theirs.fileno(),), env={},
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._inbuf.clear()
        self._outq.clear()
        self._writing = False
        if self.loop is not None:
            self.loop.add_reader(ours, self._on_readable)
        return self

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self.loop is None:
            self.loop = loop
            if self._sock is not None:
                loop.add_reader(self._sock, self._on_readable)
        elif self.loop is not loop:
            raise RuntimeError("a Spawner is used from one event loop only")
        if self.closed:
            raise SpawnerDied("the spawner was closed")
        if self._sock is None:  # it died: start another
            self.start()
        return loop

    # ------------------------------------------------------------- requests

    async def spawn(self, exe: str, argv: Sequence[str], env: dict[str, str], cwd: str,
                    user: Optional["TaskUser"], fds: Sequence[int],
                    fallback: Optional[tuple[str, Sequence[str], dict[str, str]]] = None,
                    box: Optional["Box"] = None) -> Spawned:
        """Start ``exe`` (``argv``, ``env``, in ``cwd``) as ``user`` with
        ``fds`` as its stdin/stdout/stderr; the caller keeps its fds (they
        are copied); ``box``: the namespaces and cgroups it runs in
        (isolation.py).  Raises OSError if neither it nor ``fallback`` could
        be exec'd, SpawnerDied if the spawner died meanwhile."""
        loop = self._bind()
        rid = self._next_rid()
        uid, gid = (user.uid, user.gid) if user is not None else (None, None)
        fut = loop.create_future()
        self._pending[rid] = fut
        fb = (fallback[0], list(fallback[1]), fallback[2]) if fallback is not None else None
        walls = box.wire() if box is not None else None
        self._send(("spawn", rid, exe, list(argv), env, cwd, uid, gid, fb, walls), list(fds))
        try:
            return await fut
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is None and fut.done() and not fut.cancelled():
                if fut.exception() is None:  # started meanwhile: nobody will wait for it
                    _killpg(fut.result().pid)
            raise

    def unbox(self, key: str) -> None:
        """Forget the namespaces of box ``key`` (they end with their last process)."""
        if self._sock is not None:
            self._send(("unbox", 0, key), [])

    async def kill_all(self, user: "TaskUser") -> None:
        """SIGKILL every process of ``user``'s uid (kill(-1) as that uid)."""
        loop = self._bind()
        rid = self._next_rid()
        fut = loop.create_future()
        self._pending[rid] = fut
        self._send(("kill", rid, user.uid, user.gid), [])
        try:
            ok = await fut
        finally:
            self._pending.pop(rid, None)
        if not ok:
            raise OSError(f"could not switch to uid {user.uid} to kill its processes")

    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    # ------------------------------------------------------------- plumbing

    def _send(self, msg: tuple, fds: list[int]) -> None:
        data = marshal.dumps(msg)
        # Copies: the caller may close its fds before a queued frame goes out.
        self._outq.append([_HEADER.pack(len(data)) + data, [os.dup(fd) for fd in fds]])
        self._flush()

    def _flush(self) -> None:
        sock = self._sock
        while self._outq and sock is not None:
            data, fds = self._outq[0]
            try:
                if fds:
                    n = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    n = sock.send(data)
            except BlockingIOError:
                break
            except OSError:
                self._died()
                return
            _close(fds)  # they went with the first bytes
            if n < len(data):
                self._outq[0] = [data[n:], []]
            else:
                self._outq.pop(0)
        want = bool(self._outq)
        if want != self._writing and self.loop is not None and sock is not None:
            self._writing = want
            if want:
                self.loop.add_writer(sock, self._flush)
            else:
                self.loop.remove_writer(sock)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._died()
                return
            self._inbuf += data
        buf = self._inbuf
        while len(buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf)
            if len(buf) < _HEADER.size + size:
                break
            msg = marshal.loads(bytes(buf[_HEADER.size:_HEADER.size + size]))
            del buf[:_HEADER.size + size]
            self._handle(msg)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "exit":
            _, pid, status, utime, stime, maxrss = msg
            fut = self._exits.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result((status, utime, stime, maxrss * 1024))
            return
        fut = self._pending.pop(msg[1], None)
        if kind == "started":
            _, _, pid, fell_back, floor = msg
            assert self.loop is not None
            exited = self.loop.create_future()
            self._exits[pid] = exited
            if fut is None or fut.done():  # its waiter was cancelled
                _killpg(pid)
                exited.add_done_callback(_ignore)
                return
            fut.set_result(Spawned(pid, exited, fell_back, floor))
        elif fut is None or fut.done():
            return
        elif kind == "error":
            _, _, code, text = msg
            fut.set_exception(OSError(code, text) if code else OSError(text))
        elif kind == "killed":
            fut.set_result(msg[2])

    def _died(self) -> None:
        """The spawner is gone (or unreachable): fail its waiters, kill its commands."""
        if self._sock is None:
            return
        if self.loop is not None:
            self.loop.remove_reader(self._sock)
            if self._writing:
                self.loop.remove_writer(self._sock)
        self._sock.close()
        self._sock = None
        self._writing = False
        for _, fds in self._outq:
            _close(fds)
        self._outq.clear()
        if not self.closed:
            log.error("the spawner process (pid %s) died; the %d command(s) it ran are killed",
                      self.pid, len(self._exits))
        for pid in self._exits:
            _killpg(pid)  # orphans now: kill their groups, best effort
        error = SpawnerDied("the spawner process died")
        for fut in [*self._pending.values(), *self._exits.values()]:
            if not fut.done():
                fut.set_exception(error)
                fut.add_done_callback(_ignore)
        self._pending.clear()
        self._exits.clear()
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Stop the spawner: it SIGKILLs the commands still running and exits."""
        self.closed = True
        self._died()

    def __del__(self) -> None:
        if self._sock is not None:
            self._sock.close()


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _ignore(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


# ------------------------------------------------------------ the current one

_spawner: Optional[Spawner] = None
_per_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Spawner]" = weakref.WeakKeyDictionary()


def set_spawner(spawner: Optional[Spawner]) -> None:
    """Make ``spawner`` the one commands of other users go through (the daemon's)."""
    global _spawner
    _spawner = spawner


def current() -> Spawner:
    """The spawner for the running loop (started on first use)."""
    loop = asyncio.get_running_loop()
    if _spawner is not None and not _spawner.closed and _spawner.loop in (None, loop):
        return _spawner
    sp = _per_loop.get(loop)
    if sp is None or sp.closed:
        sp = _per_loop[loop] = Spawner().start()
    return sp

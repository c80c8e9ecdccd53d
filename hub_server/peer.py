"""One connection as the hub sees it: who it speaks for, and a bounded outbox.

Everything the hub sends to a peer goes through ``Peer``'s queue and one
writer task, so frames keep their order and memory stays bounded however
slowly the peer reads:

* ``post(msg)`` never waits.  Live ``output`` beyond ``send_queue_bytes``
  queued is dropped and counted; once the queue has drained, the peer gets
  one marker per stream saying how many lines it missed.  A peer that keeps
  the queue full for ``slow_timeout`` seconds, or lets it pass
  ``send_queue_hard_bytes`` with messages that cannot be dropped, is
  disconnected (websocket close 1008 with the reason).
* ``send(msg)`` / ``send_bytes(frame)`` wait for room: a request handler (or
  a blob download) that outruns its reader simply slows down with it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Optional, Union

import websockets
from websockets.asyncio.server import ServerConnection

from . import protocol as p
from .auth import Principal
from .blobs import BlobWriter

log = logging.getLogger("hwf.hub")


class Peer:
    def __init__(self, ws: ServerConnection, principal: Principal, limits: p.Limits,
                 slow_timeout: float) -> None:
        self.ws = ws
        self.principal = principal
        self.role = principal.role
        self.allowed = p.ALLOWED[principal.role]
        self.machine_id: Optional[str] = None
        self.uploads: dict[int, BlobWriter] = {}
        self._soft = limits.send_queue_bytes
        self._hard = max(limits.send_queue_hard_bytes, limits.send_queue_bytes)
        self._slow_timeout = slow_timeout
        self._queue: collections.deque[tuple[Union[bytes, str], bool]] = collections.deque()
        self.queued_bytes = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        # (watch, task_id, attempt, stream) -> [lines, bytes] dropped
        self._dropped: dict[tuple[Optional[int], str, int, str], list[int]] = {}
        self._dropping_since: Optional[float] = None
        self.closing = False
        self._writer = asyncio.ensure_future(self._write_loop())

    # -- sending ------------------------------------------------------------

    def post(self, msg: Any) -> None:
        """Queue a message without waiting (from synchronous code)."""
        if self.closing:
            return
        data = p.encode(msg)
        if isinstance(msg, p.Output) and self.queued_bytes + len(data) > self._soft:
            self._drop(msg)
            return
        if self.queued_bytes + len(data) > self._hard:
            self.close_slow(f"send queue above {self._hard} bytes: the peer is not reading")
            return
        self._push(data, True)

    async def send(self, msg: Any) -> None:
        """Queue a message and wait until the queue has room again."""
        await self._send(p.encode(msg), True)

    async def wait_room(self) -> None:
        """Return once the queue is below ``send_queue_bytes`` (or the peer is closing)."""
        while self.queued_bytes > self._soft and not self.closing:
            self._room.clear()
            await self._room.wait()

    async def send_bytes(self, frame: bytes) -> None:
        await self._send(frame, False)

    async def _send(self, data: bytes, text: bool) -> None:
        if self.closing:
            raise websockets.ConnectionClosedError(None, None)
        self._push(data, text)
        await self.wait_room()

    def _push(self, data: bytes, text: bool) -> None:
        self._queue.append((data, text))
        self.queued_bytes += len(data)
        self._wake.set()

    def _drop(self, msg: p.Output) -> None:
        key = (msg.watch, msg.task_id, msg.attempt, msg.stream)
        counts = self._dropped.setdefault(key, [0, 0])
        counts[0] += msg.text.count("\n")
        counts[1] += len(msg.text)
        now = time.monotonic()
        if self._dropping_since is None:
            self._dropping_since = now
        elif now - self._dropping_since > self._slow_timeout:
            self.close_slow(f"live output dropped for over {self._slow_timeout:g}s: the peer is not reading")

    def _markers(self) -> None:
        """Tell the peer, in each stream it missed output of, how much it missed."""
        dropped, self._dropped = self._dropped, {}
        self._dropping_since = None
        for (watch, task_id, attempt, stream), (lines, size) in dropped.items():
            text = (f"\n[hwf: {lines} lines ({size} bytes) of output dropped: "
                    "this connection was not reading fast enough]\n")
            self._push(p.encode(p.Output(task_id=task_id, attempt=attempt, stream=stream,  # type: ignore[arg-type]
                                         text=text, watch=watch)), True)

    async def _write_loop(self) -> None:
        try:
            while True:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                data, text = self._queue.popleft()
                self.queued_bytes -= len(data)
                await self.ws.send(data, text=text)
                if self.queued_bytes <= self._soft:
                    self._room.set()
                    if self._dropped and self.queued_bytes <= self._soft // 2:
                        self._markers()
        except websockets.ConnectionClosed:
            pass
        finally:
            self._release()

    def _release(self) -> None:
        self.closing = True
        self._queue.clear()
        self.queued_bytes = 0
        self._room.set()

    def close_slow(self, reason: str) -> None:
        """Disconnect a peer that does not keep up; frees its queue at once."""
        if self.closing:
            return
        log.warning("disconnecting %s (%s %s): %s", self.ws.remote_address, self.role,
                    self.principal.user, reason)
        self.close(1008, reason)

    def close(self, code: int, reason: str) -> None:
        self._release()
        self._writer.cancel()
        asyncio.ensure_future(self.ws.close(code, reason[:120]))

    async def stop(self) -> None:
        """The connection ended: stop the writer, abort open uploads."""
        self._writer.cancel()
        self._release()
        for w in self.uploads.values():
            w.abort()
        self.uploads.clear()

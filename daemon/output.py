"""A task's live output on its way to the hub, in bounded memory.

A task can print far faster than the hub link carries (1 GB in seconds).
Starting one send per batch without waiting queued all of it in the
daemon's memory and its socket buffer, and the heartbeats behind it
stalled until the hub declared the daemon lost.  So the pump keeps at most
``MAX_PENDING_OUTPUT`` bytes waiting and one send in flight; what comes
beyond that is dropped and counted, and once there is room again the
watcher gets a line saying how much it missed.  The runner's own kept head
of each command's output (``max_output_bytes``) is not affected.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Awaitable, Callable, Optional

log = logging.getLogger(__name__)

MAX_PENDING_OUTPUT = 1 << 20  # bytes of one task's output waiting to be sent
MAX_OUTPUT_MESSAGE = 64 << 10  # bytes of text in one output message
BATCH_BYTES = 16 << 10  # send at once from this much; less waits up to ``interval``
STREAMS = ("stdout", "stderr")

Send = Callable[[str, str], Awaitable[None]]  # send(stream, text)


def dropped_marker(count: int) -> str:
    return f"\n[hwf: {count} bytes of output dropped: the hub is not keeping up]\n"


class OutputPump:
    """Call it with ``(stream, text)``; ``await close()`` sends what is left.

    Batches go out at most every ``interval`` seconds unless ``BATCH_BYTES``
    are waiting.  Create it inside a running event loop.
    """

    def __init__(self, send: Send, *, interval: float = 0.1, limit: int = MAX_PENDING_OUTPUT,
                 message_bytes: int = MAX_OUTPUT_MESSAGE) -> None:
        self._send = send
        self.interval = interval
        self.limit = limit
        self.message_bytes = message_bytes
        self._parts: dict[str, collections.deque[tuple[str, int]]] = {s: collections.deque() for s in STREAMS}
        self.pending = 0  # bytes waiting, markers included
        self.dropped = {s: 0 for s in STREAMS}  # bytes dropped since the last marker
        self.dropped_total = 0
        self._wake = asyncio.Event()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._closing = False
        self._worker = asyncio.ensure_future(self._run())

    def __call__(self, stream: str, text: str) -> None:
        if self._closing or not text:
            return
        size = len(text.encode())
        self._resume(stream)
        if self.dropped[stream] or self.pending + size > self.limit:
            # Once dropping, keep dropping this stream until its marker is
            # queued: text after a gap must not look continuous.
            self.dropped[stream] += size
            self.dropped_total += size
            return
        self._parts[stream].append((text, size))
        self.pending += size
        if self.pending >= BATCH_BYTES:
            self._wake.set()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._wake.set)

    def _resume(self, stream: str) -> None:
        """Queue the 'dropped' marker once the backlog has drained to half the bound."""
        if self.dropped[stream] and self.pending <= self.limit // 2:
            marker = dropped_marker(self.dropped[stream])
            self.dropped[stream] = 0
            self._parts[stream].append((marker, len(marker)))
            self.pending += len(marker)

    def _take(self, stream: str) -> str:
        """Up to ``message_bytes`` of the stream's waiting text (one oversized part is split)."""
        parts = self._parts[stream]
        out: list[str] = []
        size = 0
        while parts:
            text, n = parts[0]
            if size + n > self.message_bytes:
                if out:
                    break
                head, tail = text[: self.message_bytes], text[self.message_bytes:]
                head_n = len(head.encode())
                parts[0] = (tail, n - head_n)
                out.append(head)
                size += head_n
                break
            parts.popleft()
            out.append(text)
            size += n
        self.pending -= size
        return "".join(out)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            while True:
                sent = False
                for stream in STREAMS:
                    self._resume(stream)
                    text = self._take(stream)
                    if text:
                        sent = True
                        try:
                            await self._send(stream, text)  # one send in flight, never more
                        except Exception:
                            log.exception("sending output failed")
                if not sent:
                    break
            if self._closing:
                return

    async def close(self) -> None:
        """Send everything still waiting (and a last marker), then stop."""
        if not self._closing:
            self._closing = True
            self._wake.set()
        await asyncio.shield(self._worker)

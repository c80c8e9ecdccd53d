"""A task's parsed progress on its way to the hub, throttled.

Blender prints ``Fra:N`` lines many times a second per frame, and a
``percent`` progress bar can redraw thousands of times a second; each
``p.Progress`` costs the hub a store write and a message per watcher.  So
at most one goes out per ``interval`` (and one send in flight), always the
latest value, and ``close()`` sends the last one before the task's result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Optional

from .parsers import ProgressParser, Update

log = logging.getLogger(__name__)

INTERVAL = 0.25  # seconds between two progress messages of one task (~4 per second)

SendProgress = Callable[[Update], Awaitable[None]]


class ProgressReporter:
    """Call it with ``(stream, text)`` like an ``on_output``; ``await close()`` at the task's end.

    Create it inside a running event loop.  Output that parses to no new
    progress costs no message.
    """

    def __init__(self, parser: ProgressParser, send: SendProgress, *, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.parser = parser
        self._send = send
        self.interval = interval
        self._clock = clock
        self._latest: Optional[Update] = None  # waiting to be sent
        self._last_sent = -float("inf")
        self._inflight: Optional[asyncio.Future] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._closed = False
        self.sent = 0

    def __call__(self, stream: str, text: str) -> None:
        if self._closed:
            return
        update = self.parser.feed(text, stream)
        if update is not None:
            self._latest = update
            self._kick()

    def _kick(self) -> None:
        """Send now if the interval has passed, else once it has (a timer)."""
        if self._latest is None or self._inflight is not None or self._timer is not None or self._closed:
            return
        wait = self._last_sent + self.interval - self._clock()
        if wait <= 0:
            self._start()
        else:
            self._timer = asyncio.get_running_loop().call_later(wait, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._kick()

    def _start(self) -> None:
        update, self._latest = self._latest, None
        assert update is not None
        self._last_sent = self._clock()
        self._inflight = asyncio.ensure_future(self._deliver(update))
        self._inflight.add_done_callback(self._on_sent)

    def _on_sent(self, _: asyncio.Future) -> None:
        self._inflight = None
        self._kick()

    async def _deliver(self, update: Update) -> None:
        try:
            await self._send(update)
            self.sent += 1
        except Exception:  # progress is best effort; the task's result is not
            log.exception("sending progress failed")

    async def close(self) -> None:
        """Read the unfinished last lines and send what is still waiting; then stop."""
        if self._closed:
            return
        self._closed = True
        final = self.parser.finish()
        if final is not None:
            self._latest = final
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
        if self._latest is not None:
            update, self._latest = self._latest, None
            await self._deliver(update)


def fan_out(*outputs: Optional[Callable[[str, str], None]]) -> Optional[Callable[[str, str], None]]:
    """One ``on_output`` calling each of ``outputs`` (None ones left out); None if none is left."""
    present = [o for o in outputs if o is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def both(stream: str, text: str) -> None:
        for output in present:
            try:
                output(stream, text)
            except Exception:  # one broken consumer must not starve the other
                log.exception("on_output consumer failed")

    return both

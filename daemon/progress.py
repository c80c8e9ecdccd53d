"""A task's progress on its way to the hub: parsed from its output, throttled.

The parser (parsers.py) reads each stream's lines; the newest update goes
out at most every ``interval`` seconds (a render printing a line per
sample must not become a message per line), and ``close()`` sends the last
one before the task's result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Optional

from .parsers import ProgressParser, Update

log = logging.getLogger(__name__)

Send = Callable[[Update], Awaitable[None]]


class ProgressReporter:
    """Call it with ``(stream, text)`` (an ``on_output``); ``await close()`` at the end."""

    def __init__(self, send: Send, kind: Optional[str], frame_start: Optional[int] = None,
                 frame_end: Optional[int] = None, *, interval: float = 0.25) -> None:
        self._send = send
        self._parsers = {s: ProgressParser(kind, frame_start, frame_end) for s in ("stdout", "stderr")}
        self.interval = interval
        self._latest: Optional[Update] = None
        self._sent_at = 0.0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._sending: Optional[asyncio.Future] = None

    def __call__(self, stream: str, text: str) -> None:
        parser = self._parsers.get(stream)
        got = parser.feed(text) if parser is not None else None
        if got is not None:
            self._note(got)

    def _note(self, update: Update) -> None:
        if self._latest is not None:  # keep a frame seen earlier when this line had only a percent
            update = Update(update.percent if update.percent is not None else self._latest.percent,
                            update.frame if update.frame is not None else self._latest.frame)
        self._latest = update
        if self._timer is None:
            wait = max(0.0, self._sent_at + self.interval - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(wait, self._flush)

    def _flush(self) -> None:
        self._timer = None
        update, self._latest = self._latest, None
        if update is None:
            return
        self._sent_at = time.monotonic()
        self._sending = asyncio.ensure_future(self._send_quietly(update))

    async def _send_quietly(self, update: Update) -> None:
        try:
            await self._send(update)
        except Exception:  # progress is best effort; the result is not
            log.exception("sending progress failed")

    async def close(self) -> None:
        for parser in self._parsers.values():
            got = parser.finish()
            if got is not None:
                self._note(got)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sending is not None:
            await self._sending
        update, self._latest = self._latest, None
        if update is not None:
            await self._send_quietly(update)


def both(*sinks: Optional[Callable[[str, str], None]]) -> Optional[Callable[[str, str], None]]:
    """One ``on_output`` feeding several (the live-output pump and the progress parser)."""
    live = [s for s in sinks if s is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def feed(stream: str, text: str) -> None:
        for sink in live:
            sink(stream, text)

    return feed

"""One status-page snapshot per user per interval, however many streams read it.

``/api/events`` used to compute a snapshot per stream every half second (300
light streams took 93% of a core); now every stream of one user (and role)
waits on that user's ``Feed``, which one task refreshes each interval while
anyone listens.  Streams are capped per user and in total.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from .auth import Principal

log = logging.getLogger("hwf.http")


class Feed:
    """The latest snapshot of one (user, role), as bytes, with a version number."""

    def __init__(self) -> None:
        self.version = 0
        self.data = b""
        self.key: Optional[str] = None
        self.listeners = 0
        self._changed = asyncio.Event()
        self.task: Optional[asyncio.Task] = None

    def publish(self, snap: dict[str, Any]) -> None:
        """A new snapshot: readers wake only if something other than its time changed."""
        key = json.dumps({k: v for k, v in snap.items() if k != "time"}, sort_keys=True, default=str)
        if key == self.key:
            return
        self.key, self.data = key, json.dumps(snap).encode()
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def next(self, seen: int, timeout: float) -> tuple[int, bytes]:
        """The snapshot newer than version ``seen``, or the current one after ``timeout``."""
        if self.version == seen:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self.version, self.data


class SnapshotFeeds:
    def __init__(self, compute: Callable[[Principal], Awaitable[dict[str, Any]]], interval: float, *,
                 max_total: int, max_per_user: int) -> None:
        self.compute = compute
        self.interval = interval
        self.max_total, self.max_per_user = max_total, max_per_user
        self.feeds: dict[tuple[str, str], Feed] = {}
        self.streams = 0
        self.per_user: dict[str, int] = {}

    def room_for(self, who: Principal) -> Optional[str]:
        """None, or why another stream of ``who`` is refused (naming the flag)."""
        if self.streams >= self.max_total:
            return (f"the hub has {self.streams} event streams open (--http-max-streams={self.max_total}); "
                    "try again shortly")
        held = self.per_user.get(who.user, 0)
        if held >= self.max_per_user:
            return (f"user {who.user!r} has {held} event streams open "
                    f"(--http-max-streams-per-user={self.max_per_user}); close one first")
        return None

    @contextlib.asynccontextmanager
    async def subscribe(self, who: Principal) -> AsyncIterator[Feed]:
        """Count a stream of ``who`` for as long as it is open; its user's feed."""
        key = (who.user, who.role)
        feed = self.feeds.get(key)
        if feed is None:
            feed = self.feeds[key] = Feed()
        self.streams += 1
        self.per_user[who.user] = self.per_user.get(who.user, 0) + 1
        feed.listeners += 1
        try:
            if feed.task is None:
                feed.task = asyncio.ensure_future(self._refresh(who, feed))
            if feed.version == 0:
                await feed.next(0, self.interval * 20)  # the first snapshot, shared with whoever asked first
            yield feed
        finally:
            self.streams -= 1
            left = self.per_user[who.user] - 1
            if left:
                self.per_user[who.user] = left
            else:
                del self.per_user[who.user]
            feed.listeners -= 1
            if feed.listeners == 0:
                if feed.task is not None:
                    feed.task.cancel()
                del self.feeds[key]

    async def _refresh(self, who: Principal, feed: Feed) -> None:
        """While anyone listens: one snapshot per interval for all of them."""
        while True:
            try:
                feed.publish(await self.compute(who))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. the hub was slow to answer: try again next round
                log.debug("snapshot for %s failed: %r", who.user, exc)
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        for feed in list(self.feeds.values()):
            if feed.task is not None:
                feed.task.cancel()

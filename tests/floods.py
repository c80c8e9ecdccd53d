"""Watching a hub under a flood: its peak RSS, its fds, and how long another
user's ``get_pool`` round trip takes meanwhile (reported, never asserted)."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from typing import Optional

import psutil
from websockets.exceptions import ConnectionClosed

from rawpeer import RawPeer


class Watch:
    """Samples the hub's RSS and open fds, and times another user's ``get_pool``
    round trips over the websocket, until ``stop()``."""

    def __init__(self, pid: int, address: str, token: str) -> None:
        self.proc = psutil.Process(pid)
        self.base_rss = self.proc.memory_info().rss
        self.rss: list[int] = [self.base_rss]
        self.fds: list[int] = [self.proc.num_fds()]
        self.trips: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._peer = RawPeer(address, token)
        self._threads = [threading.Thread(target=self._sample, daemon=True),
                         threading.Thread(target=self._ping, daemon=True)]
        for t in self._threads:
            t.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.rss.append(self.proc.memory_info().rss)
                self.fds.append(self.proc.num_fds())
            except psutil.Error:
                return
            self._stop.wait(0.05)

    def _ping(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                reply = self._peer.request({"type": "get_pool"}, timeout=60)
            except Exception as exc:  # the report says what failed; the test asserts on it
                self.errors.append(repr(exc))
                return
            if reply["type"] != "pool":
                self.errors.append(str(reply))
                return
            self.trips.append(time.perf_counter() - t0)
            self._stop.wait(0.02)

    def stop(self) -> "Watch":
        self._stop.set()
        for t in self._threads:
            t.join(timeout=70)
        with contextlib.suppress(ConnectionClosed):  # cleanup only: the report and asserts use trips/errors
            self._peer.close()
        return self

    @property
    def growth(self) -> int:
        return max(self.rss) - self.base_rss

    def p99(self) -> Optional[float]:
        if len(self.trips) < 2:
            return self.trips[0] if self.trips else None
        return statistics.quantiles(self.trips, n=100, method="inclusive")[98]

    def report(self, what: str) -> str:
        p99 = self.p99()
        line = (f"[{what}] hub RSS +{self.growth / 2**20:.1f} MiB (peak {max(self.rss) / 2**20:.0f} MiB), "
                f"fds peak {max(self.fds)}, other user's get_pool: {len(self.trips)} round trips, "
                f"p99 {p99 * 1000 if p99 is not None else float('nan'):.1f} ms, "
                f"max {max(self.trips, default=float('nan')) * 1000:.1f} ms")
        print(line)
        return line

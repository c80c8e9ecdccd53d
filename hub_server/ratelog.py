"""One log line per cause per interval, with a count: for log sites an attacker
can trigger once per connection (refused connections, failed accepts, broken
handshakes).  A flood of 10,000 idle connections used to write a traceback
each (416 MB in two minutes); now it writes one line every ``interval``
seconds per cause, saying how many times it happened.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional


class RateLimitedLog:
    """``log(cause, message)``: the first time a cause happens in an interval it is
    logged at once; repeats are counted and reported with the next line of that
    cause after the interval (``... (x123 in the last 10 s)``)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.level = level
        self._last: dict[str, float] = {}  # cause -> when it was last written
        self._held: dict[str, int] = {}  # cause -> times since then, not written

    def __call__(self, cause: str, message: str, level: Optional[int] = None) -> bool:
        """Log ``message`` unless ``cause`` was logged within the interval; True if written."""
        now = self.clock()
        last = self._last.get(cause)
        if last is not None and now - last < self.interval:
            self._held[cause] = self._held.get(cause, 0) + 1
            return False
        held = self._held.pop(cause, 0)
        if held and last is not None:
            message = f"{message} (x{held + 1} in the last {now - last:.0f} s)"
        if len(self._last) > 1000:  # causes are a small fixed set; never let them grow without bound
            self._last.clear()
        self._last[cause] = now
        self.logger.log(self.level if level is None else level, "%s", message)
        return True

    def flush(self) -> None:
        """Report causes held back whose interval has passed (call now and then)."""
        now = self.clock()
        for cause, held in list(self._held.items()):
            last = self._last.get(cause, now)
            if now - last >= self.interval:
                del self._held[cause]
                self._last[cause] = now
                self.logger.log(self.level, "%s: x%d more in the last %.0f s", cause, held, now - last)

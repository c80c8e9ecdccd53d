"""Views that ask the hub again in the background, on HWF's I/O loop, so a
notebook stays usable while a slow or unreachable hub is asked."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Optional

import pandas as pd

from .._ioloop import io_loop


class BackgroundRefresh:
    """Mixin: subclasses define ``async _fetch()`` and ``to_dataframe()``."""

    _auto: Optional[concurrent.futures.Future] = None

    async def _fetch(self) -> None:
        raise NotImplementedError

    def to_dataframe(self) -> pd.DataFrame:
        raise NotImplementedError

    def _start_refreshing(self, every: Optional[float], auto: bool) -> None:
        """First fetch (waited for unless on the I/O thread), then every ``every`` s."""
        if io_loop().in_loop_thread():
            self.refresh()
        else:
            self.refresh_sync()
        if auto and every is not None:
            self._auto = io_loop().submit(self._auto_refresh(every))

    async def _auto_refresh(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self._fetch()

    def refresh(self) -> concurrent.futures.Future:
        """Ask the hub again in the background; returns at once."""
        return io_loop().submit(self._fetch())

    def refresh_sync(self) -> pd.DataFrame:
        """Ask the hub again and wait for the answer (not from HWF's I/O thread)."""
        io_loop().run_sync(self._fetch())
        return self.to_dataframe()

    def stop(self) -> None:
        """Stop the auto refresh (the view keeps its last state)."""
        fut, self._auto = self._auto, None
        if fut is not None:
            fut.cancel()

    @property
    def running(self) -> bool:
        """Auto refresh is on."""
        return self._auto is not None and not self._auto.done()


def check_interval(refresh: Any) -> None:
    if refresh is not None and refresh <= 0:
        raise ValueError(f"refresh must be > 0 seconds or None, got {refresh!r}")

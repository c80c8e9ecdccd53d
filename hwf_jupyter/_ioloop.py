"""The client's own event loop, on a background thread.

All network I/O of the client runs here (as in ipyparallel and dask), so the
public API works the same from a notebook cell (whose kernel already runs a
loop), a plain script, another thread, or a kernel where the user applied
``nest_asyncio``: coroutines are handed over with ``run_coroutine_threadsafe``
and never run nested inside the caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from typing import Any, Awaitable, Callable, Coroutine, Optional, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_instance: Optional["IOLoop"] = None


class IOLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hwf-io", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        """Block the calling thread until ``coro`` finishes on the I/O loop."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("a *_sync function was called from HWF's own I/O thread; await it instead")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()  # Ctrl-C or timeout: stop the remote work too
            raise

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` from any loop, running it on the I/O loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return await coro
        fut = self.submit(coro)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            raise


def io_loop() -> IOLoop:
    """The process-wide I/O loop, started on first use."""
    global _instance
    if _instance is None:
        with _lock:
            if _instance is None:
                _instance = IOLoop()
    return _instance


def on_io_loop(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Make a coroutine method run on the I/O loop whoever awaits it."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        return await io_loop().run_async(fn(*args, **kwargs))

    return wrapper


def sync_twin(fn: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """The blocking ``<name>_sync`` twin of a public coroutine function."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return io_loop().run_sync(fn(*args, **kwargs))

    wrapper.__name__ = wrapper.__qualname__ = fn.__name__ + "_sync"
    wrapper.__doc__ = f"Blocking twin of ``{fn.__name__}``: safe from a notebook cell, a script or a thread."
    return wrapper

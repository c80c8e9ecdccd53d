"""``PyFuture``: the value of a function task, usable from sync and async code.

A ``concurrent.futures.Future`` (so ``concurrent.futures.wait`` and
``as_completed`` take it), completed by HWF's I/O thread when the hub
reports the task's end, plus:

* ``await fut`` on any event loop (a notebook's, a script's, one with
  ``nest_asyncio`` applied): the loop is woken from the I/O thread;
  cancelling the awaiting coroutine does not cancel the task (as with
  Dask), ``fut.cancel()`` does;
* ``add_done_callback(fn)``: ``fn(fut)`` runs on the event loop that was
  running where it was added (as asyncio does), or, when none was, on HWF's
  I/O thread (as concurrent.futures does: keep it short), or at once if the
  future is already done;
* ``cancel()``: marks it cancelled now and cancels the task on the hub
  (a running task is killed on its daemon);
* ``task_id`` once the hub accepted it, and ``info``: the finished task's
  ``TaskResult`` (machine, duration, peak RAM, CPU time, stdout).

``result()`` and ``exception()`` block the calling thread, which is safe in a
notebook cell (the network runs on HWF's own thread), but not on that thread
itself: there, ``await`` the future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import TYPE_CHECKING, Any, Callable, Optional

from ._ioloop import io_loop

if TYPE_CHECKING:
    from .results import TaskResult

Callback = Callable[["PyFuture"], Any]


class PyFuture(concurrent.futures.Future):
    """The future value of ``hub.submit(fn, ...)`` (one task on the farm)."""

    def __init__(self, label: str = "", on_cancel: Optional[Callable[["PyFuture"], None]] = None) -> None:
        super().__init__()
        self.label = label
        self.task_id: Optional[str] = None
        self.session_id: Optional[str] = None
        self.info: Optional["TaskResult"] = None
        self._on_cancel = on_cancel
        # Resolved with the task id once the hub accepted the task (or with the
        # submit's error): code that needs the id waits on it.
        self.submitted: concurrent.futures.Future = concurrent.futures.Future()

    # -- set by the client (on the I/O thread) --------------------------------

    def _accepted(self, task_id: str, session_id: str) -> None:
        self.task_id, self.session_id = task_id, session_id
        if not self.submitted.done():
            self.submitted.set_result(task_id)

    def _refused(self, exc: BaseException) -> None:
        if not self.submitted.done():
            self.submitted.set_exception(exc)
        self._settle(exc=exc)

    def _settle(self, value: Any = None, *, exc: Optional[BaseException] = None, cancelled: bool = False,
                info: Optional["TaskResult"] = None) -> bool:
        """Complete the future unless it is done already (a local cancel wins)."""
        if info is not None:
            self.info = info
        if self.done():
            return False
        try:
            if cancelled:
                return concurrent.futures.Future.cancel(self)
            if exc is not None:
                self.set_exception(exc)
            else:
                self.set_result(value)
            return True
        except concurrent.futures.InvalidStateError:  # lost a race with cancel()
            return False

    # -- the user's side ------------------------------------------------------

    def cancel(self) -> bool:
        """Cancel the task: True unless it had already ended."""
        if self.cancelled():
            return True
        if not concurrent.futures.Future.cancel(self):
            return False
        if self._on_cancel is not None:
            self._on_cancel(self)
        return True

    def _check_thread(self) -> None:
        if not self.done() and io_loop().in_loop_thread():
            raise RuntimeError("result() would block HWF's I/O thread, which completes it: await the future instead")

    def result(self, timeout: Optional[float] = None) -> Any:
        """The function's return value; re-raises its exception (with the
        remote traceback as ``__cause__``); ``TaskFailed`` when the task
        failed otherwise; ``CancelledError``; ``TimeoutError`` after ``timeout`` s."""
        self._check_thread()
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._check_thread()
        return super().exception(timeout)

    def add_done_callback(self, fn: Callback) -> None:
        try:
            loop: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop is io_loop().loop:
            super().add_done_callback(fn)
            return

        def on_loop(fut: concurrent.futures.Future, fn: Callback = fn,
                    loop: asyncio.AbstractEventLoop = loop) -> None:
            try:
                loop.call_soon_threadsafe(fn, fut)
            except RuntimeError:  # that loop is closed: nobody is left to call
                pass

        super().add_done_callback(on_loop)

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        if not self.done():
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_: concurrent.futures.Future) -> None:
                def set_it() -> None:
                    if not waiter.done():
                        waiter.set_result(None)

                try:
                    loop.call_soon_threadsafe(set_it)
                except RuntimeError:
                    pass

            concurrent.futures.Future.add_done_callback(self, wake)
            await waiter  # cancelling this wait leaves the task alone
        return super().result(0)

    def __repr__(self) -> str:
        with self._condition:
            state = self._state.lower()
        what = f" {self.label}" if self.label else ""
        tid = f" {self.task_id}" if self.task_id else " (not yet accepted)"
        return f"<PyFuture{what}{tid} {state}>"

"""Final display updates that must also reach front-ends which only listen to the running cell.

A progress view ends on HWF's I/O thread, often after its cell finished.
Its ``update_display_data`` then carries the finished cell's parent header:
JupyterLab keeps that cell's future and applies it, but nbclient (and so
``hwf run-notebook`` and nbconvert) reads only the running cell's messages
and drops it, so the executed notebook would keep the stale live state.
Sending the update again from the next ``post_run_cell`` (on the kernel's
main thread, under whatever cell is running then) reaches those too; a
display update is idempotent, so front-ends that got the first copy lose
nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

_lock = threading.Lock()
_pending: list[Callable[[], None]] = []
_hooked: set[int] = set()  # id() of shells whose post_run_cell hook is registered


def hook_shell(shell: Any) -> None:
    """Register the post_run_cell hook once per shell (no-op outside IPython)."""
    if shell is None or not hasattr(shell, "events"):
        return
    with _lock:
        if id(shell) in _hooked:
            return
        _hooked.add(id(shell))
    shell.events.register("post_run_cell", _run_pending)


def resend_after_next_cell(update: Callable[[], None]) -> None:
    """Call ``update`` again after the next cell runs (from the kernel's main thread)."""
    with _lock:
        _pending.append(update)


def _run_pending(*_args: Any) -> None:
    with _lock:
        todo = list(_pending)
        _pending.clear()
    for update in todo:
        try:
            update()
        except Exception:  # a display that cannot be updated must not break the cell
            log.exception("re-sending a final progress display failed")

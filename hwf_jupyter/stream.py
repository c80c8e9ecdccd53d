"""Remote stdout/stderr shown under the cell that dispatched the tasks.

Output arrives on HWF's I/O thread, possibly while the user runs other
cells.  Like ipyparallel, we remember the dispatching cell's parent header
and publish ``stream`` messages on IOPub with it, so the front-end appends
the lines to that cell's output, not to whichever cell is running now.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Optional

from hub_server import protocol as p

from ._ioloop import io_loop


class CellStream:
    def __init__(self, shell: Any = None, *, prefix: bool = False) -> None:
        kernel = getattr(shell, "kernel", None)
        self.kernel = kernel
        self.parent = kernel.get_parent() if kernel is not None else None
        self.prefix = prefix
        self.watcher: Any = None
        self._remaining: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def start(cls, hub: Any, task_ids: list[str], *, shell: Any = None) -> "CellStream":
        """Watch the tasks' output until they all end."""
        stream = cls(shell, prefix=len(task_ids) > 1)
        stream._remaining = set(task_ids)
        stream.watcher = hub.watch_sync(task_ids, output=True, on_output=stream.on_output,
                                        on_event=stream.on_event, on_snapshot=stream.on_snapshot)
        return stream

    def on_snapshot(self, briefs: list[p.TaskBrief]) -> None:
        for b in briefs:
            if b.status in p.TERMINAL_STATES:
                self._ended(b.task_id)

    def on_event(self, ev: p.TaskEvent) -> None:
        if ev.status in p.TERMINAL_STATES:
            self._ended(ev.task_id)

    def _ended(self, task_id: str) -> None:
        with self._lock:
            self._remaining.discard(task_id)
            finished = not self._remaining
        if finished and self.watcher is not None:
            io_loop().submit(self.watcher.close())

    def on_output(self, out: p.Output) -> None:
        text = out.text
        if self.prefix:
            tag = f"[{out.task_id[-6:]}] "
            text = "".join(tag + line for line in text.splitlines(keepends=True))
        self.write(out.stream, text)

    def write(self, name: str, text: str) -> None:
        if self.kernel is None or self.parent is None:
            target = sys.stderr if name == "stderr" else sys.stdout
            target.write(text)
            target.flush()
            return
        self.kernel.session.send(
            self.kernel.iopub_socket,
            "stream",
            {"name": name, "text": text},
            parent=self.parent,
            ident=f"stream.{name}".encode(),
        )


def parent_msg_id(stream: Optional[CellStream]) -> Optional[str]:
    """The msg_id of the cell a stream writes under (for tests and debugging)."""
    if stream is None or not stream.parent:
        return None
    return stream.parent.get("header", {}).get("msg_id")

"""Remote stdout/stderr shown under the cell that dispatched the tasks.

Output arrives on HWF's I/O thread, possibly while the user runs other
cells.  Like ipyparallel, we remember the dispatching cell's parent header
and publish ``stream`` messages on IOPub with it, so the front-end appends
the lines to that cell's output, not to whichever cell is running now.

What the notebook shows is capped per task and stream (``LineCap``): the
first lines live, then, when the task ends, "… N lines omitted" and the
last lines, so a chatty task does not bloat the saved .ipynb.  The results
(``%hwf_results --level command``) keep the daemon's full capture.
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import Any, Optional

from hub_server import protocol as p

from ._ioloop import io_loop


DEFAULT_MAX_LINES = 200
OMITTED_HINT = "full output: %hwf_results --level command"


class LineCap:
    """Which lines of one output stream to show: the first ``head`` live, the
    last ``tail`` at the end, and a count of those left out between.

    Sans-I/O: ``feed(text)`` returns what to show now, ``finish()`` what to
    show when the task has ended.  A line is counted when its newline comes
    (chunks may split lines anywhere).
    """

    def __init__(self, max_lines: int = DEFAULT_MAX_LINES) -> None:
        if not isinstance(max_lines, int) or isinstance(max_lines, bool) or max_lines < 0:
            raise ValueError(f"max_lines must be a whole number >= 0, got {max_lines!r}")
        self.unlimited = max_lines == 0
        self.tail = max_lines // 4
        self.head = max_lines - self.tail
        self.shown = 0  # whole lines shown live
        self.held = 0  # whole lines past the head (shown at the end, or omitted)
        self._tail: collections.deque[str] = collections.deque(maxlen=max(self.tail, 1))
        self._partial = ""  # the unfinished line past the head
        self.finished = False

    def feed(self, text: str) -> str:
        if self.unlimited or self.finished:
            return text
        out: list[str] = []
        for piece in text.splitlines(keepends=True):
            ends = piece.endswith(("\n", "\r"))
            if self.shown < self.head and not self._partial:
                out.append(piece)
                self.shown += ends
                continue
            self._partial += piece
            if ends:
                self.held += 1
                if self.tail:
                    self._tail.append(self._partial)
                self._partial = ""
        return "".join(out)

    @property
    def omitted(self) -> int:
        return self.held - (len(self._tail) if self.tail else 0)

    def finish(self) -> str:
        """The omitted-lines note and the last lines (once; later feeds pass through)."""
        if self.unlimited or self.finished:
            return ""
        self.finished = True
        if self._partial:
            self.held += 1
            if self.tail:
                self._tail.append(self._partial + "\n")
            self._partial = ""
        tail = "".join(self._tail) if self.tail else ""
        omitted = self.omitted
        if omitted <= 0:
            return tail
        return f"… {omitted} line{'s' * (omitted != 1)} omitted ({OMITTED_HINT})\n" + tail


class CellStream:
    def __init__(self, shell: Any = None, *, prefix: bool = False, max_lines: int = DEFAULT_MAX_LINES) -> None:
        kernel = getattr(shell, "kernel", None)
        self.kernel = kernel
        self.parent = kernel.get_parent() if kernel is not None else None
        self.prefix = prefix
        self.max_lines = max_lines
        LineCap(max_lines)  # a bad value fails here, before anything is watched
        self.watcher: Any = None
        self._remaining: set[str] = set()
        self._caps: dict[tuple[str, str], LineCap] = {}
        self._lock = threading.Lock()

    @classmethod
    def start(cls, hub: Any, task_ids: list[str], *, shell: Any = None,
              max_lines: int = DEFAULT_MAX_LINES) -> "CellStream":
        """Watch the tasks' output until they all end (``max_lines`` per task and stream; 0: all)."""
        stream = cls(shell, prefix=len(task_ids) > 1, max_lines=max_lines)
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
            if task_id not in self._remaining:
                return
            self._remaining.discard(task_id)
            finished = not self._remaining
            ends = [(name, cap.finish()) for (tid, name), cap in self._caps.items() if tid == task_id]
        for name, text in ends:
            self._show(task_id, name, text)
        if finished and self.watcher is not None:
            io_loop().submit(self.watcher.close())

    def on_output(self, out: p.Output) -> None:
        with self._lock:
            cap = self._caps.get((out.task_id, out.stream))
            if cap is None:
                cap = self._caps[(out.task_id, out.stream)] = LineCap(self.max_lines)
            text = cap.feed(out.text)
        self._show(out.task_id, out.stream, text)

    def _show(self, task_id: str, name: str, text: str) -> None:
        if not text:
            return
        if self.prefix:
            tag = f"[{task_id[-6:]}] "
            text = "".join(tag + line for line in text.splitlines(keepends=True))
        self.write(name, text)

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

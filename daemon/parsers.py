"""Progress from a command's output lines (the Manager API's ``parser``).

Sans-I/O: ``ProgressParser.feed(text)`` takes output as it comes (any
chunking) and returns the latest progress it read, or None.  Task output is
untrusted: odd lines, huge numbers and garbage are ignored, never raised on,
and a line is looked at only up to ``MAX_LINE`` characters.

* ``frames``: Blender's ``Fra:12 Mem:...`` and ``Frame 12`` / ``frame 12/24``;
  with the task's frame range, percent = frames before the current one / count.
* ``percent``: the last ``NN%`` / ``NN.N%`` on a line (0-100).
* ``hwf-progress: N/M``: any command may print it, whatever the parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

MAX_LINE = 4096
_FRAME = re.compile(r"\bFra:\s*(-?\d{1,9})\b|\b[Ff]rame[ :#]+(-?\d{1,9})\b")
_PERCENT = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,6})?)\s?%")
_HWF = re.compile(r"hwf-progress:\s*(\d{1,15})\s*/\s*(\d{1,15})")
_LINE_END = re.compile(r"[\r\n]")


@dataclass(frozen=True)
class Update:
    percent: Optional[float] = None
    frame: Optional[int] = None


class ProgressParser:
    def __init__(self, kind: Optional[str] = None, frame_start: Optional[int] = None,
                 frame_end: Optional[int] = None) -> None:
        if kind not in (None, "frames", "percent", "hwf-progress"):
            raise ValueError(f"unknown parser {kind!r}")
        self.kind = kind
        self.frame_start, self.frame_end = frame_start, frame_end
        self._partial = ""

    def feed(self, text: str) -> Optional[Update]:
        """The newest progress in the complete lines so far (None if nothing new)."""
        parts = _LINE_END.split(self._partial + text)
        self._partial = parts.pop()[-MAX_LINE:]  # an unfinished line waits for its end
        latest = None
        for line in parts:
            got = self.line(line[:MAX_LINE])
            if got is not None:
                latest = got
        return latest

    def finish(self) -> Optional[Update]:
        """The last line, if the output did not end with a newline."""
        line, self._partial = self._partial, ""
        return self.line(line) if line else None

    def line(self, line: str) -> Optional[Update]:
        m = _HWF.search(line)
        if m:
            done, total = int(m.group(1)), int(m.group(2))
            if 0 < total and done <= total:
                return Update(percent=100.0 * done / total)
            return None
        if self.kind == "frames":
            return self._frame(line)
        if self.kind == "percent":
            found = [float(x) for x in _PERCENT.findall(line)]
            found = [x for x in found if 0.0 <= x <= 100.0]
            return Update(percent=found[-1]) if found else None
        return None

    def _frame(self, line: str) -> Optional[Update]:
        m = None
        for m in _FRAME.finditer(line):
            pass
        if m is None:
            return None
        frame = int(m.group(1) if m.group(1) is not None else m.group(2))
        lo, hi = self.frame_start, self.frame_end
        if lo is None or hi is None:
            return Update(frame=frame)
        if not lo <= frame <= hi:
            return None
        return Update(percent=100.0 * (frame - lo) / (hi - lo + 1), frame=frame)

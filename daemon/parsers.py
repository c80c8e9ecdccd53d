"""Progress read from a task's output: sans-I/O, fed text chunks as they come.

A render prints ``Fra:12 Mem:...`` long before it ends; a watcher wants to
see that.  One ``ProgressParser`` per attempt (all stages, both streams)
turns the output into the task's latest ``Update`` (percent, frame).

Task output is untrusted: a line that does not parse, a number too large
for the protocol's ranges or a negative one is ignored, never an error.
The regexes run over whole chunks (C speed), not line by line in Python:
a task may print a gigabyte, and only the last match of a chunk matters.
A line split across chunks is kept (at most ``MAX_LINE`` characters) until
its end arrives; ``\\r`` ends a line too, as progress bars redraw with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

PARSERS = ("frames", "percent", "hwf-progress")
MAX_LINE = 4096  # characters of an unfinished line kept until its end arrives
MAX_FRAME = 10**9  # the protocol's FrameNumber bound
_MAX_DIGITS = 10  # longer digit runs are garbage (and int() of huge strings is slow)

# Blender: "Fra:12 Mem:18.54M ..."; also "Frame 12", "frame: 12", "frame 12/24",
# "Rendering frame 12 of 24".  [ \t] (not \s): a match never spans lines.
_FRAME = re.compile(
    r"\bFra:[ \t]*(\d+)"
    r"|(?i:\bframe)[ \t]*[:#]?[ \t]*(\d+)(?:[ \t]*(?:/|(?i:of))[ \t]*(\d+))?"
)
# "45%", "45.5 %"; not "-5%", "1.2.3%" or "x5%".
_PERCENT = re.compile(r"(?<![\w.+\-])(\d+(?:\.\d+)?)[ \t]?%")
# The farm's own line, whatever the parser: "hwf-progress: 3/4".
_HWF = re.compile(r"\bhwf-progress:[ \t]*(\d+)[ \t]*/[ \t]*(\d+)")
_BREAK = re.compile(r"[\r\n]")


@dataclass(frozen=True)
class Update:
    """The task's progress as read so far: what ``p.Progress`` carries."""

    percent: Optional[float] = None  # 0-100
    frame_current: Optional[int] = None


def check_parser(name: Optional[str]) -> Optional[str]:
    """``name`` if it is a known parser (or None); else a ValueError naming the allowed ones."""
    if name is not None and name not in PARSERS:
        raise ValueError(f"parser: {name!r} is not one of {', '.join(PARSERS)} (or None)")
    return name


def _number(digits: str) -> Optional[int]:
    if len(digits) > _MAX_DIGITS:
        return None
    n = int(digits)
    return n if n <= MAX_FRAME else None


def _clamp(value: float) -> float:
    """0..100, rounded as the hub stores it (55.00000000000001 is 55.0)."""
    return round(min(100.0, max(0.0, value)), 3)


class ProgressParser:
    """Feed it output text; ``feed`` returns the new ``Update`` when progress changed.

    ``parser`` is ``TaskSpec.parser``; ``frame_start``/``frame_end`` (both
    set, start <= end) turn the current frame into a percent: the frames
    before it are done; a frame outside them is not believed (the hub
    would drop it too).  ``hwf-progress: N/M`` lines count with any parser.
    """

    def __init__(self, parser: Optional[str] = None, frame_start: Optional[int] = None,
                 frame_end: Optional[int] = None) -> None:
        self.parser = check_parser(parser)
        self.range: Optional[tuple[int, int]] = None
        if frame_start is not None and frame_end is not None and frame_start <= frame_end:
            self.range = (frame_start, frame_end)
        self.percent: Optional[float] = None
        self.frame_current: Optional[int] = None
        self._partial: dict[str, str] = {}

    @property
    def update(self) -> Update:
        return Update(self.percent, self.frame_current)

    def feed(self, text: str, stream: str = "stdout") -> Optional[Update]:
        """Read a chunk of one stream's output; the new state if it changed, else None."""
        if not text:
            return None
        partial = self._partial.get(stream, "")
        cut = _last_break(text)
        if cut < 0:
            partial += text
            if len(partial) <= MAX_LINE:
                self._partial[stream] = partial
                return None
            # A line this long is read as if it ended here: memory stays bounded.
            self._partial[stream] = ""
            return self._scan(partial)
        tail = text[cut + 1:]
        if len(tail) <= MAX_LINE:
            self._partial[stream] = tail
            return self._scan(partial + text[: cut + 1])
        self._partial[stream] = ""
        return self._scan(partial + text)

    def finish(self) -> Optional[Update]:
        """The output ended: read the unfinished lines (no newline at the end)."""
        rest = [t for t in self._partial.values() if t]
        self._partial.clear()
        changed = None
        for text in rest:
            changed = self._scan(text) or changed
        return changed

    def _scan(self, text: str) -> Optional[Update]:
        """Apply the last valid match of each kind in ``text``; later ones win the percent."""
        before = (self.percent, self.frame_current)
        candidates: list[tuple[int, Optional[float], Optional[int]]] = []  # (position, percent, frame)
        hwf = _last(_HWF, text, _hwf_percent, "hwf-progress:")
        if hwf is not None:
            candidates.append((hwf[0], hwf[1], None))
        if self.parser == "frames":
            frame = _last(_FRAME, text, self._frame_of, _may_have_frames)
            if frame is not None:
                pos, (n, total) = frame
                candidates.append((pos, self._frame_percent(n, total), n))
        elif self.parser == "percent":
            pct = _last(_PERCENT, text, _percent_of, "%")
            if pct is not None:
                candidates.append((pct[0], pct[1], None))
        for _, percent, frame in sorted(candidates, key=lambda c: c[0]):
            if frame is not None:
                self.frame_current = frame
            if percent is not None:
                self.percent = percent
        if (self.percent, self.frame_current) == before:
            return None
        return self.update

    def _frame_of(self, m: re.Match) -> Optional[tuple[int, Optional[int]]]:
        """(frame, total from "N/M") of a match; a frame outside the task's range is not believed."""
        digits = m.group(1) if m.group(1) is not None else m.group(2)
        frame = _number(digits)
        if frame is None or (self.range is not None and not self.range[0] <= frame <= self.range[1]):
            return None
        total = _number(m.group(3)) if m.group(3) is not None else None
        return frame, total

    def _frame_percent(self, frame: int, total: Optional[int]) -> Optional[float]:
        if self.range is not None:
            start, end = self.range
            return _clamp((frame - start) / (end - start + 1) * 100.0)
        if total:  # "frame 12/24" and no range in the spec: frames count from 1
            return _clamp((frame - 1) / total * 100.0)
        return None


def _last_break(text: str) -> int:
    return max(text.rfind("\n"), text.rfind("\r"))


def _may_have_frames(text: str) -> bool:
    """A cheap test before the frame regex (whose alternation and \\b scan at ~30 MB/s)."""
    return "Fra:" in text or "frame" in text.lower()


def _last(pattern: re.Pattern, text: str, convert, hint: Union[str, Callable[[str], bool]] = ""):  # type: ignore[no-untyped-def]
    """The position and converted value of the last match ``convert`` accepts.

    Most chunks have no match at all (a literal ``hint`` rejects them at
    memchr speed); a flood of matches (Blender prints Fra:N per sample) is
    read from its end, in growing windows cut at line starts, so only the
    last few matches are converted in Python.
    """
    if isinstance(hint, str) and hint not in text:
        return None
    if callable(hint) and not hint(text):
        return None
    if pattern.search(text) is None:
        return None
    end, size = len(text), 4096
    while end > 0:
        start = max(0, end - size)
        if start > 0:  # back to the start of that line: a match never spans lines
            start = max(text.rfind("\n", 0, start), text.rfind("\r", 0, start)) + 1
        found = None
        for m in pattern.finditer(text, start, end):
            value = convert(m)
            if value is not None:
                found = (m.start(), value)
        if found is not None:
            return found
        end, size = start, size * 4
    return None


def _hwf_percent(m: re.Match) -> Optional[float]:
    done, total = _number(m.group(1)), _number(m.group(2))
    if done is None or total is None or total == 0 or done > total:
        return None
    return _clamp(done / total * 100.0)


def _percent_of(m: re.Match) -> Optional[float]:
    digits = m.group(1)
    if len(digits) > 16:
        return None
    value = float(digits)
    return value if 0.0 <= value <= 100.0 else None

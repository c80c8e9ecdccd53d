"""What the magics say back in one line: a cancel's outcome, a Ctrl-C during a wait.

Sans-I/O: each takes the facts (counts, ids) and returns text, so the words
are unit-tested without a kernel.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Optional

from hub_server import protocol as p

_STATE_ORDER = ("queued", "retrying", "assigned", "running")


def _counts_text(by_state: Mapping[str, int]) -> str:
    order = [s for s in _STATE_ORDER if by_state.get(s)] + sorted(
        s for s in by_state if s not in _STATE_ORDER and by_state[s])
    return ", ".join(f"{by_state[s]} {s}" for s in order)


def _tasks(n: int) -> str:
    return f"{n} task{'s' * (n != 1)}"


class CancelReport(dict):
    """``hub.cancel``'s answer ({"cancelled": ids, "by_state": counts}) that reads
    as a sentence: "cancelled 3 tasks (2 queued, 1 running)"."""

    def text(self) -> str:
        n = len(self.get("cancelled", []))
        if n == 0:
            return "cancelled 0 tasks: none was still queued or running"
        counts = _counts_text(self.get("by_state", {}))
        return f"cancelled {_tasks(n)}" + (f" ({counts})" if counts else "")

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.text())


def interrupted_line(statuses: Iterable[str], *, session_id: Optional[str], cancel_hint: str) -> str:
    """The one line shown when Ctrl-C stops a wait: what still runs and how to cancel it."""
    statuses = list(statuses)
    left = Counter(s for s in statuses if s not in p.TERMINAL_STATES)
    of = f"of session {session_id}" if session_id else "waited on"
    if not left:
        return f"interrupted: all {_tasks(len(statuses))} {of} have ended; nothing to cancel"
    n = sum(left.values())
    verb = "still runs" if n == 1 else "still run"
    return (f"interrupted: {n} of {_tasks(len(statuses))} {of} {verb} ({_counts_text(left)}); "
            f"{cancel_hint} cancels {'it' if n == 1 else 'them'}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a magic's wait, shown as its one line (no traceback through HWF).

    A KeyboardInterrupt still, so "Run All" stops here as it would for any
    interrupted cell."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]

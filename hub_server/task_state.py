"""The task lifecycle as a pure state machine (no I/O, no clock).

    queued -> assigned -> running -> finished | failed | cancelled
    assigned/running -> retrying -> queued      (daemon lost, attempts left)
    any non-terminal -> cancelled | failed      (cancel, timeout, no attempts left)

The hub asks ``check`` before every transition and stores the result; a
transition that is not listed here is a bug or a stale message (a result
for an attempt that was already given up), and is refused.
"""

from __future__ import annotations

from .protocol import TERMINAL_STATES

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"assigned", "cancelled", "failed"}),
    "assigned": frozenset({"running", "retrying", "queued", "finished", "failed", "cancelled"}),
    "running": frozenset({"retrying", "finished", "failed", "cancelled"}),
    "retrying": frozenset({"queued", "failed", "cancelled"}),
    "finished": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class InvalidTransition(ValueError):
    pass


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATES


def check(current: str, new: str) -> None:
    """Raise InvalidTransition unless ``current -> new`` is allowed."""
    allowed = TRANSITIONS.get(current)
    if allowed is None:
        raise InvalidTransition(f"unknown task state {current!r}")
    if new not in allowed:
        raise InvalidTransition(f"task cannot go from {current!r} to {new!r}")


def after_loss(attempts_used: int, max_retries: int) -> str:
    """Where a task goes when its daemon is lost: retry, or give up."""
    return "retrying" if attempts_used <= max_retries else "failed"

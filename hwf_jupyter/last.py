"""The kernel's last submission, whoever made it.

``%hwf_results``, ``%hwf_cancel`` and friends default to the last dispatch,
whether it came from ``%hwf_dispatch``, ``dispatch()`` in Python or the
``TaskBuilder`` widget: each of those records it here.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .dispatch import Submission

_lock = threading.Lock()
_last: Optional["Submission"] = None


def remember(sub: "Submission") -> None:
    """Make ``sub`` the last submission (called by every dispatch path)."""
    global _last
    with _lock:
        _last = sub


def last_submission() -> Optional["Submission"]:
    """The last dispatch made in this process, or None."""
    with _lock:
        return _last

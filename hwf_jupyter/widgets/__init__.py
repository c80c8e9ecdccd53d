"""Jupyter widgets for HWF: live task progress, the hardware pool, a task form.

Each also works without a notebook: its repr is plain text.
"""

from .builder import TaskBuilder
from .credits import CreditBoard
from .pool import PoolView
from .progress import Progress, watch_progress

__all__ = ["CreditBoard", "PoolView", "Progress", "TaskBuilder", "watch_progress"]

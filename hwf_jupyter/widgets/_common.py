"""Small helpers shared by the widgets: kernel detection and formatting."""

from __future__ import annotations

import html
import os
from typing import Any, Optional


def in_kernel() -> bool:
    """Widgets only render in a Jupyter kernel; a terminal IPython or a script gets text."""
    if os.environ.get("HWF_NONINTERACTIVE") == "1":
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and hasattr(ip, "kernel")


def as_hub(obj: Any, widget: str) -> Any:
    """The ``Hub`` a widget talks to: a Hub, or a LocalCluster's (its ``hub()``).

    Anything else is a TypeError naming what the widget takes, at once,
    rather than an AttributeError from the first background refresh."""
    from ..cluster import LocalCluster
    from ..hub import Hub

    if isinstance(obj, LocalCluster):
        return obj.hub()
    if isinstance(obj, Hub) or (hasattr(obj, "get_hardware_pool") and hasattr(obj, "get_result")):
        return obj  # a Hub, or a stand-in with its methods
    raise TypeError(f"{widget} takes a Hub (hwf_jupyter.Hub or %hwf_connect's) or a LocalCluster, "
                    f"got {type(obj).__name__}")


def resolve_interactive(interactive: Optional[bool]) -> bool:
    return in_kernel() if interactive is None else bool(interactive)


def fmt_seconds(s: Optional[float]) -> str:
    """Durations people read at a glance: 0.12s, 42.0s, 3m05s, 2h07m."""
    if s is None:
        return "-"
    if s < 10:
        return f"{s:.2f}s"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m}m{sec:02d}s"
    h, rest = divmod(int(round(s)), 3600)
    return f"{h}h{rest // 60:02d}m"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def error_html(text: str) -> str:
    """One red line: what went wrong, never a traceback."""
    return f'<span style="color:#c62828"><b>Error:</b> {esc(text)}</span>'


def describe_error(exc: BaseException) -> str:
    """Our own errors read as sentences already; others get their type name."""
    from ..task import TaskError

    msg = str(exc) or type(exc).__name__
    if isinstance(exc, TaskError):
        return msg.splitlines()[0]
    return f"{type(exc).__name__}: {msg}".splitlines()[0]

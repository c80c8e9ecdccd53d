"""``CreditBoard``: a live credit leaderboard (``hub.credit_tally``), refreshed
in the background on HWF's I/O loop while tasks finish.

Its output bundle carries a static HTML table beside the widget, so a saved
notebook shows the last standings without a kernel.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Optional

import pandas as pd

from ._common import as_hub, describe_error, error_html, esc, resolve_interactive
from ._refresh import BackgroundRefresh, check_interval

if TYPE_CHECKING:
    import ipywidgets

    from ..hub import Hub

BY = ("machine", "owner", "user", "session")


def _fmt(v: Any) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return "(none)"
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


class CreditBoard(BackgroundRefresh):
    """Ranked credit totals by ``by`` (machine, owner, user or session), refreshed
    every ``refresh`` seconds (None: only on ``refresh()``)."""

    def __init__(self, hub: "Hub", by: str = "owner", *, refresh: Optional[float] = 1.0,
                 top: int = 20, interactive: Optional[bool] = None) -> None:
        if by not in BY:
            raise ValueError(f"by must be one of {', '.join(BY)}, not {by!r}")
        check_interval(refresh)
        self.hub, self.by, self.top = as_hub(hub, 'CreditBoard'), by, top
        self.interactive = resolve_interactive(interactive)
        self.error: Optional[str] = None
        self.updated: Optional[float] = None
        self._df = pd.DataFrame(columns=["rank", by, "credits", "tasks", "pending"])
        self._lock = threading.Lock()
        self._box: Optional["ipywidgets.VBox"] = None
        if self.interactive:
            self._build_widgets()
        self._start_refreshing(refresh, auto=self.interactive)

    async def _fetch(self) -> None:
        try:
            df = await self.hub.credit_tally(by=self.by)
        except Exception as exc:  # shown on the board; the next refresh tries again
            with self._lock:
                self.error = describe_error(exc)
        else:
            with self._lock:
                self._df, self.error, self.updated = df, None, time.time()
        self._render()

    def to_dataframe(self) -> pd.DataFrame:
        with self._lock:
            return self._df.copy()

    @property
    def widget(self) -> Optional["ipywidgets.VBox"]:
        return self._box

    def _build_widgets(self) -> None:
        import ipywidgets as w

        self._status = w.HTML()
        self._table = w.HTML()
        self._box = w.VBox([self._status, self._table])

    def _rows(self) -> list[list[str]]:
        with self._lock:
            df = self._df
        cols = ["rank", self.by, "credits", "tasks", "pending"]
        return [[_fmt(r[c]) for c in cols] for _, r in df.head(self.top).iterrows()]

    def html(self) -> str:
        cols = ["#", self.by, "credits", "tasks", "pending"]
        head = "".join(f'<th style="padding:1px 8px">{esc(c)}</th>' for c in cols)
        body = "".join(
            "<tr>" + "".join(f'<td style="padding:1px 8px;text-align:{"left" if i == 1 else "right"}">{esc(v)}</td>'
                             for i, v in enumerate(row)) + "</tr>"
            for row in self._rows())
        table = f'<table style="font-size:90%"><tr>{head}</tr>{body}</table>' if body else "<i>no credits yet</i>"
        return f"<b>Credits by {esc(self.by)}</b><br>{table}"

    def text(self) -> str:
        lines = [f"Credits by {self.by}"] + ["  ".join(r) for r in self._rows()]
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines) if len(lines) > 1 else f"Credits by {self.by}: none yet"

    def _render(self) -> None:
        if self._box is None:
            return
        with self._lock:
            error, updated = self.error, self.updated
        when = time.strftime("%H:%M:%S", time.localtime(updated)) if updated else "never"
        with self._status.hold_sync(), self._table.hold_sync():
            self._status.value = esc(f"updated {when}") + (" &nbsp;" + error_html(error) if error else "")
            self._table.value = self.html()

    def __repr__(self) -> str:
        return self.text()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict[str, Any]:
        bundle: dict[str, Any] = {"text/plain": self.text(), "text/html": self.html()}
        if self._box is not None:
            bundle.update(self._box._repr_mimebundle_(**kwargs) or {})
            bundle["text/plain"], bundle["text/html"] = self.text(), self.html()
        return bundle

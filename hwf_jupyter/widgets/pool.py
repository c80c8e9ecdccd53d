"""``PoolView``: the hub's machines and their load, refreshed in the background.

Refreshes run as coroutines on HWF's I/O loop, so a notebook stays usable
while a slow or unreachable hub is asked again; only the first fetch (so the
view has something to show) waits.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional

import pandas as pd

from ..results import HardwarePool
from ._common import as_hub, describe_error, error_html, esc, resolve_interactive
from ._refresh import BackgroundRefresh, check_interval

if TYPE_CHECKING:
    import ipywidgets

    from ..hub import Hub

# Display column -> function of a HardwarePool.to_dataframe() row.
_COLUMNS: dict[str, Any] = {
    "name": lambda r: r["name"],
    "state": lambda r: r["state"],
    "os": lambda r: " / ".join(str(v) for v in (r["os"], r["distro"]) if isinstance(v, str) and v),
    "arch": lambda r: r["arch"],
    "cpu": lambda r: r["cpu"],
    "cores": lambda r: r["cores"],
    "RAM GB": lambda r: r["ram_mb"] / 1024,  # the frame has MiB; people read machines in GB
    "GPUs": lambda r: r["gpus"],
    "slots": lambda r: r["slots"],
    "running": lambda r: r["running"],
    "load 1m": lambda r: r["load_1m"],
    "cpu%": lambda r: r["cpu_percent"],
    "mem%": lambda r: r["mem_percent"],
    "disk%": lambda r: r["disk_percent"],
}


def display_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The machine table as people read it: fewer, shorter columns."""
    rows = [{k: f(r) for k, f in _COLUMNS.items()} for _, r in df.iterrows()]
    return pd.DataFrame(rows, columns=list(_COLUMNS))


def _fmt(v: Any) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


class PoolView(BackgroundRefresh):
    """Machines matching ``hardware`` (all without it), with a Refresh button and auto refresh."""

    def __init__(
        self,
        hub: "Hub",
        *hardware: Mapping[str, Any],
        refresh: Optional[float] = 5.0,
        interactive: Optional[bool] = None,
        include_offline: bool = False,
    ) -> None:
        check_interval(refresh)
        self.hub = as_hub(hub, 'PoolView')
        self.hardware = hardware
        self.refresh_interval = refresh
        self.include_offline = include_offline
        self.interactive = resolve_interactive(interactive)
        self.pool: Optional[HardwarePool] = None
        self.error: Optional[str] = None
        self.updated: Optional[float] = None
        self._df = HardwarePool().to_dataframe()
        self._lock = threading.Lock()
        self._box: Optional["ipywidgets.VBox"] = None
        if self.interactive:
            self._build_widgets()
        self._start_refreshing(refresh, auto=self.interactive)

    # -- fetching -------------------------------------------------------------

    async def _fetch(self) -> None:
        try:
            pool = await self.hub.get_hardware_pool(*self.hardware, include_offline=self.include_offline)
        except Exception as exc:  # shown in the view; the next refresh tries again
            with self._lock:
                self.error = describe_error(exc)
        else:
            with self._lock:
                self.pool, self._df, self.error = pool, pool.to_dataframe(), None
                self.updated = time.time()
        self._render()

    def to_dataframe(self) -> pd.DataFrame:
        """The last pool as ``HardwarePool.to_dataframe()`` returned it."""
        with self._lock:
            return self._df.copy()

    # -- showing ----------------------------------------------------------------

    @property
    def widget(self) -> Optional["ipywidgets.VBox"]:
        return self._box

    def _build_widgets(self) -> None:
        import ipywidgets as w

        self.button = w.Button(description="Refresh", icon="refresh", layout=w.Layout(width="110px"))
        self.button.on_click(lambda _b: self.refresh())
        self._status = w.HTML()
        self._table = w.HTML()
        self._box = w.VBox([w.HBox([self.button, self._status]), self._table])

    def _html_table(self, df: pd.DataFrame) -> str:
        frame = display_frame(df)
        if frame.empty:
            return "<i>no machines</i>"
        head = "".join(f'<th style="padding:1px 6px">{esc(c)}</th>' for c in frame.columns)
        body = "".join(
            "<tr>" + "".join(
                f'<td style="padding:1px 6px;text-align:{"left" if i < 5 or c == "GPUs" else "right"}">'
                f"{esc(_fmt(v))}</td>"
                for i, (c, v) in enumerate(row.items())
            ) + "</tr>"
            for _, row in frame.iterrows()
        )
        return f'<table style="font-size:90%"><tr>{head}</tr>{body}</table>'

    def _render(self) -> None:
        if self._box is None:
            return
        with self._lock:
            df, error, updated = self._df, self.error, self.updated
        when = time.strftime("%H:%M:%S", time.localtime(updated)) if updated else "never"
        status = f"{len(df)} machine(s), updated {when}"
        with self._status.hold_sync(), self._table.hold_sync():
            self._status.value = esc(status) + (" &nbsp;" + error_html(error) if error else "")
            self._table.value = self._html_table(df)

    def text(self) -> str:
        with self._lock:
            df, error = self._df, self.error
        out = display_frame(df).map(_fmt).to_string(index=False) if len(df) else "(no machines)"
        return out + (f"\nerror: {error}" if error else "")

    def __repr__(self) -> str:
        return self.text()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict[str, Any]:
        if self._box is None:
            return {"text/plain": self.text()}
        bundle = dict(self._box._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = self.text()
        return bundle

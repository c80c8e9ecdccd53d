"""HTML cards for notebook display, like Dask's client card.

``Hub``, ``LocalCluster``, ``Submission`` and ``ResultList`` show one of these
instead of a one-line repr: the facts a user looks for (address, workers,
slots, memory, status counts) and the status page link.  Building a card
never touches the network: it uses what the object already knows (a pool
cached by the last ``get_hardware_pool``, counts from the last fetch), so
displaying a disconnected Hub cannot hang a cell.  Everything shown is
escaped: machine names, labels and errors come from daemons and users.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .results import HardwarePool, ResultList

# Status colours shared with the progress widget's vocabulary.
STATUS_COLOURS = {
    "queued": "#9e9e9e", "assigned": "#90caf9", "running": "#1976d2", "retrying": "#ef6c00",
    "finished": "#2e7d32", "failed": "#c62828", "cancelled": "#6d4c41",
}
_TH = "text-align:left;padding:1px 1em 1px 0;vertical-align:top;white-space:nowrap"
_TD = "text-align:left;padding:1px 0"
_MAX_MACHINES = 12  # per-machine rows in a card; the rest is summed up
_MAX_TASK_ROWS = 10


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def code(value: object) -> str:
    """An id or a name: monospace, never wrapped at its hyphens."""
    return f"<code style='white-space:nowrap'>{esc(value)}</code>"


def link(url: str) -> str:
    u = esc(url)
    return f"<a href='{u}' target='_blank' rel='noopener'>{u}</a>"


def fmt_gb(n_bytes: Optional[float]) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**30:.1f} GB"


def fmt_age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def status_counts_html(counts: Mapping[str, int]) -> str:
    """``3 finished · 1 failed`` with each status in its colour."""
    if not counts:
        return "-"
    return " · ".join(f"<span style='color:{STATUS_COLOURS.get(k, '#000')};white-space:nowrap'>"
                      f"{int(v)} {esc(k)}</span>" for k, v in counts.items())


def card(title: str, rows: Sequence[tuple[str, str]], *, status_url: Optional[str] = None,
         sections: Iterable[tuple[str, str]] = (), open_sections: bool = False) -> str:
    """A card: a title, ``rows`` of (label, trusted HTML), the status page link,
    then collapsible ``sections`` of (summary text, trusted HTML), folded
    unless ``open_sections``.

    Row values are HTML: callers escape what they put in (``esc``/``code``)."""
    cells = "".join(f"<tr><th style='{_TH}'>{esc(k)}</th><td style='{_TD}'>{v}</td></tr>" for k, v in rows)
    if status_url:
        cells += f"<tr><th style='{_TH}'>status page</th><td style='{_TD}'>{link(status_url)}</td></tr>"
    attr = " open" if open_sections else ""
    more = "".join(f"<details{attr}><summary>{esc(s)}</summary>{body}</details>" for s, body in sections)
    return (f"<div class='hwf-card' style='border-left:4px solid #1976d2;padding:2px 10px;margin:2px 0'>"
            f"<div style='font-weight:bold;margin-bottom:2px'>{esc(title)}</div>"
            f"<table style='margin:0'>{cells}</table>{more}</div>")


# -------------------------------------------------------------------- pools


def pool_rows(pool: "HardwarePool") -> list[tuple[str, str]]:
    """Workers, slots, cores and memory of the online machines (Dask's "Cluster Info")."""
    online = [m for m in pool if m.state == "online"]
    others = len(pool) - len(online)
    workers = f"{len(online)} online" + (f" ({others} draining or offline)" if others else "")
    rams = [m.ram for m in online if isinstance(m.ram, (int, float))]
    cores = [m.cores for m in online if isinstance(m.cores, int)]
    gpus = sum(len(m.gpus) for m in online)
    rows = [("workers", esc(workers)),
            ("slots", esc(f"{sum(m.slots for m in online)} ({sum(m.running for m in online)} running)")),
            ("cores", esc(sum(cores) if cores else "-")),
            ("memory", esc(fmt_gb(sum(rams)) if rams else "-"))]
    if gpus:
        rows.append(("GPUs", esc(gpus)))
    return rows


def machines_table(pool: "HardwarePool") -> str:
    """One row per machine (name, state, slots, cores, RAM), at most _MAX_MACHINES."""
    head = "".join(f"<th style='{_TH}'>{h}</th>" for h in ("machine", "state", "slots", "running", "cores", "RAM"))
    body = "".join(
        f"<tr><td style='{_TD}'>{code(m.name)}</td><td style='{_TD}'>{esc(m.state)}</td>"
        f"<td style='{_TD}'>{esc(m.slots)}</td><td style='{_TD}'>{esc(m.running)}</td>"
        f"<td style='{_TD}'>{esc(m.cores if m.cores is not None else '-')}</td>"
        f"<td style='{_TD}'>{esc(fmt_gb(m.ram if isinstance(m.ram, (int, float)) else None))}</td></tr>"
        for m in list(pool)[:_MAX_MACHINES])
    rest = len(pool) - _MAX_MACHINES
    tail = f"<tr><td colspan='6'>… {rest} more (hub.get_hardware_pool())</td></tr>" if rest > 0 else ""
    return f"<table><tr>{head}</tr>{body}{tail}</table>"


def pool_section(pool: Optional["HardwarePool"], fetched: Optional[float],
                 now: Optional[float] = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(rows, sections) for a cached pool; a hint when none was fetched yet."""
    if pool is None:
        return [("workers", "<i>not fetched yet: <code>hub.get_hardware_pool()</code></i>")], []
    rows = pool_rows(pool)
    if fetched is not None:
        rows.append(("as of", esc(fmt_age(max(0.0, (now or time.time()) - fetched)))))
    sections = [(f"Machines ({len(pool)})", machines_table(pool))] if len(pool) else []
    return rows, sections


# -------------------------------------------------------------------- results


def results_card(results: "ResultList") -> str:
    """A ResultList: counts by status, machines, time span, then its first tasks."""
    starts = [t.started for t in results if t.started is not None]
    ends = [t.finished for t in results if t.finished is not None]
    machines = sorted({t.machine for t in results if t.machine})
    rows = [("tasks", esc(len(results))), ("status", status_counts_html(results.by_status()))]
    if machines:
        shown = ", ".join(code(m) for m in machines[:_MAX_MACHINES])
        rows.append(("machines", shown + (f" … {len(machines) - _MAX_MACHINES} more"
                                           if len(machines) > _MAX_MACHINES else "")))
    if starts and ends:
        rows.append(("wall time", esc(f"{max(ends) - min(starts):.2f}s from the first start to the last end")))
    failed = results.failed
    if failed and failed[0].error:
        rows.append(("first error", f"{code(failed[0].task_id)} {esc(failed[0].error.splitlines()[0])}"))
    sections = []
    if len(results):
        cols = ["task_id", "label", "status", "machine", "exit_code", "duration_s", "error"]
        frame = results[:_MAX_TASK_ROWS].to_dataframe()[cols]
        more = len(results) - _MAX_TASK_ROWS
        note = f"<div>… {more} more: <code>results.to_dataframe()</code></div>" if more > 0 else ""
        sections.append((f"Tasks ({len(results)})", (frame._repr_html_() or "") + note))
    return card("HWF results", rows, sections=sections, open_sections=True)

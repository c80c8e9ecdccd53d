"""Static HTML of a progress view: what a saved notebook shows without a kernel.

Plain HTML with inline styles only (no scripts, no widget model), so
JupyterLab, nbviewer, GitHub and ``nbconvert --to html`` all render it.  The
live widget and this snapshot draw from the same view dict
(``Progress._view``), so they cannot disagree.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from hub_server import protocol as p

from ._common import esc

# Segment colours of the state bar, in drawing order (ended states first).
SEGMENT_ORDER = ("finished", "failed", "cancelled", "running", "retrying", "queued")
TAIL_LINES = 5  # stderr lines shown under a failed task
TAIL_WIDTH = 200  # characters kept of each of those lines


def segments_html(counts: Mapping[str, int], colors: Mapping[str, str], *, partial: float = 0.0) -> str:
    """A bar of one coloured segment per state, widths in proportion to the counts.

    ``partial`` (tasks' worth of progress inside running tasks) is drawn as
    a darker part of the running segment, so the snapshot moves like the bar.
    """
    n = sum(counts.values())
    if n <= 0:
        return '<div style="height:10px;background:#e0e0e0;border-radius:3px"></div>'
    parts = []
    for state in SEGMENT_ORDER:
        c = counts.get(state, 0)
        if not c:
            continue
        width = 100.0 * c / n
        background = "#cfd8dc" if state == "queued" else colors[state]  # pending: a pale track
        if state == "running" and partial > 0:  # the running tasks' own progress, solid; the rest pale
            inside = min(100.0, 100.0 * partial / c)
            background = (f"linear-gradient(to right, {colors[state]} {inside:.1f}%, "
                          f"{colors[state]}55 {inside:.1f}%)")
        parts.append(f'<div title="{state} {c}" style="width:{width:.3f}%;background:{background};'
                     f'opacity:{0.55 if state == "retrying" else 1}"></div>')
    return ('<div class="hwf-progress-bar" style="display:flex;height:10px;border-radius:3px;'
            'overflow:hidden;background:#e0e0e0">' + "".join(parts) + "</div>")


def failure_tail(index: int, stage: p.StageOutcome) -> Optional[dict[str, Any]]:
    """Where a failed stage failed and the last lines of its stderr (stdout if stderr is empty).

    Commands count from 0, like ``%hwf_results --level command``'s ``command_index``.
    """
    if stage.status != "failed":
        return None
    cmd_index, cmd = None, None
    for i, c in enumerate(stage.commands):
        cmd_index, cmd = i, c
        if c.exit_code not in (0, None):
            break
    tail, stream = "", "stderr"
    if cmd is not None:
        tail = last_lines(cmd.stderr)
        if not tail:
            tail, stream = last_lines(cmd.stdout), "stdout"
    where = f"stage {index} {stage.name!r}"
    if cmd_index is not None:
        where += f", command {cmd_index}"
        if cmd is not None and cmd.exit_code not in (0, None):
            where += f" (exit code {cmd.exit_code})"
    return {"where": where, "tail": tail, "stream": stream}


def last_lines(text: str, n: int = TAIL_LINES, width: int = TAIL_WIDTH) -> str:
    """The last ``n`` non-blank lines, each cut to ``width`` characters."""
    lines = [ln.rstrip() for ln in str(text or "").splitlines() if ln.strip()]
    cut = [ln if len(ln) <= width else ln[: width - 1] + "…" for ln in lines[-n:]]
    return "\n".join(cut)


def failures_html(items: list[tuple[str, str, Optional[dict[str, Any]]]], more: int) -> str:
    """Each failed task: its id, the error, and its stderr tail in a box."""
    if not items and not more:
        return ""
    rows = []
    for tid, err, info in items:
        row = f"<div><b>{esc(tid)}</b>: {esc(err)}"
        if info and info.get("tail"):
            rows_label = f"last lines of {info['stream']} ({info['where']})"
            row += (f'<div style="color:#555;margin:2px 0 4px 1em">{esc(rows_label)}:</div>'
                    f'<pre style="margin:0 0 4px 1em;padding:4px 6px;background:#fbe9e7;color:#3e2723;'
                    f'white-space:pre-wrap;font-size:95%">{esc(info["tail"])}</pre>')
        rows.append(row + "</div>")
    if more:
        rows.append(f"<div>+{more} more</div>")
    return f'<div style="color:#c62828;font-family:monospace;font-size:90%">{"".join(rows)}</div>'


def snapshot_html(view: Mapping[str, Any]) -> str:
    """The whole view as one static block: state bar, summary, waits, stages, failures."""
    return ('<div class="hwf-progress-snapshot" style="font-family:sans-serif;font-size:13px;max-width:900px">'
            f'{view["segments"]}<div style="margin-top:4px">{view["summary"]}</div>'
            f'{view["stages"]}{view["failed"]}</div>')

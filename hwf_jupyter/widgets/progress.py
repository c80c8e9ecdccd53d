"""``Progress``: live progress of a set of tasks, as a widget or as text.

The bar counts tasks: an ended task is 1, a running one the larger of its
parser's progress/100 (``TaskSpec.parser``: the hub sends progress events
while it runs) and its stages done / stages, so a few long tasks still move
the bar.  While anything runs a 1 s ticker redraws the elapsed time and asks
the hub, every few seconds, why queued tasks wait.  Failed tasks show the
last lines of their stderr.  The displayed output carries a static HTML
snapshot next to the widget, and once everything has ended the display is
replaced by that snapshot alone, so a saved notebook reads right without a
kernel (see ``_snapshot``).

Watch callbacks run on HWF's I/O thread and can come thousands a second, so
they only update plain state under a lock; drawing happens at most
``max_rate`` times a second, in one coalesced render scheduled on the I/O
loop (a widget update per event would flood the browser).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from hub_server import protocol as p
from hub_server.protocol import TERMINAL_STATES

from .._ioloop import io_loop
from ..functions import task_ids_of
from . import _finals
from ._common import esc, fmt_seconds, resolve_interactive
from ._snapshot import failure_tail, failures_html, segments_html, snapshot_html

if TYPE_CHECKING:
    import ipywidgets

    from ..hub import Hub, Watcher

# Buckets shown to the user, in display order; "assigned" counts as queued.
STATES = ("finished", "failed", "cancelled", "running", "retrying", "queued")
_BUCKET = {"assigned": "queued"}
_COLORS = {"finished": "#2e7d32", "failed": "#c62828", "cancelled": "#757575",
           "running": "#1565c0", "retrying": "#ef6c00", "queued": "#616161"}
MAX_FAILED_SHOWN = 20
MAX_FRAMES_SHOWN = 5  # running tasks' current frames listed in the summary
TICK = 1.0  # seconds between redraws of the elapsed time while anything runs
WAIT_EVERY = 3.0  # seconds between asking the hub why queued tasks wait
MAX_WAIT_ASKED = 50  # queued tasks asked about per round (the reasons repeat)
MAX_WAIT_SHOWN = 3  # distinct wait reasons listed
_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

log = logging.getLogger(__name__)


def _bucket(status: str) -> str:
    return _BUCKET.get(status, status)


class _StageStats:
    """Durations of one stage index, keyed by task so a retry replaces, not adds."""

    __slots__ = ("name", "by_task", "failed", "total", "timed", "max")

    def __init__(self, name: str) -> None:
        self.name = name
        self.by_task: dict[str, tuple[str, Optional[float]]] = {}
        self.failed = 0
        self.total = 0.0
        self.timed = 0
        self.max: Optional[float] = None

    def put(self, task_id: str, status: str, duration: Optional[float]) -> None:
        self.drop(task_id)
        self.by_task[task_id] = (status, duration)
        self.failed += status == "failed"
        if duration is not None:
            self.total += duration
            self.timed += 1
            self.max = duration if self.max is None else max(self.max, duration)

    def drop(self, task_id: str) -> None:
        old = self.by_task.pop(task_id, None)
        if old is None:
            return
        status, duration = old
        self.failed -= status == "failed"
        if duration is not None:
            self.total -= duration
            self.timed -= 1
            if self.max is not None and duration >= self.max:
                durations = [d for _, d in self.by_task.values() if d is not None]
                self.max = max(durations) if durations else None

    @property
    def mean(self) -> Optional[float]:
        return self.total / self.timed if self.timed else None


class Progress:
    """Counts per state, failures and stage timings of tasks, updated live.

    Feed it with :meth:`apply_snapshot` / :meth:`apply_event` (usually via
    :func:`watch_progress`).  In a notebook it shows a progress bar; elsewhere
    (or with ``interactive=False``) its repr is a short text summary.
    """

    def __init__(
        self,
        task_ids: Iterable[str] = (),
        *,
        title: str = "",
        interactive: Optional[bool] = None,
        max_rate: float = 10.0,
    ) -> None:
        if max_rate <= 0:
            raise ValueError(f"max_rate must be > 0 renders per second, got {max_rate!r}")
        self.title = title
        self.interactive = resolve_interactive(interactive)
        self.max_rate = float(max_rate)
        self.watcher: Optional["Watcher"] = None
        self.auto_close = True  # close the watcher once every task is done
        self.renders = 0  # how many times the widgets were updated (for tests and curiosity)

        self._lock = threading.Lock()  # guards the plain state below
        self._render_lock = threading.Lock()  # one render at a time (timer vs flush)
        self._status: dict[str, str] = {}
        self._counts = dict.fromkeys(STATES, 0)
        self._errors: dict[str, str] = {}
        self._stages: dict[int, _StageStats] = {}
        self._progress: dict[str, float] = {}  # running task -> percent from its parser
        self._frames: dict[str, int] = {}  # running task -> frame being rendered
        self._fail_info: dict[str, dict[str, Any]] = {}  # failed task -> where + stderr tail
        self._n_stages: dict[str, int] = {}  # task -> its number of stages (from the snapshot)
        self._stages_done: dict[str, set[int]] = {}  # running task -> finished stage indices
        self._wait: dict[str, str] = {}  # queued task -> why it waits (hub's wait_reason)
        self.hub: Optional["Hub"] = None  # set by watch_progress: wait reasons are asked of it
        self._ticker: Optional[concurrent.futures.Future] = None
        self._handle: Any = None  # the DisplayHandle of show(), updated with the final snapshot
        self._final_published = False
        self._t0 = time.monotonic()
        self._t_done: Optional[float] = None
        self._scheduled = False
        self._last_render = float("-inf")
        self._closing_watch = False
        self._closed = False  # close() was called: no more ticks
        for tid in dict.fromkeys(task_ids):
            self._set_status(tid, "queued")
        self._check_done()

        self._box: Optional["ipywidgets.VBox"] = None
        if self.interactive:
            self._build_widgets()
            self.flush()

    # -- feeding (any thread; normally HWF's I/O thread) ----------------------

    def apply_snapshot(self, briefs: list[p.TaskBrief]) -> None:
        """The current state of the watched tasks (at subscribe and after a reconnect)."""
        with self._lock:
            submitted = [b.submitted for b in briefs if b.submitted is not None]
            if submitted:  # time from submission, not from when the view appeared
                since = max(0.0, time.time() - min(submitted))
                self._t0 = min(self._t0, time.monotonic() - since)
            for b in briefs:
                if b.n_stages:
                    self._n_stages[b.task_id] = b.n_stages
                self._set_status(b.task_id, b.status, b.error)
                self._set_progress(b.task_id, b.progress, b.frame_current)
                for i, st in enumerate(b.stages):
                    self._set_stage(b.task_id, i, st)
            self._changed()

    def apply_event(self, ev: p.TaskEvent) -> None:
        """One task transition or finished stage."""
        with self._lock:
            if ev.status == "retrying":
                for stats in self._stages.values():  # the hub starts the stages over
                    stats.drop(ev.task_id)
                self._stages_done.pop(ev.task_id, None)
                self._fail_info.pop(ev.task_id, None)
            if ev.n_stages:
                self._n_stages[ev.task_id] = ev.n_stages
            self._set_status(ev.task_id, ev.status, ev.error)
            self._set_progress(ev.task_id, ev.progress, ev.frame_current)
            if ev.stage is not None and ev.stage_index is not None:
                self._set_stage(ev.task_id, ev.stage_index, ev.stage)
            self._changed()

    def _set_status(self, task_id: str, status: str, error: Optional[str] = None) -> None:
        old = self._status.get(task_id)
        if old in TERMINAL_STATES and status not in TERMINAL_STATES:
            # Terminal is final: this is an older snapshot that lost a race with an event.
            return
        if old is not None:
            self._counts[_bucket(old)] -= 1
        elif status not in TERMINAL_STATES:
            self._t_done = None  # a new task (session watch): not done any more
        self._status[task_id] = status
        self._counts[_bucket(status)] = self._counts.get(_bucket(status), 0) + 1
        if status == "failed":
            self._errors[task_id] = error or "failed (no error text)"
        else:
            self._errors.pop(task_id, None)
        if status != "queued":
            self._wait.pop(task_id, None)
        if status in TERMINAL_STATES:
            self._stages_done.pop(task_id, None)

    def _set_progress(self, task_id: str, percent: Optional[float], frame: Optional[int]) -> None:
        """Keep a running task's latest progress; a task that is not running has none.

        Called after ``_set_status``: a late progress event of a task that
        already ended finds it terminal and is dropped.
        """
        if self._status.get(task_id) != "running":
            self._progress.pop(task_id, None)
            self._frames.pop(task_id, None)
            return
        if percent is not None:
            self._progress[task_id] = min(100.0, max(0.0, float(percent)))
        if frame is not None:
            self._frames[task_id] = frame

    def _set_stage(self, task_id: str, index: int, st: p.StageOutcome) -> None:
        if st.status == "skipped":
            return
        if st.status == "failed":
            info = failure_tail(index, st)
            if info is not None:
                self._fail_info[task_id] = info
        elif st.status == "finished" and self._status.get(task_id) not in TERMINAL_STATES:
            self._stages_done.setdefault(task_id, set()).add(index)
        stats = self._stages.get(index)
        if stats is None:
            stats = self._stages[index] = _StageStats(st.name)
        stats.put(task_id, st.status, st.duration)

    def apply_wait_reasons(self, reasons: dict[str, Optional[str]]) -> None:
        """Why queued tasks wait (the hub's ``wait_reason``); ignored for tasks no longer queued."""
        with self._lock:
            for tid, reason in reasons.items():
                if reason and self._status.get(tid) == "queued":
                    self._wait[tid] = str(reason)
                else:
                    self._wait.pop(tid, None)
            self._changed()

    def _changed(self) -> None:
        """Called with the lock held after every update."""
        self._check_done()
        self._ensure_ticker()
        if self.interactive and not self._scheduled:
            self._scheduled = True
            delay = max(0.0, self._last_render + 1.0 / self.max_rate - time.monotonic())
            loop = io_loop()
            if loop.in_loop_thread():
                loop.loop.call_later(delay, self._timed_render)
            else:
                loop.loop.call_soon_threadsafe(loop.loop.call_later, delay, self._timed_render)

    def _check_done(self) -> None:
        if self._t_done is None and self._is_done():
            self._t_done = time.monotonic()
        self._maybe_close_watch()

    def _maybe_close_watch(self) -> None:
        w = self.watcher
        if w is not None and self.auto_close and not self._closing_watch and self._is_done():
            self._closing_watch = True
            io_loop().submit(w.close())  # never close_sync: this may be the I/O thread

    # -- reading --------------------------------------------------------------

    def _is_done(self) -> bool:
        n = len(self._status)
        return n > 0 and sum(self._counts[s] for s in TERMINAL_STATES) == n

    @property
    def done(self) -> bool:
        """Every task is finished, failed or cancelled (False while there are none)."""
        with self._lock:
            return self._is_done()

    @property
    def total(self) -> int:
        with self._lock:
            return len(self._status)

    @property
    def counts(self) -> dict[str, int]:
        """Tasks per state: finished, failed, cancelled, running, retrying, queued."""
        with self._lock:
            return dict(self._counts)

    @property
    def fraction(self) -> float:
        """Tasks done, running ones counted by their parser's progress (0 without tasks)."""
        with self._lock:
            n = len(self._status)
            return self._done_units() / n if n else 0.0

    @property
    def task_progress(self) -> dict[str, float]:
        """Running tasks' percent, as their progress parser last read it."""
        with self._lock:
            return dict(self._progress)

    @property
    def frames(self) -> dict[str, int]:
        """Running tasks' current frame (parser "frames")."""
        with self._lock:
            return dict(self._frames)

    def _done_units(self) -> float:
        ended = sum(self._counts[s] for s in TERMINAL_STATES)
        live = self._progress.keys() | self._stages_done.keys()  # only running tasks have either
        return ended + sum(self._running_fraction(t) for t in live if self._status.get(t) == "running")

    def _running_fraction(self, task_id: str) -> float:
        """A running task's share done: its parser's progress or its stages done, whichever is more."""
        parser = self._progress.get(task_id, 0.0) / 100.0
        n = self._n_stages.get(task_id, 0)
        staged = min(1.0, len(self._stages_done.get(task_id, ())) / n) if n else 0.0
        return max(parser, staged)

    @property
    def wait_reasons(self) -> dict[str, str]:
        """Queued tasks and why they wait, as the hub last said."""
        with self._lock:
            return dict(self._wait)

    @property
    def failure_details(self) -> dict[str, dict[str, Any]]:
        """Failed tasks: ``where`` (stage, command counted from 0, exit code), ``tail`` (last lines)."""
        with self._lock:
            return {t: dict(i) for t, i in self._fail_info.items() if t in self._errors}

    def _frames_text(self) -> str:
        if not self._frames:
            return ""
        shown = [str(f) for f in list(self._frames.values())[:MAX_FRAMES_SHOWN]]
        more = ", ..." if len(self._frames) > MAX_FRAMES_SHOWN else ""
        return ("frame " if len(self._frames) == 1 else "frames ") + ", ".join(shown) + more

    @property
    def failed(self) -> dict[str, str]:
        """Failed task ids and their error text."""
        with self._lock:
            return dict(self._errors)

    @property
    def statuses(self) -> dict[str, str]:
        with self._lock:
            return dict(self._status)

    @property
    def elapsed(self) -> float:
        """Seconds since creation, frozen when the last task ended."""
        with self._lock:
            return self._elapsed()

    def _elapsed(self) -> float:
        end = self._t_done if self._t_done is not None else time.monotonic()
        return end - self._t0

    def stage_stats(self) -> list[dict[str, Any]]:
        """Per stage index: name, tasks done (finished or failed), failed, mean and max seconds."""
        with self._lock:
            return self._stage_rows()

    def _stage_rows(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "stage": s.name, "done": len(s.by_task), "failed": s.failed,
             "mean": s.mean, "max": s.max}
            for i, s in sorted(self._stages.items())
        ]

    def text(self) -> str:
        """One to three lines: counts and elapsed time, then the failures."""
        with self._lock:
            return self._text()

    def _headline(self) -> str:
        """``3/5 done`` while tasks run; at the end the true outcome: ``2/2 cancelled``, ``3/3 ended``."""
        n = len(self._status)
        ended = sum(self._counts[s] for s in TERMINAL_STATES)
        if n and ended == n:
            states = [s for s in STATES if self._counts[s]]
            if states == ["finished"]:
                return f"{n}/{n} done"
            return f"{n}/{n} {states[0]}" if len(states) == 1 else f"{n}/{n} ended"
        return f"{ended}/{n} done"

    def _wait_groups(self) -> list[tuple[str, int]]:
        """Distinct wait reasons of queued tasks, most common first."""
        groups: dict[str, int] = {}
        for tid, reason in self._wait.items():
            if self._status.get(tid) == "queued":
                groups[reason] = groups.get(reason, 0) + 1
        return sorted(groups.items(), key=lambda kv: -kv[1])

    def _text(self) -> str:
        parts = ", ".join(f"{s} {self._counts[s]}" for s in STATES if self._counts[s])
        n = len(self._status)
        lines = [f"{self.title or 'hwf'}: {self._headline()} [{parts}] {self._elapsed():.1f}s"]
        if self._progress or self._frames:
            live = [f"{self._done_units() / n * 100:.1f}%"] if self._progress and n else []
            live += [self._frames_text()] if self._frames else []
            lines[0] += " (" + ", ".join(live) + ")"
        for reason, count in self._wait_groups()[:MAX_WAIT_SHOWN]:
            lines.append(f"  queued {count}: {_one_line(reason, 160)}")
        if self._errors:
            tid, err = next(iter(self._errors.items()))
            lines.append(f"  failed {tid}: {_one_line(err, 160)}")
            info = self._fail_info.get(tid)
            if info and info["tail"]:
                lines.append(f"    last lines of {info['stream']} ({info['where']}):")
                lines.extend(f"    | {ln}" for ln in info["tail"].splitlines())
            if len(self._errors) > 1:
                others = list(self._errors)[1:]
                shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                lines.append(f"  +{len(others)} more failed: {shown}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    # -- widgets ----------------------------------------------------------------

    @property
    def widget(self) -> Optional["ipywidgets.VBox"]:
        """The VBox shown in a notebook (None in text mode)."""
        return self._box

    def _build_widgets(self) -> None:
        import ipywidgets as w

        # Float: running tasks add their parser's progress/100 to the ended count.
        self._bar = w.FloatProgress(min=0, max=0, value=0, layout=w.Layout(width="100%"))
        self._summary = w.HTML()
        self._stage_html = w.HTML()
        self._failed_html = w.HTML()
        self._box = w.VBox([self._bar, self._summary, self._stage_html, self._failed_html])

    def _timed_render(self) -> None:
        with self._lock:
            self._scheduled = False
        self._render()

    def flush(self) -> None:
        """Render now and resend the full state, on the calling thread.

        Called when a cell stops waiting: the front-end (and nbclient, which
        keeps only messages of the running cell) then gets the final state
        under that cell, even if earlier updates from the I/O thread were
        attributed elsewhere.  ipywidgets skips traits it believes are in
        sync, hence the explicit ``send_state``.
        """
        self._render()
        if self._box is not None:
            with self._render_lock:
                for widget in self._box.children:
                    widget.send_state()

    def _render(self) -> None:
        if self._box is None:
            return
        with self._render_lock:
            with self._lock:  # read everything at once, then draw without the lock
                self._last_render = time.monotonic()
                self.renders += 1
                view = self._view()
            with contextlib.ExitStack() as stack:
                for widget in (self._box, *self._box.children):
                    stack.enter_context(widget.hold_sync())
                if view["max"] >= self._bar.max:
                    self._bar.max = view["max"]
                    self._bar.value = view["value"]
                else:
                    self._bar.value = view["value"]
                    self._bar.max = view["max"]
                self._bar.bar_style = view["bar_style"]
                self._bar.style.bar_color = view["bar_color"]
                self._summary.value = view["summary"]
                self._stage_html.value = view["stages"]
                self._failed_html.value = view["failed"]
        if view["final"]:
            self._publish_final()

    def _view(self) -> dict[str, Any]:
        n = len(self._status)
        ended = sum(self._counts[s] for s in TERMINAL_STATES)
        done = self._is_done()
        color = None
        if self._counts["failed"]:
            style = "danger"
        elif n and self._counts["finished"] == n:
            style = "success"
        else:
            style = ""
            if done and self._counts["cancelled"]:
                color = _COLORS["cancelled"]  # cancelled is its own colour, never a "done" blue
        value = min(float(n), self._done_units())
        partial = value - ended
        return {"max": n, "value": value, "bar_style": style, "bar_color": color, "done": done,
                "final": done and (self.auto_close or self._closed),
                "summary": self._summary_html(n, ended), "stages": self._stages_html(),
                "failed": self._failed_block(),
                "segments": segments_html(self._counts, _COLORS, partial=partial),
                "text": self._text()}

    def _summary_html(self, n: int, ended: int) -> str:
        title = f"<b>{esc(self.title)}</b> &nbsp;" if self.title else ""
        parts = " &middot; ".join(
            f'<span style="color:{_COLORS[s]}">{s} {self._counts[s]}</span>'
            for s in STATES if self._counts[s]
        )
        live = ""
        if self._progress and n:
            live += f" &nbsp; {self._done_units() / n * 100:.1f}%"
        if self._frames:
            live += f" &nbsp; {esc(self._frames_text())}"
        head = esc(self._headline())
        line = f"{title}{head}{live} &nbsp; {parts} &nbsp; <i>{fmt_seconds(self._elapsed())}</i>"
        waits = self._wait_groups()
        for reason, count in waits[:MAX_WAIT_SHOWN]:
            line += (f'<div style="color:{_COLORS["queued"]}">queued {count}: '
                     f'<span class="hwf-wait-reason">{esc(_one_line(reason, 300))}</span></div>')
        if len(waits) > MAX_WAIT_SHOWN:
            line += f"<div>+{len(waits) - MAX_WAIT_SHOWN} more wait reasons</div>"
        return line

    def _stages_html(self) -> str:
        rows = self._stage_rows()
        if not rows:
            return ""
        cell = 'style="padding:1px 8px;text-align:{}"'
        head = "".join(f"<th {cell.format('left' if h == 'stage' else 'right')}>{h}</th>"
                       for h in ("#", "stage", "done", "failed", "mean", "max"))
        body = "".join(
            "<tr>"
            f"<td {cell.format('right')}>{r['index']}</td><td {cell.format('left')}>{esc(r['stage'])}</td>"
            f"<td {cell.format('right')}>{r['done']}</td><td {cell.format('right')}>{r['failed'] or ''}</td>"
            f"<td {cell.format('right')}>{fmt_seconds(r['mean'])}</td>"
            f"<td {cell.format('right')}>{fmt_seconds(r['max'])}</td></tr>"
            for r in rows
        )
        return f'<table style="font-size:90%"><tr>{head}</tr>{body}</table>'

    def _failed_block(self) -> str:
        items = list(self._errors.items())
        shown = [(tid, _one_line(err, 500), self._fail_info.get(tid)) for tid, err in items[:MAX_FAILED_SHOWN]]
        return failures_html(shown, max(0, len(items) - MAX_FAILED_SHOWN))

    def snapshot_html(self) -> str:
        """The current state as static HTML (what a saved notebook shows without a kernel)."""
        with self._lock:
            return snapshot_html(self._view())

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict[str, Any]:
        """The widget plus a static HTML/text fallback; once all has ended, the fallback alone.

        A saved notebook has no widget model: a widget view there reads "Error
        displaying widget: model not found", so the final output must not be one.
        """
        if self._box is None:
            return {"text/plain": self.text()}
        with self._lock:
            final = self._is_done() and (self.auto_close or self._closed)
        if not final:
            self.flush()
        with self._lock:
            view = self._view()
        static = {"text/html": snapshot_html(view), "text/plain": view["text"]}
        if final:
            return static
        bundle = dict(self._box._repr_mimebundle_(**kwargs) or {})
        bundle.update(static)
        return bundle

    # -- display and ticking ----------------------------------------------------

    def show(self) -> Any:
        """Display this view in the current cell; it is replaced by its static snapshot at the end."""
        from IPython import get_ipython
        from IPython.display import display

        _finals.hook_shell(get_ipython())
        handle = display(self, display_id=True)
        with self._lock:
            self._handle = handle
            if self._is_done() and (self.auto_close or self._closed):
                self._final_published = True  # what was just displayed is the final snapshot
        return handle

    def _publish_final(self) -> None:
        """Replace the displayed widget with the final snapshot (once)."""
        with self._lock:
            handle = self._handle
            if handle is None or self._final_published:
                return
            self._final_published = True
        try:
            handle.update(self)
        except Exception:  # a closed kernel channel must not break the I/O thread
            log.exception("could not update the progress display")
        if threading.current_thread() is not threading.main_thread():
            # Sent under the (maybe finished) dispatching cell: again after the next cell.
            _finals.resend_after_next_cell(lambda: handle.update(self))

    def _ensure_ticker(self) -> None:
        """Lock held: a 1 s ticker runs while anything is not ended (and a view or hub needs it)."""
        if self._closed or self._is_done() or not (self.interactive or self.hub is not None):
            return
        if self._ticker is not None and not self._ticker.done():
            return
        self._ticker = io_loop().submit(self._tick())

    @property
    def ticking(self) -> bool:
        """The elapsed-time ticker is running."""
        t = self._ticker
        return t is not None and not t.done()

    async def _tick(self) -> None:
        last_ask = float("-inf")
        while True:
            await asyncio.sleep(TICK)
            with self._lock:
                if self._closed or self._is_done():
                    return
                queued = [t for t, s in self._status.items() if s == "queued"][:MAX_WAIT_ASKED]
            if self._box is not None:
                self._render()  # the elapsed time moves even when no event arrives
            if self.hub is not None and queued and time.monotonic() - last_ask >= WAIT_EVERY:
                last_ask = time.monotonic()
                await self._ask_wait_reasons(queued)

    async def _ask_wait_reasons(self, ids: list[str]) -> None:
        hub = self.hub
        if hub is None:
            return
        try:
            results = await asyncio.wait_for(hub.get_result(ids, download=False), timeout=10.0)
        except Exception as exc:  # an unreachable hub: try again next round
            log.debug("asking why tasks wait failed: %s", exc)
            return
        self.apply_wait_reasons({r.task_id: r.wait_reason for r in results})

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Stop watching and ticking (without waiting); the last state stays on screen."""
        with self._lock:
            w, self._closing_watch, self._closed = self.watcher, True, True
            ticker, self._ticker = self._ticker, None
            final = self._is_done()
        if ticker is not None:
            ticker.cancel()
        if w is not None:
            io_loop().submit(w.close())
        if final and self._box is not None:
            self._render()
            self._publish_final()

    @classmethod
    def attach(
        cls,
        hub: "Hub",
        task_ids: Union[str, Iterable[str], None] = None,
        *,
        session: Optional[str] = None,
        title: str = "",
        interactive: Optional[bool] = None,
        max_rate: float = 10.0,
    ) -> "Progress":
        """Same as :func:`watch_progress`."""
        return watch_progress(hub, task_ids, session=session, title=title,
                              interactive=interactive, max_rate=max_rate)


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def watch_progress(
    hub: "Hub",
    task_ids: Union[str, Iterable[str], None] = None,
    *,
    session: Optional[str] = None,
    title: str = "",
    interactive: Optional[bool] = None,
    max_rate: float = 10.0,
) -> Progress:
    """A Progress kept up to date by a hub watch; the watch ends when all tasks have.

    ``task_ids`` may be a list of ids, a ``Submission`` or futures of
    ``hub.submit``/``hub.map`` (waited for until the hub accepted them); with ``session=`` the
    whole session is watched (tasks added later grow the total) and the watch
    stays open until :meth:`Progress.close`.
    """
    if (task_ids is None) == (session is None):
        raise ValueError("watch_progress takes task ids or session=, not both or neither")
    ids = [task_ids] if isinstance(task_ids, str) else task_ids_of(task_ids or [])
    prog = Progress(ids, title=title, interactive=interactive, max_rate=max_rate)
    prog.auto_close = session is None
    prog.hub = hub
    if session is not None:
        watcher = hub.watch_sync(session=session, on_event=prog.apply_event, on_snapshot=prog.apply_snapshot)
    else:
        watcher = hub.watch_sync(ids, on_event=prog.apply_event, on_snapshot=prog.apply_snapshot)
    with prog._lock:
        prog.watcher = watcher
        prog._maybe_close_watch()  # everything may have ended before the watch began
        prog._ensure_ticker()
    return prog

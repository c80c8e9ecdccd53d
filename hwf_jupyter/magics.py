"""IPython magics: ``%load_ext hwf_jupyter`` then ``%%hwf_stage``, ``%hwf_dispatch``...

Misuse (an empty draft, no hub, a bad option or value, a hub that is down)
raises ``UsageError``, which IPython shows as one line, not a traceback;
Ctrl-C during a wait shows one line too: what still runs, how to cancel it.
``%hwf_results``/``%hwf_cancel`` default to the kernel's last submission,
made by ``%hwf_dispatch``, ``dispatch()`` or the TaskBuilder (last.py).
Network work runs on HWF's I/O thread; a magic blocks its cell only when it
waits for results (``--wait``), and live widgets keep updating meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import shlex
import sys
from typing import Any, Callable, Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Bool, Unicode

from hub_server import protocol as p
from hub_server.hardware import HardwareError
from hub_server.link import HubError

from . import localfarm
from .cluster import ClusterError, LocalCluster
from .functions import make_options, submit_each
from .pycall import RUNTIME, TaskFailed
from .px import CELL_FILE, TargetOutput, cell_names, describe_error, render, runner
from .dispatch import Submission, dispatch_sync, progress_fields
from .draft import Draft
from .hub import Hub
from .last import last_submission
from .notices import CancelReport, Interrupted, interrupted_line
from .results import ResultList
from .stream import DEFAULT_MAX_LINES, CellStream
from .task import Data, Stage, TaskError

LEVELS = ("task", "stage", "command")
NOT_CONNECTED = ("hwf: not connected to a hub (a new or restarted kernel): run %hwf_local (starts your local "
                 "farm, or re-attaches to the running one) or %hwf_connect URL --token T, then run this again")
_USER_ERRORS = (TaskError, HubError, HardwareError, ClusterError, ValueError, TypeError, NotImplementedError,
                OSError)


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user's mistake into a one-line UsageError naming it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError:
            raise
        except _USER_ERRORS as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise UsageError(f"hwf: {text}") from None

    return wrapper


def _key_values(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"hwf: expected KEY=VALUE, got {pair!r}")
        key, value = key.strip(), value.strip()
        if key == "tags":
            out[key] = [t for t in value.split(",") if t]
        elif key == "cores" and value.isdigit():
            out[key] = int(value)
        else:
            out[key] = value
    return out


def _data_arg(spec: str) -> Data:
    src, sep, name = spec.partition(":")
    return Data(src, name if sep and name else None)


@magics_class
class HWFMagics(Magics):
    """HWF magics; ``%config HWFMagics.hub_url = 'ws://...'`` sets defaults."""

    hub_url = Unicode("", help="hub to connect to on first use when %hwf_connect was not run").tag(config=True)
    token = Unicode("", help="token for hub_url (default: $HWF_TOKEN)").tag(config=True)
    progress = Bool(True, help="show a live progress widget on %hwf_dispatch").tag(config=True)
    artifacts_dir = Unicode("hwf_artifacts", help="where artifacts are downloaded").tag(config=True)
    ca_file = Unicode("", help="CA certificate file that signs the hub's wss:// certificate").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.hub: Optional[Hub] = None
        self.cluster: Optional[LocalCluster] = None
        self.draft = Draft()
        self.submissions: list[Submission] = []
        self.progress_views: list[Any] = []
        self.streams: list[CellStream] = []
        self.px_futures: list[Any] = []  # the last %%hwf_px's futures

    # -- connection ---------------------------------------------------------

    def _require_hub(self) -> Hub:
        if self.hub is None and self.hub_url:
            self._connect(self.hub_url, self.token or None, self.ca_file or None)
        if self.hub is None:
            raise UsageError(NOT_CONNECTED)
        return self.hub

    def _connect(self, url: str, token: Optional[str], ca_file: Optional[str] = None) -> Hub:
        hub = Hub(url, token=token, artifacts_dir=self.artifacts_dir, ssl=ca_file)
        hub.connect_sync()  # fail here, with the URL, rather than at first use
        if self.hub is not None:
            self.hub.close_sync()
        self.hub = hub
        return hub

    @magic_arguments()
    @argument("url", help="hub address: host, host:port, ws://host:port or wss://host:port (TLS)")
    @argument("--token-file", default=None, metavar="PATH",
              help="read the access token from this file (keeps it out of the notebook)")
    @argument("--token", default=None,
              help="access token, saved in the notebook with the cell: prefer --token-file or $HWF_TOKEN")
    @argument("--ca-file", default=None,
              help="CA certificate that signs the hub's wss:// certificate (default: the system's CAs)")
    @line_magic
    @_one_line_errors
    def hwf_connect(self, line: str) -> Hub:
        """Connect this notebook to a hub.

        The token comes from ``--token-file PATH`` (its first line), else
        ``%config HWFMagics.token``, else ``$HWF_TOKEN``; ``--token T`` works
        but T is then saved in the notebook, so it prints a warning."""
        args = parse_argstring(self.hwf_connect, line)
        if args.token and args.token_file:
            raise UsageError("hwf: give --token or --token-file, not both")
        if args.token_file:
            token: Optional[str] = _read_token_file(args.token_file)
        elif args.token:
            token = args.token
        else:
            token = self.token or os.environ.get("HWF_TOKEN") or None
        hub = self._connect(args.url, token, args.ca_file or self.ca_file or None)
        if args.token:  # after connecting, so a failure stays one line
            print("hwf: warning: --token is saved in this notebook with the cell; "
                  "use --token-file PATH or $HWF_TOKEN to keep it out", file=sys.stderr)
        return hub

    @magic_arguments()
    @argument("--daemons", type=int, default=None,
              help="daemon processes (default: what the running farm has; 2 for a new one)")
    @argument("--slots", type=int, default=None,
              help="tasks each daemon runs at once (default: what the running farm has; 2 for a new one)")
    @argument("--stop", action="store_true", help="stop your local farm (its running tasks end)")
    @line_magic
    @_one_line_errors
    def hwf_local(self, line: str) -> Optional[LocalCluster]:
        """Start your local farm (a hub + daemons on this machine), or attach to
        the one already running.  It outlives kernel restarts: after one, run
        %hwf_local again and %hwf_results --session S.  Its state, logs and
        record live in $HWF_LOCAL_DIR (default ~/.hwf/local)."""
        args = parse_argstring(self.hwf_local, line)
        if args.stop:
            if args.daemons is not None or args.slots is not None:
                raise UsageError("hwf: %hwf_local --stop takes no --daemons/--slots")
            self._stop_local()
            return None
        for name in ("daemons", "slots"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UsageError(f"hwf: --{name} must be >= 1, got {value}")
        cluster = self.cluster
        if cluster is not None and (cluster.hub_process is None or cluster.hub_process.poll() is not None):
            cluster = None  # stopped (here or by another kernel) or died: find or start it again
        if cluster is None:
            self.cluster = cluster = LocalCluster(daemons=args.daemons, slots=args.slots, persistent=True)
            how = "attached to your running local farm" if cluster.attached else "started your local farm"
            print(f"hwf: {how} in {cluster.root}; it outlives kernel restarts (%hwf_local --stop ends it)")
        else:
            conflict = localfarm.shape_conflict(_record_of(cluster), args.daemons, args.slots)
            if conflict:
                raise UsageError(f"hwf: {conflict}")
        if self.hub is None or self.hub.url != cluster.address:
            if self.hub is not None:
                self.hub.close_sync()
            self.hub = cluster.hub(artifacts_dir=self.artifacts_dir)
        return cluster

    def _stop_local(self) -> None:
        root = self.cluster.root if self.cluster is not None else localfarm.default_root()
        if self.cluster is not None and self.hub is not None and self.hub.url == self.cluster.address:
            self.hub.close_sync()
            self.hub = None
        stopped = self.cluster.stop() if self.cluster is not None else localfarm.stop_farm(root)
        self.cluster = None
        if stopped:
            print(f"hwf: stopped your local farm in {root} (pids {' '.join(map(str, stopped))})")
        else:
            print(f"hwf: no local farm was running in {root}")

    # -- the draft ----------------------------------------------------------

    @magic_arguments()
    @argument("name", help="stage name; a stage of this name already in the draft is replaced")
    @argument("--data", action="append", default=[], metavar="SRC[:NAME]",
              help="local file sent with the task, saved as NAME (repeatable)")
    @argument("--track", default="time", help="measures to track: time,ram,cpu,gpu")
    @argument("--comment", default="", help="a note kept with the stage's results")
    @argument("--per-line", action="store_true",
              help="run each non-empty, non-comment line as its own command (each timed; "
                   "a failing line stops the stage)")
    @cell_magic
    @_one_line_errors
    def hwf_stage(self, line: str, cell: str) -> None:
        """Add a stage to the draft task: the cell is one bash script.

        As with ``%%bash``: loops, ``if``, heredocs, line continuations and
        functions work.  No ``set -e`` is added: the stage fails only if the
        script's exit status (its last command's, as bash has it) is not 0;
        put ``set -e`` first to stop at the first failing command.
        ``--per-line`` runs each non-empty, non-comment line as its own
        command instead (timed separately; the first failure stops the stage;
        failures count commands from 0, like the results' ``command_index``).

        A stage named like one already in the draft replaces it (re-running a
        cell does not add it twice); after ``%hwf_dispatch`` the next stage
        starts a new draft.  ``%hwf_draft`` shows the draft,
        ``%hwf_draft --clear`` empties it."""
        args = parse_argstring(self.hwf_stage, line)
        tracks = {t.strip() for t in args.track.split(",") if t.strip()}
        unknown = tracks - {"time", "ram", "cpu", "gpu"}
        if unknown:
            raise UsageError(f"hwf: unknown --track value(s) {', '.join(sorted(unknown))} (use time,ram,cpu,gpu)")
        if args.per_line:
            cmds = [c for c in cell.splitlines() if c.strip() and not c.lstrip().startswith("#")]
        else:
            cmds = [cell.strip("\n")] if cell.strip() else []
        stage = Stage(
            args.name, data=[_data_arg(d) for d in args.data], cmd=cmds,
            track_time="time" in tracks, track_ram="ram" in tracks,
            track_cpu="cpu" in tracks, track_gpu="gpu" in tracks, comment=args.comment,
        )
        for d in stage.data:
            d.check()
        print(f"hwf draft: {self.draft.add_stage(stage)}")
        display(self.draft)

    @line_magic
    @_one_line_errors
    def hwf_artifacts(self, line: str) -> None:
        """%hwf_artifacts FILE ... : files (globs allowed) to bring back."""
        files = shlex.split(line)
        if not files:
            raise UsageError("hwf: name at least one file, e.g. %hwf_artifacts out.txt '*.csv'")
        self.draft.add_artifacts(files)
        print(f"hwf draft: artifacts {', '.join(self.draft.artifacts)}")

    @line_magic
    @_one_line_errors
    def hwf_hardware(self, line: str) -> None:
        """%hwf_hardware KEY=VALUE ... : e.g. os=linux ram=16GB gpu=none tags=fast."""
        pairs = shlex.split(line)
        if pairs:
            self.draft.set_hardware(_key_values(pairs))
        shown = ", ".join(f"{k}={v}" for k, v in self.draft.hardware.items()) or "any machine"
        print(f"hwf draft: hardware {shown}")

    @magic_arguments()
    @argument("--clear", action="store_true", help="start a new, empty draft")
    @line_magic
    @_one_line_errors
    def hwf_draft(self, line: str) -> Draft:
        """Show the draft task (stages, artifacts, hardware); ``--clear`` empties it.

        ``%%hwf_stage`` cells add to it (same name: replaced), ``%hwf_dispatch``
        sends it; after a dispatch the next edit starts a new draft."""
        args = parse_argstring(self.hwf_draft, line)
        if args.clear:
            self.draft.clear()
        return self.draft

    # -- dispatch -----------------------------------------------------------

    @magic_arguments()
    @argument("--repeat", type=int, default=1,
              help="copies of the task; each gets $HWF_INDEX (0, 1, ...) in its environment")
    @argument("--param", action="append", default=[], metavar="NAME=V1,V2,...",
              help="one task per value, with $HWF_PARAM_<NAME> set (repeatable: every combination)")
    @argument("--stream-lines", type=int, default=DEFAULT_MAX_LINES, metavar="N",
              help="with --stream: lines shown per task and stream, the rest summed up "
                   "(0: all; %%hwf_results --level command keeps the daemon's capture)")
    @argument("--priority", type=int, default=0, help="higher runs first")
    @argument("--across", action="store_true", help="one copy on each machine matching the hardware")
    @argument("--wait", action="store_true", help="block this cell until every task has ended")
    @argument("--stream", action="store_true", help="show remote stdout/stderr under this cell, live")
    @argument("--timeout", type=float, default=None, help="seconds before a task is killed and failed")
    @argument("--session", default=None, help="add to an existing session")
    @argument("--max-retries", type=int, default=3, help="retries after a lost daemon")
    @argument("--label", default="", help="a label kept with the tasks")
    @argument("--credits", default=None, metavar="N|MIN:MAX",
              help="credits each task pays its machine: N, or its CPU-seconds clamped into MIN:MAX")
    @argument("--parser", default=None, metavar="NAME",
              help=f"read progress from the task's output: {', '.join(p.PARSERS)}")
    @argument("--frames", default=None, metavar="START:END",
              help="the render's frame range, for --parser frames percentages")
    @line_magic
    @_one_line_errors
    def hwf_dispatch(self, line: str) -> Submission:
        """Dispatch the draft task; shows live progress and returns a Submission.

        The draft is then spent: the next ``%%hwf_stage`` starts a new one
        (this one can still be dispatched again until then).  Every task gets
        ``$HWF_INDEX`` (0..n-1); ``--param lr=0.1,0.2 --param seed=1,2`` makes
        4 tasks with ``$HWF_PARAM_LR``/``$HWF_PARAM_SEED`` and the values in
        their labels.  The dispatch becomes the last submission, which
        ``%hwf_results`` and ``%hwf_cancel`` use by default.  Ctrl-C during
        ``--wait`` stops waiting, not the tasks, and says how to cancel them."""
        args = parse_argstring(self.hwf_dispatch, line)
        params = _params_arg(args.param)
        if args.stream_lines < 0:
            raise UsageError(f"hwf: --stream-lines must be >= 0, got {args.stream_lines}")
        frames = _frames_arg(args.frames)
        progress_fields(args.parser, frames)  # a bad name or range fails before anything is built
        task = self.draft.build(label=args.label)
        hub = self._require_hub()
        across = None
        if args.across:
            across = hub.get_hardware_pool_sync({k: v for k, v in task.hardware.items() if k != "daemon"})
            if len(across) == 0:
                raise UsageError("hwf: --across: no connected machine matches the draft's hardware")
        sub = dispatch_sync(task, hub, repeat=args.repeat, priority=args.priority, across=across,
                            session=args.session, max_retries=args.max_retries, timeout=args.timeout,
                            stream=args.stream, credits=_credits_arg(args.credits),
                            parser=args.parser, frames=frames, params=params)
        self.submissions.append(sub)
        self.draft.mark_dispatched(sub.session_id)
        print(f"hwf: dispatched {len(sub)} task(s) in session {sub.session_id}  "
              f"(after a kernel restart: %hwf_results --session {sub.session_id})")
        view = self._show_progress(hub, list(sub), title=f"hwf session {sub.session_id}")
        if args.stream:
            self.streams.append(CellStream.start(hub, list(sub), shell=self.shell, max_lines=args.stream_lines))
        if args.wait:
            hint = "%hwf_cancel" if args.session else f"%hwf_cancel --session {sub.session_id}"
            self._wait(hub, list(sub), sub.session_id, hint, download=False)
            self._settle(view)
        return sub

    def _wait(self, hub: Hub, ids: list[str], session_id: Optional[str], cancel_hint: str,
              download: bool = True) -> ResultList:
        """Results once every task ended; Ctrl-C: one line on what still runs."""
        try:
            return hub.get_result_sync(ids, wait=True, download=download)
        except KeyboardInterrupt:
            try:
                now = hub.get_result_sync(ids, wait=False, download=False)
                line = interrupted_line([r.status for r in now], session_id=session_id, cancel_hint=cancel_hint)
            except Exception:  # the hub is gone too: still say how to cancel
                line = f"interrupted: the tasks may still run; {cancel_hint} cancels them"
            raise Interrupted(line) from None

    def _last(self) -> Optional[Submission]:
        """The last dispatch in this kernel, by any path (magic, dispatch(), TaskBuilder)."""
        sub = last_submission()
        return sub if sub is not None else (self.submissions[-1] if self.submissions else None)

    def _hub_of(self, sub: Submission) -> Hub:
        """The hub a submission went to (if still open), else this notebook's."""
        hub = getattr(sub, "hub", None)
        if hub is not None and not getattr(hub, "closed", False):
            return hub
        return self._require_hub()

    def _show_progress(self, hub: Hub, ids: list[str] = (), *, session: Optional[str] = None,
                       title: str = "") -> Any:
        if not self.progress:
            return None
        from .widgets import watch_progress

        view = watch_progress(hub, None if session else list(ids), session=session, title=title)
        self.progress_views.append(view)
        view.show()  # a display handle: replaced by the static final snapshot at the end
        return view

    def _settle(self, view: Any) -> None:
        """After a wait: send the final widget state from this cell."""
        if view is not None:
            view.flush()
            if view.widget is None:  # text mode: show where it ended
                display(view)

    # -- results ------------------------------------------------------------

    @magic_arguments()
    @argument("ids", nargs="*", help="task ids (default: the last dispatch)")
    @argument("--level", default="task", choices=LEVELS, help="one row per task, stage or command")
    @argument("--session", default=None, help="every task of a session (also after a kernel restart)")
    @argument("--last", action="store_true", help="the last dispatch (the default)")
    @argument("--wait", action="store_true", help="wait until every task has ended (Ctrl-C stops waiting only)")
    @line_magic
    @_one_line_errors
    def hwf_results(self, line: str) -> Any:
        """Results as a DataFrame: ``df = %hwf_results --level stage``.

        Default: the last dispatch of this kernel, whether made by
        ``%hwf_dispatch``, ``dispatch()`` in Python or the TaskBuilder."""
        args = parse_argstring(self.hwf_results, line)
        session_id: Optional[str] = None
        if args.session:
            hub = self._require_hub()
            session = hub.session_sync(args.session)
            ids, session_id = session.task_ids, args.session
            if not session.done and not args.wait:
                self._show_progress(hub, session=args.session, title=f"hwf session {args.session}")
            hint = f"%hwf_cancel --session {args.session}"
        elif args.ids:
            hub = self._require_hub()
            ids = args.ids
            hint = "%hwf_cancel " + " ".join(ids) if len(ids) <= 3 else "%hwf_cancel ID ..."
        elif (last := self._last()) is not None:
            hub = self._hub_of(last)
            ids, session_id, hint = list(last), last.session_id, "%hwf_cancel"
        else:
            self._require_hub()
            raise UsageError("hwf: nothing to show: no dispatch yet in this kernel; pass task ids or --session S")
        if args.wait:
            results: ResultList = self._wait(hub, ids, session_id, hint)
        else:
            results = hub.get_result_sync(ids, wait=False)
        if args.wait:
            for view in self.progress_views:
                view.flush()
        return results.to_dataframe(level=args.level)

    @line_magic
    @_one_line_errors
    def hwf_pool(self, line: str) -> Any:
        """%hwf_pool [KEY=VALUE ...] : the machines (matching the hardware) as a DataFrame."""
        hub = self._require_hub()
        pairs = shlex.split(line)
        hardware = [_key_values(pairs)] if pairs else []
        return hub.get_hardware_pool_sync(*hardware).to_dataframe()

    # -- Python on the daemons ------------------------------------------------

    @magic_arguments()
    @argument("--targets", default="all",
              help="all: run once on each online daemon (matching --hardware); N: run N times")
    @argument("--hardware", nargs="*", default=[], metavar="KEY=VALUE",
              help="hardware the targets must have, e.g. ram=4GB tags=fast")
    @argument("--timeout", type=float, default=None, help="seconds before a run is killed and failed")
    @cell_magic
    @_one_line_errors
    def hwf_px(self, line: str, cell: str) -> None:
        """Run the cell's Python code on daemons, like ipyparallel's %%px:
        each target's stdout and last value are shown tagged with its name.
        Names the cell reads from the notebook are sent with it; the code
        runs in a fresh namespace each time."""
        args = parse_argstring(self.hwf_px, line)
        hardware = _key_values(args.hardware)
        if not cell.strip():
            raise UsageError("hwf_px: the cell is empty")
        try:
            names, skipped = cell_names(cell, self.shell.user_ns if self.shell is not None else {})
        except SyntaxError as exc:
            raise UsageError(f"hwf_px: the cell has a syntax error on line {exc.lineno}: {exc.msg}") from None
        hub = self._require_hub()
        opts = make_options(hardware, 0, 3, args.timeout, "time", None, label="hwf_px")
        pins: Optional[list[str]] = None
        if args.targets == "all":
            pool = hub.get_hardware_pool_sync({**hardware, "runtime": RUNTIME})
            pins = [m.name for m in pool if m.state == "online"]
            if not pins:
                wanted = ", ".join(f"{k}={v}" for k, v in hardware.items())
                raise UsageError(f"hwf_px: no online daemon runs {RUNTIME}" + (f" with {wanted}" if wanted else ""))
            count = len(pins)
        else:
            try:
                count = int(args.targets)
            except ValueError:
                raise UsageError(f"hwf_px: --targets takes 'all' or a number, got {args.targets!r}") from None
            if not 1 <= count <= 1000:
                raise UsageError(f"hwf_px: --targets N must be from 1 to 1000, got {count}")
        if skipped:
            print(f"hwf_px: not sent (they do not pickle): {', '.join(skipped)}", file=sys.stderr)
        fn = runner()
        futures = submit_each(hub, [(fn, (cell, CELL_FILE), names)] * count, opts, pins)
        self.px_futures = futures
        try:
            concurrent.futures.wait(futures)
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            raise
        outputs = [_px_output(f, pins[i] if pins else str(i)) for i, f in enumerate(futures)]
        out, err = render(outputs, _pretty)
        sys.stdout.write(out)
        sys.stderr.write(err)
        failed = sum(o.error is not None for o in outputs)
        if failed:
            raise UsageError(f"hwf_px: {failed} of {len(outputs)} target(s) raised (shown above)")

    @magic_arguments()
    @argument("--by", default="owner", choices=["machine", "owner", "user", "session"],
              help="group credits by machine, owner (default), user or session")
    @argument("--board", action="store_true", help="show a live leaderboard widget instead of a DataFrame")
    @line_magic
    @_one_line_errors
    def hwf_credits(self, line: str) -> Any:
        """Credit tallies as a ranked DataFrame (yours; an admin's: everyone's)."""
        args = parse_argstring(self.hwf_credits, line)
        hub = self._require_hub()
        if args.board:
            from .widgets.credits import CreditBoard
            return CreditBoard(hub, by=args.by)
        return hub.credit_tally_sync(by=args.by)

    @magic_arguments()
    @argument("ids", nargs="*", help="task ids (default: the last dispatch's tasks)")
    @argument("--session", default=None, help="cancel every unfinished task of a session")
    @line_magic
    @_one_line_errors
    def hwf_cancel(self, line: str) -> CancelReport:
        """Cancel tasks (running ones are killed on their daemon); says how many, by state.

        Default: the last dispatch of this kernel (``%hwf_dispatch``,
        ``dispatch()`` or the TaskBuilder).  Returns a dict (``cancelled``:
        ids, ``by_state``: counts) shown as "cancelled 3 tasks (2 queued, 1 running)"."""
        args = parse_argstring(self.hwf_cancel, line)
        if args.ids and args.session:
            raise UsageError("hwf: give task ids or --session S, not both")
        if not args.ids and not args.session:
            last = self._last()
            if last is None:
                self._require_hub()
                raise UsageError("hwf: nothing to cancel: no dispatch yet in this kernel; name task ids or --session S")
            return CancelReport(self._hub_of(last).cancel_sync(list(last)))
        hub = self._require_hub()
        return CancelReport(hub.cancel_sync(args.ids or None, session=args.session))


def _read_token_file(path: str) -> str:
    """The token in ``path`` (first line, stripped); a one-line error naming the file otherwise."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as exc:
        raise UsageError(f"hwf: --token-file {path!r}: {exc.strerror or exc}") from None
    if not token:
        raise UsageError(f"hwf: --token-file {path!r} is empty")
    return token


def _params_arg(specs: list[str]) -> dict[str, list[str]]:
    """``--param name=v1,v2`` (repeatable) -> dispatch's params= (checked there)."""
    params: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"hwf: --param takes NAME=V1,V2,..., got {spec!r}")
        if name in params:
            raise UsageError(f"hwf: --param {name} is given twice")
        params[name] = [v.strip() for v in values.split(",") if v.strip()]
        if not params[name]:
            raise UsageError(f"hwf: --param {name} has no values (NAME=V1,V2,...)")
    return params


def _record_of(cluster: LocalCluster) -> localfarm.FarmRecord:
    """The shape of the farm this kernel uses, as shape_conflict wants it."""
    return localfarm.FarmRecord(root=str(cluster.root), address=cluster.address, hub_pid=0, port=cluster.port,
                                slots=cluster.slots, daemons={n: 0 for n in cluster.daemon_processes})


def _credits_arg(text: Optional[str]) -> Any:
    """``--credits N`` or ``MIN:MAX`` -> dispatch's credits= (checked there)."""
    if text is None:
        return None
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            return (int(lo), int(hi))
        return int(text)
    except ValueError:
        raise UsageError(f"hwf: --credits takes N or MIN:MAX (whole numbers), got {text!r}") from None
def _frames_arg(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``--frames START:END`` -> dispatch's frames= (range checked there)."""
    if text is None:
        return None
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return (int(start), int(end))
    except ValueError:
        raise UsageError(f"hwf: --frames takes START:END (whole numbers), got {text!r}") from None


def _pretty(value: Any) -> str:
    from IPython.lib.pretty import pretty

    return pretty(value, max_width=100)


def _px_output(fut: Any, target: str) -> TargetOutput:
    info = fut.info
    if info is not None and info.machine and info.machine != target:
        target = f"{target}:{info.machine}"
    out = TargetOutput(tag=target)
    if info is not None:
        cmds = [c for s in info.stages for c in s.commands]
        out.stdout = "".join(c.stdout for c in cmds)
        out.stderr = "".join(c.stderr for c in cmds)
    try:
        out.value, out.has_value = fut.result(), True
    except concurrent.futures.CancelledError:
        out.error = "cancelled"
    except TaskFailed as exc:
        out.error = str(exc)
    except Exception as exc:
        out.error = describe_error(exc)
    return out


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics once: loading again (a profile that preloads HWF, then
    ``%load_ext hwf_jupyter`` in the notebook) is a silent no-op."""
    if "HWFMagics" in ipython.magics_manager.registry:
        return
    ipython.register_magics(HWFMagics(shell=ipython))


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.registry.get("HWFMagics")
    if magics is not None and magics.cluster is not None:
        magics.cluster.close()  # the local farm keeps running: %hwf_local --stop ends it

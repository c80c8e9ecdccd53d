"""IPython magics: ``%load_ext hwf_jupyter`` then ``%%hwf_stage``, ``%hwf_dispatch``...

Misuse (an empty draft, no hub, a bad option or value, a hub that is down)
raises ``UsageError``, which IPython shows as one line, not a traceback.
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
from .results import ResultList
from .stream import CellStream
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
    @argument("--token", default=None, help="access token (default: $HWF_TOKEN or HWFMagics.token)")
    @argument("--ca-file", default=None,
              help="CA certificate that signs the hub's wss:// certificate (default: the system's CAs)")
    @line_magic
    @_one_line_errors
    def hwf_connect(self, line: str) -> Hub:
        """Connect this notebook to a hub."""
        args = parse_argstring(self.hwf_connect, line)
        token = args.token or self.token or os.environ.get("HWF_TOKEN")
        return self._connect(args.url, token, args.ca_file or self.ca_file or None)

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
    @argument("name", help="stage name")
    @argument("--data", action="append", default=[], metavar="SRC[:NAME]",
              help="local file sent with the task, saved as NAME (repeatable)")
    @argument("--track", default="time", help="measures to track: time,ram,cpu,gpu")
    @argument("--comment", default="", help="a note kept with the stage's results")
    @cell_magic
    @_one_line_errors
    def hwf_stage(self, line: str, cell: str) -> None:
        """Add a stage to the draft task: each non-empty cell line is a command."""
        args = parse_argstring(self.hwf_stage, line)
        tracks = {t.strip() for t in args.track.split(",") if t.strip()}
        unknown = tracks - {"time", "ram", "cpu", "gpu"}
        if unknown:
            raise UsageError(f"hwf: unknown --track value(s) {', '.join(sorted(unknown))} (use time,ram,cpu,gpu)")
        cmds = [c for c in cell.splitlines() if c.strip() and not c.lstrip().startswith("#")]
        stage = Stage(
            args.name, data=[_data_arg(d) for d in args.data], cmd=cmds,
            track_time="time" in tracks, track_ram="ram" in tracks,
            track_cpu="cpu" in tracks, track_gpu="gpu" in tracks, comment=args.comment,
        )
        for d in stage.data:
            d.check()
        self.draft.add_stage(stage)
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
        """Show (or clear) the draft task."""
        args = parse_argstring(self.hwf_draft, line)
        if args.clear:
            self.draft.clear()
        return self.draft

    # -- dispatch -----------------------------------------------------------

    @magic_arguments()
    @argument("--repeat", type=int, default=1, help="copies of the task")
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
        """Dispatch the draft task; shows live progress and returns a Submission."""
        args = parse_argstring(self.hwf_dispatch, line)
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
                            parser=args.parser, frames=frames)
        self.submissions.append(sub)
        print(f"hwf: dispatched {len(sub)} task(s) in session {sub.session_id}  "
              f"(after a kernel restart: %hwf_results --session {sub.session_id})")
        view = self._show_progress(hub, list(sub), title=f"hwf session {sub.session_id}")
        if args.stream:
            self.streams.append(CellStream.start(hub, list(sub), shell=self.shell))
        if args.wait:
            hub.get_result_sync(list(sub), wait=True, download=False)
            self._settle(view)
        return sub

    def _show_progress(self, hub: Hub, ids: list[str] = (), *, session: Optional[str] = None,
                       title: str = "") -> Any:
        if not self.progress:
            return None
        from .widgets import watch_progress

        view = watch_progress(hub, None if session else list(ids), session=session, title=title)
        self.progress_views.append(view)
        display(view)
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
    @argument("--wait", action="store_true", help="wait until every task has ended")
    @line_magic
    @_one_line_errors
    def hwf_results(self, line: str) -> Any:
        """Results as a DataFrame: ``df = %hwf_results --level stage``."""
        args = parse_argstring(self.hwf_results, line)
        hub = self._require_hub()
        if args.session:
            session = hub.session_sync(args.session)
            ids = session.task_ids
            if not session.done and not args.wait:
                self._show_progress(hub, session=args.session, title=f"hwf session {args.session}")
        elif args.ids:
            ids = args.ids
        elif self.submissions:
            ids = list(self.submissions[-1])
        else:
            raise UsageError("hwf: nothing to show: no dispatch yet in this kernel; pass task ids or --session S")
        results: ResultList = hub.get_result_sync(ids, wait=args.wait)
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
    @argument("ids", nargs="*", help="task ids")
    @argument("--session", default=None, help="cancel every unfinished task of a session")
    @line_magic
    @_one_line_errors
    def hwf_cancel(self, line: str) -> Any:
        """Cancel tasks (running ones are killed on their daemon)."""
        args = parse_argstring(self.hwf_cancel, line)
        hub = self._require_hub()
        if not args.ids and not args.session:
            if not self.submissions:
                raise UsageError("hwf: name task ids or --session S to cancel")
            args.session = self.submissions[-1].session_id
        return hub.cancel_sync(args.ids or None, session=args.session)


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
    ipython.register_magics(HWFMagics(shell=ipython))


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.registry.get("HWFMagics")
    if magics is not None and magics.cluster is not None:
        magics.cluster.close()  # the local farm keeps running: %hwf_local --stop ends it

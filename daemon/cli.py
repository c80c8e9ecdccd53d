"""``hwf-daemon`` / ``python -m hwf_daemon`` / ``hwf daemon``: the daemon's command line.

It lives in the daemon package so a daemon process need not import the
notebook library (pandas, widgets: 80 MB instead of 30).  Size matters
here: tasks that run as another user cannot be started with vfork, so
every command forks the whole daemon, and that costs in proportion to its
memory.  ``LocalCluster`` starts daemons this way; ``hwf daemon`` (through
``hwf_jupyter.cli``) takes the same options.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from hub_server.cli import version_line

from .accounts import DEFAULT_SLOT_UID_BASE, AccountError
from .isolation import DEFAULT_DISK, DEFAULT_MAX_PIDS
from .runtimes import RuntimeConfigError
from .taskdirs import TaskDirError
from .tokens import ON_COMMAND_LINE, TOKEN_ENV, TokenError, daemon_token


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return n


def _size(text: str) -> int:
    """A byte count: 1048576, 512MB, 2GB (GB = GiB, as in a task's ram)."""
    from hub_server.hardware import parse_size

    try:
        n = parse_size(text, key="size")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (use e.g. 2GB, 512MB or bytes)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return n


class _RefuseToken(argparse.Action):
    """``--token`` is kept only to say why it is gone (without echoing the token)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        parser.error(ON_COMMAND_LINE)


def add_arguments(d: argparse.ArgumentParser) -> None:
    """The daemon's options, on ``hwf daemon`` or on the standalone parser."""
    d.add_argument("--hub", required=True,
                   help="hub address, e.g. ws://127.0.0.1:8765, wss://hub:8765 (TLS) or unix:/run/hwf/hub.sock")
    d.add_argument("--ca-file", default=None, metavar="PEM",
                   help="CA certificate that signs the hub's wss:// certificate (default: the system's CAs)")
    d.add_argument("--token-file", default=None, metavar="PATH",
                   help="file holding the daemon token on its first line, readable by its owner only "
                        "(chmod 600); '-' reads it from the first line of stdin (default: $HWF_TOKEN)")
    d.add_argument("--token", nargs="?", action=_RefuseToken, help=argparse.SUPPRESS)
    d.add_argument("--run-as", default=None, metavar="USER",
                   help="run every task as this user (name or uid; needs root), or 'self' for the daemon's "
                        "own user (default: as root, each slot runs as its own unprivileged uid; "
                        "otherwise the daemon's user)")
    d.add_argument("--slot-uid-base", type=int, default=DEFAULT_SLOT_UID_BASE, metavar="UID",
                   help="as root, slot k runs as uid/gid UID+k (the next free ones if another daemon "
                        f"holds them; default {DEFAULT_SLOT_UID_BASE})")
    d.add_argument("--slots", type=int, default=1, help="tasks run at once")
    d.add_argument("--workdir", default="hwf-daemon", help="task working dirs and the blob cache")
    d.add_argument("--name", default=None, help="machine name (default: hostname)")
    d.add_argument("--tags", default="", help="comma-separated tags tasks can require")
    d.add_argument("--drain-timeout", type=float, default=300.0,
                   help="on SIGTERM, let running tasks finish for up to this many seconds (SIGINT: stop now)")
    d.add_argument("--keep-workdirs", action="store_true", help="keep each task's working dir")
    d.add_argument("--python", default=None, metavar="PATH",
                   help="the Python interpreter of the warm workers that run Python function tasks (default: "
                        "the daemon's own if the task users can run it, else a python3.X of the same version "
                        "that they can)")
    d.add_argument("--python-max-tasks", type=int, default=1000, metavar="N",
                   help="replace a slot's Python worker after it has served N calls (default 1000)")
    d.add_argument("--containers", action="store_true",
                   help="run MECA container tasks with docker/podman where the engine answers (off by default: "
                        "whoever may submit to this daemon may then run any image on it)")
    d.add_argument("--grid-handler", default=None, metavar="HANDLER",
                   help="the HTC-Grid handler for tasks whose client config names none: 'module:function' "
                        "(called with each task dict) or a shell command (the task dict as JSON on stdin)")
    d.add_argument("--artifact-upload-tries", type=int, default=8, metavar="N",
                   help="times an artifact upload the hub refuses as busy is tried, backing off up to 8 s "
                        "between tries, before the artifact is reported lost (default 8)")
    d.add_argument("--isolation", choices=("auto", "none"), default="auto",
                   help="'auto': as root, each task gets a private /tmp, /var/tmp and /dev/shm, a /proc showing "
                        "only its own processes, and a cgroup with the limits below (what this machine lacks is "
                        "logged at start); 'none': none of that (for measuring, or where it breaks things)")
    d.add_argument("--task-max-pids", type=_positive, default=DEFAULT_MAX_PIDS, metavar="N",
                   help=f"processes a task may have at once (cgroup pids.max; default {DEFAULT_MAX_PIDS})")
    d.add_argument("--task-memory", type=_size, default=None, metavar="BYTES",
                   help="memory a task may use (cgroup; e.g. 2GB; a task's larger ram requirement wins; "
                        "default: the machine's RAM divided by --slots)")
    d.add_argument("--task-disk", type=_size, default=DEFAULT_DISK, metavar="BYTES",
                   help=f"disk a task may fill in its dir and private /tmp (polled every second; "
                        f"default {DEFAULT_DISK // 2**30}GB)")
    d.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    d.set_defaults(func=run)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``daemon`` on an ``add_subparsers()`` object."""
    # allow_abbrev=False: "--tok=SECRET" must not be taken for --token-file
    # nor echoed back in an "ambiguous option" error.
    d = sub.add_parser("daemon", help="run a daemon that executes tasks", allow_abbrev=False)
    add_arguments(d)
    return d


def run(args: argparse.Namespace) -> int:
    """Start the daemon; 2 with a clear message if its token or accounts are unusable."""
    from .agent import Daemon, DaemonConfig

    try:
        token = daemon_token(args.token_file)
    except TokenError as exc:
        print(f"hwf daemon: error: {exc}", file=sys.stderr)
        return 2
    os.environ.pop(TOKEN_ENV, None)  # not for the guardian nor any other child
    config = DaemonConfig(
        hub=args.hub,
        token=token,
        workdir=Path(args.workdir),
        slots=args.slots,
        name=args.name or socket.gethostname(),
        tags=[t.strip() for t in (args.tags or "").split(",") if t.strip()],
        keep_workdirs=args.keep_workdirs,
        parent_pid=args.parent_pid,
        drain_timeout=args.drain_timeout,
        run_as=args.run_as,
        slot_uid_base=args.slot_uid_base,
        ca_file=args.ca_file,
        python=args.python,
        python_max_tasks=args.python_max_tasks,
        grid_handler=args.grid_handler,
        containers=args.containers,
        artifact_upload_tries=args.artifact_upload_tries,
        isolation=args.isolation,
        task_max_pids=args.task_max_pids,
        task_memory=args.task_memory,
        task_disk=args.task_disk,
    )
    if args.artifact_upload_tries < 1:
        print("hwf daemon: error: --artifact-upload-tries must be at least 1", file=sys.stderr)
        return 2
    if args.python_max_tasks < 1:
        print("hwf daemon: error: --python-max-tasks must be at least 1", file=sys.stderr)
        return 2
    try:
        daemon = Daemon(config)
        if config.ca_file and not Path(config.ca_file).is_file():
            raise TaskDirError(f"--ca-file {config.ca_file}: no such file")
    except (AccountError, TaskDirError, RuntimeConfigError) as exc:
        print(f"hwf daemon: error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(daemon.run())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hwf-daemon", description="Run a daemon that executes tasks.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=version_line("hwf-daemon"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``hwf`` command: one entry point that dispatches to each program.

``hwf hub`` and ``hwf token`` are the hub's (``hub_server/cli.py``, also
``hwf-hub`` / ``python -m hub_server``), ``hwf daemon`` is the daemon's
(``daemon/cli.py``, also ``hwf-daemon`` / ``python -m hwf_daemon``);
``hwf local`` and ``hwf run-notebook`` belong to the notebook library.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

from hub_server import cli as hub_cli
from hwf_daemon import cli as daemon_cli


def _local(args: argparse.Namespace) -> int:
    from .cluster import LocalCluster

    with LocalCluster(daemons=args.daemons, slots=args.slots) as cluster:
        print(f"hub:    {cluster.address}")
        print(f"token:  {cluster.token}")
        print(f"daemons: {', '.join(cluster.daemon_processes)}")
        print("Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)
    return 0


def _run_notebook(args: argparse.Namespace) -> int:
    from .notebook_runner import execute_notebook

    dest, _ = execute_notebook(args.notebook, args.output, timeout=args.timeout)
    print(f"executed notebook written to {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hwf", description="HWF: run compute work on a hub of daemons.")
    parser.add_argument("--version", action="version", version=hub_cli.version_line("hwf"))
    sub = parser.add_subparsers(dest="command", required=True)
    hub_cli.add_parsers(sub)  # hub, token
    daemon_cli.add_parser(sub)  # daemon

    loc = sub.add_parser("local", help="run a hub and daemons on this machine until Ctrl-C")
    loc.add_argument("--daemons", type=int, default=2)
    loc.add_argument("--slots", type=int, default=2)
    loc.set_defaults(func=_local)

    nb = sub.add_parser("run-notebook", help="execute a notebook headlessly (widget state kept)")
    nb.add_argument("notebook")
    nb.add_argument("--output", default=None, help="default: NAME.executed.ipynb beside it")
    nb.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    nb.set_defaults(func=_run_notebook)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

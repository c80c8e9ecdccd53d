"""The ``hwf`` command: ``hwf hub``, ``hwf daemon``, ``hwf local``, ``hwf token``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from hub_server import protocol as p


def _hub(args: argparse.Namespace) -> int:
    from hub_server.server import HubConfig, run_hub

    limits = p.Limits()
    if args.max_file_bytes is not None:
        limits = p.Limits(**{**p.to_builtins(limits), "max_file_bytes": args.max_file_bytes})
    config = HubConfig(
        state_dir=Path(args.state_dir),
        host=args.host,
        port=args.port,
        limits=limits,
        heartbeat_timeout=args.heartbeat_timeout,
        reconnect_grace=args.reconnect_grace,
        trust_loopback=args.trust_loopback,
    )
    return _run_until_signal(run_hub(config, args.ready_file), args.parent_pid)


def _run_until_signal(coro, parent_pid: Optional[int]) -> int:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(coro)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        if parent_pid:
            async def watch() -> None:
                while os.getppid() == parent_pid:
                    await asyncio.sleep(0.5)
                task.cancel()
            watcher = asyncio.ensure_future(watch())
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            if parent_pid:
                watcher.cancel()

    asyncio.run(main())
    return 0


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


def _token(args: argparse.Namespace) -> int:
    from hub_server import auth

    store = auth.open_state_dir(args.state_dir)
    try:
        if args.action == "create":
            print(auth.create_token(store, args.role, args.label))
        else:
            for row in store.tokens():
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"]))
                print(f"{row['role']:7} {created}  {row['label']}")
    finally:
        store.close()
    return 0


def _run_notebook(args: argparse.Namespace) -> int:
    from .notebook_runner import execute_notebook

    dest, _ = execute_notebook(args.notebook, args.output, timeout=args.timeout)
    print(f"executed notebook written to {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hwf", description="HWF: run compute work on a hub of daemons.")
    sub = parser.add_subparsers(dest="command", required=True)

    hub = sub.add_parser("hub", help="run a hub")
    hub.add_argument("--host", default="127.0.0.1")
    hub.add_argument("--port", type=int, default=p.DEFAULT_PORT, help="websocket port (0: any free port)")
    hub.add_argument("--state-dir", default="hwf-state", help="SQLite store, blobs and admin.token live here")
    hub.add_argument("--max-file-bytes", type=int, default=None, help="largest Data/artifact file accepted")
    hub.add_argument("--heartbeat-timeout", type=float, default=10.0)
    hub.add_argument("--reconnect-grace", type=float, default=15.0)
    hub.add_argument("--trust-loopback", action="store_true",
                     help="let callers on 127.0.0.1 in as clients without a token (like HTC-Grid's INTRA_VPC)")
    hub.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    hub.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    hub.set_defaults(func=_hub)

    from daemon.cli import add_parser as add_daemon_parser

    add_daemon_parser(sub)  # the daemon's options live with the daemon (daemon/cli.py)

    loc = sub.add_parser("local", help="run a hub and daemons on this machine until Ctrl-C")
    loc.add_argument("--daemons", type=int, default=2)
    loc.add_argument("--slots", type=int, default=2)
    loc.set_defaults(func=_local)

    tok = sub.add_parser("token", help="create or list access tokens")
    tok.add_argument("action", choices=["create", "list"])
    tok.add_argument("--role", choices=p.ROLES, default="client")
    tok.add_argument("--label", default="")
    tok.add_argument("--state-dir", default="hwf-state")
    tok.set_defaults(func=_token)
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

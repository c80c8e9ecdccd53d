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

# Hub limits settable on the command line: Limits field -> help.
_LIMIT_FLAGS = {
    "max_file_bytes": "largest Data/artifact file accepted, bytes",
    "max_message_bytes": "largest websocket message, bytes",
    "max_queued_tasks": "unfinished tasks on the hub, all users",
    "max_queued_per_user": "unfinished tasks per user",
    "max_tasks_per_submit": "tasks in one submit message",
    "max_uploads_per_connection": "blob uploads open at once per connection",
    "max_uploads": "blob uploads open at once on the hub",
    "max_blob_store_bytes": "bytes of all stored blobs",
    "send_queue_bytes": "bytes queued to one slow reader before its live output is dropped",
    "send_queue_hard_bytes": "bytes queued to one slow reader before it is disconnected",
}


def _hub(args: argparse.Namespace) -> int:
    from hub_server.server import HubConfig, run_hub

    overrides = {name: getattr(args, name) for name in _LIMIT_FLAGS if getattr(args, name) is not None}
    limits = p.Limits(**{**p.to_builtins(p.Limits()), **overrides})
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("hwf hub: --tls-cert and --tls-key go together")
    config = HubConfig(
        state_dir=Path(args.state_dir),
        host=args.host,
        port=args.port,
        limits=limits,
        heartbeat_timeout=args.heartbeat_timeout,
        reconnect_grace=args.reconnect_grace,
        trust_loopback=args.trust_loopback,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        slow_reader_timeout=args.slow_reader_timeout,
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
    """Tokens live in the hub's store: this works while the hub runs, and a
    revoked token's open connections are closed by the hub within a second."""
    from hub_server import auth

    store = auth.open_state_dir(args.state_dir)
    try:
        if args.action == "create":
            if args.user and args.owner:
                raise auth.AuthError("give --user (client/admin) or --owner (daemon), not both")
            user = args.owner if args.role == "daemon" else args.user
            if args.role == "daemon" and args.user:
                raise auth.AuthError("a daemon token has an --owner, not a --user")
            if args.role != "daemon" and args.owner:
                raise auth.AuthError(f"a {args.role} token has a --user, not an --owner")
            token = auth.create_token(store, args.role, user, args.label)
            row = store.token(auth.hash_token(token))
            print(f"created {row['token_id']}: {args.role} token for {row['user']!r} "
                  "(shown once; store it now)", file=sys.stderr)
            print(token)
        elif args.action == "list":
            print(f"{'id':15} {'role':7} {'user/owner':16} {'created':19}  {'revoked':19}  label")
            for row in store.tokens():
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"]))
                revoked = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["revoked"]))
                           if row["revoked"] else "-")
                print(f"{row['token_id']:15} {row['role']:7} {row['user']:16} {created:19}  {revoked:19}  {row['label']}")
        else:
            ids = auth.revoke(store, args.ids, user=args.user)
            print(f"revoked {len(ids)} token(s){': ' + ', '.join(ids) if ids else ''}")
    except auth.AuthError as exc:
        print(f"hwf token: {exc}", file=sys.stderr)
        return 2
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
    hub.add_argument("--heartbeat-timeout", type=float, default=10.0)
    hub.add_argument("--reconnect-grace", type=float, default=15.0)
    hub.add_argument("--trust-loopback", action="store_true",
                     help="let callers on 127.0.0.1 in as clients without a token (like HTC-Grid's INTRA_VPC)")
    hub.add_argument("--tls-cert", default=None, help="serve wss:// with this PEM certificate chain")
    hub.add_argument("--tls-key", default=None, help="the PEM private key of --tls-cert")
    hub.add_argument("--slow-reader-timeout", type=float, default=60.0,
                     help="disconnect a peer whose live output has been dropped this many seconds")
    for name, help_text in _LIMIT_FLAGS.items():
        hub.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                         help=f"{help_text} (default {getattr(p.Limits(), name)})")
    hub.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    hub.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    hub.set_defaults(func=_hub)

    from daemon.cli import add_parser as add_daemon_parser

    add_daemon_parser(sub)  # the daemon's options live with the daemon (daemon/cli.py)

    loc = sub.add_parser("local", help="run a hub and daemons on this machine until Ctrl-C")
    loc.add_argument("--daemons", type=int, default=2)
    loc.add_argument("--slots", type=int, default=2)
    loc.set_defaults(func=_local)

    tok = sub.add_parser("token", help="create, list or revoke access tokens (also while the hub runs)")
    tok.add_argument("action", choices=["create", "list", "revoke"])
    tok.add_argument("ids", nargs="*", help="revoke: the token ids (tok-...) to revoke")
    tok.add_argument("--role", choices=p.ROLES, default="client")
    tok.add_argument("--user", default=None,
                     help="create: the user a client/admin token acts for (default: your login name); "
                          "revoke: every token of this user or owner")
    tok.add_argument("--owner", default=None, help="create: who owns the machines of a daemon token")
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

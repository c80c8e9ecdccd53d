"""The hub's command lines: ``hwf-hub`` / ``python -m hub_server`` / ``hwf hub``
(run a hub) and ``hwf token`` (manage the tokens in its state dir).

Standalone: nothing here imports the notebook library, so a hub process
stays small and starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Coroutine, Optional, Sequence

from . import __version__
from . import gridcall
from . import protocol as p

# Hub limits settable on the command line: Limits field -> help.
LIMIT_FLAGS = {
    "max_file_bytes": "largest Data/artifact file accepted, bytes",
    "max_message_bytes": "largest websocket message, bytes",
    "max_queued_tasks": "unfinished tasks on the hub, all users",
    "max_queued_per_user": "unfinished tasks per user",
    "max_tasks_per_submit": "tasks in one submit message",
    "max_uploads_per_connection": "blob uploads open at once per connection",
    "max_uploads": "blob uploads of clients open at once on the hub",
    "max_uploads_per_user": "blob uploads open at once per user (or daemon owner)",
    "max_daemon_uploads": "blob uploads of daemons (artifacts) open at once on the hub",
    "max_blob_store_bytes": "bytes of all stored blobs",
    "max_blob_bytes_per_user": "bytes of stored blobs a user uploaded or whose tasks produced",
    "send_queue_bytes": "bytes queued to one slow reader before its live output is dropped",
    "send_queue_hard_bytes": "bytes queued to one slow reader before it is disconnected",
    "max_waiters_per_user": "get_results(wait=True) requests one user may have waiting",
    "max_watches_per_user": "watches one user may have open",
    "max_waited_ids_per_user": "task ids one user's waiting requests and watches may cover together",
}

# Connection and stream caps (HubConfig field -> type, help); defaults are HubConfig's.
CONNECTION_FLAGS = {
    "max_connections": (int, "websocket connections open at once (counted before the handshake)"),
    "max_connections_per_address": (int, "websocket connections open at once from one address"),
    "http_header_timeout": (float, "seconds a new HTTP connection has to send its whole request head"),
    "http_idle_timeout": (float, "seconds an idle keep-alive HTTP connection is kept"),
    "http_max_connections": (int, "HTTP connections open at once"),
    "http_max_connections_per_address": (int, "HTTP connections open at once from one address"),
    "http_max_streams": (int, "/api/events streams open at once"),
    "http_max_streams_per_user": (int, "/api/events streams open at once per user"),
}


def version_line(prog: str) -> str:
    return f"{prog} {__version__} (Python {sys.version.split()[0]})"


# ------------------------------------------------------------------ the hub


def add_hub_arguments(hub: argparse.ArgumentParser) -> None:
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
    hub.add_argument("--unix", default=None, metavar="PATH",
                     help="also serve the websocket protocol on this unix socket (same tokens); "
                          "clients and daemons connect to unix:PATH")
    hub.add_argument("--unix-mode", type=_octal, default=0o660, metavar="MODE",
                     help="file mode of the --unix socket (default 660)")
    hub.add_argument("--creditpiggy", action="append", default=[], metavar="ENDPOINT",
                     help="serve CreditPiggy's daemon line protocol on unix:PATH, tcp:HOST:PORT or "
                          "udp:HOST:PORT (repeatable); whoever can connect may alloc and claim credits")
    hub.add_argument("--creditpiggy-user", default="creditpiggy", metavar="NAME",
                     help="the client user the line protocol acts as: it sees and changes only that "
                          "user's own slots; never an admin (default creditpiggy)")
    hub.add_argument("--creditpiggy-secret-file", default=None, metavar="FILE",
                     help="file (mode 600) whose first line is the shared secret that tcp:/udp: "
                          "creditpiggy lines must open with (SECRET=<secret>,COMMAND,...); required "
                          "for tcp:/udp: endpoints, not needed on unix: ones")
    hub.add_argument("--creditpiggy-mode", type=_octal, default=0o600, metavar="MODE",
                     help="file mode of a unix: creditpiggy socket (default 600: the hub's user only)")
    hub.add_argument("--creditpiggy-allow-remote", action="store_true",
                     help="let tcp:/udp: creditpiggy endpoints bind a non-loopback address")
    hub.add_argument("--creditpiggy-idle-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="close a creditpiggy connection that sends no command this long (default 10)")
    hub.add_argument("--creditpiggy-max-connections", type=int, default=256, metavar="N",
                     help="creditpiggy connections open at once; more are answered ER (default 256)")
    hub.add_argument("--blob-gc-interval", type=float, default=3600.0, metavar="SECONDS",
                     help="collect unreferenced blobs this often (default 3600; 0: never, 'hwf blobs gc' still works)")
    hub.add_argument("--blob-gc-grace", type=float, default=3600.0, metavar="SECONDS",
                     help="garbage collection spares blobs stored or used this recently (default 3600)")
    hub.add_argument("--upload-idle-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="drop an announced upload that receives no bytes this long, freeing its slot "
                          "(default 10)")
    for name, help_text in LIMIT_FLAGS.items():
        hub.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                         help=f"{help_text} (default {getattr(p.Limits(), name)})")
    from .server import HubConfig

    for name, (kind, help_text) in CONNECTION_FLAGS.items():
        hub.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(HubConfig, name),
                         metavar="SECONDS" if kind is float else "N",
                         help=f"{help_text} (default {getattr(HubConfig, name):g})")
    hub.add_argument("--grid-handler", default=None, metavar="HANDLER",
                     help="HTC-Grid handler for tasks whose client config names none, on daemons without "
                          "their own --grid-handler: 'module:function' or a shell command")
    hub.add_argument("--python-trusted-owners", default="", metavar="OWNER,...",
                     help="daemon owners whose machines may run any user's Python calls (default: a user's "
                          "calls run only on machines that user owns: the client unpickles what they return)")
    hub.add_argument("--prefetch", type=int, default=1, metavar="N",
                     help="Python-call tasks a daemon may hold per slot beyond its slots, each starting the "
                          "moment a slot frees (0: none; default 1)")
    hub.add_argument("--http-port", type=_http_port, default=p.DEFAULT_HTTP_PORT, metavar="PORT",
                     help=f"the Manager HTTP API and status page (default {p.DEFAULT_HTTP_PORT}; 0: off; "
                          "auto: any free port), same tokens and TLS as the websocket")
    hub.add_argument("--http-trust", action="append", default=[], metavar="CIDR=USER",
                     help="HTTP calls without a token from these addresses act as client USER (repeatable; "
                          "for a brender server that sends no token); off by default")
    hub.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    hub.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    hub.set_defaults(func=run_hub_cli)


def _http_port(text: str) -> Optional[int]:
    """``--http-port``: a port, 0 (off) or auto (any free port: 0 to the socket)."""
    if text == "auto":
        return 0
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number, 0 or auto") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return None if port == 0 else port


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 600") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode (000-777)")
    return mode


def run_hub_cli(args: argparse.Namespace) -> int:
    """Run a hub until SIGTERM/SIGINT; 2 with a clear message if it cannot start."""
    from .auth import AuthError, check_user
    from .creditserver import parse_endpoint
    from .server import HubConfig, run_hub
    from .store import SchemaError
    from .unixsock import ListenError

    overrides = {name: getattr(args, name) for name in LIMIT_FLAGS if getattr(args, name) is not None}
    limits = p.Limits(**{**p.to_builtins(p.Limits()), **overrides})
    if bool(args.tls_cert) != bool(args.tls_key):
        print("hwf hub: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        credit_endpoints = [parse_endpoint(spec, args.creditpiggy_allow_remote) for spec in args.creditpiggy]
        check_user(args.creditpiggy_user)
        credit_secret = creditpiggy_secret(args.creditpiggy_secret_file, credit_endpoints)
        if credit_endpoints:
            refuse_admin_line_user(Path(args.state_dir), args.creditpiggy_user)
        if args.blob_gc_interval < 0 or args.blob_gc_grace < 60:
            raise ValueError("--blob-gc-interval must be >= 0 and --blob-gc-grace at least 60 seconds")
        if args.upload_idle_timeout <= 0:
            raise ValueError("--upload-idle-timeout must be positive")
        if args.creditpiggy_idle_timeout <= 0 or args.creditpiggy_max_connections < 1:
            raise ValueError("--creditpiggy-idle-timeout and --creditpiggy-max-connections must be positive")
        for name in CONNECTION_FLAGS:
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for name in ("max_waiters_per_user", "max_watches_per_user", "max_waited_ids_per_user"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if args.unix is not None and not os.path.isabs(args.unix):
            raise ValueError(f"--unix {args.unix!r}: the socket path must be absolute")
        from .http_api import parse_trust

        http_trust = parse_trust(args.http_trust)
    except (ValueError, AuthError, SchemaError) as exc:
        print(f"hwf hub: error: {exc}", file=sys.stderr)
        return 2
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
        unix_path=Path(args.unix) if args.unix else None,
        unix_mode=args.unix_mode,
        creditpiggy=credit_endpoints,
        creditpiggy_user=args.creditpiggy_user,
        creditpiggy_secret=credit_secret,
        creditpiggy_mode=args.creditpiggy_mode,
        creditpiggy_idle_timeout=args.creditpiggy_idle_timeout,
        creditpiggy_max_connections=args.creditpiggy_max_connections,
        upload_idle_timeout=args.upload_idle_timeout,
        blob_gc_interval=args.blob_gc_interval,
        blob_gc_grace=args.blob_gc_grace,
        grid_handler=args.grid_handler,
        prefetch=args.prefetch,
        python_trusted_owners=tuple(o.strip() for o in args.python_trusted_owners.split(",") if o.strip()),
        http_port=args.http_port,
        http_trust=http_trust,
        **{name: getattr(args, name) for name in CONNECTION_FLAGS},
    )
    if not 0 <= args.prefetch <= 64:
        print("hwf hub: error: --prefetch must be from 0 to 64", file=sys.stderr)
        return 2
    if args.grid_handler is not None:
        problem = gridcall.check_handler(args.grid_handler)
        if problem:
            print(f"hwf hub: error: --grid-handler: {problem}", file=sys.stderr)
            return 2
    try:
        return run_until_signal(run_hub(config, args.ready_file), args.parent_pid)
    except (SchemaError, ListenError) as exc:
        print(f"hwf hub: error: {exc}", file=sys.stderr)
        return 2


def creditpiggy_secret(path: Optional[str], endpoints: list[Any]) -> Optional[str]:
    """The line protocol's shared secret: required when a tcp:/udp: endpoint
    listens (any local process, a task included, can reach it)."""
    from .privatefile import read_private_line

    networked = [str(ep) for ep in endpoints if ep.kind in ("tcp", "udp")]
    if path is None:
        if networked:
            raise ValueError(f"creditpiggy endpoint {networked[0]} needs a shared secret: pass "
                             "--creditpiggy-secret-file FILE (mode 600, the secret on its first line); "
                             "unix: endpoints need none")
        return None
    secret = read_private_line(path, "--creditpiggy-secret-file", "the creditpiggy secret")
    if not re.fullmatch(r"[\x21-\x7e]{8,256}", secret) or "," in secret:
        raise ValueError(f"--creditpiggy-secret-file {path}: the secret must be 8-256 printable "
                         "characters with no spaces or commas")
    return secret


def refuse_admin_line_user(state_dir: Path, user: str) -> None:
    """The line protocol acts as a client user: never as the admin user, nor as
    a user that holds an admin token (it would share that user's slots)."""
    from .auth import open_state_dir

    if user == "admin":
        raise ValueError("--creditpiggy-user admin: the line protocol acts as a client user, never an admin")
    store = open_state_dir(state_dir)
    try:
        if any(t["role"] == "admin" and t["user"] == user and t["revoked"] is None for t in store.tokens()):
            raise ValueError(f"--creditpiggy-user {user}: that user holds an admin token; the line protocol "
                             "acts as a client user, never an admin")
    finally:
        store.close()


def run_until_signal(coro: Coroutine[Any, Any, Any], parent_pid: Optional[int]) -> int:
    """Run ``coro`` until SIGTERM/SIGINT, or until ``parent_pid`` is no longer our parent."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(coro)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        watcher = None
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
            if watcher is not None:
                watcher.cancel()

    asyncio.run(main())
    return 0


# ------------------------------------------------------------------ tokens


def add_token_arguments(tok: argparse.ArgumentParser) -> None:
    tok.add_argument("action", choices=["create", "list", "revoke"])
    tok.add_argument("ids", nargs="*", help="revoke: the token ids (tok-...) to revoke")
    tok.add_argument("--role", choices=p.ROLES, default="client")
    tok.add_argument("--user", default=None,
                     help="create: the user a client/admin token acts for (default: your login name); "
                          "revoke: every token of this user or owner")
    tok.add_argument("--owner", default=None, help="create: who owns the machines of a daemon token")
    tok.add_argument("--label", default="")
    tok.add_argument("--state-dir", default="hwf-state")
    tok.set_defaults(func=token_cli)


def token_cli(args: argparse.Namespace) -> int:
    """Tokens live in the hub's store: this works while the hub runs, and a
    revoked token's open connections are closed by the hub within a second."""
    from . import auth
    from .store import SchemaError

    try:
        store = auth.open_state_dir(args.state_dir)
    except SchemaError as exc:
        print(f"hwf token: {exc}", file=sys.stderr)
        return 2
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


def add_parsers(sub: Any) -> None:
    """Register ``hub``, ``token`` and ``credits`` on an ``add_subparsers()`` object (for ``hwf``)."""
    add_hub_arguments(sub.add_parser("hub", help="run a hub"))
    add_token_arguments(sub.add_parser("token", help="create, list or revoke access tokens (also while the hub runs)"))
    from .credits_cli import add_credits_arguments
    add_credits_arguments(sub.add_parser("credits", help="link machines to users, print credit tallies"))
    from .blobs_cli import add_blobs_arguments
    add_blobs_arguments(sub.add_parser("blobs", help="garbage-collect blobs nothing refers to (also while the hub runs)"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``hwf-hub``: run a hub."""
    parser = argparse.ArgumentParser(prog="hwf-hub", description="Run an HWF hub.")
    parser.add_argument("--version", action="version", version=version_line("hwf-hub"))
    add_hub_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

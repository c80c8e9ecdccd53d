"""``hwf blobs gc``: delete the blobs nothing refers to any more (blobgc.py).

With a hub running on the state dir, the hub collects (an admin request over
its websocket, at the address the hub wrote in ``hub.lock``, or ``--hub``):
only the hub knows what it is about to store, so only it can delete safely.
With no hub running, the command holds the state dir's lock and collects on
its own; a hub started meanwhile waits for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from . import blobgc
from . import protocol as p
from .credits_cli import ask_hub
from .link import HubError
from .statelock import StateLock


def add_blobs_arguments(bl: argparse.ArgumentParser) -> None:
    sub = bl.add_subparsers(dest="action", required=True)
    gc = sub.add_parser("gc", help="delete blobs no unfinished task, stored result or job file refers to")
    gc.add_argument("--state-dir", default="hwf-state", help="the hub's state dir")
    gc.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    gc.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                    help="with no hub running: spare blobs stored or used this recently (default 3600; "
                         "a running hub uses its --blob-gc-grace)")
    gc.add_argument("--hub", default=os.environ.get("HWF_HUB_URL"),
                    help="the running hub's address (default: the one it wrote in STATE_DIR/hub.lock)")
    gc.add_argument("--token-file", default=None, help="a file holding an admin token (default: the state dir's)")
    gc.add_argument("--ca-file", default=None)
    gc.set_defaults(func=blobs_cli)


def collect_offline(state_dir: Path, grace: float, dry_run: bool) -> p.BlobGcReport:
    """Collect with no hub running (the caller holds the state dir's exclusive lock)."""
    from . import auth
    from .blobs import BlobStore

    store = auth.open_state_dir(state_dir)
    try:
        blobs = BlobStore(state_dir / "blobs")
        gone, listing = blobgc.candidates(store.path, blobs, time.time(), grace)
        if not dry_run:
            with store.transaction():
                store.drop_blob_refs(gone)
            for sha in gone:
                blobs.delete(sha)
    finally:
        store.close()
    deleted, freed, kept, kept_bytes = blobgc.totals(listing, gone)
    return p.BlobGcReport(id=0, dry_run=dry_run, deleted=deleted, deleted_bytes=freed, kept=kept,
                          kept_bytes=kept_bytes)


def blobs_cli(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if not (state_dir / "hub.sqlite3").exists():
        print(f"hwf blobs: no hub state in {state_dir} (give the hub's --state-dir)", file=sys.stderr)
        return 2
    lock = StateLock(state_dir)
    try:
        if lock.try_exclusive():
            report, where = collect_offline(state_dir, args.grace, args.dry_run), "no hub running"
        else:
            args.hub = args.hub or lock.address()
            if not args.hub:
                raise HubError(f"a hub holds {state_dir} but wrote no address: give --hub")
            report = asyncio.run(ask_hub(args, lambda rid: p.BlobGc(id=rid, dry_run=args.dry_run),
                                         agent="hwf-blobs"))
            where = f"by the hub at {args.hub}"
    except (HubError, OSError) as exc:
        print(f"hwf blobs: {exc}", file=sys.stderr)
        return 2
    finally:
        lock.close()
    verb = "would delete" if report.dry_run else "deleted"
    print(f"{verb} {report.deleted} blob(s), {report.deleted_bytes} bytes ({where}); "
          f"{report.kept} blob(s), {report.kept_bytes} bytes kept")
    return 0

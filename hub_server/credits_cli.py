"""``hwf credits``: link a machine to a user (paying its pending credits) and
print tallies, as an admin talking to a running hub over its websocket.

The ledger lives in the hub's memory-backed core, so changes go through the
hub rather than into its store behind its back.  The admin token comes from
``--token-file``, ``HWF_TOKEN``, or the hub's ``--state-dir`` (its
``admin.token`` file: convenient on the hub's own machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any, Optional

from . import protocol as p
from .link import HubError, Link

DEFAULT_HUB = f"ws://127.0.0.1:{p.DEFAULT_PORT}"


def add_credits_arguments(cr: argparse.ArgumentParser) -> None:
    sub = cr.add_subparsers(dest="action", required=True)
    link = sub.add_parser("link", help="link MACHINE to USER; its pending credits are paid to USER")
    link.add_argument("machine")
    link.add_argument("user")
    tally = sub.add_parser("tally", help="credit totals (admin: everyone's)")
    tally.add_argument("--by", choices=["machine", "owner", "user", "session"], default="owner")
    for parser in (link, tally):
        parser.add_argument("--hub", default=os.environ.get("HWF_HUB_URL", DEFAULT_HUB))
        parser.add_argument("--token-file", default=None, help="a file holding an admin token")
        parser.add_argument("--state-dir", default=None, help="the hub's state dir: use its admin token")
        parser.add_argument("--ca-file", default=None)
        parser.set_defaults(func=credits_cli)


def admin_token(args: argparse.Namespace) -> str:
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    if os.environ.get("HWF_TOKEN"):
        return os.environ["HWF_TOKEN"]
    if args.state_dir:
        from .auth import read_admin_token
        return read_admin_token(args.state_dir)
    raise HubError("give --token-file, HWF_TOKEN or --state-dir (for the hub's admin token)")


async def ask_hub(args: argparse.Namespace, make: Any, agent: str = "hwf-credits") -> Any:
    """One admin request to the hub at ``args.hub``; its reply."""
    link = Link(args.hub, admin_token(args), agent=agent, ssl=args.ca_file)
    await link.connect()
    try:
        return await link.request(make(link.next_id()), timeout=30)
    finally:
        await link.close()


def credits_cli(args: argparse.Namespace) -> int:
    try:
        if args.action == "link":
            r = asyncio.run(ask_hub(args, lambda rid: p.CreditLink(id=rid, machine=args.machine, user=args.user)))
            print(f"linked {r.machine} to {r.user}: paid {r.paid_credits} pending credit(s) "
                  f"from {r.paid_slots} slot(s)")
        else:
            r = asyncio.run(ask_hub(args, lambda rid: p.GetCreditTally(id=rid, by=args.by)))
            print(f"{'rank':>4}  {args.by:24} {'credits':>10} {'pending':>10} {'slots':>7}  counters")
            for rank, row in enumerate(r.rows, 1):
                counters = ", ".join(f"{k}={v:g}" for k, v in sorted(row.counters.items()))
                print(f"{rank:>4}  {str(row.key if row.key is not None else '(no owner)'):24} "
                      f"{row.credits:>10} {row.pending:>10} {row.slots:>7}  {counters}")
    except (HubError, OSError) as exc:
        print(f"hwf credits: {exc}", file=sys.stderr)
        return 2
    return 0

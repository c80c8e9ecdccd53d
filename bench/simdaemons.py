"""Many simulated daemons in one process, over real websockets to a real hub.

    python bench/simdaemons.py --hub ws://127.0.0.1:PORT --token-file F --daemons 500 \
        --ready-file R --out STATS.json [--expect N] [--slots 1]

Each simulated daemon is one websocket connection speaking HWF's protocol by
hand (as tests/rawpeer.py does): ``hello``, ``register`` with a valid
hardware report, a ``heartbeat`` every ``heartbeat_interval`` the hub asks
for, and for every ``assign`` an immediate ``task_started`` then
``task_done`` (finished, exit 0), which the hub acks with ``ok``.  Nothing
runs: what is measured is the hub's bookkeeping and scheduling.

When every daemon has registered it writes ``--ready-file`` (JSON: how long
registration took); when ``--expect`` task_done acks have arrived, or on
SIGTERM/SIGINT, it writes ``--out`` (counts and wall-clock timestamps, which
are comparable with the other processes on this machine) and exits.

Decoding uses msgspec (an HWF dependency) into plain dicts: the simulator
must stay cheaper than the hub it drives, and its own CPU time is reported
so a reader can check that it was not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from typing import Any, Optional

import msgspec
import websockets
from websockets.asyncio.client import connect

PROTOCOL_VERSION = 1
HARDWARE = {"os": "linux", "distro": "Simulated Linux", "os_version": "1", "arch": "x86_64",
            "cpu": "simulated cpu", "cores": 4, "physical_cores": 2, "ram": 8 * 2**30, "gpus": [],
            "hostname": "sim", "python": "3"}
LOAD = {"load_avg": [0.0, 0.0, 0.0], "cpu_percent": 0.0, "mem_percent": 10.0, "disk_percent": 10.0}

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode


class Stats:
    def __init__(self, expect: Optional[int]) -> None:
        self.expect = expect
        self.registered = 0
        self.assigns = 0
        self.first_assign: Optional[float] = None
        self.last_assign: Optional[float] = None
        self.acked = 0
        self.last_ack: Optional[float] = None
        self.heartbeats = 0
        self.per_second: list[int] = []  # assignments in each second after the first
        self.errors: list[str] = []
        self.lost: list[str] = []
        self.done = asyncio.Event()

    def on_assign(self, now: float) -> None:
        self.assigns += 1
        if self.first_assign is None:
            self.first_assign = now
        self.last_assign = now
        second = int(now - self.first_assign)
        while len(self.per_second) <= second:
            self.per_second.append(0)
        self.per_second[second] += 1

    def on_ack(self, now: float) -> None:
        self.acked += 1
        self.last_ack = now
        if self.expect is not None and self.acked >= self.expect:
            self.done.set()

    def as_dict(self) -> dict[str, Any]:
        cpu = os.times()
        return {
            "registered": self.registered, "assigns": self.assigns, "acked": self.acked,
            "first_assign": self.first_assign, "last_assign": self.last_assign, "last_ack": self.last_ack,
            "heartbeats": self.heartbeats, "assigns_per_second": self.per_second, "errors": self.errors[:20], "n_errors": len(self.errors),
            "lost": self.lost[:20], "n_lost": len(self.lost),
            "cpu_s": cpu.user + cpu.system,
        }


async def _heartbeats(ws: Any, interval: float, stats: Stats) -> None:
    frame = _encode({"type": "heartbeat", "load": LOAD, "running": 0}).decode()
    while True:
        await asyncio.sleep(interval)
        await ws.send(frame)
        stats.heartbeats += 1


async def daemon(i: int, args: argparse.Namespace, token: str, stats: Stats, gate: asyncio.Semaphore,
                 registered: asyncio.Event) -> None:
    name = f"sim-{i:04d}"
    async with gate:  # bounded concurrent handshakes: the hub's listen backlog is finite
        ws = await connect(args.hub, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None,
                           max_size=None, compression=None, open_timeout=120, ping_interval=None)
        await ws.send(_encode({"type": "hello", "version": PROTOCOL_VERSION, "agent": "simdaemon"}).decode())
        welcome = _decode(await ws.recv())
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"{name}: expected welcome, got {welcome}")
        await ws.send(_encode({"type": "register", "id": 1, "name": name, "hardware": HARDWARE,
                               "slots": args.slots, "tags": [], "running": [], "instance": f"sim-{os.getpid()}"})
                      .decode())
    hb: Optional[asyncio.Task] = None
    rid = 1
    try:
        async for frame in ws:
            msg = _decode(frame)
            kind = msg.get("type")
            if kind in ("assign", "assignments"):  # protocol 2 batches a daemon's new tasks
                for item in msg["items"] if kind == "assignments" else [msg]:
                    now = time.time()
                    stats.on_assign(now)
                    tid, attempt = item["task_id"], item["attempt"]
                    rid += 1
                    await ws.send(_encode({"type": "task_started", "task_id": tid, "attempt": attempt,
                                           "time": now}).decode())
                    await ws.send(_encode({"type": "task_done", "id": rid, "task_id": tid, "attempt": attempt,
                                           "outcome": {"status": "finished", "exit_code": 0, "started": now,
                                                       "finished": now}}).decode())
            elif kind == "ok":
                stats.on_ack(time.time())
            elif kind == "registered":
                stats.registered += 1
                if stats.registered == args.daemons:
                    registered.set()
                hb = asyncio.ensure_future(_heartbeats(ws, float(msg["heartbeat_interval"]) or 2.0, stats))
            elif kind == "error":
                stats.errors.append(f"{name}: {msg.get('code')}: {msg.get('message')}"[:300])
    except websockets.ConnectionClosed as exc:
        stats.lost.append(f"{name}: {exc}")
    finally:
        if hb is not None:
            hb.cancel()
        await ws.close()


async def main_async(args: argparse.Namespace) -> int:
    token = open(args.token_file).read().strip()
    stats = Stats(args.expect)
    gate = asyncio.Semaphore(args.connect_concurrency)
    registered = asyncio.Event()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    t0 = time.time()
    tasks = [asyncio.ensure_future(daemon(i, args, token, stats, gate, registered)) for i in range(args.daemons)]

    async def first_failure() -> None:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                stats.errors.append(f"daemon task failed: {t.exception()!r}"[:300])

    watcher = asyncio.ensure_future(first_failure())
    waits = [asyncio.ensure_future(e.wait()) for e in (registered, stop)]
    await asyncio.wait(waits + [watcher], return_when=asyncio.FIRST_COMPLETED)
    if registered.is_set():
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"registered": stats.registered, "register_s": time.time() - t0, "pid": os.getpid()}, f)
        os.replace(tmp, args.ready_file)
        waits = [asyncio.ensure_future(e.wait()) for e in (stats.done, stop)]
        await asyncio.wait(waits + [watcher], return_when=asyncio.FIRST_COMPLETED)
    out = stats.as_dict()
    out["register_start"] = t0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, args.out)
    return 0 if registered.is_set() else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hub", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--daemons", type=int, default=500)
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--expect", type=int, default=None, help="exit after this many task_done acks")
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--connect-concurrency", type=int, default=50)
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())

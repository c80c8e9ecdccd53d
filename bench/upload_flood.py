"""Other users' uploads while one user floods the hub with silent upload announcements.

    python bench/upload_flood.py [--rounds 40] [--connections 64]

user-b opens ``--connections`` connections, each announcing 4 uploads
(``blob_put``) it never sends, and announces again 0.2 s after one is refused or
expires (issue 18, row 4).  Meanwhile user-a, in this process, uploads a fresh
1 MiB Data file and dispatches a task that reads it, ``--rounds`` times; the
round trip (upload + dispatch + result) is measured with and without the
flood.  Also reports the hub's RSS and how many of user-b's announcements
were refused or expired.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from websockets.sync.client import connect

from hwf_jupyter import Data, LocalCluster, Stage, Task, dispatch_sync


def flooder(address: str, token: str, stop: threading.Event, counts: dict) -> None:
    """One connection of user-b: keep 4 silent announcements open, forever."""
    with connect(address, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None,
                 max_size=None, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "hello", "version": 2}))
        ws.recv()
        n = 0

        def announce() -> None:
            nonlocal n
            n += 1
            sha = hashlib.sha256(f"{id(ws)}-{n}".encode()).hexdigest()
            ws.send(json.dumps({"type": "blob_put", "id": n, "sha256": sha, "size": 1 << 20}))

        for _ in range(4):
            announce()
        while not stop.is_set():
            try:
                msg = json.loads(ws.recv(timeout=0.5))
            except TimeoutError:
                continue
            counts[msg.get("code", msg["type"])] = counts.get(msg.get("code", msg["type"]), 0) + 1
            stop.wait(0.2)  # then take the slot again: the pressure stays on
            announce()


def rounds(cluster: LocalCluster, n: int, workdir: Path) -> list[float]:
    hub = cluster.hub(artifacts_dir=workdir / "arts")
    out = []
    try:
        for i in range(n):
            src = workdir / f"in-{i}.bin"
            src.write_bytes(os.urandom(1 << 20))
            t = time.perf_counter()
            ids = dispatch_sync(Task(Stage("s", data=Data(str(src), "in.bin"), cmd="wc -c in.bin")), hub)
            r = hub.get_result_sync(ids, wait=True, timeout=120)[0]
            out.append(time.perf_counter() - t)
            assert r.status == "finished", r.error
    finally:
        hub.close_sync()
    return out


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=100)
    return {"n": len(times), "p50_ms": round(statistics.median(times) * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(daemons=1, slots=2, state_dir=Path(tmp) / "c") as c:
        hub_proc = psutil.Process(c.hub_process.pid)
        idle = rounds(c, args.rounds, Path(tmp))
        rss_idle = hub_proc.memory_info().rss
        stop, counts = threading.Event(), {}
        token = c.create_token("client", "user-b")
        threads = [threading.Thread(target=flooder, args=(c.address, token, stop, counts), daemon=True)
                   for _ in range(args.connections)]
        for t in threads:
            t.start()
        time.sleep(1)  # let every connection announce
        flooded = rounds(c, args.rounds, Path(tmp))
        rss_flood = hub_proc.memory_info().rss
        stop.set()
        for t in threads:
            t.join()
        print(json.dumps({"idle": summary(idle), "flood": summary(flooded),
                          "hub_rss_mib": {"idle": rss_idle >> 20, "flood": rss_flood >> 20},
                          "user_b_answers": counts, "connections": args.connections}, indent=1))


if __name__ == "__main__":
    sys.exit(main())

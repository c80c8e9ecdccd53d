"""How long cancelling a huge session holds up everyone else.

    python bench/cancel_stall.py [--tasks 200000]

Queues N tasks (no daemons, so they all stay queued), then cancels the whole
session while another user, in a separate process (so the client's own
decoding does not count), sends ``get_pool`` requests back to back.  Reports
how long the cancel took and the longest any single ``get_pool`` waited
meanwhile (what another user of the hub felt), next to the median
``get_pool`` round trip on an idle hub.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

from websockets.sync.client import connect

from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync


def ping(address: str, token: str, seconds: float, out: "mp.Queue") -> None:
    """Round trips of get_pool for ``seconds``: [(start, duration)]."""
    with connect(address, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None,
                 max_size=None) as ws:
        ws.send(json.dumps({"type": "hello", "version": 1}))
        ws.recv()
        waits = []
        end = time.time() + seconds
        i = 0
        while time.time() < end:
            i += 1
            t = time.time()
            ws.send(json.dumps({"type": "get_pool", "id": i}))
            ws.recv()
            waits.append((t, time.time() - t))
        out.put(waits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=200_000)
    args = ap.parse_args()
    limit = str(args.tasks + 10)
    with LocalCluster(daemons=0, hub_args=["--max-queued-tasks", limit, "--max-queued-per-user", limit]) as c:
        owner = c.hub()
        t0 = time.perf_counter()
        sub = dispatch_sync(Task(Stage("s", cmd="true")), owner, repeat=args.tasks)
        print(f"queued {args.tasks} tasks in {time.perf_counter() - t0:.1f}s")
        token = c.create_token("client", "other")
        q: mp.Queue = mp.get_context("spawn").Queue()
        idle_proc = mp.get_context("spawn").Process(target=ping, args=(c.address, token, 1.0, q))
        idle_proc.start()
        idle = [d for _, d in q.get()]
        idle_proc.join()
        pinger = mp.get_context("spawn").Process(target=ping, args=(c.address, token, 40.0, q))
        pinger.start()
        time.sleep(2.0)
        t0 = time.time()
        reply = owner.cancel_sync(session=sub.session_id)
        t1 = time.time()
        waits = [(t, d) for t, d in q.get() if t0 <= t + d and t <= t1]
        pinger.join()
        print(f"cancelled {sum(reply['by_state'].values())} tasks in {t1 - t0:.2f}s")
        print(f"get_pool round trip: idle median {statistics.median(idle) * 1e3:.2f} ms; "
              f"during the cancel: {len(waits)} requests, median {statistics.median(d for _, d in waits) * 1e3:.2f} ms, "
              f"longest {max(d for _, d in waits) * 1e3:.0f} ms")
        owner.close_sync()


if __name__ == "__main__":
    main()

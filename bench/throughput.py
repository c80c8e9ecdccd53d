"""Throughput and round-trip latency of HWF on a LocalCluster.

    python bench/throughput.py [--tasks 2000] [--daemons 2] [--slots 2] [--rtt 30]

Reports tasks/s for N trivial shell tasks (``cmd="true"``) from dispatch to
the last result, and the median round trip of one dispatch + get_result
(wait=True).  For scale, the same N ``true`` commands run through a local
``concurrent.futures`` pool of subprocesses (the floor any farm pays to fork
a shell) in the same command, and the ratio is printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync


def local_pool(n: int, workers: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda _: subprocess.run("true", shell=True, check=True), range(n)))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--daemons", type=int, default=2)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--rtt", type=int, default=30, help="round trips to time")
    args = ap.parse_args()

    with LocalCluster(daemons=args.daemons, slots=args.slots) as cluster:
        hub = cluster.hub()
        task = Task(Stage("noop", cmd="true"))
        hub.get_result_sync(dispatch_sync(task, hub, repeat=20), wait=True)  # warm-up

        t0 = time.perf_counter()
        ids = dispatch_sync(task, hub, repeat=args.tasks)
        t_sub = time.perf_counter() - t0
        res = hub.get_result_sync(ids, wait=True)
        elapsed = time.perf_counter() - t0
        ok = sum(r.ok for r in res)

        rtts = []
        for _ in range(args.rtt):
            t = time.perf_counter()
            hub.get_result_sync(dispatch_sync(task, hub), wait=True)
            rtts.append(time.perf_counter() - t)
        hub.close_sync()

    slots = args.daemons * args.slots
    floor = local_pool(args.tasks, slots)
    rate = args.tasks / elapsed
    print(f"hwf: {args.tasks} tasks ({ok} ok) on {args.daemons} daemons x {args.slots} slots: "
          f"{elapsed:.2f}s, {rate:.0f} tasks/s (submit took {t_sub:.2f}s)")
    print(f"hwf: dispatch+get_result round trip, median of {args.rtt}: "
          f"{statistics.median(rtts) * 1000:.1f} ms (min {min(rtts) * 1000:.1f} ms)")
    print(f"local ThreadPool of {slots} running the same shell commands: {floor:.0f} tasks/s")
    print(f"ratio hwf / local pool: {rate / floor:.2f}")


if __name__ == "__main__":
    main()

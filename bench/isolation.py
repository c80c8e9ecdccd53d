"""The cost of walling tasks in (daemon/isolation.py): shell ``true`` tasks per second.

    .venv/bin/python bench/isolation.py [--tasks 500] [--runs 3]

Runs, interleaved, ``--runs`` trials of ``--tasks`` tasks on
``LocalCluster(daemons=2, slots=1)`` with the daemons' ``--isolation auto``
(as root: mount + IPC namespaces, hidepid /proc, a cgroup per task, the
disk poll) and ``--isolation none``, each in a fresh cluster warmed up
first, and prints each trial and the medians.  Run it as root: otherwise
both modes are the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync


def _tree_cpu() -> float:
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def trial(mode: str, n: int, warmup: int = 20) -> dict:
    with tempfile.TemporaryDirectory(prefix="hwf-bench-iso-") as tmp:
        with LocalCluster(daemons=2, slots=1, state_dir=Path(tmp), daemon_args=["--isolation", mode]) as c:
            hub = c.hub(artifacts_dir=Path(tmp) / "artifacts")
            task = Task(Stage("noop", cmd="true"))
            hub.get_result_sync(dispatch_sync(task, hub, repeat=warmup), wait=True, timeout=300)
            cpu0 = _tree_cpu()
            t0 = time.perf_counter()
            res = hub.get_result_sync(dispatch_sync(task, hub, repeat=n), wait=True, timeout=600)
            elapsed = time.perf_counter() - t0
            cpu = _tree_cpu() - cpu0
            hub.close_sync()
    ok = sum(r.ok for r in res)
    if ok != n:
        raise SystemExit(f"--isolation {mode}: {ok} of {n} tasks finished ok")
    return {"tasks_per_s": n / elapsed, "cpu_ms_per_task": cpu / n * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("not root: --isolation auto walls nothing in here; the numbers compare nothing", file=sys.stderr)
    got: dict[str, list[dict]] = {"auto": [], "none": []}
    for run in range(args.runs):
        for mode in ("none", "auto") if run % 2 else ("auto", "none"):
            r = trial(mode, args.tasks)
            got[mode].append(r)
            print(f"run {run + 1} --isolation {mode}: {r['tasks_per_s']:.1f} tasks/s, "
                  f"{r['cpu_ms_per_task']:.2f} ms CPU per task (client, hub, daemons, spawners)", flush=True)
    for mode, rows in got.items():
        print(f"median --isolation {mode}: {statistics.median(r['tasks_per_s'] for r in rows):.1f} tasks/s, "
              f"{statistics.median(r['cpu_ms_per_task'] for r in rows):.2f} ms CPU per task")
    return 0


if __name__ == "__main__":
    sys.exit(main())

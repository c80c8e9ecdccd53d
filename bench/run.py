"""HWF against its peers (Dask distributed, ipyparallel) and the floors under them.

    make bench                        # makes .venv-bench (HWF + bench/requirements.txt), runs this
    python bench/run.py               # the full run: ~10 minutes on 2 cores
    python bench/run.py --quick       # small sizes, 1 run each: a minute or two, for iterating
    python bench/run.py --only hwf,floor --sections throughput,latency

Prints a table and writes ``bench/results/latest.json`` (``--out``): the
machine, the versions, every run's numbers and their medians.

Sections (each against its peers in the same run):

1. throughput  N shell ``true`` tasks on 2 workers: HWF (2 daemons x 1 slot),
               Dask (2 worker processes x 1 thread), ipyparallel (2 engines),
               floor = 2 processes each ``subprocess.run(["true"])`` N/2 times.
2. latency     sequential round trips of one ``true`` task; floor = a raw
               websocket echo on loopback.
3. transfer    a Data file up and an artifact back, and the same Data sent
               again (bytes the client sends are counted at its websocket);
               floor = the same bytes over a raw websocket in 1 MiB frames.
4. scale       a real hub process, simulated daemons over real websockets
               (bench/simdaemons.py), N queued tasks from one client.
5. coldstart   construction of each cluster until one task round trip works.

Method: every measurement runs in a fresh process (bench/trials.py) with
its cluster started and warmed up before the clock starts; systems are
interleaved (each round runs every system once, the order rotated by one
each round) and the reported number is the median over rounds (``--runs``,
default 3).  A peer that is not installed is reported as "not installed";
one that fails or hangs (per-trial timeout) as "failed" with its error, and
the run goes on.  Every process a trial leaves behind is stopped by PID
(this process is made a child subreaper, so orphans come back to it).

For each trial the CPU used by processes that are not this run's (other
users of the machine) is measured from /proc/stat minus our own process
tree's CPU time, and reported as "other load" in cores: numbers taken
while it is high are not comparable.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # also when loaded by path (tests/test_bench.py)
    sys.path.insert(0, str(HERE))
from trials import tree_cpu  # noqa: E402

# hwf-self: HWF with its daemons' tasks run as the daemon's own user
# (--run-as self), what a non-root user gets; run only when this is root,
# where plain "hwf" runs each task as a per-slot unprivileged user.
# hwf-noiso: HWF with its daemons' --isolation none (no namespaces, hidepid
# /proc or cgroups around tasks): what the isolation costs; root only too.
SYSTEMS = ("hwf", "hwf-self", "hwf-noiso", "dask", "ipyparallel", "floor", "hwf-chunked", "ipyparallel-chunked")
SECTIONS = {
    "throughput": ("hwf", "hwf-self", "hwf-noiso", "dask", "ipyparallel", "floor"),
    "latency": ("hwf", "hwf-self", "hwf-noiso", "dask", "ipyparallel", "floor"),
    "transfer": ("hwf", "floor"),
    "scale": ("hwf",),
    "coldstart": ("hwf", "dask", "ipyparallel"),
    # *-chunked: map(..., chunksize=N) several calls per task (Dask's client.map has no such knob).
    "functions": ("hwf", "hwf-self", "dask", "ipyparallel", "hwf-chunked", "ipyparallel-chunked"),
}
# Import name that must be present for a peer to run.
NEEDS = {"dask": "distributed", "ipyparallel": "ipyparallel", "ipyparallel-chunked": "ipyparallel"}
FULL = dict(runs=3, tasks=2000, warmup=20, rtt=200, transfer_mib=64, scale_daemons=500, scale_tasks=50_000,
            timeout=600)
QUICK = dict(runs=1, tasks=200, warmup=5, rtt=30, transfer_mib=8, scale_daemons=50, scale_tasks=2000,
             timeout=300)
# Wall-clock limit of one trial process, as a multiple of its in-trial timeout.
TRIAL_LIMIT = {"scale": 1.5, "throughput": 1.2, "latency": 1.2, "transfer": 1.2, "coldstart": 1.0,
               "functions": 1.2}


# ----------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": psutil.virtual_memory().total,
        "cpu_model": cpu_model(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": platform.platform(),
        "user": "root" if os.geteuid() == 0 else "non-root",
        "hwf_tasks_run_as": ("per-slot unprivileged users (daemons run as root)" if os.geteuid() == 0
                             else "the daemon's own user (daemons not root)"),
        "loadavg_start": os.getloadavg(),
    }


def versions() -> dict[str, Optional[str]]:
    return {d: version(d) for d in ("hwf", "dask", "distributed", "ipyparallel", "websockets", "msgspec", "psutil")}


# ------------------------------------------------------------------- processes


def become_subreaper() -> bool:
    """Orphaned descendants (a worker whose parent died) are re-parented to
    us, so every process a trial started can be found and stopped by PID."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_descendants(grace: float = 5.0) -> list[str]:
    """Stop every process below this one (all started by this run), by PID."""
    procs = psutil.Process().children(recursive=True)
    names = []
    for p in procs:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline()[:4])[:120]}")
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
    reap()
    return names


class CpuMeter:
    """CPU seconds of the whole machine and of this process tree, for 'other load'."""

    @staticmethod
    def busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    ours = staticmethod(tree_cpu)  # this process tree, reaped children included

    def __enter__(self) -> "CpuMeter":
        self.t0, self.busy0, self.ours0 = time.monotonic(), self.busy(), self.ours()
        self.load0 = os.getloadavg()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self.t0
        self.wall = wall
        self.busy_cores = (self.busy() - self.busy0) / wall
        self.our_cores = (self.ours() - self.ours0) / wall
        self.other_cores = max(0.0, self.busy_cores - self.our_cores)
        self.load1 = os.getloadavg()[0]


# ---------------------------------------------------------------------- trials


def other_load_now(seconds: float = 0.5) -> float:
    """Cores busy with processes that are not this run's, over ``seconds``."""
    b0, o0, t0 = CpuMeter.busy(), CpuMeter.ours(), time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return max(0.0, (CpuMeter.busy() - b0 - (CpuMeter.ours() - o0)) / wall)


def wait_for_quiet(limit: Optional[float], max_wait: float) -> tuple[float, Optional[float]]:
    """Wait (up to ``max_wait`` s) until other processes use at most ``limit``
    cores; returns (seconds waited, the load seen last)."""
    if limit is None:
        return 0.0, None
    t0 = time.monotonic()
    while True:
        load = other_load_now()
        if load <= limit or time.monotonic() - t0 >= max_wait:
            return time.monotonic() - t0, load


def run_trial(section: str, system: str, rnd: str, params: dict, work: Path, keep: bool) -> dict:
    tdir = work / f"{section}-{system}-r{rnd}"
    tdir.mkdir(parents=True)
    pfile, ofile, logf = tdir / "params.json", tdir / "result.json", tdir / "trial.log"
    pfile.write_text(json.dumps({**params, "tmpdir": str(tdir)}))
    limit = params["timeout"] * TRIAL_LIMIT[section] + 60
    env = dict(os.environ, IPYTHONDIR=str(work / "ipython"), PYTHONUNBUFFERED="1")
    with CpuMeter() as meter:
        with open(logf, "ab") as log:
            proc = subprocess.Popen([sys.executable, str(HERE / "trials.py"), section, system, str(pfile), str(ofile)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            proc.wait(limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGTERM)  # the trial stops its clusters in its `finally`s
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        leftovers = stop_descendants()
    if timed_out:
        result = {"ok": False, "error": f"timed out after {limit:.0f}s"}
    elif ofile.exists():
        result = json.loads(ofile.read_text())
    else:
        result = {"ok": False, "error": f"trial exited with code {proc.returncode} without a result"}
    result["wall_s"] = meter.wall
    result["other_load_cores"] = meter.other_cores
    result["machine_busy_cores"] = meter.busy_cores
    result["loadavg_1min"] = [meter.load0, meter.load1]
    if leftovers:
        result["stopped_leftovers"] = leftovers
    if not result["ok"]:
        try:
            tail = logf.read_text(errors="replace").strip().splitlines()[-15:]
        except OSError:
            tail = []
        result["log_tail"] = tail
        result["log"] = str(logf)
    if result["ok"] and not keep:
        shutil.rmtree(tdir, ignore_errors=True)
    return result


def summarize(runs: list[dict]) -> dict:
    ok = [r["metrics"] for r in runs if r["ok"]]
    out: dict[str, Any] = {"status": "ok" if len(ok) == len(runs) else ("failed" if not ok else "partly failed"),
                           "runs": runs}
    if ok:
        med: dict[str, Any] = {}
        for k, v in ok[0].items():
            vals = [m.get(k) for m in ok]
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
                med[k] = statistics.median(vals)
            else:
                med[k] = v
        out["median"] = med
        out["n_ok"] = len(ok)
    errors = [r["error"] for r in runs if not r["ok"]]
    if errors:
        out["errors"] = errors
    if runs:
        out["other_load_cores_max"] = max(r["other_load_cores"] for r in runs)
    else:
        out["status"] = "not run"
    return out


# ----------------------------------------------------------------------- table


def fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def spread(entry: dict, key: str, nd: int = 1) -> str:
    """Every run's value; '*' marks one taken while other processes used more than the limit."""
    return " / ".join(fmt(float(r["metrics"][key]), nd) + ("*" if r.get("over_load_limit") else "")
                      for r in entry.get("runs", []) if r["ok"] and r["metrics"].get(key) is not None)


def med(results: dict, section: str, system: str, key: str) -> Optional[float]:
    e = results.get(section, {}).get(system, {})
    return e.get("median", {}).get(key) if e.get("status") in ("ok", "partly failed") else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def status_note(e: dict) -> str:
    if e["status"] in ("not installed", "not run"):
        return e["status"]
    if e["status"] == "skipped":
        return "skipped: " + e.get("why", "")
    if e["status"] == "failed":
        return "FAILED: " + e.get("errors", ["?"])[0][:150]
    if e["status"] == "partly failed":
        return f"({e['n_ok']} of {len(e['runs'])} runs ok: {e['errors'][0][:100]})"
    return ""


def render(report: dict) -> str:
    m, v, cfg, res = report["machine"], report["versions"], report["config"], report["results"]
    L: list[str] = []
    add = L.append
    add(f"HWF benchmark  {report['started']}  commit {report.get('commit') or '?'}"
        f"{'  (--quick: not for reporting)' if cfg['quick'] else ''}")
    add(f"machine: {m['cores']} cores ({m['physical_cores']} physical), {m['cpu_model']}, "
        f"{m['ram_bytes'] / 2**30:.1f} GiB RAM, {m['os']}, {m['python']}")
    add("versions: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in ("hwf", "dask", "distributed",
                                                                            "ipyparallel", "websockets")))
    limit = cfg.get("max_other_load")
    add(f"method: median of {cfg['runs']} run(s) per number (runs listed as a / b / c"
        + (f"; * = taken while other processes used more than {limit} cores" if limit is not None else "")
        + "), systems interleaved, "
        f"each trial in a fresh process; HWF tasks run as {m['hwf_tasks_run_as']}"
        + ("; rows 'HWF, --run-as self': as the daemon's own user" if m.get("user") == "root" else ""))
    loads = [r["other_load_cores"] for sec in res.values() for e in sec.values() for r in e.get("runs", [])]
    if loads:
        add(f"other load (CPU used by processes not of this run, in cores, per trial): median "
            f"{statistics.median(loads):.2f}, max {max(loads):.2f}; load average {m['loadavg_start'][0]:.2f} at start, "
            f"{report['loadavg_end'][0]:.2f} at end")
        runs = [r for sec in res.values() for e in sec.values() for r in e.get("runs", [])]
        again = sum(len(r.get("discarded_for_load", [])) for r in runs)
        over = sum(1 for r in runs if r.get("over_load_limit"))
        waited = sum(r.get("waited_for_quiet_s") or 0 for r in runs)
        if limit is not None:
            add(f"load limit {limit} cores: waited {waited:.0f}s in all for a quieter machine, {again} trial(s) "
                f"run again, {over} kept over the limit (*)")

    def row(cols: list[str], widths: list[int]) -> str:
        return "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))

    names = {"hwf": "HWF", "dask": "Dask distributed", "ipyparallel": "ipyparallel"}

    if "throughput" in res:
        add("")
        add(f"1. Throughput: {cfg['tasks']} shell `true` tasks, 2 workers each (clusters warm)")
        w = [34, 9, 8, 10, 12, 22]
        add(row(["system", "tasks/s", "seconds", "HWF/this", "CPU ms/task", "runs (tasks/s)"], w))
        hwf = med(res, "throughput", "hwf", "tasks_per_s")
        for s, e in res["throughput"].items():
            label = {"floor": "floor: fork/exec `true`, 2 procs", "hwf": "HWF (2 daemons x 1 slot)",
                     "hwf-self": "HWF, --run-as self", "hwf-noiso": "HWF, --isolation none",
                     "dask": "Dask (2 procs x 1 thread)", "ipyparallel": "ipyparallel (2 engines)"}[s]
            note = status_note(e)
            if note and "median" not in e:
                add(row([label, note], [34, 40]))
                continue
            x = med(res, "throughput", s, "tasks_per_s")
            add(row([label, fmt(x), fmt(med(res, "throughput", s, "seconds"), 2),
                     fmt(ratio(hwf, x), 2) if s not in ("hwf", "hwf-self", "hwf-noiso") else "",
                     fmt(med(res, "throughput", s, "cpu_ms_per_task"), 2),
                     spread(e, "tasks_per_s", 0)], w) + (" " + note if note else ""))
        hs = med(res, "throughput", "hwf-self", "tasks_per_s")
        if hs:
            add("    HWF --run-as self over: " + ", ".join(
                f"{names.get(p, p)} {fmt(ratio(hs, med(res, 'throughput', p, 'tasks_per_s')), 2)}"
                for p in ("dask", "ipyparallel", "floor") if med(res, "throughput", p, "tasks_per_s")))
        hn = med(res, "throughput", "hwf-noiso", "tasks_per_s")
        if hn and hwf:
            add(f"    isolation's cost: HWF / HWF --isolation none = {fmt(ratio(hwf, hn), 2)} "
                f"({fmt(med(res, 'throughput', 'hwf', 'cpu_ms_per_task'), 2)} vs "
                f"{fmt(med(res, 'throughput', 'hwf-noiso', 'cpu_ms_per_task'), 2)} CPU ms/task)")
        add("    CPU ms/task: CPU time of every process of the system (client, hub/scheduler, daemons/workers, the")
        add("    `true`s) over the timed run, per task; on 2 cores a CPU-bound system tops out near 2000 / that")
    if "functions" in res:
        add("")
        add(f"1b. Python functions: {cfg['tasks']} trivial calls (`x + 1`), 2 workers each (clusters warm)")
        w = [34, 9, 8, 10, 12, 22]
        add(row(["system", "tasks/s", "seconds", "HWF/this", "CPU ms/task", "runs (tasks/s)"], w))
        hwf = med(res, "functions", "hwf", "tasks_per_s")
        chunk = max(1, cfg["tasks"] // 20)  # trials.chunksize_for: ten chunks per worker
        hwf_chunked = med(res, "functions", "hwf-chunked", "tasks_per_s")
        for s, e in res["functions"].items():
            label = {"hwf": "HWF hub.map (2 daemons x 1 slot)", "hwf-self": "HWF hub.map, --run-as self",
                     "dask": "Dask client.map", "ipyparallel": "ipyparallel map_async",
                     "hwf-chunked": f"HWF hub.map chunksize={chunk}",
                     "ipyparallel-chunked": f"ipyparallel map_async chunksize={chunk}"}[s]
            note = status_note(e)
            if note and "median" not in e:
                add(row([label, note], [34, 40]))
                continue
            x = med(res, "functions", s, "tasks_per_s")
            add(row([label, fmt(x), fmt(med(res, "functions", s, "seconds"), 2),
                     fmt(ratio(hwf_chunked if s.endswith("-chunked") else hwf, x), 2)
                     if s not in ("hwf", "hwf-self", "hwf-chunked") else "",
                     fmt(med(res, "functions", s, "cpu_ms_per_task"), 2), spread(e, "tasks_per_s", 0)], w)
                + (" " + note if note else ""))
        dask = med(res, "functions", "dask", "tasks_per_s")
        if hwf_chunked and dask:
            add(f"    HWF/this on a *-chunked row compares HWF chunked; HWF chunked / Dask client.map (no chunk knob):"
                f" {fmt(ratio(hwf_chunked, dask), 2)}")
    if "latency" in res:
        add("")
        add(f"2. Latency: {cfg['rtt']} sequential round trips of one trivial (`true`) task")
        w = [34, 10, 8, 13, 24]
        add(row(["system", "median ms", "p99 ms", "HWF/this med", "runs (median ms)"], w))
        hwf = med(res, "latency", "hwf", "median_ms")
        for s, e in res["latency"].items():
            label = {"floor": "floor: raw websocket echo", "hwf-self": "HWF, --run-as self",
                     "hwf-noiso": "HWF, --isolation none"}.get(s, names.get(s, s))
            note = status_note(e)
            if note and "median" not in e:
                add(row([label, note], [34, 40]))
                continue
            x = med(res, "latency", s, "median_ms")
            add(row([label, fmt(x, 2), fmt(med(res, "latency", s, "p99_ms"), 2),
                     fmt(ratio(hwf, x), 1) if s not in ("hwf", "hwf-self", "hwf-noiso") else "",
                     spread(e, "median_ms", 2)], w) + (" " + note if note else ""))
        if med(res, "latency", "hwf", "started_to_finished_ms") is not None:
            g = lambda k: med(res, "latency", "hwf", k)  # noqa: E731
            add(f"    HWF round trip, medians: dispatch -> daemon started it {fmt(g('dispatch_to_started_ms'), 2)} ms, "
                f"started -> finished {fmt(g('started_to_finished_ms'), 2)} ms, finished -> result in the client "
                f"{fmt(g('finished_to_result_ms'), 2)} ms")
    if "transfer" in res:
        add("")
        mib = cfg["transfer_mib"]
        add(f"3. Transfer: {mib} MiB (MB/s = 10^6 bytes/s)")
        e, f = res["transfer"].get("hwf", {}), res["transfer"].get("floor", {})
        raw_up, raw_down = med(res, "transfer", "floor", "up_MBps"), med(res, "transfer", "floor", "down_MBps")
        w = [60, 8, 8, 7]
        add(row(["what", "seconds", "MB/s", "vs raw"], w))
        if "median" in e:
            g = lambda k: med(res, "transfer", "hwf", k)  # noqa: E731
            add(row(["HWF Data up: dispatch() (sha256 + upload to hub + submit)", fmt(g("up_dispatch_s"), 2),
                     fmt(g("up_dispatch_MBps")), fmt(ratio(g("up_dispatch_MBps"), raw_up), 2)], w))
            add(row(["HWF Data up: dispatch() until the task has read it", fmt(g("up_to_task_s"), 2),
                     fmt(g("up_to_task_MBps")), fmt(ratio(g("up_to_task_MBps"), raw_up), 2)], w))
            add(row(["HWF artifact back: get_result download, hub -> client", fmt(g("down_download_s"), 2),
                     fmt(g("down_download_MBps")), fmt(ratio(g("down_download_MBps"), raw_down), 2)], w))
            add(row(["HWF artifact back: dispatch -> file on disk, minus `head -c`",
                     fmt(g("down_total_minus_command_s"), 2), fmt(g("down_total_minus_command_MBps")),
                     fmt(ratio(g("down_total_minus_command_MBps"), raw_down), 2)], w))
            add(f"    (the client's sha256 of the file alone: {fmt(g('client_sha256_s'), 2)} s; "
                f"the task's `head -c` from /dev/urandom: {fmt(g('down_command_s'), 2)} s)")
            add(f"    first dispatch: client sent {fmt(int(g('up_client_sent_bytes')))} bytes, hub blob store grew "
                f"{fmt(int(g('up_blob_store_growth_bytes')))} bytes")
            add(f"    same Data again: client sent {fmt(int(g('again_client_sent_bytes')))} bytes "
                f"(counted at the client's websocket send), blob store grew "
                f"{fmt(int(g('again_blob_store_growth_bytes')))} bytes; dispatch {fmt(g('again_dispatch_s') * 1e3, 1)} ms "
                f"(sha256 again), until read {fmt(g('again_done_s'), 2)} s")
        elif e:
            add("  HWF: " + status_note(e))
        if "median" in f:
            add(row(["floor: raw websocket up (1 MiB frames)", fmt(med(res, "transfer", "floor", "up_s"), 2),
                     fmt(raw_up), ""], w))
            add(row(["floor: raw websocket down (1 MiB frames)", fmt(med(res, "transfer", "floor", "down_s"), 2),
                     fmt(raw_down), ""], w))
            disk = med(res, "transfer", "floor", "disk_s")
            if disk is not None:
                add(row(["floor: the same bytes written to a new file", fmt(disk, 2),
                         fmt(med(res, "transfer", "floor", "disk_MBps")), ""], w))
                add(f"    (and one sha256 of them: {fmt(med(res, 'transfer', 'floor', 'sha256_s'), 2)} s; HWF writes "
                    "each file once on the hub and once at the receiver, and hashes it at both ends)")
        elif f:
            add("  floor: " + status_note(f))
    if "scale" in res:
        add("")
        e = res["scale"].get("hwf", {})
        add(f"4. Scale: a hub process, {cfg['scale_daemons']} simulated daemons (1 slot each, real websockets), "
            f"{cfg['scale_tasks']:,} tasks from one client")
        if "median" in e:
            g = lambda k: med(res, "scale", "hwf", k)  # noqa: E731
            add(f"  {cfg['scale_daemons']} daemons connected + registered: {fmt(g('register_s'), 2)} s")
            add(f"  accept {cfg['scale_tasks']:,} tasks (dispatch_sync, {int(g('submits'))} submits): "
                f"{fmt(g('accept_s'), 2)} s = {fmt(g('accept_tasks_per_s'))} tasks/s   runs: {spread(e, 'accept_s', 2)} s")
            add(f"    CPU meanwhile: client {fmt(g('accept_client_cpu_s'), 2)} s (building, encoding), "
                f"hub {fmt(g('accept_hub_cpu_s'), 2)} s (decoding, storing, scheduling the first chunks)")
            add(f"  scheduling decisions (assignments received by the daemons) per s: "
                f"{fmt(g('assignments_per_s'))}   runs: {spread(e, 'assignments_per_s', 0)}")
            add(f"    assignments per s in the first 5 s: {fmt(g('assigns_per_s_first_5s'))}, in the last 5 s: "
                f"{fmt(g('assigns_per_s_last_5s'))}")
            add(f"  submit start -> last task_done acked: {fmt(g('end_to_end_s'), 1)} s = "
                f"{fmt(g('end_to_end_tasks_per_s'))} tasks/s")
            add(f"  hub peak RSS: {g('hub_peak_rss_bytes') / 2**20:.0f} MiB ({e['median']['hub_peak_rss_source']}; "
                f"{g('hub_rss_registered_bytes') / 2**20:.0f} MiB with the daemons registered, before the submit)")
            add(f"  CPU from submit to the last ack: hub {fmt(g('hub_cpu_s'), 1)} s "
                f"({g('hub_cpu_s') / g('end_to_end_s') * 100:.0f}% of a core), simulator {fmt(g('sim_cpu_s'), 1)} s "
                f"({g('sim_cpu_s') / g('end_to_end_s') * 100:.0f}%)")
        if e and status_note(e):
            add("  " + status_note(e))
    if "coldstart" in res:
        add("")
        add("5. Cold start: construction -> first task round trip (imports done before)")
        w = [34, 9, 12, 9, 22]
        add(row(["system", "seconds", "cluster up s", "close s", "runs (s)"], w))
        for s, e in res["coldstart"].items():
            label = {"hwf": "HWF LocalCluster(daemons=2)", "dask": "Dask LocalCluster(n_workers=2)",
                     "ipyparallel": "ipyparallel Cluster(n=2)"}[s]
            note = status_note(e)
            if note and "median" not in e:
                add(row([label, note], [34, 40]))
                continue
            add(row([label, fmt(med(res, "coldstart", s, "seconds"), 2), fmt(med(res, "coldstart", s, "cluster_up_s"), 2),
                     fmt(med(res, "coldstart", s, "close_s"), 2), spread(e, "seconds", 2)], w) + (" " + note if note else ""))
    add("")
    add(f"total {report['duration_s'] / 60:.1f} min; JSON: {report['out']}")
    return "\n".join(L)


# ------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="HWF vs Dask distributed vs ipyparallel, and the floors",
                                 epilog="sizes default to the full run; --quick picks small ones")
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 run: a fast pass while iterating")
    ap.add_argument("--only", default=",".join(SYSTEMS), help=f"systems, comma-separated ({','.join(SYSTEMS)})")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated ({','.join(SECTIONS)})")
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"default {v} (--quick: {QUICK[k]})")
    ap.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    ap.add_argument("--max-other-load", type=float, default=0.3, metavar="CORES",
                    help="before each trial wait (up to --max-wait s) until other processes use at most this "
                         "many cores, and run a trial again (up to --retries times) when they used more "
                         "meanwhile; -1: never wait (default 0.3)")
    ap.add_argument("--max-wait", type=float, default=120.0)
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep every trial's dir and log (failed ones are kept anyway)")
    args = ap.parse_args(argv)

    if args.max_other_load is not None and args.max_other_load < 0:
        args.max_other_load = None
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in only:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}")
    for s in sections:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}")
    cfg = dict(QUICK if args.quick else FULL)
    for k in FULL:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    cfg["quick"] = args.quick
    cfg["max_other_load"] = args.max_other_load
    params = {k: cfg[k] for k in ("tasks", "warmup", "rtt", "scale_daemons", "scale_tasks", "timeout")}
    params["transfer_bytes"] = cfg["transfer_mib"] * 2**20

    become_subreaper()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 4 * cfg["scale_daemons"] + 1024))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    started = time.time()
    report: dict[str, Any] = {
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "versions": versions(),
        "config": {**cfg, "sections": sections, "systems": only},
        "results": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["out"] = str(out)
    work = Path(tempfile.mkdtemp(prefix="hwf-bench-"))
    failures = hwf_failed = False
    try:
        for section in sections:
            systems = [s for s in SECTIONS[section] if s in only]
            res: dict[str, dict] = {}
            runnable = []
            for s in systems:
                need = NEEDS.get(s)
                if need and importlib.util.find_spec(need) is None:
                    res[s] = {"status": "not installed", "needs": need}
                elif s in ("hwf-self", "hwf-noiso") and os.geteuid() != 0:
                    res[s] = {"status": "skipped", "why": "not root: plain hwf already runs tasks as this user"}
                else:
                    res[s] = {"runs": []}
                    runnable.append(s)
            report["results"][section] = res
            for rnd in range(cfg["runs"]):
                k = rnd % len(runnable) if runnable else 0
                for s in runnable[k:] + runnable[:k]:
                    tries: list[dict] = []
                    for attempt in range(1 + args.retries):
                        waited, before = wait_for_quiet(args.max_other_load, args.max_wait)
                        print(f"[{time.time() - started:6.0f}s] {section} {s} run {rnd + 1}/{cfg['runs']}"
                              f"{f' (again: {attempt})' if attempt else ''}"
                              f"{f' after waiting {waited:.0f}s for a quieter machine' if waited >= 2 else ''} ...",
                              end=" ", flush=True)
                        r = run_trial(section, s, f"{rnd}.{attempt}", params, work, args.keep)
                        r["other_load_before_cores"] = before
                        r["waited_for_quiet_s"] = waited
                        loud = args.max_other_load is not None and r["other_load_cores"] > args.max_other_load
                        r["over_load_limit"] = loud
                        print(f"{'ok' if r['ok'] else 'FAILED: ' + r['error'][:200]} ({r['wall_s']:.0f}s, "
                              f"other load {r['other_load_cores']:.2f} cores"
                              f"{', over the limit' if loud else ''})", flush=True)
                        tries.append(r)
                        if not (loud and r["ok"]):
                            break
                    # Every try over the limit: keep the least disturbed one (chosen by load, not by result).
                    r = min(tries, key=lambda t: t["other_load_cores"]) if all(t["ok"] for t in tries) else r
                    discarded = [{k: t[k] for k in ("metrics", "other_load_cores", "wall_s") if k in t}
                                 for t in tries if t is not r]
                    if discarded:
                        r["discarded_for_load"] = discarded
                    res[s]["runs"].append(r)
                    failures |= not r["ok"]
                    hwf_failed |= s == "hwf" and not r["ok"]
            for s in runnable:
                res[s] = summarize(res[s]["runs"])
    finally:
        stop_descendants()
        for section_res in report["results"].values():
            for s, e in section_res.items():
                if "status" not in e:  # interrupted before its section ended
                    section_res[s] = summarize(e["runs"])
        report["loadavg_end"] = os.getloadavg()
        report["duration_s"] = time.time() - started
        if not failures:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report["kept_trial_dirs"] = str(work)
        ratios = {}
        R = report["results"]
        for h in ("hwf", "hwf-self", "hwf-noiso"):
            for peer in ("dask", "ipyparallel", "floor"):
                name = f"{h.replace('-', '_')}_over_{peer}"
                ratios[f"throughput_{name}"] = ratio(med(R, "throughput", h, "tasks_per_s"),
                                                     med(R, "throughput", peer, "tasks_per_s"))
                ratios[f"latency_median_{name}"] = ratio(med(R, "latency", h, "median_ms"),
                                                         med(R, "latency", peer, "median_ms"))
        for h in ("hwf", "hwf_chunked"):
            for peer in ("dask", "ipyparallel", "ipyparallel-chunked"):
                ratios[f"functions_{h}_over_{peer.replace('-', '_')}"] = ratio(
                    med(R, "functions", h.replace("_", "-"), "tasks_per_s"), med(R, "functions", peer, "tasks_per_s"))
        ratios["upload_hwf_over_raw"] = ratio(med(R, "transfer", "hwf", "up_dispatch_MBps"),
                                              med(R, "transfer", "floor", "up_MBps"))
        ratios["download_hwf_over_raw"] = ratio(med(R, "transfer", "hwf", "down_download_MBps"),
                                                med(R, "transfer", "floor", "down_MBps"))
        report["ratios"] = ratios
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print()
    print(render(report))
    if failures:
        print(f"\nsome trials failed; their dirs and logs are kept in {work}")
    return 1 if hwf_failed else 0


if __name__ == "__main__":
    sys.exit(main())

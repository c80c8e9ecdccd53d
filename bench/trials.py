"""One measurement of one system, run in its own process by bench/run.py.

    python bench/trials.py SECTION SYSTEM PARAMS.json OUT.json

Writes ``{"ok": true, "metrics": {...}}`` or ``{"ok": false, "error": ...}``
to OUT.json.  A fresh process per trial keeps the systems apart (no threads,
imports or sockets left over from the previous one) and lets run.py stop a
hung trial, and everything it started, by PID.

Every cluster is started and warmed up *before* its clock starts (cold start
is its own section), and stopped in a ``finally``.  Imports are done before
timing too: the cold-start numbers are from construction to a working round
trip, not from ``python`` starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

HERE = Path(__file__).resolve().parent
TRUE = ["true"]
MB = 1e6


class TrialError(RuntimeError):
    pass


# --------------------------------------------------------------------- helpers


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def latency_stats(rtts: list[float]) -> dict[str, float]:
    return {"n": len(rtts), "median_ms": statistics.median(rtts) * 1e3, "p99_ms": pct(rtts, 99) * 1e3,
            "min_ms": min(rtts) * 1e3, "max_ms": max(rtts) * 1e3}


def wait_file(path: Path, proc: subprocess.Popen, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise TrialError(f"{what} exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TrialError(f"{what} not ready within {timeout:.0f}s")
        time.sleep(0.02)
    return path.read_text()


def stop(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def raw_server(tmp: Path) -> Iterator[str]:
    """A bench/rawws.py server in its own process; yields its ws:// URL."""
    ready = tmp / "rawws.ready"
    with open(tmp / "rawws.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, str(HERE / "rawws.py"), "--ready-file", str(ready)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        host, port = wait_file(ready, proc, 30, "raw websocket server").split()
        yield f"ws://{host}:{port}"
    finally:
        stop(proc)


def tree_cpu() -> float:
    """CPU seconds of this process and all its descendants, reaped ones included
    (``children_*``): the whole cluster a trial started, client included."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


# ------------------------------------------------------------------------- HWF


def hwf_cluster(tmp: Path, *, as_self: bool = False, isolation: Optional[str] = None, **kw: Any):
    """A LocalCluster; ``as_self`` adds ``--run-as self`` to its daemons (tasks
    run as the daemon's own user, what a non-root user always gets), through
    LocalCluster's private ``_spawn``: if that changes, the trial fails and says so.
    ``isolation="none"``: the daemons put no walls around tasks (what isolation costs)."""
    from hwf_jupyter import LocalCluster

    if isolation is not None:
        kw["daemon_args"] = [*kw.get("daemon_args", ()), "--isolation", isolation]
    if not as_self:
        return LocalCluster(state_dir=tmp / "hwf", **kw)

    class SelfUserCluster(LocalCluster):
        def _spawn(self, name: str, args: list, *rest: Any, **kws: Any) -> Any:
            module = kws.get("module", rest[0] if rest else None)
            if module == "hwf_daemon":
                args = [*args, "--run-as", "self"]
            return super()._spawn(name, args, *rest, **kws)

    return SelfUserCluster(state_dir=tmp / "hwf", **kw)


def hwf_check_user(hub: Any, as_self: bool, timeout: float) -> str:
    """Which uid tasks run as, checked: per-slot users unless ``as_self`` (or not root)."""
    from hwf_jupyter import Stage, Task, dispatch_sync

    r = hub.get_result_sync(dispatch_sync(Task(Stage("uid", cmd="id -u")), hub), wait=True, timeout=timeout)[0]
    uid = r.stages[0].commands[0].stdout.strip() if r.ok else "?"
    if os.geteuid() == 0 and (uid == "0") != as_self:
        raise TrialError(f"tasks run as uid {uid}, expected {'0' if as_self else 'a per-slot uid'}")
    if uid == str(os.geteuid()):
        return f"the daemon's own user (uid {uid})"
    return f"per-slot users (uid {uid}; the daemon is root)"


def hwf_throughput(P: dict, as_self: bool = False, isolation: Optional[str] = None) -> dict:
    from hwf_jupyter import Stage, Task, dispatch_sync

    n = P["tasks"]
    with hwf_cluster(P["tmp"], as_self=as_self, isolation=isolation, daemons=2, slots=1) as c:
        hub = c.hub(artifacts_dir=P["tmp"] / "artifacts")
        run_as = hwf_check_user(hub, as_self, P["timeout"])
        task = Task(Stage("noop", cmd="true"))
        hub.get_result_sync(dispatch_sync(task, hub, repeat=P["warmup"]), wait=True, timeout=P["timeout"])
        cpu0 = tree_cpu()
        t0 = time.perf_counter()
        ids = dispatch_sync(task, hub, repeat=n)
        submitted = time.perf_counter() - t0
        res = hub.get_result_sync(ids, wait=True, timeout=P["timeout"])
        elapsed = time.perf_counter() - t0
        cpu = tree_cpu() - cpu0
        hub.close_sync()
    ok = sum(r.ok for r in res)
    if ok != n:
        raise TrialError(f"{ok} of {n} tasks finished ok")
    machines = sorted({r.machine for r in res if r.machine})
    return {"tasks": n, "seconds": elapsed, "tasks_per_s": n / elapsed, "submit_s": submitted,
            "cpu_ms_per_task": cpu / n * 1e3, "workers": 2, "layout": "2 daemons x 1 slot", "machines_used": len(machines),
            "tasks_run_as": run_as}


def hwf_latency(P: dict, as_self: bool = False, isolation: Optional[str] = None) -> dict:
    from hwf_jupyter import Stage, Task, dispatch_sync

    with hwf_cluster(P["tmp"], as_self=as_self, isolation=isolation, daemons=2, slots=1) as c:
        hub = c.hub(artifacts_dir=P["tmp"] / "artifacts")
        run_as = hwf_check_user(hub, as_self, P["timeout"])
        task = Task(Stage("noop", cmd="true"))
        for _ in range(P["warmup"]):
            hub.get_result_sync(dispatch_sync(task, hub), wait=True, timeout=P["timeout"])
        rtts, to_start, running = [], [], []
        for _ in range(P["rtt"]):
            w = time.time()
            t = time.perf_counter()
            res = hub.get_result_sync(dispatch_sync(task, hub), wait=True, timeout=P["timeout"])
            rtts.append(time.perf_counter() - t)
            r = res[0]
            if not r.ok:
                raise TrialError(f"a round-trip task failed: {r!r}")
            # Where the time goes (wall clocks of client, hub and daemon: one machine, one clock).
            to_start.append(r.started - w)
            running.append(r.finished - r.started)
        hub.close_sync()
    rest = [a - b - c for a, b, c in zip(rtts, to_start, running)]
    return {**latency_stats(rtts), "how": "dispatch_sync + get_result_sync(wait=True)", "tasks_run_as": run_as,
            "dispatch_to_started_ms": statistics.median(to_start) * 1e3,
            "started_to_finished_ms": statistics.median(running) * 1e3,
            "finished_to_result_ms": statistics.median(rest) * 1e3}


def hwf_coldstart(P: dict) -> dict:
    from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync

    task = Task(Stage("noop", cmd="true"))
    t0 = time.perf_counter()
    c = LocalCluster(daemons=2, state_dir=P["tmp"] / "hwf")
    try:
        started = time.perf_counter() - t0
        hub = c.hub(artifacts_dir=P["tmp"] / "artifacts")
        res = hub.get_result_sync(dispatch_sync(task, hub), wait=True, timeout=P["timeout"])
        elapsed = time.perf_counter() - t0
        if not res[0].ok:
            raise TrialError(f"the first task failed: {res[0]!r}")
        hub.close_sync()
    finally:
        t1 = time.perf_counter()
        c.close()
        closed = time.perf_counter() - t1
    return {"seconds": elapsed, "cluster_up_s": started, "close_s": closed,
            "how": "LocalCluster(daemons=2) -> first dispatch + get_result(wait=True)"}


class SendCounter:
    """Counts the bytes this process's websocket *clients* hand to ``send``:
    what HWF's client actually puts on the wire (payloads, before framing)."""

    def __init__(self) -> None:
        from websockets.asyncio.client import ClientConnection

        self.bytes = 0
        self.frames = 0
        self.cls = ClientConnection
        self.orig = ClientConnection.send
        counter = self

        async def send(conn: Any, message: Any, text: Optional[bool] = None) -> None:
            if isinstance(message, str):
                counter.bytes += len(message.encode())
            elif isinstance(message, (bytes, bytearray, memoryview)):
                counter.bytes += memoryview(message).nbytes
            counter.frames += 1
            return await counter.orig(conn, message, text=text)

        ClientConnection.send = send  # type: ignore[method-assign]

    def restore(self) -> None:
        self.cls.send = self.orig  # type: ignore[method-assign]


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def hwf_transfer(P: dict) -> dict:
    from hub_server.blobs import file_sha256
    from hwf_jupyter import Artifacts, Data, Stage, Task, dispatch_sync

    size = P["transfer_bytes"]
    src = P["tmp"] / "payload.bin"
    with open(src, "wb") as f:
        for _ in range(0, size, 2**20):
            f.write(os.urandom(min(2**20, size - f.tell())))
    t = time.perf_counter()
    file_sha256(src)
    sha_s = time.perf_counter() - t
    counter = SendCounter()
    try:
        with hwf_cluster(P["tmp"], daemons=1, slots=1) as c:
            blobs = c.state_dir / "blobs"
            hub = c.hub(artifacts_dir=P["tmp"] / "artifacts")
            hub.get_result_sync(dispatch_sync(Task(Stage("warm", cmd="true")), hub), wait=True,
                                timeout=P["timeout"])
            read = Task(Stage("read", data=[Data(src, "in.bin")], cmd="wc -c < in.bin"))

            def up() -> dict:
                sent0, store0 = counter.bytes, tree_bytes(blobs)
                t0 = time.perf_counter()
                ids = dispatch_sync(read, hub)
                t_dispatch = time.perf_counter() - t0
                res = hub.get_result_sync(ids, wait=True, timeout=P["timeout"])
                t_done = time.perf_counter() - t0
                out = res[0].stages[0].commands[0].stdout.strip() if res[0].ok else ""
                if out != str(size):
                    raise TrialError(f"the reading task saw {out!r}, not {size} bytes: {res[0]!r}")
                return {"dispatch_s": t_dispatch, "done_s": t_done, "client_sent_bytes": counter.bytes - sent0,
                        "blob_store_growth_bytes": tree_bytes(blobs) - store0,
                        "command_s": res[0].stages[0].duration}

            first = up()
            second = up()  # the same Data again: the hub has it, nothing should move

            write = Task(Stage("write", cmd=f"head -c {size} /dev/urandom > out.bin"), Artifacts("out.bin"))
            t0 = time.perf_counter()
            ids = dispatch_sync(write, hub)
            res = hub.get_result_sync(ids, wait=True, timeout=P["timeout"], download=False)
            t_done = time.perf_counter() - t0
            if not res[0].ok:
                raise TrialError(f"the writing task failed: {res[0]!r}")
            t1 = time.perf_counter()
            res = hub.get_result_sync(ids, timeout=P["timeout"])
            t_down = time.perf_counter() - t1
            art = res[0].artifacts[0]
            if art.path is None or art.path.stat().st_size != size:
                raise TrialError(f"artifact not downloaded whole: {art!r}")
            cmd_s = res[0].stages[0].duration or 0.0
            hub.close_sync()
    finally:
        counter.restore()
    return {
        "bytes": size,
        "client_sha256_s": sha_s,
        # up: dispatch() = hash + blobs_missing + upload to the hub + submit
        "up_dispatch_s": first["dispatch_s"],
        "up_dispatch_MBps": size / MB / first["dispatch_s"],
        # up: to the task having read it = also hub -> daemon, hash check, copy into the task dir
        "up_to_task_s": first["done_s"],
        "up_to_task_MBps": size / MB / first["done_s"],
        "up_client_sent_bytes": first["client_sent_bytes"],
        "up_blob_store_growth_bytes": first["blob_store_growth_bytes"],
        "again_dispatch_s": second["dispatch_s"],
        "again_done_s": second["done_s"],
        "again_client_sent_bytes": second["client_sent_bytes"],
        "again_blob_store_growth_bytes": second["blob_store_growth_bytes"],
        # back: the task writes the file (command_s), the daemon uploads it to the hub (task done), ...
        "down_command_s": cmd_s,
        "down_task_done_s": t_done,
        # ... then get_result downloads it hub -> client (written to disk, hash checked)
        "down_download_s": t_down,
        "down_download_MBps": size / MB / t_down,
        "down_total_minus_command_s": t_done - cmd_s + t_down,
        "down_total_minus_command_MBps": size / MB / (t_done - cmd_s + t_down),
    }


# -------------------------------------------------------------------- HWF scale


def hwf_scale(P: dict) -> dict:
    import psutil

    from hwf_jupyter import Hub, Stage, Task, dispatch_sync

    tmp, n, nd = P["tmp"], P["scale_tasks"], P["scale_daemons"]
    state = tmp / "hub-state"
    hwf = Path(sys.executable).with_name("hwf")
    tok_cmd = [str(hwf)] if hwf.exists() else [sys.executable, "-m", "hwf_jupyter.cli"]

    def token(*args: str) -> str:
        out = subprocess.run([*tok_cmd, "token", "create", *args, "--state-dir", str(state)],
                             check=True, capture_output=True, text=True, timeout=60)
        return out.stdout.strip().splitlines()[-1]

    daemon_token = token("--role", "daemon", "--owner", "sim")
    client_token = token("--role", "client", "--user", "bench")
    tok_file = tmp / "daemon.token"
    tok_file.write_text(daemon_token)
    tok_file.chmod(0o600)
    limit = str(max(n + 1000, 50_000))
    hub_cmd = [sys.executable, "-m", "hub_server", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
               "--state-dir", str(state), "--ready-file", str(tmp / "hub.ready"),
               "--max-queued-per-user", limit, "--max-queued-tasks", str(max(n + 1000, 200_000)),
               "--parent-pid", str(os.getpid())]
    hub_proc = sim = None
    peak = {"rss": 0}
    sampling = threading.Event()
    try:
        with open(tmp / "hub.log", "ab") as log:
            hub_proc = subprocess.Popen(hub_cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        host, port = wait_file(tmp / "hub.ready", hub_proc, 60, "hub").split()
        url = f"ws://{host}:{port}"
        hp = psutil.Process(hub_proc.pid)

        def sample() -> None:
            while not sampling.is_set():
                with contextlib.suppress(psutil.Error):
                    peak["rss"] = max(peak["rss"], hp.memory_info().rss)
                sampling.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with open(tmp / "sim.log", "ab") as log:
            sim = subprocess.Popen(
                [sys.executable, str(HERE / "simdaemons.py"), "--hub", url, "--token-file", str(tok_file),
                 "--daemons", str(nd), "--expect", str(n), "--ready-file", str(tmp / "sim.ready"),
                 "--out", str(tmp / "sim.json")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ready = json.loads(wait_file(tmp / "sim.ready", sim, P["timeout"], "simulated daemons"))
        rss_registered = hp.memory_info().rss
        hub_cpu0 = sum(hp.cpu_times()[:2])
        sim_p = psutil.Process(sim.pid)
        sim_cpu0 = sum(sim_p.cpu_times()[:2])

        hub = Hub(url, token=client_token, artifacts_dir=tmp / "artifacts")
        pool = hub.get_hardware_pool_sync()
        if len(pool) != nd:
            raise TrialError(f"the hub lists {len(pool)} machines, not {nd}")
        task = Task(Stage("s", cmd="true"))
        me = psutil.Process()
        client_cpu0, hub_cpu_a = sum(me.cpu_times()[:2]), sum(hp.cpu_times()[:2])
        w0 = time.time()
        t0 = time.perf_counter()
        sub = dispatch_sync(task, hub, repeat=n)
        accept_s = time.perf_counter() - t0
        # Where accepting went: this process (building and encoding the specs) and the hub
        # (decoding, checking, storing; and already scheduling the first chunks meanwhile).
        accept_client_cpu = sum(me.cpu_times()[:2]) - client_cpu0
        accept_hub_cpu = sum(hp.cpu_times()[:2]) - hub_cpu_a
        chunks = math.ceil(n / hub.limits.max_tasks_per_submit)
        try:
            sim.wait(P["timeout"])
        except subprocess.TimeoutExpired:
            stop(sim, signal.SIGTERM)
            raise TrialError(f"the simulated daemons did not get {n} tasks done within {P['timeout']}s; "
                             f"see {tmp / 'sim.json'}") from None
        stats = json.loads((tmp / "sim.json").read_text())
        hub_cpu = sum(hp.cpu_times()[:2]) - hub_cpu0
        sim_cpu = stats["cpu_s"] - sim_cpu0
        counts = hub.session_sync(sub.session_id).counts
        hub.close_sync()
        hwm = None
        with contextlib.suppress(OSError, ValueError, StopIteration):
            line = next(x for x in open(f"/proc/{hub_proc.pid}/status") if x.startswith("VmHWM:"))
            hwm = int(line.split()[1]) * 1024
        sampling.set()
    finally:
        sampling.set()
        stop(sim)
        stop(hub_proc, signal.SIGINT)
    if counts.get("finished") != n or stats["n_errors"] or stats["n_lost"]:
        raise TrialError(f"hub counts {counts}; simulator: {stats['n_errors']} errors {stats['errors'][:3]}, "
                         f"{stats['n_lost']} lost connections {stats['lost'][:3]}")
    window = stats["last_assign"] - stats["first_assign"]
    end = stats["last_ack"] - w0
    return {
        "daemons": nd, "tasks": n, "submits": chunks,
        "register_s": ready["register_s"],
        "accept_s": accept_s, "accept_tasks_per_s": n / accept_s,
        "accept_client_cpu_s": accept_client_cpu, "accept_hub_cpu_s": accept_hub_cpu,
        "assignments": stats["assigns"],
        "assign_window_s": window,
        "assignments_per_s": stats["assigns"] / window if window > 0 else None,
        "end_to_end_s": end, "end_to_end_tasks_per_s": n / end,
        "hub_cpu_s": hub_cpu, "sim_cpu_s": sim_cpu,
        "hub_rss_registered_bytes": rss_registered,
        # The kernel updates VmHWM lazily: the peak is the larger of it and the samples.
        "hub_peak_rss_bytes": max(hwm or 0, peak["rss"]),
        "hub_peak_rss_source": "max of VmHWM and psutil samples every 50 ms",
        "hub_vmhwm_bytes": hwm,
        "hub_peak_rss_sampled_bytes": peak["rss"],
        "heartbeats": stats["heartbeats"],
        # Does the rate hold as the queue drains? Assignments per second in the first and
        # last 5 whole seconds (the last, partial second left out).
        "assigns_per_s_first_5s": _mean(stats["assigns_per_second"][:5]),
        "assigns_per_s_last_5s": _mean(stats["assigns_per_second"][-6:-1]),
        "assigns_per_second": stats["assigns_per_second"],
    }


def _mean(xs: list) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------------ Dask


@contextlib.contextmanager
def dask_client(**kw: Any) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, processes=True, host="127.0.0.1", dashboard_address=None, **kw)
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def dask_throughput(P: dict) -> dict:
    n = P["tasks"]
    with dask_client(threads_per_worker=1) as client:
        client.gather(client.map(subprocess.call, [TRUE] * P["warmup"], pure=False))
        cpu0 = tree_cpu()
        t0 = time.perf_counter()
        res = client.gather(client.map(subprocess.call, [TRUE] * n, pure=False))
        elapsed = time.perf_counter() - t0
        cpu = tree_cpu() - cpu0
    if sum(1 for r in res if r == 0) != n:
        raise TrialError("some tasks failed")
    return {"tasks": n, "seconds": elapsed, "tasks_per_s": n / elapsed, "cpu_ms_per_task": cpu / n * 1e3,
            "workers": 2, "layout": "2 worker processes x 1 thread", "how": "client.map(subprocess.call, [['true']]*N)"}


def dask_latency(P: dict) -> dict:
    with dask_client(threads_per_worker=1) as client:
        for _ in range(P["warmup"]):
            client.submit(subprocess.call, TRUE, pure=False).result()
        rtts = []
        for _ in range(P["rtt"]):
            t = time.perf_counter()
            r = client.submit(subprocess.call, TRUE, pure=False).result()
            rtts.append(time.perf_counter() - t)
            if r != 0:
                raise TrialError("a round-trip task failed")
    return {**latency_stats(rtts), "how": "client.submit(subprocess.call, ['true']).result()"}


def dask_coldstart(P: dict) -> dict:
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=2, processes=True, host="127.0.0.1", dashboard_address=None)
    client = None
    try:
        client = Client(cluster)
        started = time.perf_counter() - t0
        if client.submit(subprocess.call, TRUE, pure=False).result() != 0:
            raise TrialError("the first task failed")
        elapsed = time.perf_counter() - t0
    finally:
        t1 = time.perf_counter()
        if client is not None:
            client.close()
        cluster.close()
        closed = time.perf_counter() - t1
    return {"seconds": elapsed, "cluster_up_s": started, "close_s": closed,
            "how": "LocalCluster(n_workers=2) + Client -> submit().result()"}


# ----------------------------------------------------------------- ipyparallel


def ipp_profile() -> None:
    """The IPython profile dir is made before timing (run.py points IPYTHONDIR at a temp dir)."""
    from IPython.core.profiledir import ProfileDir, ProfileDirError

    ipdir = os.environ.get("IPYTHONDIR") or os.path.expanduser("~/.ipython")
    os.makedirs(ipdir, exist_ok=True)
    try:
        ProfileDir.find_profile_dir_by_name(ipdir, "default")
    except ProfileDirError:
        ProfileDir.create_profile_dir_by_name(ipdir, "default")


@contextlib.contextmanager
def ipp_view() -> Iterator[Any]:
    import ipyparallel as ipp

    ipp_profile()
    cluster = ipp.Cluster(n=2)
    rc = None
    try:
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(2, timeout=120)
        yield rc.load_balanced_view()
    finally:
        if rc is not None:
            rc.close()
        cluster.stop_cluster_sync()


def ipp_throughput(P: dict) -> dict:
    n = P["tasks"]
    with ipp_view() as view:
        view.map_sync(subprocess.call, [TRUE] * P["warmup"])
        cpu0 = tree_cpu()
        t0 = time.perf_counter()
        res = view.map_async(subprocess.call, [TRUE] * n, chunksize=1).get(timeout=P["timeout"])
        elapsed = time.perf_counter() - t0
        cpu = tree_cpu() - cpu0
    if sum(1 for r in res if r == 0) != n:
        raise TrialError("some tasks failed")
    return {"tasks": n, "seconds": elapsed, "tasks_per_s": n / elapsed, "cpu_ms_per_task": cpu / n * 1e3,
            "workers": 2, "layout": "2 engines", "how": "load_balanced_view().map_async(subprocess.call, ..., chunksize=1)"}


def ipp_latency(P: dict) -> dict:
    with ipp_view() as view:
        for _ in range(P["warmup"]):
            view.apply_sync(subprocess.call, TRUE)
        rtts = []
        for _ in range(P["rtt"]):
            t = time.perf_counter()
            r = view.apply_sync(subprocess.call, TRUE)
            rtts.append(time.perf_counter() - t)
            if r != 0:
                raise TrialError("a round-trip task failed")
    return {**latency_stats(rtts), "how": "load_balanced_view().apply_sync(subprocess.call, ['true'])"}


def ipp_coldstart(P: dict) -> dict:
    import ipyparallel as ipp

    ipp_profile()
    t0 = time.perf_counter()
    cluster = ipp.Cluster(n=2)
    rc = None
    try:
        rc = cluster.start_and_connect_sync()
        started = time.perf_counter() - t0
        if rc.load_balanced_view().apply_sync(subprocess.call, TRUE) != 0:
            raise TrialError("the first task failed")
        elapsed = time.perf_counter() - t0
    finally:
        t1 = time.perf_counter()
        if rc is not None:
            rc.close()
        cluster.stop_cluster_sync()
        closed = time.perf_counter() - t1
    return {"seconds": elapsed, "cluster_up_s": started, "close_s": closed,
            "how": "Cluster(n=2).start_and_connect_sync() -> apply_sync()"}


# ---------------------------------------------------------------------- floors


def run_trues(n: int) -> int:
    failed = 0
    for _ in range(n):
        failed += subprocess.run(TRUE).returncode != 0
    return failed


def floor_throughput(P: dict) -> dict:
    import multiprocessing as mp

    n = P["tasks"]
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(run_trues, [1, 1]))  # both workers up
        cpu0 = tree_cpu()
        t0 = time.perf_counter()
        failed = sum(ex.map(run_trues, [n // 2, n - n // 2]))
        elapsed = time.perf_counter() - t0
        cpu = tree_cpu() - cpu0
    if failed:
        raise TrialError(f"{failed} `true` runs failed")
    return {"tasks": n, "seconds": elapsed, "tasks_per_s": n / elapsed, "cpu_ms_per_task": cpu / n * 1e3,
            "workers": 2, "layout": "2 processes", "how": "2 processes, each subprocess.run(['true']) N/2 times"}


def floor_latency(P: dict) -> dict:
    async def go(url: str) -> list[float]:
        from rawws import Client

        async with Client(url) as c:
            await c.echo_rtts(P["warmup"])
            return await c.echo_rtts(P["rtt"])

    with raw_server(P["tmp"]) as url:
        rtts = asyncio.run(go(url))
    return {**latency_stats(rtts), "how": "websockets echo of a 105-byte text frame, server in another process"}


def floor_transfer(P: dict) -> dict:
    size, chunk = P["transfer_bytes"], 2**20
    data = os.urandom(size)

    async def go(url: str) -> tuple[float, float]:
        from rawws import Client

        async with Client(url) as c:
            await c.upload(data[:chunk], chunk)  # warm
            return await c.upload(data, chunk), await c.download(size, chunk)

    with raw_server(P["tmp"]) as url:
        up, down = asyncio.run(go(url))
    disk_s, sha_s = disk_floor(data, Path(P["tmp"]), chunk)
    return {"bytes": size, "up_s": up, "up_MBps": size / MB / up, "down_s": down, "down_MBps": size / MB / down,
            "disk_s": disk_s, "disk_MBps": size / MB / disk_s, "sha256_s": sha_s,
            "how": "websockets, 1 MiB binary frames, server in another process, no disk or hashing"}


def disk_floor(data: bytes, tmp: Path, chunk: int) -> tuple[float, float]:
    """What any store-to-disk transfer pays on this machine: the same bytes
    written to a new file in 1 MiB writes (as the hub and the client do; once
    dirty pages pile up the kernel throttles the writer to the disk's speed),
    after a first file has filled the dirty-page allowance; and one sha256."""
    view = memoryview(data)
    times = []
    for i in range(2):
        path = tmp / f"disk-floor-{i}"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for at in range(0, len(data), chunk):
                f.write(view[at:at + chunk])
        times.append(time.perf_counter() - t0)
        path.unlink()
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return times[-1], time.perf_counter() - t0


def _make_inc():
    """A function defined at run time: every system ships it by value (cloudpickle),
    none imports it from a module the workers may not have."""
    return lambda x: x + 1


def chunksize_for(n: int, workers: int = 2) -> int:
    """The chunk size both chunked rows use: ten chunks per worker."""
    return max(1, n // (workers * 10))


def hwf_functions(P: dict, as_self: bool = False, chunked: bool = False) -> dict:
    n = P["tasks"]
    _inc = _make_inc()
    cs = chunksize_for(n) if chunked else 1
    with hwf_cluster(P["tmp"], as_self=as_self, daemons=2, slots=1) as c:
        hub = c.hub(artifacts_dir=P["tmp"] / "artifacts")
        hub.gather(hub.map(_inc, range(P["warmup"])), timeout=P["timeout"])
        cpu0 = tree_cpu()
        t0 = time.perf_counter()
        res = hub.gather(hub.map(_inc, range(n), chunksize=cs), timeout=P["timeout"])
        elapsed = time.perf_counter() - t0
        cpu = tree_cpu() - cpu0
        hub.close_sync()
    if res != [x + 1 for x in range(n)]:
        raise TrialError("wrong values")
    return {"tasks": n, "seconds": elapsed, "tasks_per_s": n / elapsed, "cpu_ms_per_task": cpu / n * 1e3,
            "workers": 2, "layout": "2 daemons x 1 slot", "chunksize": cs,
            "how": f"hub.gather(hub.map(inc, range(N), chunksize={cs}))"}


def dask_functions(P: dict) -> dict:
    n = P["tasks"]
    _inc = _make_inc()
    with dask_client(threads_per_worker=1) as client:
        client.gather(client.map(_inc, range(P["warmup"]), pure=False))
        cpu0 = tree_cpu()
        t0 = time.perf_counter()
        res = client.gather(client.map(_inc, range(n), pure=False))
        elapsed = time.perf_counter() - t0
        cpu = tree_cpu() - cpu0
    if res != [x + 1 for x in range(n)]:
        raise TrialError("wrong values")
    return {"tasks": n, "seconds": elapsed, "tasks_per_s": n / elapsed, "cpu_ms_per_task": cpu / n * 1e3,
            "workers": 2, "layout": "2 worker processes x 1 thread", "how": "client.gather(client.map(inc, range(N)))"}


def ipp_functions(P: dict, chunked: bool = False) -> dict:
    n = P["tasks"]
    _inc = _make_inc()
    cs = chunksize_for(n) if chunked else 1
    with ipp_view() as view:
        view.map_sync(_inc, range(P["warmup"]))
        cpu0 = tree_cpu()
        t0 = time.perf_counter()
        res = view.map_async(_inc, range(n), chunksize=cs).get(timeout=P["timeout"])
        elapsed = time.perf_counter() - t0
        cpu = tree_cpu() - cpu0
    if list(res) != [x + 1 for x in range(n)]:
        raise TrialError("wrong values")
    return {"tasks": n, "seconds": elapsed, "tasks_per_s": n / elapsed, "cpu_ms_per_task": cpu / n * 1e3,
            "workers": 2, "layout": "2 engines", "chunksize": cs,
            "how": f"load_balanced_view().map_async(inc, ..., chunksize={cs})"}


TRIALS: dict[tuple[str, str], Callable[[dict], dict]] = {
    ("throughput", "hwf"): hwf_throughput,
    ("throughput", "hwf-self"): lambda P: hwf_throughput(P, as_self=True),
    ("throughput", "hwf-noiso"): lambda P: hwf_throughput(P, isolation="none"),
    ("throughput", "dask"): dask_throughput,
    ("throughput", "ipyparallel"): ipp_throughput,
    ("throughput", "floor"): floor_throughput,
    ("latency", "hwf"): hwf_latency,
    ("latency", "hwf-self"): lambda P: hwf_latency(P, as_self=True),
    ("latency", "hwf-noiso"): lambda P: hwf_latency(P, isolation="none"),
    ("latency", "dask"): dask_latency,
    ("latency", "ipyparallel"): ipp_latency,
    ("latency", "floor"): floor_latency,
    ("transfer", "hwf"): hwf_transfer,
    ("transfer", "floor"): floor_transfer,
    ("scale", "hwf"): hwf_scale,
    ("coldstart", "hwf"): hwf_coldstart,
    ("coldstart", "dask"): dask_coldstart,
    ("coldstart", "ipyparallel"): ipp_coldstart,
    ("functions", "hwf"): hwf_functions,
    ("functions", "hwf-self"): lambda P: hwf_functions(P, as_self=True),
    ("functions", "dask"): dask_functions,
    ("functions", "ipyparallel"): ipp_functions,
    ("functions", "hwf-chunked"): lambda P: hwf_functions(P, chunked=True),
    ("functions", "ipyparallel-chunked"): lambda P: ipp_functions(P, chunked=True),
}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so every `with`/`finally` stops what it started


def main() -> int:
    section, system, params_path, out_path = sys.argv[1:5]
    signal.signal(signal.SIGTERM, _interrupt)
    P = json.loads(Path(params_path).read_text())
    P["tmp"] = Path(P["tmpdir"])  # this trial's own dir, made (and removed) by run.py
    try:
        metrics = TRIALS[(section, system)](P)
        result = {"ok": True, "metrics": metrics}
    except BaseException as exc:  # reported, not raised: one failing peer must not end the run
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    Path(out_path).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())

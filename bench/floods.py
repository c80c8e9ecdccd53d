"""One user floods a shared hub; what do the others see?  (issue 18's rows 4-6)

Each scenario starts a fresh ``LocalCluster`` (1 daemon, 2 slots, HTTP API on),
lets user-b flood one shared resource, and meanwhile measures what user-a
gets: the round trip of ``get_hardware_pool`` over the websocket (median,
p99, max), whether a 1 MiB Data upload + dispatch + result still works (and
how long it took), and the hub process's peak RSS, open fds and CPU.

    python bench/floods.py                       # every scenario, issue-sized floods
    python bench/floods.py --only uploads,http   # some of them
    python bench/floods.py --scale 0.25          # smaller floods (a quick look)

Scenarios (the issue's numbers at --scale 1):
  idle      no flood: the reference round trip
  uploads   64 connections x 4 ``blob_put`` announcements that never send a byte
  http      10,000 token-less HTTP connections sending half a header, kept open
  streams   200 tasks x 512 KiB of output, then 16 ``/api/events`` streams + 300 light ones
  waiters   3,000 pending ``get_results(wait=True)`` on tasks that never run, then a disconnect

Numbers are printed as a table and written as JSON (``--out``).  The run
speaks only to 127.0.0.1 and stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from hwf_jupyter import Data, LocalCluster, Stage, Task, dispatch_sync  # noqa: E402
from rawpeer import RawPeer  # noqa: E402

NEVER = {"ram": "100000GB"}  # no daemon meets it: tasks stay queued


class Probe:
    """user-a's view while a flood runs: pool round trips, and one real dispatch."""

    def __init__(self, cluster: LocalCluster, workdir: Path) -> None:
        self.hub = cluster.hub(artifacts_dir=workdir / "arts")
        self.rtts: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.payload = workdir / "payload.bin"

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self.hub.get_hardware_pool_sync()
                self.rtts.append(time.perf_counter() - t0)
            except Exception as exc:  # what the other user sees is the measurement
                self.failures.append(f"get_pool: {type(exc).__name__}: {exc}"[:200])
                time.sleep(0.05)
            time.sleep(0.01)

    def start(self) -> "Probe":
        self._thread.start()
        return self

    def dispatch_one(self) -> dict[str, Any]:
        """A 1 MiB Data file up, a task that reads it, its result back."""
        self.payload.write_bytes(os.urandom(1 << 20))
        t0 = time.perf_counter()
        try:
            ids = dispatch_sync(Task(Stage("read", data=Data(str(self.payload), "in.bin"), cmd="wc -c < in.bin")),
                                self.hub)
            r = self.hub.get_result_sync(ids, wait=True, timeout=120)[0]
            ok = r.status == "finished" and r.output.strip() == str(1 << 20)
            return {"ok": ok, "seconds": round(time.perf_counter() - t0, 3),
                    "error": None if ok else f"{r.status}: {r.error}"}
        except Exception as exc:
            return {"ok": False, "seconds": round(time.perf_counter() - t0, 3),
                    "error": f"{type(exc).__name__}: {exc}"[:300]}

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(30)
        self.hub.close_sync()
        ms = sorted(x * 1000 for x in self.rtts)
        if not ms:
            return {"rtt_n": 0, "rtt_failures": len(self.failures), "first_failure": self.failures[:1]}
        return {"rtt_n": len(ms), "rtt_p50_ms": round(statistics.median(ms), 2),
                "rtt_p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
                "rtt_max_ms": round(ms[-1], 2), "rtt_failures": len(self.failures),
                "first_failure": self.failures[:1]}


class HubWatch:
    """Peak RSS and fds of the hub process, sampled every 50 ms; CPU over the window."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.rss0 = self.proc.memory_info().rss
        self.cpu0 = sum(self.proc.cpu_times()[:2])
        self.t0 = time.perf_counter()
        self.peak_rss = self.rss0
        self.peak_fds = self.proc.num_fds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
                self.peak_fds = max(self.peak_fds, self.proc.num_fds())
            except psutil.Error:
                return

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        wall = time.perf_counter() - self.t0
        cpu = sum(self.proc.cpu_times()[:2]) - self.cpu0
        return {"hub_rss_before_mb": round(self.rss0 / 2**20, 1), "hub_rss_peak_mb": round(self.peak_rss / 2**20, 1),
                "hub_rss_after_mb": round(self.proc.memory_info().rss / 2**20, 1),
                "hub_fds_peak": self.peak_fds, "hub_cpu_cores": round(cpu / wall, 2) if wall else None}


# ------------------------------------------------------------------ floods


def _refusals(peers: list[RawPeer], quiet: float) -> int:
    """Error replies the attacker's connections got until each was quiet for ``quiet`` s."""
    refused = 0
    for peer in peers:
        try:
            while True:
                refused += peer.recv(timeout=quiet).get("type") == "error"
        except Exception:  # quiet (TimeoutError) or closed by the hub: done with this one
            pass
    return refused


def _closer(peers: list[RawPeer]) -> Callable[[], None]:
    def stop() -> None:
        for peer in peers:
            try:
                peer.close()
            except Exception:  # already closed by the hub
                pass
    return stop


def flood_idle(cluster: LocalCluster, n: Callable[[int], int], hold: float) -> tuple[dict, Callable[[], None]]:
    return {}, lambda: None


def flood_uploads(cluster: LocalCluster, n: Callable[[int], int], hold: float) -> tuple[dict, Callable[[], None]]:
    token = cluster.create_token("client", "user-b")
    peers = []
    for _ in range(n(64)):
        peer = RawPeer(cluster.address, token)
        peers.append(peer)
        for _ in range(4):
            rid = peer.next_id()
            peer.send({"type": "blob_put", "id": rid, "sha256": os.urandom(32).hex(), "size": 1 << 20})
    # What came back at once: refusals (an accepted put answers only when its bytes end).
    refused = _refusals(peers, 0.05)
    return {"attacker_connections": len(peers), "attacker_refused_at_once": refused}, _closer(peers)


def flood_http(cluster: LocalCluster, n: Callable[[int], int], hold: float) -> tuple[dict, Callable[[], None]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = cluster.http_port
    socks, failed = [], 0
    for _ in range(n(10_000)):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /api/snapshot HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    time.sleep(hold / 2)
    closed_by_hub = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed_by_hub += 1
        except BlockingIOError:
            pass
        except OSError:
            closed_by_hub += 1

    def stop() -> None:
        for s in socks:
            s.close()
    return {"attacker_connections": len(socks), "attacker_connect_failed": failed,
            "closed_by_hub_after_half_hold": closed_by_hub}, stop


def _heavy_tasks(cluster: LocalCluster, token: str, count: int, out_kib: int) -> None:
    from hwf_jupyter import Hub
    hub = Hub(cluster.address, token=token)
    try:
        ids = dispatch_sync([Task(Stage("out", cmd=f"head -c {out_kib * 1024} /dev/zero | tr '\\0' a"))
                             for _ in range(count)], hub)
        hub.get_result_sync(ids, wait=True, timeout=600, download=False)
    finally:
        hub.close_sync()


class _Streams:
    """``n`` /api/events readers on an asyncio loop of their own (read and discarded)."""

    def __init__(self, url: str, token: str, count: int) -> None:
        self.url, self.token, self.count = url, token, count
        self.opened = 0
        self.refused: dict[int, int] = {}
        self.bytes = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._main(), self.loop)

    async def _one(self, session: Any) -> None:
        try:
            async with session.get(self.url + "/api/events",
                                   headers={"Authorization": f"Bearer {self.token}"}) as resp:
                if resp.status != 200:
                    self.refused[resp.status] = self.refused.get(resp.status, 0) + 1
                    return
                self.opened += 1
                async for chunk in resp.content.iter_any():
                    self.bytes += len(chunk)
        except Exception:
            pass

    async def _main(self) -> None:
        import aiohttp
        self._main_task = asyncio.current_task()
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as session:
            await asyncio.gather(*(self._one(session) for _ in range(self.count)))

    async def _cancel(self) -> None:
        self._main_task.cancel()
        await asyncio.gather(self._main_task, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._cancel(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def flood_streams(cluster: LocalCluster, n: Callable[[int], int], hold: float) -> tuple[dict, Callable[[], None]]:
    token = cluster.create_token("client", "user-b")
    _heavy_tasks(cluster, token, n(200), 512)
    streams = _Streams(cluster.http_url, token, n(16) + n(300))
    time.sleep(min(5.0, hold / 2))
    info = {"attacker_streams_open": streams.opened, "attacker_streams_refused": dict(streams.refused)}
    return info, streams.stop


def flood_waiters(cluster: LocalCluster, n: Callable[[int], int], hold: float) -> tuple[dict, Callable[[], None]]:
    token = cluster.create_token("client", "user-b")
    from hwf_jupyter import Hub
    hub = Hub(cluster.address, token=token)
    ids = dispatch_sync(Task(Stage("never", cmd="true"), hardware=NEVER), hub, repeat=200)
    hub.close_sync()
    peers = [RawPeer(cluster.address, token) for _ in range(max(1, n(3000) // 500))]
    sent = 0
    for i in range(n(3000)):
        peer = peers[i % len(peers)]
        peer.send({"type": "get_results", "id": peer.next_id(), "task_ids": list(ids), "wait": True})
        sent += 1
    return {"attacker_waiters_sent": sent, "attacker_refused": _refusals(peers, 0.2)}, _closer(peers)


SCENARIOS: dict[str, Callable[..., tuple[dict, Callable[[], None]]]] = {
    "idle": flood_idle, "uploads": flood_uploads, "http": flood_http,
    "streams": flood_streams, "waiters": flood_waiters,
}


def run(name: str, scale: float, hold: float, hub_args: list[str]) -> dict[str, Any]:
    def n(full: int) -> int:
        return max(1, int(full * scale))

    with tempfile.TemporaryDirectory(prefix=f"hwf-flood-{name}-") as tmp:
        work = Path(tmp)
        with LocalCluster(daemons=1, slots=2, state_dir=work / "farm", http_port=0,
                          hub_args=hub_args) as cluster:
            if not cluster.http_port:
                raise SystemExit("the hub gave no HTTP port")
            watch = HubWatch(cluster.hub_process.pid)
            try:
                info, stop_flood = SCENARIOS[name](cluster, n, hold)
            except Exception as exc:
                info, stop_flood = {"flood_error": f"{type(exc).__name__}: {exc}"[:300]}, (lambda: None)
            probe = Probe(cluster, work).start()
            time.sleep(hold / 2)
            upload = probe.dispatch_one()
            time.sleep(hold / 2)
            seen = probe.stop()
            stop_flood()
            time.sleep(2.0)  # what the hub gives back after the attacker left
            hub = watch.stop()
            log = work / "farm" / "logs"
            log_bytes = sum(f.stat().st_size for f in log.rglob("*") if f.is_file()) if log.exists() else None
            return {"scenario": name, **info, **seen, "other_user_upload": upload, **hub, "log_bytes": log_bytes}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    ap.add_argument("--scale", type=float, default=1.0, help="flood sizes as a fraction of the issue's")
    ap.add_argument("--hold", type=float, default=10.0, help="seconds the probe runs during a flood")
    ap.add_argument("--hub-arg", action="append", default=[], help="more `hwf hub` options (repeatable)")
    ap.add_argument("--out", default=str(HERE / "results" / "floods-latest.json"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.only.split(","):
        row = run(name.strip(), args.scale, args.hold, args.hub_arg)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["scenario", "rtt_p50_ms", "rtt_p99_ms", "rtt_max_ms", "rtt_failures", "hub_rss_before_mb",
            "hub_rss_peak_mb", "hub_rss_after_mb", "hub_fds_peak", "hub_cpu_cores", "log_bytes"]
    print("\n" + " | ".join(cols) + " | other user's 1 MiB dispatch")
    for r in rows:
        up = r["other_user_upload"]
        print(" | ".join(str(r.get(c, "")) for c in cols) + f" | {'ok' if up['ok'] else 'FAILED'} {up['seconds']} s"
              + ("" if up["ok"] else f" ({up['error']})"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"scale": args.scale, "hold": args.hold, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

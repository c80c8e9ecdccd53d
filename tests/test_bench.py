"""bench/run.py must not rot: a tiny run of every section, and its report.

No timing is asserted (this machine's speed is not under test); only that
every section produces its keys with positive numbers, that a peer missing
from the venv is reported as "not installed" (the test venv has neither
Dask nor ipyparallel: `make bench` installs them in .venv-bench), and that
the second dispatch of the same Data sends no file bytes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"
PEERS = {"dask": "distributed", "ipyparallel": "ipyparallel"}


def _load_run_module():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.e2e
def test_tiny_run_of_every_section(tmp_path):
    missing = [s for s, mod in PEERS.items() if importlib.util.find_spec(mod) is None]
    out = tmp_path / "bench.json"
    size = 2**20
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--runs", "1", "--tasks", "10", "--warmup", "2", "--rtt", "5",
         "--transfer-mib", "1", "--scale-daemons", "5", "--scale-tasks", "60", "--timeout", "120", "--max-other-load", "-1",
         "--only", ",".join(["hwf", "hwf-self", "floor", *missing]), "--out", str(out)],
        capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1. Throughput" in proc.stdout and "5. Cold start" in proc.stdout
    r = json.loads(out.read_text())

    assert r["machine"]["cores"] >= 1 and r["machine"]["ram_bytes"] > 0
    assert r["machine"]["cpu_model"] and r["machine"]["python"]
    assert r["versions"]["hwf"]
    assert set(r["results"]) == {"throughput", "latency", "transfer", "scale", "coldstart", "functions"}
    res = r["results"]

    def median(section, system):
        entry = res[section][system]
        assert entry["status"] == "ok", entry
        assert all(run["other_load_cores"] >= 0 for run in entry["runs"])
        return entry["median"]

    for system in ("hwf", "floor"):
        t = median("throughput", system)
        assert t["tasks"] == 10 and t["tasks_per_s"] > 0 and t["workers"] == 2
        lat = median("latency", system)
        assert lat["n"] == 5 and 0 < lat["median_ms"] <= lat["p99_ms"]
    assert median("coldstart", "hwf")["seconds"] > 0
    fn = median("functions", "hwf")
    assert fn["tasks"] == 10 and fn["tasks_per_s"] > 0
    assert "1b. Python functions" in proc.stdout
    if os.geteuid() == 0:  # --run-as self differs from the default only for a root daemon
        assert median("throughput", "hwf-self")["tasks_per_s"] > 0
        assert median("latency", "hwf-self")["median_ms"] > 0
    else:
        assert res["throughput"]["hwf-self"]["status"] == "skipped"

    up = median("transfer", "hwf")
    assert up["bytes"] == size and up["up_dispatch_MBps"] > 0 and up["down_download_MBps"] > 0
    assert up["up_client_sent_bytes"] >= size and up["up_blob_store_growth_bytes"] == size
    assert up["again_client_sent_bytes"] < 10_000  # the file itself was not sent again
    assert up["again_blob_store_growth_bytes"] == 0
    raw = median("transfer", "floor")
    assert raw["up_MBps"] > 0 and raw["down_MBps"] > 0

    sc = median("scale", "hwf")
    assert sc["daemons"] == 5 and sc["tasks"] == 60 and sc["assignments"] == 60
    assert sc["accept_s"] > 0 and sc["assignments_per_s"] > 0 and sc["hub_peak_rss_bytes"] > 0

    for system in missing:
        for section in ("throughput", "latency", "coldstart"):
            assert res[section][system]["status"] == "not installed"
    assert r["ratios"]["throughput_hwf_over_floor"] > 0
    assert r["ratios"]["upload_hwf_over_raw"] > 0


def test_report_renders_failed_and_missing_peers():
    run = _load_run_module()
    ok = {"ok": True, "metrics": {"tasks": 10, "seconds": 1.0, "tasks_per_s": 10.0, "layout": "x"},
          "other_load_cores": 0.1}
    bad = {"ok": False, "error": "TrialError: boom", "other_load_cores": 0.0}
    report = {
        "started": "now", "commit": None, "duration_s": 1.0, "out": "x.json", "loadavg_end": (0, 0, 0),
        "machine": {"cores": 2, "physical_cores": 1, "cpu_model": "cpu", "ram_bytes": 2**30, "os": "os",
                    "python": "CPython 3", "hwf_tasks_run_as": "self", "loadavg_start": (0, 0, 0)},
        "versions": {"hwf": "0", "dask": None, "distributed": None, "ipyparallel": None, "websockets": "1"},
        "config": {"quick": True, "runs": 2, "tasks": 10, "rtt": 5, "transfer_mib": 1, "scale_daemons": 5,
                   "scale_tasks": 60},
        "results": {
            "throughput": {"hwf": run.summarize([ok, bad]), "dask": {"status": "not installed"},
                           "ipyparallel": run.summarize([bad]), "floor": run.summarize([ok, ok])},
            "scale": {"hwf": run.summarize([bad])},
            "coldstart": {"hwf": run.summarize([])},
        },
    }
    text = run.render(report)
    assert "not installed" in text and "FAILED: TrialError: boom" in text and "1 of 2 runs ok" in text
    assert report["results"]["throughput"]["floor"]["median"]["tasks_per_s"] == 10.0


@pytest.mark.e2e
def test_tiny_flood_run_reports_what_the_other_user_saw(tmp_path):
    """bench/floods.py must not rot either: two scenarios at a tiny scale."""
    out = tmp_path / "floods.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "floods.py"), "--only", "idle,waiters",
                           "--scale", "0.01", "--hold", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["scenario"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"idle", "waiters"}
    for row in rows.values():
        assert row["other_user_upload"]["ok"], row
        assert row["rtt_n"] > 0 and row["rtt_p99_ms"] >= row["rtt_p50_ms"] > 0
        assert row["hub_rss_peak_mb"] >= row["hub_rss_before_mb"] > 0
    assert rows["waiters"]["attacker_waiters_sent"] == 30

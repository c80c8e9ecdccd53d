"""MECAnywhere's offload SDK over a real hub and daemons (warm Python workers)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from hwf_jupyter import LocalCluster
from hwf_jupyter import offload as meca

pytestmark = pytest.mark.e2e

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def farm():
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = TESTS + (os.pathsep + old if old else "")  # the daemons' workers import meca_tasks
    try:
        with LocalCluster(daemons=2, slots=2) as c:
            yield c
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def test_fifty_offloads_call_back_once_each_in_completion_order_on_the_callers_loop(farm, monkeypatch):
    monkeypatch.setenv("HWF_HUB_URL", farm.address)
    monkeypatch.setenv("HWF_TOKEN", farm.token)
    calls: list[tuple[str, str]] = []
    where = set()

    async def main():
        loop = asyncio.get_running_loop()
        await meca.initiate_connection(timeout=10)
        for i in range(50):
            delay = [0.02, 0.3, 0.1, 0.0, 0.2][i % 5]

            def callback(result, i=i):
                where.add((asyncio.get_running_loop() is loop, threading.get_ident()))
                calls.append((f"t{i}", result))
            assert await meca.offload_task(f"t{i}", "meca_tasks:work", f"{i}:{delay}", callback,
                                           resource={"cpu": 1, "memory": 64}, runtime="python") == f"t{i}"
        await meca.join(task_timeout=120, join_timeout=300)
        await meca.disconnect()

    asyncio.run(main())
    assert sorted(t for t, _ in calls) == sorted(f"t{i}" for i in range(50))  # once each
    assert all(result == f"done-{t[1:]}" for t, result in calls)  # its own result
    assert where == {(True, threading.get_ident())}  # on the loop that offloaded
    assert [t for t, _ in calls] != [f"t{i}" for i in range(50)]  # completion order, not a FIFO


def test_join_timeout_names_the_unfinished_and_task_timeout_fails_them(farm):
    got = {}

    async def main():
        await meca.initiate_connection(hub=farm.address, token=farm.token)
        await meca.offload_task("quick", "meca_tasks:work", "q:0", lambda r: got.__setitem__("quick", r), runtime="python")
        await meca.offload_task("slow", "meca_tasks:work", "s:30", lambda r: got.__setitem__("slow", r), runtime="python")
        with pytest.raises(meca.OffloadError, match="still running: slow") as err:
            await meca.join(join_timeout=5)
        assert err.value.unfinished == ("slow",)
        await meca.join(task_timeout=1, join_timeout=60)  # now the slow one is cut at 1 s
        await meca.disconnect()

    asyncio.run(main())
    assert got["quick"] == "done-q"
    assert "ran longer than task_timeout=1s" in got["slow"]


def test_mecas_newer_client_shape_shell_runtime_and_errors(farm):
    seen = []

    def callback(task_id, status, response, err, corr_id):  # MECA's five-argument callback
        seen.append((task_id, status, response, err, corr_id))

    async def main():
        await meca.initiate_connection(hub=farm.address, token=farm.token)
        await meca.offload_task("sh", "tr a-z A-Z", "hello meca", callback, runtime="shell")
        await meca.offload_task("bad", "meca_tasks:boom", "x", callback, runtime="python", use_gpu=False)
        await meca.join()
        with pytest.raises(meca.OffloadError, match="'cpu', 'memory'|known: cpu, memory"):
            await meca.offload_task("r", "meca_tasks:work", "r:0", callback, resource={"disk": 5})
        await meca.disconnect()

    asyncio.run(main())
    by_id = {s[0]: s for s in seen}
    assert by_id["sh"][1:4] == (1, "HELLO MECA", None)
    assert by_id["bad"][1] == 0 and "bad input 'x'" in by_id["bad"][3]


def test_gpu_and_container_tasks_wait_with_a_reason_here(farm):
    """No GPU and no container engine on this machine: the task waits, and says why."""
    async def main():
        await meca.initiate_connection(hub=farm.address, token=farm.token)
        await meca.offload_task("g", "meca_tasks:work", "g:0", lambda r: None, runtime="python", use_gpu=True, gpu_count=1)
        await meca.offload_task("d", "sampleserver:latest", "{}", lambda r: None)  # an image: docker
        s = meca._require()
        res = await s.hub.get_result([s.hwf_ids["g"], s.hwf_ids["d"]])
        await s.hub.cancel([s.hwf_ids["g"], s.hwf_ids["d"]])
        await meca.disconnect()
        return res

    g, d = asyncio.run(main())
    assert g.status == "queued" and "gpu" in (g.wait_reason or "")
    assert d.status == "queued" and "docker" in (d.wait_reason or "")

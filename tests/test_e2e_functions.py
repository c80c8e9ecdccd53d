"""hub.submit / map / gather against a real hub and real daemons (warm workers).

The functions below live in this test module, which the daemons cannot
import: the client sends a local module's functions by value, as it would
for a user's own helper module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from hwf_jupyter import Hub, LocalCluster, PyFuture, RemoteError, RemoteTraceback, TaskFailed
from hwf_jupyter.widgets import watch_progress
from waiting import wait_until

pytestmark = pytest.mark.e2e


def _square(x):
    return x * x


def _divide(a, b):
    return a / b  # the remote line


def _talk_and_sum(xs, scale=1):
    print("summing", len(xs))
    return float(np.sum(xs)) * scale


def _big_value(n):
    return b"v" * n


def _sleep(seconds):
    time.sleep(seconds)
    return "woke"


def _crash_on_first_attempt():
    if os.environ.get("HWF_ATTEMPT") == "1":
        os.kill(os.getpid(), 9)  # the worker process dies mid-task
    return int(os.environ["HWF_ATTEMPT"]), os.getpid()


def _first_of(arr, i):
    return float(arr[i])


def blob_bytes(cluster) -> int:
    root = cluster.state_dir / "blobs"
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def test_map_1000_returns_the_right_values_in_order(hub):
    futures = hub.map(_square, range(1000))
    assert len(futures) == 1000 and all(isinstance(f, PyFuture) for f in futures)
    assert hub.gather(futures, timeout=600) == [x * x for x in range(1000)]
    stats = hub._functions.stats
    assert stats["submits"] == 1, "one map is one submit message"
    assert stats["watches"] == 1, "one watch for all its futures"
    assert stats["fetches"] < 1000, "results are fetched in batches, not per future"
    info = futures[10].info
    assert info.status == "finished" and info.machine in ("daemon-1", "daemon-2")
    assert info.requested_hardware.get("runtime", "").startswith("python")


def test_a_remote_zero_division_reraises_here_with_the_remote_line(hub):
    fut = hub.submit(_divide, 1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        fut.result(timeout=120)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    shown = "".join(traceback.format_exception(info.value))
    assert "return a / b  # the remote line" in shown
    assert "in _divide" in shown and "test_e2e_functions.py" in shown
    assert isinstance(fut.exception(), ZeroDivisionError)
    assert fut.info.status == "failed"
    with pytest.raises(ZeroDivisionError):
        hub.gather([hub.submit(_square, 3), fut])


def test_a_50mb_array_used_by_100_tasks_is_uploaded_once(hub, cluster):
    big = np.random.default_rng(1).random(50 * 2**20 // 8)  # 50 MiB
    before = blob_bytes(cluster)
    client_stats = lambda: dict(hub._functions.stats) if hub._functions else {"uploads": 0, "upload_bytes": 0}
    up0 = client_stats()
    futures = hub.map(_first_of, [big] * 50, range(50))  # the array as a positional argument
    futures += [hub.submit(_first_of, big, i) for i in range(50, 100)]  # and by one submit after another
    assert hub.gather(futures, timeout=600) == [float(big[i]) for i in range(100)]
    up1 = client_stats()
    assert up1["uploads"] - up0["uploads"] == 1, "the array went up once"
    assert 50 * 2**20 <= up1["upload_bytes"] - up0["upload_bytes"] < 51 * 2**20
    grown = blob_bytes(cluster) - before
    assert 50 * 2**20 <= grown < 52 * 2**20, f"the hub stores it once (grew {grown} bytes)"
    kw = hub.map(_talk_and_sum, [big[:10]] * 3, scale=big[0])  # small: inline, no upload
    assert hub.gather(kw, timeout=120) == [float(np.sum(big[:10])) * big[0]] * 3
    assert client_stats()["uploads"] == up1["uploads"]


def test_await_in_asyncio_and_result_from_threads(hub):
    async def main():
        futs = [hub.submit(_square, i) for i in range(5)]
        one = await futs[0]
        rest = await asyncio.gather(*futs[1:])
        more = await hub.gather_async(hub.map(_square, [7, 8]))
        return [one, *rest, *more]

    assert asyncio.run(main()) == [0, 1, 4, 9, 16, 49, 64]

    out: dict[int, int] = {}

    def worker(i):
        out[i] = hub.submit(_square, i).result(timeout=120)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert out == {0: 0, 1: 1, 2: 4, 3: 9}


def test_callbacks_values_output_and_tracking(hub):
    called = threading.Event()
    seen = []

    def cb(f):
        seen.append(f.result())
        called.set()

    fut = hub.submit(_talk_and_sum, np.arange(5), scale=2, track="time,ram,cpu")
    fut.add_done_callback(cb)
    assert fut.result(timeout=120) == 20.0
    assert called.wait(30) and seen == [20.0]
    stage = fut.info.stages[0]
    assert stage.duration is not None and stage.cpu_time is not None and stage.peak_ram and stage.peak_ram > 0
    assert stage.commands[0].stdout == "summing 5\n"
    assert hub.get_result_sync(fut)[0].task_id == fut.task_id  # one future, too
    results = hub.get_result_sync([fut])
    df = results.to_dataframe()
    assert list(df["value"]) == [20.0] and results[0].value == 20.0
    big = hub.submit(_big_value, 300_000)  # above 64 KiB: comes back as an artifact
    assert big.result(timeout=120) == b"v" * 300_000
    assert not (Path(hub.artifacts_dir) / big.task_id).exists(), "the value is not left behind in hwf_artifacts"


def test_cancel_kills_the_running_task_on_its_daemon(hub):
    fut = hub.submit(_sleep, 120, max_retries=0)
    tid = wait_until(lambda: fut.task_id, what="accepted")
    wait_until(lambda: hub.get_result_sync([tid], download=False)[0].status == "running", what="running")
    assert fut.cancel() is True and fut.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result()
    res = hub.get_result_sync([tid], wait=True, timeout=60, download=False)
    assert res[0].status == "cancelled"
    early = hub.submit(_sleep, 120)
    early.cancel()  # before the hub accepted it, usually: it is cancelled on arrival
    tid2 = early.submitted.result(timeout=60)
    assert hub.get_result_sync([tid2], wait=True, timeout=60, download=False)[0].status == "cancelled"


def test_a_killed_worker_is_replaced_and_its_task_retried(hub):
    fut = hub.submit(_crash_on_first_attempt, max_retries=2)
    attempt, pid = fut.result(timeout=180)
    assert attempt == 2
    assert len(fut.info.attempts) == 2 and fut.info.attempts[0].state != "finished"
    assert hub.submit(_square, 5).result(timeout=180) == 25, "the replaced workers serve tasks"


def test_a_timeout_fails_the_future_with_a_clear_reason(hub):
    fut = hub.submit(_sleep, 30, timeout=1, max_retries=0)
    with pytest.raises(TaskFailed) as info:
        fut.result(timeout=120)
    assert info.value.task_id == fut.task_id and "timed out" in str(info.value)
    assert info.value.reason == "timeout" and info.value.status == "failed"


def test_watch_progress_follows_futures(hub):
    futures = hub.map(_square, range(20))
    prog = watch_progress(hub, futures, interactive=False)
    hub.gather(futures, timeout=120)
    wait_until(lambda: prog.done, what="progress done")
    assert prog.counts["finished"] == 20 and prog.total == 20


def test_another_user_cannot_see_or_cancel_my_function_tasks(cluster, hub):
    fut = hub.submit(_sleep, 60)
    tid = fut.submitted.result(timeout=60)
    bob = Hub(cluster.address, token=cluster.create_token(role="client", user="bob-fn"))
    try:
        with pytest.raises(RemoteError) as info:
            bob.get_result_sync([tid])
        assert info.value.code == "not_found"
        with pytest.raises(RemoteError) as info:
            bob.cancel_sync([tid])
        assert info.value.code == "not_found"
        with pytest.raises(RemoteError):
            bob.get_result_sync([fut])  # a future object of mine does not help either
        assert not fut.done()
    finally:
        bob.close_sync()
        fut.cancel()


def test_closing_the_hub_fails_waiting_futures_clearly(cluster):
    hub = cluster.hub()
    fut = hub.submit(_sleep, 60)
    fut.submitted.result(timeout=60)
    hub.close_sync()
    with pytest.raises(Exception, match="closed"):
        fut.result(timeout=30)


def test_futures_survive_a_hub_restart(tmp_path):
    with LocalCluster(daemons=1, slots=2, state_dir=tmp_path / "c") as c:
        hub = c.hub()
        assert hub.submit(_square, 2).result(timeout=120) == 4
        slow = hub.submit(_sleep, 3)
        slow.submitted.result(timeout=60)
        c.hub_process.kill()
        c.hub_process.wait()
        c.restart_hub()
        # Nobody calls the hub here: the waiting future reconnects by itself, its
        # watch is renewed, and the task's end (during or after the outage) completes it.
        assert slow.result(timeout=120) == "woke"
        assert hub.submit(_square, 3).result(timeout=120) == 9
        hub.close_sync()


def _double_or_fail(x):
    if x == 7:
        raise ValueError(f"seven is refused")  # the chunk's remote line
    return x * 2


def test_a_chunked_map_gives_each_call_its_own_value_or_exception(hub):
    futures = hub.map(_double_or_fail, range(20), chunksize=6)
    assert len(futures) == 20
    assert len({f.submitted.result(timeout=60) for f in futures}) == 4, "20 calls in chunks of 6 are 4 tasks"
    for i, f in enumerate(futures):
        if i == 7:
            with pytest.raises(ValueError, match="seven is refused") as info:
                f.result(timeout=120)
            shown = "".join(traceback.format_exception(info.value))
            assert "the chunk's remote line" in shown and "in _double_or_fail" in shown
        else:
            assert f.result(timeout=120) == i * 2, "one bad call does not cost its chunk-mates their values"
    assert futures[0].task_id == futures[5].task_id != futures[6].task_id
    assert futures[19].info.status == "finished" and futures[7].info.status == "finished"
    prog = watch_progress(hub, futures, interactive=False)
    wait_until(lambda: prog.done, what="progress done")
    assert prog.total == 4, "progress counts tasks, each chunk once"


def test_a_chunk_is_cancelled_once_all_its_calls_are(hub):
    futures = hub.map(_sleep, [60, 60, 60], chunksize=3, max_retries=0)
    tid = wait_until(lambda: futures[0].task_id, what="accepted")
    assert futures[0].cancel() and futures[1].cancel()
    assert hub.get_result_sync([tid], download=False)[0].status in ("queued", "assigned", "running")
    assert futures[2].cancel()
    res = hub.get_result_sync([tid], wait=True, timeout=60, download=False)
    assert res[0].status == "cancelled"
    assert all(f.cancelled() for f in futures)


def test_chunksize_is_checked_before_anything_is_sent(hub):
    from hwf_jupyter.task import TaskError

    for bad in (0, -1, 2.5, True, 10**6):
        with pytest.raises(TaskError, match="chunksize"):
            hub.map(_square, range(3), chunksize=bad)

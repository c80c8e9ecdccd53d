"""The core farm end to end: real hub and daemon processes over websockets."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from task_python import TASK_PY, needs_task_python

from hwf_jupyter import Artifacts, Data, Stage, Task, dispatch, dispatch_sync

PY = TASK_PY or "python3"  # tasks run as unprivileged slot users when we are root
ALLOC_200MB = f"{PY} -c 'b = bytearray(200 * 2**20); import time; time.sleep(0.3)'"
BUSY = f"{PY} -c 'import time; t = time.process_time()\nwhile time.process_time() - t < 0.4: pass'"


def seed_task(src):
    return Task(
        Stage("build", data=[Data(src, "main.txt")], cmd="cp main.txt copy.txt"),
        Stage("run", cmd=["tr a-z A-Z < copy.txt > out.txt", ALLOC_200MB, BUSY],
              track_time=True, track_ram=True, track_cpu=True, comment="the real work"),
        Artifacts("out.txt", "missing-*.bin"),
        hardware={"os": "linux", "cpu": "any", "gpu": "any", "ram": "1GB"},
    )


@needs_task_python
def test_seed_example_measures_and_returns_artifacts(hub, in_tmp):
    src = in_tmp / "main.txt"
    src.write_text("hello farm\n")

    async def go():
        ids = await dispatch(seed_task(src), hub)
        return ids, await hub.get_result(ids, wait=True)

    ids, results = asyncio.run(go())
    assert len(ids) == 1 and ids.session_id.startswith("s-")
    r = results[0]
    assert r.status == "finished", r.error
    assert r.exit_code == 0 and r.machine in ("daemon-1", "daemon-2")
    assert r.duration > 0 and len(r.attempts) == 1
    build, run = r.stages
    assert build.duration > 0 and build.peak_ram is None and build.cpu_time is None
    assert run.peak_ram >= 200 * 2**20
    assert run.cpu_time > 0.3 and run.cpu_percent > 0
    assert run.comment == "the real work"
    ok = [a for a in r.artifacts if a.ok]
    missing = [a for a in r.artifacts if not a.ok]
    assert [a.name for a in ok] == ["out.txt"]
    assert ok[0].path.read_text() == "HELLO FARM\n"
    assert ok[0].path.parent.name == r.task_id
    assert missing and "missing-*.bin" in missing[0].error
    stage_df = results.to_dataframe(level="stage")
    assert list(stage_df["stage"]) == ["build", "run"]
    assert stage_df.loc[1, "peak_ram_mb"] >= 200
    cmd_df = results.to_dataframe(level="command")
    assert len(cmd_df) == 4


def test_failing_command_fails_task_and_skips_rest(hub):
    task = Task(Stage("a", cmd=["echo one", "exit 3", "echo never"]), Stage("b", cmd="echo no"))
    ids = dispatch_sync(task, hub)
    r = hub.get_result_sync(ids, wait=True)[0]
    assert r.status == "failed" and r.exit_code == 3
    assert "exit" in r.error and "3" in r.error
    assert [s.status for s in r.stages] == ["failed", "skipped"]
    assert [c.cmd for c in r.stages[0].commands] == ["echo one", "exit 3"]
    assert r.stages[0].commands[0].stdout == "echo one".split()[1] + "\n"


def test_repeat_and_across_pool(hub, cluster):
    pool = hub.get_hardware_pool_sync({"os": "linux"})
    assert sorted(pool.names) == ["daemon-1", "daemon-2"]
    task = Task(Stage("who", cmd="echo $PWD"))
    ids = dispatch_sync(task, hub, across=pool, repeat=2)
    results = hub.get_result_sync(ids, wait=True)
    assert len(results) == 4 and all(r.ok for r in results)
    assert sorted(r.machine for r in results) == ["daemon-1", "daemon-1", "daemon-2", "daemon-2"]
    # each daemon's task dirs are its own (under its workdir, or under a
    # temp dir of its own when the workdir is private and tasks run as slot users)
    roots: dict[str, set[str]] = {}
    for r in results:
        roots.setdefault(r.machine, set()).add(r.output.strip().rsplit("/", 1)[0])
    assert all(len(dirs) == 1 for dirs in roots.values()), roots
    assert roots["daemon-1"] != roots["daemon-2"]


def test_pinned_daemon_runs_there(hub):
    ids = dispatch_sync(Task(Stage("s", cmd="true"), hardware={"daemon": "daemon-2"}), hub, repeat=3)
    assert {r.machine for r in hub.get_result_sync(ids, wait=True)} == {"daemon-2"}


def test_unmatched_hardware_waits_then_runs_when_daemon_joins(hub, cluster):
    task = Task(Stage("s", cmd="echo ran"), hardware={"tags": ["special-box"]})
    ids = dispatch_sync(task, hub)
    r = hub.get_result_sync(ids)[0]
    assert r.status == "queued"
    assert "waiting for matching hardware" in r.wait_reason and "special-box" in r.wait_reason
    partial = hub.get_result_sync(ids, wait=True, timeout=0.5)
    assert partial[0].status == "queued"
    name = cluster.add_daemon("special", tags=["special-box"], slots=1)
    try:
        r = hub.get_result_sync(ids, wait=True, timeout=30)[0]
        assert r.status == "finished" and r.machine == name and r.output == "ran\n"
    finally:
        cluster.stop_daemon(name)


def test_priority_orders_the_queue(hub, cluster):
    # 'daemon-1' only, one task at a time: a blocker, then low and high priority work
    pin = {"daemon": "daemon-1"}
    blocker = dispatch_sync(Task(Stage("b", cmd="sleep 0.5"), hardware=pin), hub, repeat=2)
    low = dispatch_sync(Task(Stage("l", cmd="true"), hardware=pin), hub, priority=0)
    high = dispatch_sync(Task(Stage("h", cmd="true"), hardware=pin), hub, priority=10)
    res = hub.get_result_sync([*blocker, *low, *high], wait=True)
    by_id = {r.task_id: r for r in res}
    assert by_id[high[0]].started <= by_id[low[0]].started


def test_two_clients_500_tasks_each_result_attributed(cluster, tmp_path):
    hubs = [cluster.hub(artifacts_dir=tmp_path / f"a{i}") for i in range(2)]
    outcomes: dict[int, list] = {}
    errors = []

    def client(i):
        try:
            tasks = [Task(Stage("e", cmd=f"echo client{i}-task{k}")) for k in range(250)]
            ids = dispatch_sync(tasks, hubs[i])
            res = hubs[i].get_result_sync(ids, wait=True, timeout=240)
            outcomes[i] = list(zip(ids, res))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    total = 0
    for i, pairs in outcomes.items():
        for k, (tid, r) in enumerate(pairs):
            assert r.task_id == tid and r.status == "finished"
            assert r.output == f"client{i}-task{k}\n"
            total += 1
    assert total == 500
    for h in hubs:
        h.close_sync()


def test_wait_timeout_returns_partial_quickly(hub):
    import time

    ids = dispatch_sync(Task(Stage("slow", cmd="sleep 3")), hub)
    t0 = time.monotonic()
    r = hub.get_result_sync(ids, wait=True, timeout=0.5)[0]
    assert time.monotonic() - t0 < 2.0
    assert r.status in ("queued", "assigned", "running")
    assert hub.get_result_sync(ids, wait=True)[0].status == "finished"


def test_same_data_uploaded_once(hub, cluster, in_tmp):
    src = in_tmp / "blob.bin"
    src.write_bytes(b"x" * 300_000)
    blobs = cluster.state_dir / "blobs"
    before = {p.name for p in blobs.glob("*/*") if p.parent.name != "tmp"}
    t = Task(Stage("s", data=Data(src, "in.bin"), cmd="wc -c < in.bin"))
    ids = dispatch_sync([t, t], hub, repeat=2)
    res = hub.get_result_sync(ids, wait=True)
    assert all(r.output.strip() == "300000" for r in res)
    after = {p.name for p in blobs.glob("*/*") if p.parent.name != "tmp"}
    assert len(after - before) == 1


def test_sync_twin_from_thread_and_await_from_other_loop(hub):
    box = {}

    def worker():
        box["ids"] = dispatch_sync(Task(Stage("s", cmd="echo t")), hub)

    th = threading.Thread(target=worker)
    th.start()
    th.join(30)

    async def other_loop():
        return await hub.get_result(box["ids"], wait=True)

    assert asyncio.run(other_loop())[0].output == "t\n"


def test_a_late_watcher_still_gets_the_first_lines_of_output(hub):
    """The hub keeps a running attempt's recent output and replays it when a
    watch starts: nothing is lost to a watcher that subscribes after the
    task began (as a busy notebook does)."""
    ids = dispatch_sync(Task(Stage("s", cmd=["for i in 1 2 3; do echo line-$i; done", "sleep 2", "echo last"])),
                        hub, stream=True)
    deadline = time.monotonic() + 30
    while hub.get_result_sync(list(ids))[0].status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # the first lines are out before anyone watches
    seen: list[str] = []
    finished = threading.Event()
    w = hub.watch_sync(list(ids), output=True, on_output=lambda o: seen.append(o.text),
                       on_event=lambda e: e.status == "finished" and finished.set())
    assert finished.wait(30)
    w.close_sync()
    text = "".join(seen)
    assert text.index("line-1") < text.index("line-2") < text.index("line-3") < text.index("last")

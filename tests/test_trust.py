"""The shared farm under attack: tenancy, rogue daemons, slow readers, floods.

Every test here plays the attacker against a real hub (and daemons) on
127.0.0.1, then checks that a normal client still dispatches and gets
results, and that nothing stored was lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from websockets.exceptions import ConnectionClosed

from hwf_jupyter import ConnectError, Hub, LocalCluster, RemoteError, Stage, Task, dispatch_sync
from hwf_jupyter.hub import artifact_destination

from rawpeer import RawPeer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A farm of its own: rogue daemons join it, so no other test's tasks land there."""
    with LocalCluster(daemons=1, slots=2, state_dir=tmp_path_factory.mktemp("trust")) as c:
        yield c


def healthy(cluster: LocalCluster, tmp_path: Path, before: list[str] = ()) -> None:
    """A normal client still dispatches and gets results; earlier results are intact."""
    hub = cluster.hub(artifacts_dir=tmp_path / "healthy")
    try:
        ids = dispatch_sync(Task(Stage("ok", cmd="echo still-fine"), hardware={"daemon": "daemon-1"}), hub)
        r = hub.get_result_sync(ids, wait=True, timeout=60)[0]
        assert r.status == "finished" and r.output == "still-fine\n", (r.status, r.error)
        if before:
            old = hub.get_result_sync(list(before))
            assert all(o.status in ("finished", "failed", "cancelled") for o in old)
    finally:
        hub.close_sync()


def pinned(name: str, *cmds: str, **kw) -> Task:
    return Task(Stage("s", cmd=list(cmds) or ["true"]), hardware={"daemon": name}, **kw)


# ------------------------------------------------------------ 3. tenancy


def test_another_users_ids_answer_as_unknown_ids(farm, tmp_path):
    alice = farm.hub(artifacts_dir=tmp_path / "a")
    bob = Hub(farm.address, token=farm.create_token("client", "bob"), artifacts_dir=tmp_path / "b")
    try:
        from hwf_jupyter import Artifacts
        sub = dispatch_sync(Task(Stage("s", cmd=["echo secret > s.txt", "sleep 30"]), Artifacts("s.txt")), alice)
        tid, sid = sub[0], sub.session_id
        fake_tid, fake_sid = "t-" + "0" * 16, "s-" + "0" * 16

        def refusal(call):
            with pytest.raises(RemoteError) as info:
                call()
            return info.value.code, str(info.value)

        for real, fake in [(tid, fake_tid)]:
            got = [refusal(lambda: bob.get_result_sync([real])), refusal(lambda: bob.watch_sync([real])),
                   refusal(lambda: bob.cancel_sync([real]))]
            want = [refusal(lambda: bob.get_result_sync([fake])), refusal(lambda: bob.watch_sync([fake])),
                    refusal(lambda: bob.cancel_sync([fake]))]
            assert [(c, m.replace(real, "ID")) for c, m in got] == [(c, m.replace(fake, "ID")) for c, m in want]
            assert all(c == "not_found" for c, _ in got)
        for call in (lambda s: bob.session_sync(s), lambda s: bob.cancel_sync(session=s),
                     lambda s: bob.watch_sync(session=s),
                     lambda s: dispatch_sync(Task(Stage("x", cmd="true")), bob, session=s)):
            (c1, m1), (c2, m2) = refusal(lambda: call(sid)), refusal(lambda: call(fake_sid))
            assert c1 == c2 == "not_found" and m1.replace(sid, "S") == m2.replace(fake_sid, "S")
        # Alice's task still runs: Bob's cancel did nothing.
        assert alice.session_sync(sid).counts.get("running", 0) + alice.session_sync(sid).counts.get("assigned", 0) == 1
        # The admin sees everything.
        admin = Hub(farm.address, token=farm.admin_token)
        assert admin.get_result_sync([tid])[0].task_id == tid
        admin.close_sync()
        alice.cancel_sync([tid])
        r = alice.get_result_sync([tid], wait=True)[0]
        assert r.status == "cancelled"
    finally:
        alice.close_sync()
        bob.close_sync()
    healthy(farm, tmp_path, [tid])


def test_another_users_blobs_cannot_be_read_or_probed(farm, tmp_path):
    alice = farm.hub(artifacts_dir=tmp_path / "a")
    from hwf_jupyter import Artifacts
    ids = dispatch_sync(Task(Stage("s", cmd="echo alice-private > out.txt"), Artifacts("out.txt")), alice)
    art = alice.get_result_sync(ids, wait=True)[0].artifacts[0]
    assert art.path.read_text() == "alice-private\n"
    alice.close_sync()
    with RawPeer(farm.address, farm.create_token("client", "mallory")) as m:
        got = m.request({"type": "blob_get", "sha256": art.sha256})
        fake = m.request({"type": "blob_get", "sha256": "f" * 64})
        assert got["type"] == fake["type"] == "error" and got["code"] == fake["code"] == "not_found"
        # "Is this file on the hub?" is not answered for others' files.
        missing = m.request({"type": "blobs_missing", "sha256": [art.sha256]})
        assert missing["missing"] == [art.sha256]
        # ...and a submit cannot borrow it as Data either.
        spec = {"stages": [{"name": "s", "cmds": ["cat x"],
                            "data": [{"filename": "x", "sha256": art.sha256, "size": art.size}]}]}
        reply = m.request({"type": "submit", "tasks": [spec]})
        assert reply["type"] == "error" and reply["code"] == "missing_blob"
    healthy(farm, tmp_path, ids)


# ------------------------------------------------------- rogue daemons


def daemon_token(cluster: LocalCluster, owner: str) -> str:
    return cluster.create_token("daemon", owner)


def test_bad_hardware_is_refused_at_registration_and_the_farm_keeps_scheduling(farm, tmp_path):
    with RawPeer(farm.address, daemon_token(farm, "rogue")) as rogue:
        for hardware, field in [({"ram": "lots"}, "hardware.ram"), ({"cores": -3}, "hardware.cores"),
                                ({"gpus": [{"name": ["x"]}]}, "hardware.gpus"),
                                ({"ram": 10**30}, "hardware.ram")]:
            reply = rogue.register("rogue-hw", hardware=dict(farm_hw(), **hardware))
            assert reply["type"] == "error" and reply["code"] == "bad_message", reply
            assert field in reply["message"], reply["message"]
        assert "rogue-hw" not in farm.hub().get_hardware_pool_sync(include_offline=True).names
    healthy(farm, tmp_path)


def farm_hw() -> dict:
    from rawpeer import HW
    return dict(HW)


def test_artifact_names_from_a_rogue_daemon_never_leave_the_artifacts_folder(farm, tmp_path):
    client = farm.hub(artifacts_dir=tmp_path / "arts")
    outside = tmp_path / "escape.txt"
    with RawPeer(farm.address, daemon_token(farm, "rogue")) as rogue:
        assert rogue.register("rogue-art", tags=("rogue-art",))["type"] == "registered"
        from hwf_jupyter import Artifacts
        ids = dispatch_sync(Task(Stage("s", cmd="true"), Artifacts("*"), hardware={"daemon": "rogue-art"}), client)
        assign = rogue.wait_push("assign")
        assert assign["task_id"] == ids[0]
        sha = rogue.upload(b"pwned\n")
        names = ["../../escape.txt", str(outside), "a/../../../escape.txt", "nul\x00.txt", "fine.txt"]
        arts = [{"pattern": "*", "name": n, "sha256": sha, "size": 6} for n in names]
        done = rogue.request({"type": "task_done", "task_id": ids[0], "attempt": assign["attempt"],
                              "outcome": {"status": "finished", "exit_code": 0, "artifacts": arts}})
        assert done["type"] == "ok"
    r = client.get_result_sync(ids, wait=True)[0]
    client.close_sync()
    assert not outside.exists() and not (tmp_path / "escape.txt").exists()
    by_name = {a.name: a for a in r.artifacts}
    assert by_name["fine.txt"].path == tmp_path / "arts" / ids[0] / "fine.txt"
    assert by_name["fine.txt"].path.read_bytes() == b"pwned\n"
    refused = [a for a in r.artifacts if a.name is None]
    assert len(refused) == 4 and all("refused artifact name" in a.error for a in refused)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [f"arts/{ids[0]}/fine.txt"]
    healthy(farm, tmp_path, ids)


def test_client_refuses_artifact_names_that_leave_its_folder(tmp_path):
    """Second line of defence, in the client: even if a hub passed a bad name."""
    root = tmp_path / "arts"
    (root / "t-1").mkdir(parents=True)
    os.symlink("/tmp", root / "t-1" / "link")
    assert artifact_destination(root, "t-1", "ok/x.txt") == root / "t-1" / "ok/x.txt"
    for name in ["../x", "/etc/passwd", "link/x", "a/../../x", "", "x\x00"]:
        assert artifact_destination(root, "t-1", name) is None, name
    for task_id in ["..", "../t", "a/b", ""]:
        assert artifact_destination(root, task_id, "x") is None, task_id


def test_a_machine_name_is_bound_to_its_owner(farm, tmp_path):
    """A daemon of another owner cannot squat daemon-1's name while it is away."""
    farm.stop_daemon("daemon-1")  # briefly away
    try:
        with RawPeer(farm.address, daemon_token(farm, "squatter")) as rogue:
            reply = rogue.register("daemon-1")
            assert reply["type"] == "error" and reply["code"] == "conflict"
            assert "registered to another owner" in reply["message"]
    finally:
        farm.daemon_processes.pop("daemon-1")
        farm.add_daemon("daemon-1")  # the real one comes back under its name
    healthy(farm, tmp_path)


def test_a_daemon_cannot_claim_or_cancel_another_machines_attempt(farm, tmp_path):
    client = farm.hub(artifacts_dir=tmp_path / "a")
    ids = dispatch_sync(pinned("daemon-1", "sleep 2", "echo real"), client)
    deadline = time.monotonic() + 30
    while client.get_result_sync(ids)[0].status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with RawPeer(farm.address, daemon_token(farm, farm.user)) as rogue:  # even the same owner
        assert rogue.register("rogue-claim", running=((ids[0], 1),))["type"] == "registered"
        fake = rogue.request({"type": "task_done", "task_id": ids[0], "attempt": 1,
                              "outcome": {"status": "failed", "error": "forged"}})
        assert fake["type"] == "ok"  # acked like any stale resend, and ignored
        forged = {"type": "task_done", "id": 0, "task_id": ids[0], "attempt": 1,
                  "outcome": {"status": "failed", "error": "forged in a batch"}}
        batch = rogue.request({"type": "tasks_done", "done": [forged, dict(forged, attempt=2)]})
        assert batch["type"] == "ok"  # the batch form is checked the same way
    r = client.get_result_sync(ids, wait=True)[0]
    client.close_sync()
    assert r.status == "finished" and r.output == "real\n" and r.machine == "daemon-1"
    assert [(a.machine, a.state) for a in r.attempts] == [("daemon-1", "finished")]
    healthy(farm, tmp_path, ids)


def test_a_rogue_daemons_reports_are_bounded(farm, tmp_path):
    client = farm.hub(artifacts_dir=tmp_path / "a")
    with RawPeer(farm.address, daemon_token(farm, "rogue")) as rogue:
        assert rogue.register("rogue-num")["type"] == "registered"
        ids = dispatch_sync(pinned("rogue-num", "true"), client)
        a = rogue.wait_push("assign")
        stage = {"name": "s", "status": "finished"}
        for index in range(1000, 3000):  # cannot grow the hub's memory: ignored
            rogue.send({"type": "stage_done", "task_id": a["task_id"], "attempt": a["attempt"],
                        "index": index, "stage": stage})
        bad = rogue.request({"type": "task_done", "task_id": a["task_id"], "attempt": a["attempt"],
                             "outcome": {"status": "failed", "exit_code": 2**63}})
        assert bad["type"] == "error" and bad["code"] == "bad_message" and "exit_code" in bad["message"]
        # a refused result ends its attempt (lost, the task queued again), so
        # a second word on the same attempt is stale: acked and ignored
        late = rogue.request({"type": "task_done", "task_id": a["task_id"], "attempt": a["attempt"],
                              "outcome": {"status": "failed", "exit_code": 3, "error": "rogue failure",
                                          "stages": [dict(stage, status="failed")]}})
        assert late["type"] == "ok"
    r = client.get_result_sync(ids)[0]
    assert r.status == "queued" and [(x.state, x.machine) for x in r.attempts] == [("lost", "rogue-num")]
    assert "exit_code" in r.attempts[0].reason and r.exit_code is None
    client.cancel_sync(list(ids))
    client.close_sync()
    healthy(farm, tmp_path, ids)


def test_a_rogue_daemons_heartbeat_load_is_bounded(farm, tmp_path):
    """Issue 18 row 11: 1e308 % CPU in a heartbeat reached the pool and the page."""
    with RawPeer(farm.address, daemon_token(farm, "rogue")) as rogue:
        assert rogue.register("rogue-load")["type"] == "registered"
        sane = {"load_avg": [0.5, 0.25, 0.125], "cpu_percent": 12.5, "mem_percent": 40.0, "disk_percent": 7.0}
        rogue.send({"type": "heartbeat", "load": sane})
        for field, value in [("cpu_percent", 1e308), ("mem_percent", 101.0), ("disk_percent", -1.0),
                             ("load_avg", [1e308, 0.0, 0.0])]:
            rogue.send({"type": "heartbeat", "load": dict(sane, **{field: value})})
            refusal = rogue.recv()
            assert refusal["type"] == "error" and refusal["code"] == "bad_message", refusal
            assert field in refusal["message"], refusal["message"]
        pool = farm.hub().get_hardware_pool_sync(include_offline=True).to_dataframe().set_index("name")
        row = pool.loc["rogue-load"]
        assert (row["cpu_percent"], row["mem_percent"], row["disk_percent"]) == (12.5, 40.0, 7.0)
        assert row["load_1m"] == 0.5
    healthy(farm, tmp_path)


# ------------------------------------------------------- bounded resources


def _rss_peak(pid: int, stop: threading.Event, out: list[int]) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            out.append(proc.memory_info().rss)
        except psutil.Error:
            return
        time.sleep(0.05)


# Up to 200 MB of output, for at least 4 s whatever this machine's speed: the
# slow-reader timeout (1 s) must pass while output still flows.
FLOOD = ("sleep 1; for i in $(seq 100); do head -c 2000000 /dev/zero | tr '\\0' x | fold -w 99; "
         "[ $SECONDS -ge 5 ] && break; done; while [ $SECONDS -lt 5 ]; do echo tick; sleep 0.1; done")


@pytest.mark.parametrize("slow_timeout", [600, 1])
def test_a_watcher_that_stops_reading_cannot_grow_the_hub(tmp_path, slow_timeout):
    """200 MB of live output to a watcher that never reads: the hub stays small,
    the watcher gets its output dropped with a marker (or, past the slow-reader
    timeout, is disconnected), and everyone else is served meanwhile."""
    with LocalCluster(daemons=1, slots=2, state_dir=tmp_path / "c",
                      hub_args=["--slow-reader-timeout", str(slow_timeout)]) as c:
        hub = c.hub(artifacts_dir=tmp_path / "a")
        ids = dispatch_sync(Task(Stage("flood", cmd=FLOOD)), hub, stream=True)
        watcher = RawPeer(c.address, c.token, max_queue=1)
        w = watcher.request({"type": "watch", "task_ids": list(ids), "output": True})
        assert w["type"] == "watching"
        base = psutil.Process(c.hub_process.pid).memory_info().rss
        samples: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_rss_peak, args=(c.hub_process.pid, stop, samples))
        sampler.start()
        try:
            # Served while the watcher blocks: another client's round trip.
            other = dispatch_sync(Task(Stage("s", cmd="echo served")), hub)
            assert hub.get_result_sync(other, wait=True, timeout=120)[0].output == "served\n"
            r = hub.get_result_sync(ids, wait=True, timeout=300)[0]
        finally:
            stop.set()
            sampler.join()
        assert r.status == "finished", r.error
        growth = max(samples) - base
        assert growth < 100 * 2**20, f"hub grew by {growth / 2**20:.0f} MiB"
        # Now read what the watcher was sent.
        texts, closed = [], None
        try:
            while True:
                msg = watcher.recv(timeout=5)
                if msg["type"] == "output":
                    texts.append(msg["text"])
        except TimeoutError:
            pass
        except ConnectionClosed as exc:
            closed = exc
        received = sum(map(len, texts))
        assert received < 200_000_000
        if slow_timeout == 1:
            assert closed is not None and "not reading" in (closed.rcvd.reason if closed.rcvd else "")
        else:
            assert closed is None
            assert any("lines" in t and "of output dropped" in t for t in texts)
        watcher.close()
        hub.close_sync()
        healthy(c, tmp_path, ids)


def test_upload_announcements_without_data_are_bounded(farm, tmp_path):
    hub_proc = psutil.Process(farm.hub_process.pid)
    fds_before = hub_proc.num_fds()
    with RawPeer(farm.address, farm.token) as m:
        codes = []
        for i in range(3000):
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            m.send({"type": "blob_put", "id": 10_000 + i, "sha256": sha, "size": 10})
        for _ in range(3000 - 4):  # the first 4 are open uploads (no reply until data)
            codes.append(m.recv()["code"])
        assert set(codes) == {"limit"}
        assert hub_proc.num_fds() - fds_before < 10
        err = m.request({"type": "blob_put", "sha256": "a" * 64, "size": 10})
        assert "max_uploads_per_connection=4" in err["message"]
    healthy(farm, tmp_path)


# ------------------------------------------------------ quotas, fair share


def test_per_user_queue_limit_keeps_room_for_others(tmp_path):
    with LocalCluster(daemons=1, slots=1, state_dir=tmp_path / "c",
                      hub_args=["--max-queued-per-user", "5"]) as c:
        alice = c.hub()
        bob = Hub(c.address, token=c.create_token("client", "bob"))
        a_ids = dispatch_sync(Task(Stage("s", cmd="sleep 30")), alice, repeat=5)
        with pytest.raises(RemoteError, match=rf"user '{c.user}' has 5 unfinished tasks; 1 more would exceed "
                                              r"max_queued_per_user=5") as info:
            dispatch_sync(Task(Stage("s", cmd="true")), alice)
        assert info.value.code == "queue_full"
        b_ids = dispatch_sync(Task(Stage("s", cmd="echo bob")), bob)
        alice.cancel_sync(list(a_ids))
        assert bob.get_result_sync(b_ids, wait=True, timeout=60)[0].output == "bob\n"
        # Alice's room is back once her tasks ended.
        assert len(dispatch_sync(Task(Stage("s", cmd="true")), alice, repeat=5)) == 5
        alice.close_sync()
        bob.close_sync()


def test_fair_share_one_task_of_bob_does_not_wait_behind_2000_of_alice(tmp_path):
    with LocalCluster(daemons=1, slots=2, state_dir=tmp_path / "c") as c:
        alice = c.hub()
        bob = Hub(c.address, token=c.create_token("client", "bob"))
        a_ids = dispatch_sync(Task(Stage("s", cmd="sleep 0.05")), alice, repeat=2000)
        while alice.session_sync(a_ids.session_id).counts.get("finished", 0) < 10:
            time.sleep(0.05)
        b_ids = dispatch_sync(Task(Stage("s", cmd="echo bob")), bob)
        b = bob.get_result_sync(b_ids, wait=True, timeout=120)[0]
        started_between = [r for r in alice.get_result_sync(list(a_ids), download=False)
                           if r.started is not None and b.submitted < r.started < b.started]
        # Only the two slots' next tasks may slip in: at most a few task lengths.
        assert len(started_between) <= 4, len(started_between)
        alice.cancel_sync(session=a_ids.session_id)
        alice.close_sync()
        bob.close_sync()


def test_cancelling_50000_tasks_lets_other_requests_through(tmp_path):
    """Cancellation runs in chunks: a request sent after the cancel is answered
    before the cancel finishes (no timing assert: the order of the replies)."""
    with LocalCluster(daemons=0, state_dir=tmp_path / "c") as c:
        hub = c.hub()
        ids = dispatch_sync(Task(Stage("s", cmd="true")), hub, repeat=50_000)
        hub.close_sync()
        with RawPeer(c.address, c.token) as m:
            m.send({"type": "cancel", "id": 1, "session_id": ids.session_id})
            m.send({"type": "get_pool", "id": 2})
            first, second = m.recv(timeout=120), m.recv(timeout=120)
            assert (first["type"], second["type"]) == ("pool", "cancelled")
            assert second["by_state"] == {"queued": 50_000}


# ------------------------------------------------------------ small ones


def test_deep_json_and_out_of_range_numbers_get_clear_errors(farm, tmp_path):
    with RawPeer(farm.address, farm.token) as m:
        deep = '{"type":"submit","id":7,"tasks":[{"stages":[{"name":"s","cmds":["true"]}],"hardware":{"a":' \
               + "[" * 100_000 + "]" * 100_000 + "}}]}"
        r = m.request(deep)
        assert r["type"] == "error" and r["code"] == "bad_message" and r["id"] == 7
        for frame in ["[" * 100_000 + "]" * 100_000,
                      '{"type":"launch","id":8,"x":' + "[" * 100_000 + "]" * 100_000 + "}"]:
            r = m.request(frame)
            assert r["type"] == "error" and r["code"] == "bad_message", r
        stage = {"name": "s", "cmds": ["true"]}
        for spec, code, words in [
            ({"stages": [stage], "priority": 2**63}, "bad_message", "`$.tasks[0].priority`"),
            ({"stages": [stage], "max_retries": 10**6}, "bad_message", "`$.tasks[0].max_retries`"),
            ({"stages": [stage], "timeout": -1}, "bad_message", "`$.tasks[0].timeout`"),
            ({"stages": [stage], "hardware": {"ram": "9" * 400}}, "bad_hardware", "cannot parse"),
            ({"stages": [stage], "hardware": {"ram": 2**62}}, "bad_hardware", "largest size"),
            ({"stages": [stage], "hardware": {"cores": 10**9}}, "bad_hardware", "cores"),
        ]:
            r = m.request({"type": "submit", "tasks": [spec]})
            assert r["type"] == "error" and r["code"] == code and words in r["message"], (spec, r)
        # The connection is still good.
        assert m.request({"type": "get_pool"})["type"] == "pool"
    log = (farm.log_dir / "hub.log").read_text()
    assert "RecursionError" not in log and "Traceback" not in log
    healthy(farm, tmp_path)


def test_state_dir_is_made_private_whatever_existed(tmp_path):
    from hub_server import auth
    state = tmp_path / "hub"  # where LocalCluster keeps the hub's state
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    db = state / auth.DB_FILE
    db.touch(mode=0o644)
    os.chmod(db, 0o644)
    with LocalCluster(daemons=0, state_dir=tmp_path) as c:
        assert c.state_dir == state
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        for f in state.iterdir():
            if f.is_file():
                assert f.stat().st_mode & 0o077 == 0, f
        assert oct((state / "blobs").stat().st_mode & 0o777) == "0o700"


def test_revoked_token_is_refused_at_once_open_connections_included(farm, tmp_path):
    token = farm.create_token("client", "carol")
    hub = Hub(farm.address, token=token)
    assert len(hub.get_hardware_pool_sync()) >= 1
    with RawPeer(farm.address, token) as raw:
        listing = subprocess.run([sys.executable, "-m", "hwf_jupyter.cli", "token", "list",
                                  "--state-dir", str(farm.state_dir)], capture_output=True, text=True, check=True)
        carol = [line for line in listing.stdout.splitlines() if " carol " in line]
        assert len(carol) == 1 and token not in listing.stdout
        token_id = carol[0].split()[0]
        out = subprocess.run([sys.executable, "-m", "hwf_jupyter.cli", "token", "revoke", token_id,
                              "--state-dir", str(farm.state_dir)], capture_output=True, text=True, check=True)
        assert f"revoked 1 token(s): {token_id}" in out.stdout
        with pytest.raises(ConnectionClosed) as info:
            raw.recv(timeout=10)
        assert info.value.rcvd.reason == "token revoked"
    with pytest.raises(ConnectError, match="token revoked"):
        Hub(farm.address, token=token).get_hardware_pool_sync()
    with pytest.raises((ConnectError, RemoteError)):
        hub.get_hardware_pool_sync()
    hub.close_sync()
    bad = subprocess.run([sys.executable, "-m", "hwf_jupyter.cli", "token", "revoke", "tok-nope",
                          "--state-dir", str(farm.state_dir)], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown token id(s): tok-nope" in bad.stderr
    healthy(farm, tmp_path)


def test_token_create_names_user_and_owner(farm):
    out = subprocess.run([sys.executable, "-m", "hwf_jupyter.cli", "token", "create", "--role", "daemon",
                          "--owner", "lab-7", "--state-dir", str(farm.state_dir)],
                         capture_output=True, text=True, check=True)
    token = out.stdout.strip().splitlines()[-1]
    assert token.startswith("hwf_d_") and "for 'lab-7'" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "hwf_jupyter.cli", "token", "create", "--role", "client",
                          "--user", "no spaces", "--state-dir", str(farm.state_dir)], capture_output=True, text=True)
    assert bad.returncode == 2 and "user/owner name 'no spaces'" in bad.stderr
    with RawPeer(farm.address, token) as d:
        assert d.register("lab-7-box")["type"] == "registered"
    pool = farm.hub().get_hardware_pool_sync(include_offline=True)
    assert {m.name: m for m in pool}["lab-7-box"].owner == "lab-7"


# ------------------------------------------------------------------- TLS


SEED_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(void) {
    size_t n = 50u << 20;
    char *p = malloc(n);
    memset(p, 1, n);
    printf("touched %zu bytes\n", n);
    return 0;
}
"""


def test_tls_farm_runs_the_seed_example_and_refuses_plain_ws(tmp_path):
    from hwf_jupyter import Artifacts, Data
    from tlsfiles import make_tls_files

    pem, key, ca_pem = make_tls_files(tmp_path)
    src = tmp_path / "main.c"
    src.write_text(SEED_C)
    with LocalCluster(daemons=2, state_dir=tmp_path / "c", tls=(pem, key, ca_pem)) as c:
        assert c.address.startswith("wss://127.0.0.1:")
        hub = c.hub(artifacts_dir=tmp_path / "arts")
        task = Task(
            Stage("build", data=[Data(src, "main.c")], cmd="gcc main.c -o main"),
            Stage("run", cmd=["./main > out.txt", "wc -c out.txt"], track_time=True, track_ram=True,
                  track_cpu=True),
            Artifacts("out.txt"),
            hardware={"os": "linux", "ram": "256MB"},
        )
        r = hub.get_result_sync(dispatch_sync(task, hub), wait=True, timeout=120)[0]
        assert r.status == "finished", r.error
        assert r.artifacts[0].path.read_text() == "touched 52428800 bytes\n"
        assert r.stages[1].peak_ram > 50 * 2**20
        assert len(hub.get_hardware_pool_sync()) == 2  # both daemons came in over wss://
        hub.close_sync()
        plain = "ws://" + c.address.split("://", 1)[1]
        with pytest.raises(ConnectError):
            Hub(plain, token=c.token, connect_timeout=5).get_hardware_pool_sync()
        with pytest.raises(ConnectError, match="TLS with hub at .* failed.*CERTIFICATE_VERIFY_FAILED"):
            Hub(c.address, token=c.token, connect_timeout=5).get_hardware_pool_sync()  # system CAs only


def test_blob_store_bytes_are_bounded(tmp_path):
    from hwf_jupyter import Data
    with LocalCluster(daemons=1, state_dir=tmp_path / "c", hub_args=["--max-blob-store-bytes", "5000"]) as c:
        hub = c.hub(artifacts_dir=tmp_path / "a")
        small, big = tmp_path / "small.bin", tmp_path / "big.bin"
        small.write_bytes(os.urandom(3000))
        big.write_bytes(os.urandom(3000))
        ids = dispatch_sync(Task(Stage("s", data=Data(small, "x"), cmd="wc -c < x")), hub)
        assert hub.get_result_sync(ids, wait=True)[0].output.strip() == "3000"
        with pytest.raises(RemoteError, match=r"blob store is full: 3000 of max_blob_store_bytes=5000 used; "
                                              r"a file of 3000 bytes does not fit") as info:
            dispatch_sync(Task(Stage("s", data=Data(big, "x"), cmd="true")), hub)
        assert info.value.code == "store_full"
        # What is stored stays usable.
        again = dispatch_sync(Task(Stage("s", data=Data(small, "y"), cmd="wc -c < y")), hub)
        assert hub.get_result_sync(again, wait=True)[0].output.strip() == "3000"
        hub.close_sync()


def test_revoke_every_token_of_a_user(farm):
    tokens = [farm.create_token("client", "dave") for _ in range(2)]
    for t in tokens:
        assert len(Hub(farm.address, token=t).get_hardware_pool_sync()) >= 1
    out = subprocess.run([sys.executable, "-m", "hwf_jupyter.cli", "token", "revoke", "--user", "dave",
                          "--state-dir", str(farm.state_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("revoked 2 token(s)")
    for t in tokens:
        with pytest.raises(ConnectError, match="token revoked"):
            Hub(farm.address, token=t).get_hardware_pool_sync()
    assert len(farm.hub().get_hardware_pool_sync()) >= 1  # others unaffected

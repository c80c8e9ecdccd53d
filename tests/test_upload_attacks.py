"""Uploads and blobs under attack (issue 18, row 4), on a real hub and daemon.

user-b announces uploads (``blob_put``) on many connections and never sends a
byte.  That used to fill the hub's upload slots: every other user's upload was
refused until user-b left, and a finished task of user-a lost its artifact.
Each test ends with a normal user dispatching and earlier data intact.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hwf_jupyter import Artifacts, Data, Hub, LocalCluster, Stage, Task, dispatch_sync

from rawpeer import RawPeer
from waiting import wait_until

pytestmark = pytest.mark.e2e


def flood(cluster: LocalCluster, token: str, connections: int = 64, per_connection: int = 4) -> list[RawPeer]:
    """Open ``connections`` raw connections, each announcing uploads it never sends."""
    peers = []
    for c in range(connections):
        peer = RawPeer(cluster.address, token)
        for i in range(per_connection):
            sha = hashlib.sha256(f"flood-{c}-{i}".encode()).hexdigest()
            peer.send({"type": "blob_put", "id": 1000 + i, "sha256": sha, "size": 1 << 20})
        peers.append(peer)
    return peers


def answers(peers: list[RawPeer], per_peer: int = 4, timeout: float = 60) -> list[dict]:
    """The one answer each announcement gets: a refusal at once, or an error when it expires."""
    return [peer.recv(timeout=timeout) for peer in peers for _ in range(per_peer)]


def healthy(cluster: LocalCluster, tmp_path: Path, before: list[str] = ()) -> None:
    """A normal client still dispatches (with a Data file and an artifact); earlier results are intact."""
    src = tmp_path / "healthy-in.txt"
    src.write_text("still fine\n")
    hub = cluster.hub(artifacts_dir=tmp_path / "healthy")
    try:
        ids = dispatch_sync(Task(Stage("ok", data=Data(str(src), "in.txt"), cmd="cp in.txt out.txt"),
                                 Artifacts("out.txt")), hub)
        r = hub.get_result_sync(ids, wait=True, timeout=60)[0]
        assert r.status == "finished", (r.status, r.error)
        assert [a.path.read_text() for a in r.artifacts if a.ok] == ["still fine\n"]
        if before:
            old = hub.get_result_sync(list(before))
            assert all(o.status == "finished" and all(a.ok for a in o.artifacts) for o in old)
    finally:
        hub.close_sync()


def test_announcement_flood_neither_blocks_uploads_nor_loses_artifacts(tmp_path):
    with LocalCluster(daemons=1, slots=2, state_dir=tmp_path / "c") as c:
        alice = c.hub(artifacts_dir=tmp_path / "a")
        peers = flood(c, c.create_token("client", "user-b"))
        try:
            # user-a's Data upload goes through while user-b's announcements hold slots.
            src = tmp_path / "input.bin"
            src.write_bytes(b"alice's data\n" * 1000)
            ids = dispatch_sync(Task(Stage("s", data=Data(str(src), "input.bin"),
                                           cmd=["sha256sum input.bin > digest.txt", "echo art > art.txt"]),
                                     Artifacts("digest.txt", "art.txt")), alice)
            r = alice.get_result_sync(ids, wait=True, timeout=120)[0]
            assert r.status == "finished", (r.status, r.error)
            # ... and her finished task kept its artifacts (the daemon's uploads were not refused).
            assert all(a.ok for a in r.artifacts), [a.error for a in r.artifacts]
            digest = hashlib.sha256(src.read_bytes()).hexdigest()
            got = {a.name: a.path.read_text() for a in r.artifacts}
            assert got == {"digest.txt": f"{digest}  input.bin\n", "art.txt": "art\n"}
            # user-b held at most its own share of slots, and its silent announcements
            # expired, each with an error naming the limit.
            got = answers(peers)
            codes = [(m["type"], m["code"]) for m in got]
            assert codes.count(("error", "timeout")) == 16 and codes.count(("error", "limit")) == 64 * 4 - 16
            assert all("--upload-idle-timeout" in m["message"] for m in got if m["code"] == "timeout")
            assert all("max_uploads_per_user=16" in m["message"] and "--max-uploads-per-user" in m["message"]
                       for m in got if m["code"] == "limit")
        finally:
            for peer in peers:
                peer.close()
        healthy(c, tmp_path, list(ids))
        alice.close_sync()


def test_a_full_client_pool_never_refuses_a_finished_tasks_artifact(tmp_path):
    """Many users together fill every client upload slot: clients are refused
    (naming the flag), but daemons upload artifacts from their own pool."""
    with LocalCluster(daemons=1, slots=2, state_dir=tmp_path / "c",
                      hub_args=["--max-uploads", "32", "--upload-idle-timeout", "600"]) as c:
        alice = c.hub(artifacts_dir=tmp_path / "a")
        peers = [p for u in range(3) for p in flood(c, c.create_token("client", f"sybil-{u}"), 4, 4)]
        try:
            refused = [m for m in answers(peers[8:], timeout=10)]  # the first 32 hold every client slot
            assert {m["code"] for m in refused} == {"busy"}
            assert "max_uploads=32" in refused[0]["message"] and "--max-uploads" in refused[0]["message"]
            src = tmp_path / "in.txt"
            src.write_text("x\n")
            with pytest.raises(Exception, match="--max-uploads"):
                dispatch_sync(Task(Stage("s", data=Data(str(src), "in.txt"), cmd="true")), alice)
            ids = dispatch_sync(Task(Stage("s", cmd="echo made-during-flood > out.txt"), Artifacts("out.txt")),
                                alice)
            r = alice.get_result_sync(ids, wait=True, timeout=120)[0]
            assert r.status == "finished", r.error
            assert [a.path.read_text() for a in r.artifacts if a.ok] == ["made-during-flood\n"]
        finally:
            for peer in peers:
                peer.close()
        healthy(c, tmp_path, list(ids))
        alice.close_sync()


def test_a_rogue_daemon_owner_filling_the_daemon_pool_only_delays_artifacts(tmp_path):
    """owner-m's daemon token announces uploads and sends nothing: the real
    daemon's artifact upload is refused as busy, retried with backoff, and
    succeeds once owner-m's announcements expire."""
    with LocalCluster(daemons=1, slots=2, state_dir=tmp_path / "c",
                      hub_args=["--max-daemon-uploads", "4", "--upload-idle-timeout", "6"]) as c:
        alice = c.hub(artifacts_dir=tmp_path / "a")
        rogue = flood(c, c.create_token("daemon", "owner-m"), 1, 4)
        try:
            ids = dispatch_sync(Task(Stage("s", cmd="echo kept > out.txt"), Artifacts("out.txt")), alice)
            r = alice.get_result_sync(ids, wait=True, timeout=120)[0]
            assert r.status == "finished", r.error
            assert [a.path.read_text() for a in r.artifacts if a.ok] == ["kept\n"]
            assert {m["code"] for m in answers(rogue, timeout=30)} == {"timeout"}
            log = (c.log_dir / "daemon-1.log").read_text()
            assert "max_daemon_uploads=4" in log, "the daemon's upload was refused at first, then retried"
        finally:
            for peer in rogue:
                peer.close()
        healthy(c, tmp_path, list(ids))
        alice.close_sync()


# ------------------------------------------------------------ quotas and garbage collection


def hwf(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("HWF_TOKEN", "HWF_HUB_URL")}
    run = subprocess.run([sys.executable, "-m", "hwf_jupyter.cli", *args], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def age_every_blob(state_dir: Path, seconds: float = 7200) -> None:
    """Pretend every stored blob was last used ``seconds`` ago (past the GC grace)."""
    old = time.time() - seconds
    for f in (state_dir / "blobs").glob("??/*"):
        os.utime(f, (old, old))


def test_quota_refuses_a_users_blobs_and_hwf_blobs_gc_frees_only_unreferenced_ones(tmp_path):
    with LocalCluster(daemons=1, slots=1, state_dir=tmp_path / "c",
                      hub_args=["--max-blob-bytes-per-user", "300000", "--blob-gc-interval", "0"]) as c:
        alice = c.hub(artifacts_dir=tmp_path / "a")
        src, waiting_src = tmp_path / "in.txt", tmp_path / "waiting.txt"
        src.write_text("input\n")
        waiting_src.write_text("for a task that has not run\n")
        ran = dispatch_sync(Task(Stage("s", data=Data(str(src), "in.txt"), cmd="tr a-z A-Z < in.txt > out.txt"),
                                 Artifacts("out.txt")), alice)
        assert alice.get_result_sync(ran, wait=True, timeout=60)[0].status == "finished"
        waiting = dispatch_sync(Task(Stage("s", data=Data(str(waiting_src), "w.txt"), cmd="cat w.txt"),
                                     hardware={"tags": ["no-such-machine"]}), alice)
        with RawPeer(c.address, c.token) as raw:
            orphan = raw.upload(b"o" * 200_000)  # uploaded, never used by a task
            # The user's quota: 200 kB more would pass 300,000 bytes.
            sha = hashlib.sha256(b"p" * 200_000).hexdigest()
            err = raw.request({"type": "blob_put", "sha256": sha, "size": 200_000})
            assert err["code"] == "quota", err
            assert "max_blob_bytes_per_user=300000" in err["message"] and "--max-blob-bytes-per-user" in err["message"]
        # Another user's room is their own.
        with RawPeer(c.address, c.create_token("client", "user-b")) as other:
            other.upload(b"p" * 200_000)

        age_every_blob(c.state_dir)
        blob = lambda s: c.state_dir / "blobs" / s[:2] / s
        digest = lambda f: hashlib.sha256(f.read_bytes()).hexdigest()
        dry = hwf("blobs", "gc", "--state-dir", str(c.state_dir), "--dry-run")
        # alice's orphan, user-b's upload and the Data of the task that ended.
        assert dry.startswith("would delete 3 blob(s)") and "by the hub at ws://" in dry, dry
        assert blob(orphan).exists()
        real = hwf("blobs", "gc", "--state-dir", str(c.state_dir))
        assert real.startswith("deleted 3 blob(s)"), real
        assert not blob(orphan).exists() and not blob(digest(src)).exists()
        assert blob(digest(waiting_src)).exists(), "the Data of a task that has not run stays"
        # The stored result keeps its artifact: a fresh client still downloads it.
        again = c.hub(artifacts_dir=tmp_path / "again")
        r = again.get_result_sync(ran)[0]
        assert [a.path.read_text() for a in r.artifacts if a.ok] == ["INPUT\n"]
        again.close_sync()
        # The collected orphan no longer counts against alice's quota.
        with RawPeer(c.address, c.token) as raw:
            raw.upload(b"p" * 200_000)
        # The waiting task still runs once a machine it wants appears... here: cancelled, and nothing else lost.
        alice.cancel_sync(list(waiting))
        healthy(c, tmp_path, list(ran))
        alice.close_sync()
    # With no hub running, the command collects on its own under the state dir's lock.
    age_every_blob(c.state_dir)
    alone = hwf("blobs", "gc", "--state-dir", str(c.state_dir))
    assert "(no hub running)" in alone, alone
    assert "deleted 0 blob(s)" not in alone


def test_the_hub_collects_on_its_schedule(tmp_path):
    with LocalCluster(daemons=1, slots=1, state_dir=tmp_path / "c",
                      hub_args=["--blob-gc-interval", "1", "--blob-gc-grace", "60"]) as c:
        with RawPeer(c.address, c.token) as raw:
            orphan = raw.upload(b"never used by a task\n")
            fresh = raw.upload(b"uploaded just now\n")
        path = c.state_dir / "blobs" / orphan[:2] / orphan
        old = time.time() - 120
        os.utime(path, (old, old))
        wait_until(lambda: not path.exists(), timeout=30, what="the scheduled GC to delete the orphan")
        assert (c.state_dir / "blobs" / fresh[:2] / fresh).exists(), "a blob inside its grace stays"
        healthy(c, tmp_path)

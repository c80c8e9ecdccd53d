"""Uploads and blobs under attack (issue 18, row 4), on a real hub and daemon.

user-b announces uploads (``blob_put``) on many connections and never sends a
byte.  That used to fill the hub's upload slots: every other user's upload was
refused until user-b left, and a finished task of user-a lost its artifact.
Each test ends with a normal user dispatching and earlier data intact.
"""

from __future__ import annotations

import hashlib
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


def replies(peer: RawPeer, timeout: float) -> list[dict]:
    """Every error reply the peer got within ``timeout`` seconds (until quiet)."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(peer.recv(timeout=max(0.05, deadline - time.monotonic())))
        except TimeoutError:
            break
    return got


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
            # user-b's silent announcements expire, each with an error naming the limit.
            errors = [m for peer in peers for m in replies(peer, 0.2)]
            waited = [m for m in replies(peers[0], 30)]
            expired = [m for m in errors + waited if "--upload-idle-timeout" in m.get("message", "")]
            assert expired, errors[:3] + waited[:3]
            assert all(m["type"] == "error" and m["code"] == "timeout" for m in expired)
        finally:
            for peer in peers:
                peer.close()
        healthy(c, tmp_path, list(ids))
        alice.close_sync()

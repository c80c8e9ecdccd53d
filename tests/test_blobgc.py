"""Blob garbage collection and per-user blob quotas, without sockets: the
referencing rule (blobgc.py) and the core's final cut."""

from __future__ import annotations

import hashlib
import os

from hub_server import blobgc
from hub_server import protocol as p
from hub_server.events import BlobsScanned, BlobStored, Received, Send
from hub_server.store import read_blob_references

from test_core import ALICE, CLIENT, DAEMON, OWNER, T0, Farm, assigned, done
from test_core_manager import ADMIN, ADMIN_PEER, reply

OLD = T0 - 7200  # two hours before the farm's clock: past a one-hour grace


def put(f: Farm, data: bytes, who=ALICE, peer: int = CLIENT, mtime: float = OLD) -> str:
    """Store a blob as ``who``'s upload, last used at ``mtime``."""
    sha = hashlib.sha256(data).hexdigest()
    w = f.core.blobs.writer(sha, len(data))
    w.write(data)
    w.finish()
    out = f.handle(BlobStored(peer, 1, sha))
    assert [i.msg for i in out if isinstance(i, Send)] == [p.Ok(id=1)], out
    os.utime(f.core.blobs.path(sha), (mtime, mtime))
    f.core.blobs._touched.clear()  # the next use touches it for real
    return sha


def data_spec(sha: str, name: str = "in.txt") -> p.TaskSpec:
    return p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["true"], data=[p.DataSpec(name, sha, 1)])])


def test_plan_keeps_referenced_and_recently_used_blobs():
    listing = {"a" * 64: (10, 0.0), "b" * 64: (20, 0.0), "c" * 64: (30, 995.0), "d" * 64: (40, 100.0)}
    assert blobgc.plan(listing, {"b" * 64}, now=1000.0, grace=10.0) == ["a" * 64, "d" * 64]
    assert blobgc.totals(listing, ["a" * 64, "d" * 64]) == (2, 50, 2, 50)


def test_gc_never_deletes_what_a_task_a_result_or_a_job_file_needs(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    f.connect(ADMIN_PEER, ADMIN)
    queued_in = put(f, b"input of a task that waits")
    ran_in = put(f, b"input of a task that finished")
    job = put(f, b"PK a job file")
    orphan = put(f, b"uploaded, never submitted")
    fresh = put(f, b"uploaded a minute ago", mtime=T0 - 60)
    f.register("d1", "i1", slots=1)
    ran = f.submit(data_spec(ran_in)).task_ids[0]
    art = put(f, b"an artifact", who=OWNER, peer=DAEMON)
    f.handle(Received(DAEMON, done(ran, 1, exit_code=0,
                                   artifacts=[p.ArtifactInfo(pattern="o", name="o", sha256=art, size=11)])))
    f.submit(data_spec(queued_in, "a.txt"), p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["sleep 1"])]))
    assert reply(f.handle(Received(CLIENT, p.PutJobFile(id=5, job_id="j", sha256=job)))) == p.Ok(id=5)
    for sha in (queued_in, ran_in, job, art):  # the submit, result and job file just touched them
        os.utime(f.core.blobs.path(sha), (OLD, OLD))
    f.core.blobs._touched.clear()

    found, listing = blobgc.candidates(f.core.store.path, f.core.blobs, now=T0, grace=3600)
    assert read_blob_references(f.core.store.path) >= {queued_in, art, job}
    assert set(found) == {ran_in, orphan}, "Data of an ended task and an orphan; not the fresh upload"
    # Between the scan and the cut, alice is told her orphan is there (she will submit it).
    missing = reply(f.handle(Received(CLIENT, p.BlobsMissing(id=6, sha256=[orphan]))))
    assert missing.missing == []
    out = f.handle(BlobsScanned(ADMIN_PEER, 7, False, 3600, tuple(found), listing))
    report = reply(out, peer=ADMIN_PEER)
    assert (report.deleted, report.kept) == (1, 5)
    assert not f.core.blobs.has(ran_in)
    assert all(f.core.blobs.has(s) for s in (queued_in, job, art, orphan, fresh))
    # The deleted blob is no one's any more: asked again, it is missing, and quotas forget it.
    assert reply(f.handle(Received(CLIENT, p.BlobsMissing(id=8, sha256=[ran_in])))).missing == [ran_in]
    assert not f.core.store.blob_ref_exists(ran_in, "u:alice")
    # The queued task still runs with its Data; the result keeps its artifact.
    res = reply(f.handle(Received(CLIENT, p.GetResults(id=9, task_ids=[ran]))))
    assert res.tasks[0].artifacts[0].sha256 == art


def test_a_dry_run_deletes_nothing(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(ADMIN_PEER, ADMIN)
    orphan = put(f, b"orphan")
    found, listing = blobgc.candidates(f.core.store.path, f.core.blobs, now=T0, grace=3600)
    report = reply(f.handle(BlobsScanned(ADMIN_PEER, 1, True, 3600, tuple(found), listing)), peer=ADMIN_PEER)
    assert (report.dry_run, report.deleted, report.deleted_bytes) == (True, 1, 6)
    assert f.core.blobs.has(orphan) and f.core.store.blob_ref_exists(orphan, "u:alice")


def test_blob_gc_is_for_admins_only(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    err = reply(f.handle(Received(CLIENT, p.BlobGc(id=1))))
    assert isinstance(err, p.Error) and err.code == "forbidden"


def test_per_user_blob_quota_counts_uploads_and_artifacts(tmp_path):
    f = Farm(tmp_path)
    f.core.limits = p.Limits(max_blob_bytes_per_user=100)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    first = put(f, b"x" * 60)
    # The announcement of 50 more is refused, naming the limit and its flag ...
    over = f.core.blob_quota_refusal(ALICE, "0" * 64, 50)
    assert "stores 60 bytes" in over and "max_blob_bytes_per_user=100" in over and "--max-blob-bytes-per-user" in over
    assert f.core.blob_quota_refusal(ALICE, first, 60) is None, "her own blob again costs nothing"
    assert f.core.blob_quota_refusal(ALICE, "0" * 64, 30, pending=20) is not None, "open uploads count"
    assert f.core.blob_quota_refusal(OWNER, "0" * 64, 10**9) is None, "daemons are charged per task"
    # ... and so is the blob if it arrives anyway (an HTTP upload, a race).
    data = b"y" * 50
    sha = hashlib.sha256(data).hexdigest()
    w = f.core.blobs.writer(sha, len(data))
    w.write(data)
    w.finish()
    (err,) = [i.msg for i in f.handle(BlobStored(CLIENT, 2, sha)) if isinstance(i, Send)]
    assert isinstance(err, p.Error) and err.code == "quota"
    assert not f.core.store.blob_ref_exists(sha, "u:alice")
    # A task's artifacts count against its user: the one that does not fit is reported, not kept.
    f.register("d1", "i1", slots=1)
    tid = f.submit(p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["true"])])).task_ids[0]
    small = put(f, b"z" * 30, who=OWNER, peer=DAEMON)
    big = put(f, b"w" * 20, who=OWNER, peer=DAEMON)
    f.handle(Received(DAEMON, done(tid, 1, exit_code=0, artifacts=[
        p.ArtifactInfo(pattern="a", name="a", sha256=small, size=30),
        p.ArtifactInfo(pattern="b", name="b", sha256=big, size=20)])))
    arts = reply(f.handle(Received(CLIENT, p.GetResults(id=3, task_ids=[tid])))).tasks[0].artifacts
    assert arts[0].sha256 == small and arts[0].error is None
    assert arts[1].sha256 is None and "max_blob_bytes_per_user=100" in arts[1].error
    assert f.core.store.blob_bytes("u:alice") == 90

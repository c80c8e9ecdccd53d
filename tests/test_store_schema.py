"""The store's schema version: an HWF 0.1 store is migrated with nothing lost,
a store from a newer HWF is refused untouched."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from hub_server import auth
from hub_server import protocol as p
from hub_server.auth import Principal
from hub_server.blobs import BlobStore
from hub_server.core import HubCore
from hub_server.events import Connected, Received
from hub_server.store import SCHEMA_VERSION, SchemaError, Store

SCHEMA1 = (Path(__file__).parent / "data" / "store_schema1.sql").read_text()
OLD_CLIENT = "hwf_c_an-old-client-token"
OLD_ADMIN = "hwf_a_an-old-admin-token"
ARTIFACT = b"made by HWF 0.1\n"


def make_v1_store(state: Path) -> dict:
    """A state dir as HWF 0.1 left it: tokens, a finished task with an artifact, a machine."""
    state.mkdir(parents=True)
    blobs = BlobStore(state / "blobs")
    sha, size = hashlib.sha256(ARTIFACT).hexdigest(), len(ARTIFACT)
    w = blobs.writer(sha, size)
    w.write(ARTIFACT)
    w.finish()
    db = sqlite3.connect(state / auth.DB_FILE)
    db.executescript(SCHEMA1)
    now = time.time()
    db.execute("INSERT INTO tokens VALUES (?, 'client', 'old', ?)", (auth.hash_token(OLD_CLIENT), now))
    db.execute("INSERT INTO tokens VALUES (?, 'admin', 'initial admin token', ?)", (auth.hash_token(OLD_ADMIN), now))
    db.execute("INSERT INTO meta VALUES ('hub_id', 'hub-old')")
    db.execute("INSERT INTO sessions VALUES ('s-old', ?)", (now,))
    spec = p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["echo hi > out.txt"])], artifacts=["out.txt"])
    outcome = p.TaskOutcome(status="finished", exit_code=0, started=now, finished=now,
                            stages=[p.StageOutcome(name="s", status="finished")],
                            artifacts=[p.ArtifactInfo(pattern="out.txt", name="out.txt", sha256=sha, size=size)])
    db.execute(
        "INSERT INTO tasks(task_id, session_id, spec, requirements, priority, max_retries, status, submitted, "
        "queued, started, finished, machine, attempt, exit_code, result, result_attempt) "
        "VALUES ('t-old', 's-old', ?, '{}', 0, 3, 'finished', ?, ?, ?, ?, 'box', 1, 0, ?, 1)",
        (msgspec.json.encode(spec), now, now, now, now, msgspec.json.encode(outcome)))
    db.execute("INSERT INTO attempts VALUES ('t-old', 1, 'box', 'finished', ?, ?, ?, NULL, 'i1')", (now, now, now))
    db.execute("INSERT INTO machines VALUES ('box', 'box', '{}', 2, '[]', 'offline', ?, ?, NULL, 'i1')", (now, now))
    db.commit()
    db.close()
    (state / auth.ADMIN_TOKEN_FILE).write_text(OLD_ADMIN + "\n")
    return {"sha": sha}


def test_an_hwf_0_1_store_is_migrated_with_nothing_lost(tmp_path):
    state = tmp_path / "state"
    made = make_v1_store(state)
    store = auth.open_state_dir(state)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    backup = state / f"{auth.DB_FILE}.schema1.bak"
    old = sqlite3.connect(backup)
    assert old.execute("SELECT count(*) FROM tasks").fetchone()[0] == 1
    assert old.execute("PRAGMA user_version").fetchone()[0] == 0
    old.close()
    who = auth.authenticate(store, OLD_CLIENT)
    assert isinstance(who, Principal) and (who.role, who.user) == ("client", "default")
    assert who.token_id.startswith("tok-")
    admin = auth.authenticate(store, OLD_ADMIN)
    assert isinstance(admin, Principal) and admin.user == "admin"
    core = HubCore(store, BlobStore(state / "blobs"), p.Limits(), now=time.time())
    core.handle(Connected(1, who, p.PROTOCOL_VERSION), now=time.time())
    (res,) = core.handle(Received(1, p.GetResults(id=2, task_ids=["t-old"])), now=time.time())
    rec = res.msg.tasks[0]
    assert (rec.status, rec.session_id, rec.artifacts[0].sha256) == ("finished", "s-old", made["sha"])
    (ses,) = core.handle(Received(1, p.GetSession(id=3, session_id="s-old")), now=time.time())
    assert ses.msg.task_ids == ["t-old"]
    assert core.blob_readable(who, made["sha"])  # the old artifact stays downloadable
    assert not core.blob_readable(Principal("tok-x", "client", "mallory"), made["sha"])
    assert core.hub_id == "hub-old"
    store.close()
    # Opening again changes nothing more (migration steps are idempotent).
    again = Store(state / auth.DB_FILE)
    assert again.db.execute("SELECT count(*) FROM tokens").fetchone()[0] == 2
    again.close()


def test_a_store_from_a_newer_hwf_is_refused_untouched(tmp_path):
    state = tmp_path / "state"
    auth.open_state_dir(state).close()
    db_file = state / auth.DB_FILE
    db = sqlite3.connect(db_file)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    before = db_file.read_bytes()
    with pytest.raises(SchemaError, match=rf"written by a newer HWF \(store schema {SCHEMA_VERSION + 1}; "
                                          rf"HWF .* reads schema {SCHEMA_VERSION} and older\)"):
        Store(db_file)
    assert db_file.read_bytes() == before


@pytest.mark.e2e
def test_hub_and_token_commands_refuse_a_newer_store_with_a_clear_message(tmp_path):
    state = tmp_path / "state"
    auth.open_state_dir(state).close()
    db = sqlite3.connect(state / auth.DB_FILE)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    db.close()
    for argv in (["-m", "hub_server", "--port", "0", "--http-port", "0", "--state-dir", str(state)],
                 ["-m", "hwf_jupyter.cli", "token", "list", "--state-dir", str(state)]):
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "written by a newer HWF" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.e2e
def test_a_migrated_store_serves_its_old_results_through_a_real_hub(tmp_path):
    from hwf_jupyter import Hub, LocalCluster

    make_v1_store(tmp_path / "hub")
    with LocalCluster(daemons=0, state_dir=tmp_path) as c:
        hub = Hub(c.address, token=OLD_CLIENT, artifacts_dir=tmp_path / "arts")
        r = hub.get_result_sync(["t-old"])[0]
        assert r.status == "finished" and r.artifacts[0].path.read_bytes() == ARTIFACT
        hub.close_sync()


def test_a_schema_2_store_gets_the_credit_ledger_empty_with_a_backup(tmp_path):
    path = tmp_path / "hub.sqlite3"
    store = Store(path)
    store.add_session("s-2", 1.0, "alice")
    store.close()
    db = sqlite3.connect(path)  # what HWF 0.2 left: no credit tables, user_version 2
    for table in ("credit_slots", "credit_counters", "credit_meta", "credit_links"):
        db.execute(f"DROP TABLE {table}")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    assert store.session("s-2")["user"] == "alice"
    store.add_credit_slots([("x", "alice", None, None, 3, None, None, 1.0, None)])
    assert store.credit_slot("x")["state"] == "allocated"
    assert (tmp_path / "hub.sqlite3.schema2.bak").exists()
    store.close()


def test_a_schema_3_store_gets_the_manager_api_columns_and_keeps_its_tasks(tmp_path):
    path = tmp_path / "hub.sqlite3"
    store = Store(path)
    store.add_session("s-3", 1.0, "alice")
    store.insert_tasks([(1, "t-3", "s-3", b"{}", b"{}", 0, 3, "alice", None, None, 1.0)])
    store.close()
    db = sqlite3.connect(path)  # what schema 3 had: no progress/hidden/ids columns, no job files
    db.execute("DROP TABLE job_files")
    db.execute("DROP INDEX tasks_user_external")
    for col in ("progress", "frame_current", "hidden", "external_id", "job_id"):
        db.execute(f"ALTER TABLE tasks DROP COLUMN {col}")
    db.execute("ALTER TABLE machines DROP COLUMN admin_status")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    rows, total = store.list_tasks(user="alice")
    assert total == 1 and rows[0]["task_id"] == "t-3" and rows[0]["hidden"] == 0 and rows[0]["progress"] is None
    store.set_job_file("alice", "job-1", "a" * 64, 2.0)
    assert store.job_file("alice", "job-1") == "a" * 64 and store.job_file("bob", "job-1") is None
    assert (tmp_path / "hub.sqlite3.schema3.bak").exists()
    store.close()


def test_a_schema_4_store_gets_its_user_slots_named_per_user(tmp_path):
    """Schema 5 keys a user's slot NAME as USER/NAME: old slots keep their
    state, counters and meta; task slots keep their task id; then a second
    user may use the same name."""
    path = tmp_path / "hub.sqlite3"
    store = Store(path)
    store.add_credit_slots([
        ("job-17", "alice", None, None, 5, None, None, 1.0, None),
        ("bob/x", "alice", None, None, None, 1, 9, 1.0, 100.0),   # a name holding a slash
        ("alice/x", "bob", None, None, 2, None, None, 1.0, None),  # would meet the one above
        ("t-1", "alice", "s-1", "t-1", None, None, None, 1.0, None),
    ])
    store.set_credit_counters("job-17", {"events": 7})
    store.set_credit_meta("job-17", {"tune": "A14"})
    store.set_credit_counters("alice/x", {"events": 1})
    store.claim_credit_slot("job-17", "m1", 5, None, 2.0, {})
    store.claim_credit_slot("t-1", "m1", 3, "lab", 2.0, {"tasks": 1})
    store.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=4")
    db.commit()
    db.close()

    store = Store(path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    assert (tmp_path / "hub.sqlite3.schema4.bak").exists()
    got = {r["slot"]: r for r in store.credit_slots()}
    assert set(got) == {"alice/job-17", "alice/bob/x", "bob/alice/x", "t-1"}
    assert (got["alice/job-17"]["state"], got["alice/job-17"]["credits"]) == ("claimed", 5)
    assert got["alice/job-17"]["counters"] == {"events": 7} and got["alice/job-17"]["meta"] == {"tune": "A14"}
    assert got["bob/alice/x"]["counters"] == {"events": 1} and got["bob/alice/x"]["user"] == "bob"
    assert (got["alice/bob/x"]["min"], got["alice/bob/x"]["max"], got["alice/bob/x"]["expires"]) == (1, 9, 100.0)
    assert got["t-1"]["counters"] == {"tasks": 1} and got["t-1"]["owner"] == "lab"
    assert {r["key"]: r["credits"] for r in store.credit_tally("machine")} == {"m1": 8}
    store.close()

    store = Store(path)  # opened again: migrated once, not twice
    assert {r["slot"] for r in store.credit_slots()} == {"alice/job-17", "alice/bob/x", "bob/alice/x", "t-1"}
    store.close()

    # through the core: alice's "job-17" is hers, and bob may have his own
    store = Store(path)
    core = HubCore(store, BlobStore(tmp_path / "blobs"), p.Limits(), now=3.0)
    core.handle(Connected(1, Principal("tok-a", "client", "alice"), p.PROTOCOL_VERSION),
                Connected(2, Principal("tok-b", "client", "bob"), p.PROTOCOL_VERSION), now=3.0)
    (mine,) = core.handle(Received(1, p.GetCreditSlots(id=1, slots=["job-17"])), now=3.0)
    assert [(s.slot, s.state, s.counters) for s in mine.msg.slots] == [("job-17", "claimed", {"events": 7})]
    (new,) = core.handle(Received(2, p.CreditAlloc(id=2, slot="job-17", credits=1)), now=3.0)
    assert isinstance(new.msg, p.Ok), new
    store.close()

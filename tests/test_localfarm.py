"""The local farm's record, pid checks and shape messages, without sockets or farms."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hwf_jupyter import localfarm
from hwf_jupyter.localfarm import FarmRecord, FarmRecordError


def _record(root="/tmp/farm", **kw) -> FarmRecord:
    base = dict(root=root, address="ws://127.0.0.1:9000", hub_pid=4242, port=9000, slots=2,
                daemons={"daemon-1": 4243, "daemon-2": 4244}, http_port=9001, http_url="http://127.0.0.1:9001",
                client_token_file=f"{root}/client.token", daemon_token_file=f"{root}/daemon.token",
                admin_token_file=f"{root}/hub/admin.token", log_dir=f"{root}/logs", started=1.5)
    base.update(kw)
    return FarmRecord(**base)


def test_record_round_trips_and_lists_daemons_before_the_hub():
    rec = _record()
    again = FarmRecord.from_json(rec.to_json())
    assert again == rec
    assert again.pids == [4243, 4244, 4242]


@pytest.mark.parametrize("field,value", [
    ("hub_pid", "4242"), ("hub_pid", 1), ("hub_pid", True), ("port", 0), ("slots", 0),
    ("daemons", [4243]), ("address", None), ("started", "yesterday"), ("version", 2),
])
def test_a_bad_record_names_its_field(field, value):
    raw = json.loads(_record().to_json())
    raw[field] = value
    with pytest.raises(FarmRecordError, match=repr(field)):
        FarmRecord.from_json(json.dumps(raw))


def test_a_daemon_pid_that_is_not_a_pid_is_refused():
    raw = json.loads(_record().to_json())
    raw["daemons"] = {"daemon-1": "init"}
    with pytest.raises(FarmRecordError, match="daemon-1"):
        FarmRecord.from_json(json.dumps(raw))


def test_garbage_records_read_as_no_farm(tmp_path):
    assert localfarm.read_record(tmp_path) is None
    (tmp_path / localfarm.RECORD_FILE).write_text("{not json")
    assert localfarm.read_record(tmp_path) is None
    (tmp_path / localfarm.RECORD_FILE).write_text("[1, 2]")
    assert localfarm.read_record(tmp_path) is None


def test_record_and_token_files_are_private(tmp_path):
    root = localfarm.prepare_root(tmp_path / "farm")
    localfarm.write_record(root, _record(str(root)))
    localfarm.write_secret(root / "client.token", "hwf_c_secret")
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / localfarm.RECORD_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root / "client.token").st_mode) == 0o600
    assert localfarm.read_secret(root / "client.token") == "hwf_c_secret"
    assert localfarm.read_record(root) == _record(str(root))


def test_an_open_dir_is_made_private(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    localfarm.prepare_root(loose)
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700


def test_default_root_follows_the_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HWF_LOCAL_DIR", str(tmp_path / "x"))
    assert localfarm.default_root() == tmp_path / "x"
    monkeypatch.delenv("HWF_LOCAL_DIR")
    assert localfarm.default_root() == Path.home() / ".hwf" / "local"


def test_shape_conflict_says_what_runs_and_how_to_change_it():
    rec = _record()
    assert localfarm.shape_conflict(rec, None, None) is None
    assert localfarm.shape_conflict(rec, 2, 2) is None
    msg = localfarm.shape_conflict(rec, 3, None)
    assert "runs 2 daemon(s) x 2 slot(s), not 3 x 2" in msg
    assert "%hwf_local --stop" in msg and "%hwf_local --daemons 3 --slots 2" in msg
    assert "not 2 x 4" in localfarm.shape_conflict(rec, None, 4)


def test_pids_that_are_not_farm_processes_are_never_ours(tmp_path):
    # This very process (pytest) is alive but not a hub/daemon of that dir: a
    # record naming it (a reused pid, or a forged record) must not get it signalled.
    assert not localfarm.is_farm_process(os.getpid(), tmp_path)
    assert not localfarm.is_farm_process(2**22 + 12345, tmp_path)  # no such pid
    proc = localfarm.AdoptedProcess(os.getpid(), tmp_path)
    assert proc.poll() == -1
    proc.kill()  # a no-op: poll() said it is not ours
    proc.send_signal(2)


def test_stop_farm_signals_only_recorded_farm_processes(tmp_path):
    root = localfarm.prepare_root(tmp_path / "farm")
    localfarm.write_record(root, _record(str(root), hub_pid=os.getpid(), daemons={"daemon-1": os.getppid()}))
    assert localfarm.stop_farm(root) == []  # we are still here: nothing was signalled
    assert localfarm.read_record(root) is None  # the stale record is gone
    assert localfarm.stop_farm(tmp_path / "never-made") == []


def test_a_farm_dir_of_another_user_is_refused(tmp_path, monkeypatch):
    # Its record would choose which pids we signal and where our tokens go.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(theirs).st_uid + 1)
    with pytest.raises(PermissionError, match="belongs to another user"):
        localfarm.prepare_root(theirs)

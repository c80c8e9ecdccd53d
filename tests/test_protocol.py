"""The wire protocol alone: bytes in, typed messages out, clear errors."""

import msgspec
import pytest

from hub_server import protocol as p


def test_round_trip_submit():
    spec = p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["true"])], hardware={"os": "linux"})
    msg = p.Submit(id=7, tasks=[spec])
    back = p.decode(p.encode(msg))
    assert isinstance(back, p.Submit)
    assert back.id == 7 and back.tasks[0].stages[0].cmds == ["true"]
    assert back.tasks[0].hardware == {"os": "linux"}


def test_unknown_type_is_named():
    with pytest.raises(p.ProtocolError, match="unknown message type 'frobnicate'"):
        p.decode(b'{"type": "frobnicate", "id": 1}')


def test_missing_field_is_named():
    with pytest.raises(p.ProtocolError, match="task_ids"):
        p.decode(b'{"type": "get_results", "id": 1}')


def test_fields_from_a_newer_peer_are_ignored_everywhere():
    """Forward compatibility: a newer hub (or client, or daemon) may add a field
    to any message, nested structs included, and this version still reads it."""
    samples = {
        p.Welcome: p.Welcome(version=2, role="client", hub_id="h", limits=p.Limits(), time=1.0),
        p.Results: p.Results(id=1, tasks=[p.TaskRecord(task_id="t", session_id="s", status="finished",
                                                       stages=[p.StageOutcome(name="x", status="finished")])]),
        p.Pool: p.Pool(id=1, machines=[p.MachineInfo(machine_id="m", name="m", state="online", hardware={},
                                                     slots=1, load=p.Load())]),
        p.Assignments: p.Assignments(items=[p.Assign(task_id="t", attempt=1, spec=p.TaskSpec(
            stages=[p.StageSpec(name="s", cmds=["true"])]))]),
        p.TaskEvent: p.TaskEvent(watch=1, task_id="t", status="running", time=1.0),
        p.Register: p.Register(id=1, name="d", hardware=p.MachineHardware(), slots=1),
    }

    free_form = {"hardware", "machine_hardware", "env"}  # dicts of any keys: an extra key is data there

    def add_field(obj):
        if isinstance(obj, dict):
            fields = {k: v if k in free_form else add_field(v) for k, v in obj.items()}
            return {**fields, "added_in_v9": {"any": [1, "x"]}}
        if isinstance(obj, list):
            return [add_field(v) for v in obj]
        return obj

    for cls, msg in samples.items():
        newer = add_field(msgspec.json.decode(p.encode(msg)))
        assert "added_in_v9" in newer
        back = p.decode(msgspec.json.encode(newer))
        assert back == msg, cls


def test_malformed_json():
    with pytest.raises(p.ProtocolError, match="malformed JSON"):
        p.decode(b'{"type": ')


def test_wrong_type_of_value():
    with pytest.raises(p.ProtocolError, match="Expected `int`"):
        p.decode(b'{"type": "get_results", "id": "x", "task_ids": []}')


def test_request_id_recovered_from_bad_frame():
    assert p.request_id(b'{"type": "nope", "id": 42}') == 42
    assert p.request_id(b"garbage") is None


def test_chunk_frames():
    frame = p.encode_chunk(123456, b"hello")
    tid, payload = p.decode_chunk(frame)
    assert tid == 123456 and bytes(payload) == b"hello"
    with pytest.raises(p.ProtocolError):
        p.decode_chunk(b"\x00\x01")


def test_every_message_type_round_trips():
    for cls in p.Message.__args__:
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str) and tag
    assert len({c.__struct_config__.tag for c in p.Message.__args__}) == len(p.Message.__args__)


def test_roles_allowed():
    assert p.Submit in p.ALLOWED["client"] and p.Register not in p.ALLOWED["client"]
    assert p.Register in p.ALLOWED["daemon"] and p.Submit not in p.ALLOWED["daemon"]
    assert set(p.ALLOWED["admin"]) == set(p.ALLOWED["client"]) | set(p.ALLOWED["daemon"]) | {p.CreditLink, p.SetMachine, p.BlobGc}
    assert p.SetMachine not in p.ALLOWED["client"] and p.Progress in p.ALLOWED["daemon"]
    # A client claims its own slots (the ledger checks whose); a daemon writes
    # no slot at all (issue 18): its credits come from its results.
    assert p.CreditClaim in p.ALLOWED["client"]
    assert not set(p.CREDIT_WRITES) & set(p.ALLOWED["daemon"])
    assert p.GetCreditTally in p.ALLOWED["daemon"]
    assert p.CreditLink not in p.ALLOWED["client"] and p.CreditLink not in p.ALLOWED["daemon"]
    assert p.BlobGc not in p.ALLOWED["client"] and p.BlobGc not in p.ALLOWED["daemon"]
    text = p.forbidden_text("daemon", p.CreditClaim(id=1, slot="s", machine="m"))
    assert "'credit_claim'" in text and "daemon token cannot allocate, claim" in text


@pytest.mark.parametrize("where,value", [
    ("cpu_seconds", "1e300"), ("cpu_seconds", "-1"), ("gpu_seconds", "1e400"), ("started", "-5"),
    ("cpu_seconds", "NaN"), ("finished", "Infinity"), ("cpu_seconds", "-Infinity"),
])
def test_a_results_numbers_are_finite_non_negative_and_bounded(where, value):
    """Issue 18 row 2: the error names the field, never a crash, also for
    NaN/Infinity (not JSON, but Python's json writes them)."""
    frame = '{"type": "task_done", "id": 3, "task_id": "t-1", "attempt": 2, "outcome": {"status": "finished", "%s": %s}}'
    with pytest.raises(p.ProtocolError, match=rf"outcome\.{where}"):
        p.decode(frame % (where, value))
    assert p.refused_results(frame % (where, value)) == [("t-1", 2)]
    ok = p.decode(frame % (where, "12.5"))
    assert getattr(ok.outcome, where) == 12.5


@pytest.mark.parametrize("stage_field,value", [("peak_ram", -1), ("duration", 1e300), ("cpu_percent", -3),
                                               ("gpu_util", 1e300), ("gpu_mem", 2**60), ("cpu_time", -0.5)])
def test_stage_and_command_numbers_are_bounded(stage_field, value):
    stage = {"name": "s", "status": "finished", stage_field: value}
    with pytest.raises(p.ProtocolError, match=stage_field):
        p.decode(p.msgspec.json.encode({"type": "stage_done", "task_id": "t", "attempt": 1, "index": 0, "stage": stage}))
    if stage_field in ("peak_ram", "duration", "cpu_time"):
        cmd = {"cmd": "x", "exit_code": 0, stage_field: value}
        outcome = {"status": "finished", "stages": [{"name": "s", "status": "finished", "commands": [cmd]}]}
        frame = p.msgspec.json.encode({"type": "tasks_done", "id": 1, "done": [
            {"type": "task_done", "id": 0, "task_id": "t-a", "attempt": 1, "outcome": {"status": "finished"}},
            {"type": "task_done", "id": 0, "task_id": "t-b", "attempt": 4, "outcome": outcome}]})
        with pytest.raises(p.ProtocolError, match=stage_field):
            p.decode(frame)
        assert p.refused_results(frame) == [("t-a", 1), ("t-b", 4)]


def test_refused_results_reads_only_results():
    assert p.refused_results('{"type": "heartbeat", "load": 5}') == []
    assert p.refused_results("not json") == []
    assert p.refused_results('{"type": "task_done", "task_id": 5}') == []


def test_limits_are_sent_in_welcome():
    w = p.Welcome(version=1, role="client", hub_id="h", limits=p.Limits(max_file_bytes=10), time=0.0)
    back = p.decode(p.encode(w))
    assert back.limits.max_file_bytes == 10
    assert msgspec.to_builtins(back.limits)["chunk_bytes"] == p.Limits().chunk_bytes

"""Function tasks without sockets: pickling, persistent ids, values, errors, options."""

from __future__ import annotations

import base64
import io
import pickle
import threading
import traceback

import msgspec
import numpy as np
import pytest

from hub_server import protocol as p
from hwf_jupyter.functions import Options, build_batch, make_options, outcome
from hwf_jupyter.pycall import (
    ARG_PREFIX,
    CALL_FILE,
    NO_SCALAR,
    RUNTIME,
    CallEncoder,
    RemoteException,
    RemoteTraceback,
    TaskFailed,
    load_scalar,
    remote_exception,
    with_local_source,
)
from hwf_jupyter.results import ResultList
from hwf_jupyter.task import TaskError


class _ArgFiles(pickle.Unpickler):
    """What the daemon's worker does with a persistent id: load hwf-arg-<sha> from the task's files."""

    def __init__(self, data: bytes, files: dict[str, bytes]) -> None:
        super().__init__(io.BytesIO(data))
        self.files = files

    def persistent_load(self, pid):
        assert pid.startswith(ARG_PREFIX)
        return _ArgFiles(self.files[pid], self.files).load()


def _call_bytes(enc: CallEncoder, encoded) -> bytes:
    if encoded.pickled is not None:
        return base64.b64decode(encoded.pickled)
    return enc.blobs[encoded.call_sha]


def _files(enc: CallEncoder, encoded) -> dict[str, bytes]:
    return {name: enc.blobs[sha] for name, sha in encoded.arg_files.items()}


def test_small_call_is_inline_and_round_trips():
    enc = CallEncoder()
    encoded = enc.encode(lambda x, y=1: x + y, (41,), {"y": 1})
    assert encoded.pickled is not None and encoded.call_sha is None and not encoded.arg_files
    fn, args, kwargs = pickle.loads(_call_bytes(enc, encoded))
    assert fn(*args, **kwargs) == 42
    call = encoded.py_call()
    assert call.python == RUNTIME[6:] and call.pickled_file is None


def test_a_big_argument_goes_once_as_its_own_file_by_persistent_id():
    big = np.arange(400_000, dtype=np.float64)  # 3.2 MB pickled
    enc = CallEncoder()
    calls = [enc.encode(np.sum, (big,), {}) for _ in range(100)]
    pids = {pid for c in calls for pid in c.arg_files}
    assert len(pids) == 1, "the same array in 100 calls is one argument file"
    assert len(enc.blobs) == 1, "and one blob to upload"
    (name,) = pids
    sha = calls[0].arg_files[name]
    assert name == ARG_PREFIX + sha and len(enc.blobs[sha]) > 3_000_000
    for c in calls[:3]:
        assert c.pickled is not None and len(base64.b64decode(c.pickled)) < 4096, "the call itself stays small"
        fn, args, kwargs = _ArgFiles(_call_bytes(enc, c), _files(enc, c)).load()
        assert fn(*args) == big.sum()
    specs = calls[0].data_specs(enc.sizes)
    assert [(d.filename, d.sha256, d.size) for d in specs] == [(name, sha, len(enc.blobs[sha]))]


def test_a_big_object_nested_in_another_argument_is_also_referenced():
    big = np.ones(300_000)
    enc = CallEncoder()
    first = enc.encode(len, (big,), {})
    second = enc.encode(len, ([big, big],), {})  # measured before: found by identity anywhere
    assert second.arg_files == first.arg_files
    _, args, _ = _ArgFiles(_call_bytes(enc, second), _files(enc, second)).load()
    assert len(args[0]) == 2 and all(len(a) == 300_000 for a in args[0])


def test_a_call_between_inline_and_argument_size_goes_as_a_file():
    enc = CallEncoder()
    mid = b"x" * 200_000  # above 64 KiB inline, below 1 MiB per argument
    encoded = enc.encode(len, (mid,), {})
    assert encoded.pickled is None and encoded.call_sha is not None and not encoded.arg_files
    assert encoded.py_call().pickled_file == CALL_FILE
    assert [d.filename for d in encoded.data_specs(enc.sizes)] == [CALL_FILE]
    fn, args, _ = pickle.loads(_call_bytes(enc, encoded))
    assert fn(*args) == 200_000


def test_a_huge_closure_is_sent_once_too():
    data = np.ones(200_000)

    def f(i):
        return data[i]

    enc = CallEncoder()
    calls = [enc.encode(f, (i,), {}) for i in range(5)]
    assert len(enc.blobs) == 1 and all(c.arg_files == calls[0].arg_files for c in calls)
    fn, args, _ = _ArgFiles(_call_bytes(enc, calls[3]), _files(enc, calls[3])).load()
    assert fn(*args) == 1.0


def test_what_does_not_pickle_is_named():
    lock = threading.Lock()
    with pytest.raises(TypeError, match="does not pickle") as info:
        CallEncoder().encode(lambda l: None, (lock,), {})
    assert "lock" in str(info.value)


def test_load_scalar_loads_scalars_only_and_runs_nothing(tmp_path):
    for v in (1, 2.5, "abc", True, None, -(2**70), 1 + 2j):
        assert load_scalar(base64.b64encode(pickle.dumps(v)).decode()) == v
    assert load_scalar(base64.b64encode(pickle.dumps(np.float64(2.5))).decode()) == 2.5
    assert type(load_scalar(base64.b64encode(pickle.dumps(np.int64(7))).decode())) is int
    for v in ([1], {"a": 1}, "x" * 5000, np.arange(3)):
        assert load_scalar(base64.b64encode(pickle.dumps(v)).decode()) is NO_SCALAR
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(target), "w"))

    assert load_scalar(base64.b64encode(pickle.dumps(Evil())).decode()) is NO_SCALAR
    assert not target.exists(), "a table never runs what a daemon sent"
    assert load_scalar(None) is NO_SCALAR and load_scalar("!!notbase64") is NO_SCALAR


def _raise_here():
    return 1 / 0  # the line a remote traceback should show


def _tb_without_source() -> str:
    try:
        _raise_here()
    except ZeroDivisionError as exc:
        lines = traceback.format_exception(exc)
    # as a daemon formats it when it has no source file: frames without their code lines
    text = "".join(lines)
    return "\n".join(line for line in text.splitlines() if not line.startswith("    ") or "File" in line) + "\n"


def test_remote_exception_is_rebuilt_with_the_remote_traceback_as_cause():
    tb = _tb_without_source()
    assert "1 / 0" not in tb
    value = p.PyValue(error_type="ZeroDivisionError", traceback=tb, repr="ZeroDivisionError('division by zero')",
                      pickled=base64.b64encode(pickle.dumps(ZeroDivisionError("division by zero"))).decode())
    exc = remote_exception(value)
    assert type(exc) is ZeroDivisionError and str(exc) == "division by zero"
    assert isinstance(exc.__cause__, RemoteTraceback)
    shown = "".join(traceback.format_exception(exc))
    assert "return 1 / 0  # the line a remote traceback should show" in shown, "source filled in from here"
    assert "_raise_here" in shown


def test_an_exception_that_did_not_pickle_keeps_its_type_and_text():
    exc = remote_exception(p.PyValue(error_type="WeirdError", repr="WeirdError('x')", traceback="Traceback...\n"))
    assert isinstance(exc, RemoteException) and exc.error_type == "WeirdError" and "WeirdError" in str(exc)
    assert isinstance(exc.__cause__, RemoteTraceback)


def test_with_local_source_leaves_frames_that_have_code_alone():
    text = 'Traceback:\n  File "/nope/x.py", line 3, in f\n    y = 1\nValueError\n'
    assert with_local_source(text) == text


def _record(status="finished", value=None, artifacts=(), error=None, task_id="t1") -> p.TaskRecord:
    return p.TaskRecord(task_id=task_id, session_id="s", status=status, value=value, artifacts=list(artifacts),
                        error=error)


def _inline(v) -> p.PyValue:
    return p.PyValue(pickled=base64.b64encode(pickle.dumps(v)).decode(), repr=repr(v))


def test_outcome_of_each_kind_of_record():
    kind, data = outcome(_record(value=_inline([1, 2])))
    assert kind == "value" and pickle.loads(data) == [1, 2]
    sha = "a" * 64
    art = p.ArtifactInfo(pattern="hwf-value.pkl", name="hwf-value.pkl", sha256=sha, size=10)
    assert outcome(_record(value=p.PyValue(artifact="hwf-value.pkl"), artifacts=[art])) == ("download", sha)
    kind, exc = outcome(_record(value=p.PyValue(artifact="hwf-value.pkl")))
    assert kind == "error" and isinstance(exc, TaskFailed) and "did not reach the hub" in str(exc)
    kind, exc = outcome(_record("failed", value=p.PyValue(error_type="KeyError", repr="KeyError('k')")))
    assert kind == "error" and isinstance(exc, RemoteException)
    kind, exc = outcome(_record("failed", error="timeout after 5s"))
    assert isinstance(exc, TaskFailed) and "timeout after 5s" in str(exc) and exc.task_id == "t1"
    kind, exc = outcome(_record("failed", error="this task's function was pickled by Python 3.11, but ..."))
    assert "pickled by Python 3.11" in str(exc), "a version mismatch reads clearly"
    assert outcome(_record("cancelled")) == ("cancelled", None)
    kind, exc = outcome(_record("finished"))
    assert isinstance(exc, TaskFailed) and "without a value" in str(exc)


def test_dataframe_value_column_for_small_scalars_only():
    scalars = ResultList.from_records([
        _record(value=_inline(3), task_id="a"),
        _record(value=_inline(np.int64(4)), task_id="b"),
        _record("failed", value=p.PyValue(error_type="ValueError"), task_id="c"),
        _record("running", task_id="d"),
    ])
    df = scalars.to_dataframe()
    assert list(df["value"].astype(object).where(df["value"].notna(), None)) == [3, 4, None, None]
    assert str(df["value"].dtype) == "Int64"
    assert scalars[0].value == 3
    with pytest.raises(RemoteException, match="ValueError"):
        _ = scalars[2].value
    words = ResultList.from_records([_record(value=_inline("x"), task_id="a"), _record(value=_inline(1.5))])
    assert list(words.to_dataframe()["value"]) == ["x", 1.5]
    mixed = ResultList.from_records([_record(value=_inline(3)), _record(value=_inline([1, 2]))])
    assert "value" not in mixed.to_dataframe().columns
    plain = ResultList.from_records([_record()])
    assert "value" not in plain.to_dataframe().columns
    assert "value" not in ResultList().to_dataframe().columns


def test_options_add_the_runtime_and_refuse_mistakes():
    opts = make_options({"ram": "1GB"}, 0, 3, None, "time,ram", None)
    assert opts.hardware == {"ram": "1GB", "runtime": RUNTIME} and opts.track == ("time", "ram")
    assert make_options(None, 0, 3, None, True, None).track == ("time", "ram", "cpu", "gpu")
    assert make_options({"runtime": RUNTIME}, 0, 3, None, "time", None).hardware == {"runtime": RUNTIME}
    with pytest.raises(TaskError, match="runtime='python2.7'"):
        make_options({"runtime": "python2.7"}, 0, 3, None, "time", None)
    with pytest.raises(TaskError, match="unknown hardware key"):
        make_options({"colour": "red"}, 0, 3, None, "time", None)
    with pytest.raises(TaskError, match="track"):
        make_options(None, 0, 3, None, "time,speed", None)
    with pytest.raises(TaskError, match="timeout"):
        make_options(None, 0, 3, -1, "time", None)
    with pytest.raises(TaskError, match="max_retries"):
        make_options(None, 0, 101, None, "time", None)


def test_a_batch_is_one_stage_per_call_with_the_runtime_and_pins():
    opts = Options(hardware={"runtime": RUNTIME}, track=("time", "cpu"), timeout=5.0)
    batch = build_batch([(len, ("ab",), {}), (len, ("abc",), {})], opts, lambda f: None, pins=["d1", "d2"])
    assert len(batch.futures) == 2 and not batch.blobs
    for spec, pin in zip(batch.specs, ["d1", "d2"]):
        (stage,) = spec.stages
        assert stage.cmds == [] and stage.call is not None and stage.call.pickled
        assert stage.track_cpu and not stage.track_ram and spec.timeout == 5.0
        assert spec.hardware == {"runtime": RUNTIME, "daemon": pin}
        assert spec.label == "len"
        p.decode(p.encode(p.Submit(id=1, tasks=[spec])))  # valid on the wire
    with pytest.raises(TypeError, match="callable"):
        build_batch([(3, (), {})], opts, lambda f: None)


def test_pyvalue_on_the_wire_is_strict():
    with pytest.raises(p.ProtocolError):
        p.decode(msgspec.json.encode({"type": "results", "id": 1, "tasks": [
            {"task_id": "t", "session_id": "s", "status": "finished", "value": {"size": -1}}]}))


def test_functions_of_a_local_module_travel_by_value(tmp_path, monkeypatch):
    import subprocess
    import sys

    (tmp_path / "my_local_helpers.py").write_text("OFFSET = 40\n\ndef add(x):\n    return x + OFFSET\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_local_helpers

    enc = CallEncoder()
    encoded = enc.encode(my_local_helpers.add, (2,), {})
    blob = tmp_path / "call.pkl"
    blob.write_bytes(_call_bytes(enc, encoded))
    # Elsewhere, where my_local_helpers cannot be imported (as on a daemon):
    code = "import pickle,sys; fn,a,k=pickle.load(open(sys.argv[1],'rb')); print(fn(*a))"
    out = subprocess.run([sys.executable, "-c", code, str(blob)], cwd="/", capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.stdout.strip() == "42", out.stderr
    enc2 = CallEncoder()
    installed = enc2.encode(np.sum, ([1],), {})
    assert b"numpy" in base64.b64decode(installed.pickled), "installed packages go by name"


def test_hwf_pickles_keep_the_source_file_name_for_remote_tracebacks():
    import pickle

    from hwf_jupyter.pycall import dumps

    def local(x):  # a closure: always pickled by value
        return x

    assert pickle.loads(dumps(local)).__code__.co_filename == __file__
    assert pickle.loads(dumps(local))(3) == 3

"""The warm worker's call handling (daemon/pyworker.py), in this process: no
sockets, no daemon.  What the worker does with one request: refuse another
Python's pickle before unpickling it, resolve ``hwf-arg-<sha>`` persistent
ids, switch a large value to a file, keep the user's traceback."""

from __future__ import annotations

import base64
import hashlib
import io
import pickle
import sys

import cloudpickle
import pytest

from hwf_daemon import pyworker as pw

PY = "%d.%d" % sys.version_info[:2]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # serve() leaves the worker in /; this puts the test back
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


def request(folder, fn=None, *args, python=PY, **extra):
    req = {"id": 1, "cwd": str(folder), "env": None, "python": python}
    if fn is not None:
        req["pickled"] = base64.b64encode(cloudpickle.dumps((fn, args, {}))).decode()
    req.update(extra)
    return req


def value_of(reply):
    return pickle.loads(base64.b64decode(reply["value"]["pickled"]))


def add(a, b):
    return a + b


def divide(a, b):
    return a / b


def test_a_call_returns_its_value_inline(folder):
    reply = pw.serve(request(folder, add, 2, 3))
    assert reply["ok"] and reply["describe"] == "python: add(...)" and value_of(reply) == 5
    assert reply["value"]["repr"] == "5" and reply["value"].get("artifact") is None
    assert reply["wall"] >= 0 and reply["cpu"] >= 0 and reply["peak_ram"] is None


def test_another_pythons_pickle_is_refused_before_unpickling(folder):
    marker = folder / "unpickled"

    class Tripwire:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    req = request(folder, add, 1, 2, python="3.99")
    req["pickled"] = base64.b64encode(pickle.dumps((Tripwire(), (), {}))).decode()
    reply = pw.serve(req)
    assert not reply["ok"] and not marker.exists()
    assert "pickled by Python 3.99" in reply["error"] and f"runs Python {PY}" in reply["error"]


def test_the_value_goes_to_a_file_above_the_inline_limit(folder):
    small = pw.serve(request(folder, bytes, 1000, inline_max=2000))
    assert small["value"]["pickled"] and not (folder / pw.VALUE_FILE).exists()
    big = pw.serve(request(folder, bytes, 5000, inline_max=2000))
    assert big["ok"] and big["value"]["artifact"] == pw.VALUE_FILE and "pickled" not in big["value"]
    data = (folder / pw.VALUE_FILE).read_bytes()
    assert big["value"]["size"] == len(data) and pickle.loads(data) == bytes(5000)


class _ArgPickler(cloudpickle.Pickler):
    """What a client does with a large argument: its own file, named by sha256."""

    def __init__(self, f, big, folder):
        super().__init__(f)
        self.big, self.folder = big, folder

    def persistent_id(self, obj):
        if obj is self.big:
            data = cloudpickle.dumps(obj)
            sha = hashlib.sha256(data).hexdigest()
            (self.folder / f"hwf-arg-{sha}").write_bytes(data)
            return sha
        return None


def test_large_arguments_resolve_from_their_files(folder):
    big = list(range(10_000))
    buf = io.BytesIO()
    _ArgPickler(buf, big, folder).dump((sum, (big,), {}))
    reply = pw.serve(request(folder, pickled=base64.b64encode(buf.getvalue()).decode()))
    assert reply["ok"] and value_of(reply) == sum(big)
    # The same call without its argument file: a clear refusal, not a crash.
    for f in folder.glob("hwf-arg-*"):
        f.unlink()
    reply = pw.serve(request(folder, pickled=base64.b64encode(buf.getvalue()).decode()))
    assert not reply["ok"] and "is missing from the task's files" in reply["error"]


@pytest.mark.parametrize("pid", ["../../etc/passwd", "hwf-arg-xyz", ("a",), 42])
def test_persistent_ids_other_than_a_sha256_are_refused(pid):
    with pytest.raises(pickle.UnpicklingError, match="persistent id"):
        pw.argument_file(pid)


def test_an_exception_comes_back_with_the_users_traceback(folder):
    reply = pw.serve(request(folder, divide, 1, 0))
    assert not reply["ok"] and reply["error"] == "python: divide(...) raised ZeroDivisionError: division by zero"
    value = reply["value"]
    tb = value["traceback"]
    assert value["error_type"] == "ZeroDivisionError" and "return a / b" in tb and "in divide" in tb
    assert "daemon/pyworker.py" not in tb and "in serve" not in tb  # the worker's own frames are not the user's business
    assert isinstance(value_of(reply), ZeroDivisionError)


def test_output_of_a_call_and_its_environment(folder, capsys):
    def show():
        import os
        print("dir", os.getcwd())
        return os.environ.get("HWF_TASK_ID")

    env = {"HWF_TASK_ID": "t-1", "PATH": "/usr/bin:/bin"}
    saved = dict(__import__("os").environ)
    try:
        reply = pw.serve(request(folder, show, env=env, track_ram=True))
    finally:
        __import__("os").environ.clear()
        __import__("os").environ.update(saved)
    assert value_of(reply) == "t-1" and f"dir {folder}" in capsys.readouterr().out
    assert reply["peak_ram"] > 0


def test_a_ref_call_imports_the_function_and_forgets_task_modules(folder):
    (folder / "meca_task.py").write_text("def run(data):\n    return data.upper()\n")
    reply = pw.serve(request(folder, ref="meca_task:run", arg="hello"))
    assert reply["ok"] and value_of(reply) == "HELLO" and reply["describe"] == "python: meca_task:run(data)"
    assert "meca_task" not in sys.modules  # the next task may ship another meca_task.py
    reply = pw.serve(request(folder, ref="meca_task:nope", arg="x"))
    assert not reply["ok"] and "AttributeError" in reply["error"]
    assert not pw.serve(request(folder, ref="not a ref"))["ok"]


def test_grid_handlers_get_the_event_and_their_return_is_the_output(folder, capsys):
    (folder / "lam.py").write_text(
        "def handler(event, context):\n"
        "    print('log line')\n"
        "    return {'y': event['x'] * 2, 'id': context.aws_request_id}\n"
        "def one(event):\n"
        "    return 'plain'\n")
    reply = pw.serve(request(folder, ref="lam:handler", arg='{"x": 21}', grid=True))
    out = capsys.readouterr()
    assert reply["ok"] and out.out == '{"y": 42, "id": ""}' and "log line" in out.err
    reply = pw.serve(request(folder, ref="lam:one", arg="{}", grid=True))
    assert reply["ok"] and capsys.readouterr().out == "plain"


def test_a_value_that_does_not_pickle_fails_the_call_clearly(folder):
    def make_lock():
        import threading
        return threading.Lock()

    reply = pw.serve(request(folder, make_lock))
    assert not reply["ok"] and "could not be pickled" in reply["error"]
    assert reply["value"]["repr"].startswith("<unlocked _thread.lock")


def _huge_error():
    raise ValueError("x" * 10**6)


def test_a_huge_exception_text_is_bounded(folder):
    reply = pw.serve(request(folder, _huge_error))
    assert not reply["ok"] and len(reply["error"]) < 5000 and len(reply["value"]["traceback"]) <= 70_000

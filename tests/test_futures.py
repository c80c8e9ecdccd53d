"""PyFuture's state machine without sockets: completed from another thread, as
HWF's I/O thread does, and used from threads and event loops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from hwf_jupyter._ioloop import io_loop
from hwf_jupyter.futures import PyFuture
from hwf_jupyter.px import TargetOutput, cell_names, describe_error, render, runner
from hwf_jupyter.pycall import RemoteTraceback


def _later(fn, *args, **kwargs) -> threading.Thread:
    t = threading.Timer(0.05, fn, args, kwargs)
    t.start()
    return t


def test_result_blocks_until_another_thread_settles_it():
    f = PyFuture("f")
    assert not f.done() and "not yet accepted" in repr(f)
    _later(f._settle, 42)
    assert f.result(timeout=30) == 42 and f.done()
    assert f._settle(43) is False and f.result() == 42, "settled once"


def test_result_times_out_and_raises_remote_exceptions():
    f = PyFuture()
    with pytest.raises(concurrent.futures.TimeoutError):
        f.result(timeout=0.01)
    exc = ZeroDivisionError("division by zero")
    exc.__cause__ = RemoteTraceback("Traceback ...\n  1 / 0\n")
    f._settle(exc=exc)
    with pytest.raises(ZeroDivisionError) as info:
        f.result()
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert f.exception() is exc


def test_await_on_a_loop_of_its_own_and_cancelling_the_wait_leaves_the_task():
    f = PyFuture()
    g = PyFuture()

    async def main():
        _later(f._settle, "v")
        got = await f
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(g, 0.01)
        return got

    assert asyncio.run(main()) == "v"
    assert not g.cancelled(), "a timed-out await does not cancel the task"
    g._settle(1)

    async def again():
        return await g  # already done

    assert asyncio.run(again()) == 1


def test_done_callbacks_run_on_the_loop_that_added_them():
    f = PyFuture()
    seen = {}

    async def main():
        loop_thread = threading.current_thread()
        done = asyncio.Event()

        def cb(fut):
            seen["thread"] = threading.current_thread()
            seen["value"] = fut.result()
            done.set()

        f.add_done_callback(cb)
        _later(f._settle, 7)
        await asyncio.wait_for(done.wait(), 30)
        return loop_thread

    loop_thread = asyncio.run(main())
    assert seen == {"thread": loop_thread, "value": 7}


def test_done_callbacks_without_a_loop_run_on_the_settling_thread():
    f = PyFuture()
    seen = []
    f.add_done_callback(lambda fut: seen.append(threading.current_thread().name))
    t = threading.Thread(target=f._settle, args=(1,), name="settler")
    t.start()
    t.join()
    assert seen == ["settler"]
    f.add_done_callback(lambda fut: seen.append("now"))  # already done: called at once
    assert seen == ["settler", "now"]


def test_cancel_marks_it_now_tells_the_client_and_wins_over_a_late_result():
    told = []
    f = PyFuture(on_cancel=told.append)
    assert f.cancel() is True and f.cancelled() and told == [f]
    with pytest.raises(concurrent.futures.CancelledError):
        f.result()
    assert f._settle(5) is False and f.cancelled()
    assert f.cancel() is True and len(told) == 1, "cancelling twice tells once"
    g = PyFuture(on_cancel=told.append)
    g._settle(1)
    assert g.cancel() is False and len(told) == 1, "a finished future cannot be cancelled"
    h = PyFuture()
    assert h._settle(cancelled=True) and h.cancelled(), "cancelled on the hub by someone else"


def test_submission_state_and_refusal():
    f = PyFuture()
    f._accepted("task-1", "s-1")
    assert f.submitted.result() == "task-1" and f.task_id == "task-1" and "task-1" in repr(f)
    g = PyFuture()
    g._refused(ValueError("hub said no"))
    with pytest.raises(ValueError, match="hub said no"):
        g.result()
    with pytest.raises(ValueError):
        g.submitted.result()


def test_works_with_concurrent_futures_helpers():
    fs = [PyFuture() for _ in range(5)]
    for i, f in enumerate(reversed(fs)):
        _later(f._settle, i)
    done = [f.result() for f in concurrent.futures.as_completed(fs, timeout=30)]
    assert sorted(done) == [0, 1, 2, 3, 4]


def test_result_refuses_to_block_the_io_thread():
    f = PyFuture()

    async def on_io():
        with pytest.raises(RuntimeError, match="await the future"):
            f.result()
        f._settle(3)
        return f.result()  # done: fine anywhere

    assert io_loop().run_sync(on_io()) == 3


# ------------------------------------------------------------------ %%hwf_px pieces


def test_px_runner_runs_a_cell_and_returns_its_last_value():
    import cloudpickle

    fn = runner()
    assert fn("x = 20\nx + y", "<cell>", y=22) == 42
    assert fn("x = 20\nx + 1;", "<cell>") is None, "a trailing ; hides the value"
    assert fn("x = 1", "<cell>") is None
    blob = cloudpickle.dumps(fn)
    assert b"hwf_jupyter" not in blob, "sent by value: daemons need nothing of the client"
    with pytest.raises(ZeroDivisionError):
        cloudpickle.loads(blob)("1/0", "<cell>")


def test_px_sends_the_names_the_cell_reads_that_pickle():
    lock = threading.Lock()
    ns = {"data": [1, 2], "lock": lock, "print": print, "In": [], "_i3": "", "unused": 1, "helper": len}
    found, skipped = cell_names("print(helper(data), lock)\nz = 1\nz", ns)
    assert found == {"data": [1, 2], "helper": len}
    assert skipped == ["lock"]
    with pytest.raises(SyntaxError):
        cell_names("def (:", {})


def test_px_render_tags_each_target():
    exc = ZeroDivisionError("division by zero")
    exc.__cause__ = RemoteTraceback('Traceback (most recent call last):\n  File "<hwf_px runner>", line 12, in '
                                    'hwf_px_run\n    exec(x)\n  File "<hwf_px cell>", line 1, in <module>\n'
                                    '    1/0\nZeroDivisionError: division by zero\n')
    err = describe_error(exc)
    assert "<hwf_px runner>" not in err and "1/0" in err and "ZeroDivisionError" in err
    out, errs = render([TargetOutput("daemon-1", stdout="hi\nthere\n", value=42, has_value=True),
                        TargetOutput("daemon-2", error=err)])
    assert out == "[daemon-1] hi\n[daemon-1] there\n[daemon-1] Out: 42\n"
    assert errs.startswith("[daemon-2] Traceback") and "[daemon-2] ZeroDivisionError: division by zero" in errs

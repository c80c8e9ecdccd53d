"""The sans-I/O parts of issue 18's flood limits: per-user waiter and watch
caps in the core (and that a disconnect frees them), replies sized before
they are built, connection caps, and the rate-limited log."""

from __future__ import annotations

import logging

from hub_server import protocol as p
from hub_server.auth import Principal
from hub_server.blobs import BlobStore
from hub_server.conncaps import ConnectionCaps, fit_caps
from hub_server.core import HubCore
from hub_server.events import Connected, Disconnected, Received
from hub_server.ratelog import RateLimitedLog
from hub_server.store import Store

B = Principal("tok-b", "client", "user-b")
SPEC = p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["true"])], hardware={"tags": ["nowhere"]})


def core(tmp_path, **limits) -> HubCore:
    return HubCore(Store(tmp_path / "hub.sqlite3"), BlobStore(tmp_path / "blobs"), p.Limits(**limits), now=1.0)


def replies(out, peer):
    return [i.msg for i in out if getattr(i, "peer", None) == peer and hasattr(i, "msg")]


def test_waiters_are_capped_per_user_across_connections_and_freed_on_disconnect(tmp_path):
    c = core(tmp_path, max_waiters_per_user=3)
    c.handle(Connected(1, B, p.PROTOCOL_VERSION), Connected(2, B, p.PROTOCOL_VERSION), now=1.0)
    (sub,) = replies(c.handle(Received(1, p.Submit(id=1, tasks=[SPEC] * 2)), now=1.0), 1)
    waits = [Received(1 + i % 2, p.GetResults(id=10 + i, task_ids=sub.task_ids, wait=True)) for i in range(5)]
    out = c.handle(*waits, now=1.0)
    errors = [m for m in replies(out, 1) + replies(out, 2) if isinstance(m, p.Error)]
    assert len(errors) == 2 and all("--max-waiters-per-user=3" in e.message for e in errors)
    assert c._holds["user-b"] == [3, 0, 6] and len(c._waiters) == 2
    c.handle(Disconnected(1), Disconnected(2), now=1.0)
    assert c._waiters == {} and c._holds == {}, "a gone peer's waiters hold nothing"


def test_watches_count_task_ids_and_unwatch_frees_them(tmp_path):
    c = core(tmp_path, max_waited_ids_per_user=3)
    c.handle(Connected(1, B, p.PROTOCOL_VERSION), now=1.0)
    (sub,) = replies(c.handle(Received(1, p.Submit(id=1, tasks=[SPEC] * 2)), now=1.0), 1)
    first = replies(c.handle(Received(1, p.Watch(id=2, task_ids=sub.task_ids)), now=1.0), 1)
    assert isinstance(first[0], p.Watching)
    (refused,) = replies(c.handle(Received(1, p.Watch(id=3, task_ids=sub.task_ids)), now=1.0), 1)
    assert isinstance(refused, p.Error) and "--max-waited-ids-per-user=3" in refused.message
    c.handle(Received(1, p.Unwatch(id=4, watch=2)), now=1.0)
    again = replies(c.handle(Received(1, p.Watch(id=5, task_ids=sub.task_ids)), now=1.0), 1)
    assert isinstance(again[0], p.Watching)
    c.handle(Disconnected(1), now=1.0)
    assert c._holds == {}


def test_a_reply_over_max_message_bytes_is_refused_before_it_is_built(tmp_path):
    c = core(tmp_path, max_message_bytes=8 * 1024)
    c.handle(Connected(1, B, p.PROTOCOL_VERSION), now=1.0)
    (sub,) = replies(c.handle(Received(1, p.Submit(id=1, tasks=[SPEC] * 20)), now=1.0), 1)
    (err,) = replies(c.handle(Received(1, p.GetResults(id=2, task_ids=sub.task_ids)), now=1.0), 1)
    assert isinstance(err, p.Error) and err.code == "limit" and "--max-message-bytes=8192" in err.message
    (ok,) = replies(c.handle(Received(1, p.GetResults(id=3, task_ids=sub.task_ids[:2])), now=1.0), 1)
    assert isinstance(ok, p.Results) and len(ok.tasks) == 2


def test_connection_caps_per_address_and_in_total():
    caps = ConnectionCaps(3, 2, "--total", "--per")
    assert caps.admit("a") is None and caps.admit("a") is None
    status, why = caps.admit("a")
    assert status == 429 and "--per=2" in why
    assert caps.admit("b") is None
    status, why = caps.admit("c")
    assert status == 503 and "--total=3" in why
    caps.release("a")
    assert caps.admit("c") is None and caps.open == {"a": 1, "b": 1, "c": 1}


def test_caps_are_fitted_under_the_fd_limit():
    assert fit_caps(100_000, {"--a": 1024, "--b": 4096}) == {"--a": 1024, "--b": 4096}
    fitted = fit_caps(1280, {"--a": 1024, "--b": 4096})
    assert sum(fitted.values()) <= 1280 - 256 and fitted["--a"] < fitted["--b"]


def test_rate_limited_log_writes_one_line_per_cause_per_interval_with_a_count(caplog):
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("t"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        for _ in range(1000):
            rl("emfile", "accept failed: too many open files")
        rl("other", "something else")
        now[0] = 11.0
        rl("emfile", "accept failed: too many open files")
        rl("emfile", "accept failed: too many open files")
        now[0] = 25.0
        rl.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["accept failed: too many open files", "something else",
                     "accept failed: too many open files (x1000 in the last 11 s)",
                     "emfile: x1 more in the last 14 s"]

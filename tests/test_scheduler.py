"""The scheduler alone: no sockets, no clock."""

from hub_server import hardware as hw
from hub_server.scheduler import Scheduler

LINUX = {"os": "linux", "arch": "x86_64", "cpu": "x", "cores": 4, "ram": 8 * 2**30, "gpus": []}
GPU = dict(LINUX, gpus=[{"name": "NVIDIA A100", "memory": 1}])


def test_priority_then_fifo():
    s = Scheduler()
    for i, prio in enumerate([0, 5, 0, 5]):
        s.enqueue(f"t{i}", {}, prio)
    s.add_machine("m", LINUX, slots=4)
    assert [t for t, _ in s.schedule()] == ["t1", "t3", "t0", "t2"]


def test_fills_slots_and_spreads_over_machines():
    s = Scheduler()
    s.add_machine("a", LINUX, slots=2)
    s.add_machine("b", LINUX, slots=2)
    for i in range(10):
        s.enqueue(f"t{i}", {})
    out = s.schedule()
    assert len(out) == 4
    assert sorted(m for _, m in out) == ["a", "a", "b", "b"]
    assert s.schedule() == []  # no free slots
    s.release("a")
    assert s.schedule() == [("t4", "a")]


def test_hardware_matching_and_wait_reason():
    s = Scheduler()
    s.add_machine("cpu", LINUX, slots=4)
    s.enqueue("g", hw.normalize({"gpu": "a100"}))
    s.enqueue("c", {})
    assert s.schedule() == [("c", "cpu")]
    assert "no connected daemon has gpu=a100" in s.wait_reason("g")
    s.add_machine("gpu", GPU, slots=1)
    assert s.schedule() == [("g", "gpu")]
    assert s.wait_reason("g") is None


def test_priority_across_groups():
    s = Scheduler()
    s.enqueue("low", {}, 0)
    s.enqueue("high", hw.normalize({"os": "linux"}), 9)
    s.add_machine("m", LINUX, slots=1)
    assert s.schedule() == [("high", "m")]


def test_pinned_daemon_and_exclusions():
    s = Scheduler()
    s.add_machine("a", LINUX, slots=4)
    s.add_machine("b", LINUX, slots=4)
    s.enqueue("pin", hw.normalize({"daemon": "b"}))
    s.enqueue("retry", {}, exclude={"a"})
    out = dict(s.schedule())
    assert out == {"pin": "b", "retry": "b"}


def test_excluded_everywhere_waits_with_reason():
    s = Scheduler()
    s.add_machine("a", LINUX, slots=1)
    s.enqueue("t", {}, exclude={"a"})
    assert s.schedule() == []
    assert "excluding a" in s.wait_reason("t")


def test_remove_and_machine_loss():
    s = Scheduler()
    s.enqueue("t1", {})
    s.enqueue("t2", {})
    assert s.remove("t1") and not s.remove("t1")
    s.add_machine("a", LINUX, slots=2)
    s.remove_machine("a")
    assert s.schedule() == []
    s.add_machine("a", LINUX, slots=2)
    assert s.schedule() == [("t2", "a")]
    assert s.queued_count() == 0


def test_draining_machine_takes_nothing():
    s = Scheduler()
    s.add_machine("a", LINUX, slots=2)
    s.set_accepting("a", False)
    s.enqueue("t", {})
    assert s.schedule() == []
    assert "draining" in s.wait_reason("t")


def test_many_tasks_scale():
    s = Scheduler()
    for i in range(20000):
        s.enqueue(f"t{i}", {} if i % 2 else hw.normalize({"os": "linux"}))
    s.add_machine("a", LINUX, slots=20000)
    assert len(s.schedule()) == 20000


def test_fair_share_at_equal_priority_goes_to_the_user_running_least():
    s = Scheduler()
    for i in range(100):
        s.enqueue(f"a{i}", {}, user="alice")
    s.add_machine("m", LINUX, slots=2)
    assert [t for t, _ in s.schedule()] == ["a0", "a1"]
    s.enqueue("b0", {}, user="bob")  # queued after 98 of alice's
    s.remove("a0")  # a0 ended: its slot frees up
    s.release("m")
    assert s.schedule() == [("b0", "m")]
    assert s.running_by_user() == {"alice": 1, "bob": 1}
    # Priority still comes first.
    s.enqueue("urgent", {}, priority=5, user="alice")
    s.remove("b0")
    s.release("m")
    assert s.schedule() == [("urgent", "m")]


def test_a_failing_pass_puts_everything_back():
    s = Scheduler()
    for i in range(4):
        s.enqueue(f"t{i}", {}, user="u")
    s.add_machine("m", LINUX, slots=4)
    real = s._schedule_into

    def explode(taken):
        real(taken)
        raise RuntimeError("boom")

    s._schedule_into = explode  # type: ignore[method-assign]
    try:
        s.schedule()
    except RuntimeError:
        pass
    s._schedule_into = real  # type: ignore[method-assign]
    assert s.queued_count() == 4 and s.running_by_user() == {}
    assert sorted(t for t, _ in s.schedule()) == ["t0", "t1", "t2", "t3"]


def test_a_machine_with_odd_facts_matches_nothing_and_stalls_no_one():
    s = Scheduler()
    s.add_machine("odd", dict(LINUX, ram="lots", cores=None, gpus="many"), slots=4)
    s.add_machine("ok", LINUX, slots=1)
    s.enqueue("t", hw.normalize({"ram": "1GB", "cores": 2, "gpu": "none"}))
    s.enqueue("u", hw.normalize({"gpu": "a100"}))
    assert s.schedule() == [("t", "ok")]
    assert "no connected daemon has gpu=a100" in s.wait_reason("u")


def test_short_tasks_may_wait_on_a_daemon_beyond_its_slots():
    s = Scheduler()
    s.add_machine("a", LINUX, slots=1, extra=1)
    s.add_machine("b", LINUX, slots=1, extra=1)
    for i in range(3):
        s.enqueue(f"call{i}", {}, prefetch=True)
    s.enqueue("shell", {})
    got = s.schedule()
    # Real slots first, spread over the machines; then one prefetched call; the
    # shell task takes no extra place.
    assert sorted(m for _, m in got[:2]) == ["a", "b"]
    assert [t for t, _ in got] == ["call0", "call1", "call2"]
    assert s.is_queued("shell")
    s.release(got[0][1])
    s.release(got[1][1])
    s.release(got[2][1])
    assert [t for t, _ in s.schedule()] == ["shell"]


def test_wait_reason_says_how_far_off_the_pool_is():
    s = Scheduler()
    s.enqueue("big", hw.normalize({"ram": "64GB"}))
    assert "no daemon is connected" in s.wait_reason("big")
    s.add_machine("small", dict(LINUX, ram=int(23.5 * 2**30)), slots=2)
    s.add_machine("tiny", dict(LINUX, ram=4 * 2**30), slots=2)
    assert s.schedule() == []
    reason = s.wait_reason("big")
    assert "no connected daemon has ram>=64.0GiB" in reason and "largest ram: 23.5GiB" in reason
    s.enqueue("gpu", hw.normalize({"gpu": "a100", "cores": 64}))
    reason = s.wait_reason("gpu")
    assert "GPUs seen: none" in reason and "most cores: 4" in reason
    # each requirement is met by some machine, never by one machine
    s.add_machine("gpu-box", dict(GPU, ram=2 * 2**30), slots=1)
    s.enqueue("both", hw.normalize({"gpu": "a100", "ram": "8GB"}))
    assert s.schedule() == []
    assert "no single daemon meets them all" in s.wait_reason("both")

"""The hub's side of Python calls, without sockets: call stages checked as
untrusted input, runtimes matched, lost attempts retried, values recorded,
per-user worker keys, and the farm's HTC-Grid handler."""

from __future__ import annotations

import msgspec
import pytest
from hub_server.auth import Principal
from test_core import ALICE, BOB, CLIENT, DAEMON, HW, OTHER, OWNER, assigned, done
from test_core import Farm as _Farm


def Farm(tmp_path, **kw) -> _Farm:  # noqa: N802 (a factory standing in for the class)
    """The daemons here are owned by 'owner': trusted to run anyone's calls."""
    kw.setdefault("trusted_owners", ("owner",))
    return _Farm(tmp_path, **kw)

from hub_server import gridcall
from hub_server import hardware as hw
from hub_server import protocol as p
from hub_server.events import Received, Send

PY = p.PyCall(python="3.11", pickled="gASVAAAAAAAAAACMAU6ULg==")


def call_spec(call: p.PyCall = PY, **kw) -> p.TaskSpec:
    stage = kw.pop("stage", None) or p.StageSpec(name="call", cmds=[], call=call)
    return p.TaskSpec(stages=[stage], **kw)


def refused(f: Farm, spec: p.TaskSpec) -> p.Error:
    out = f.handle(Received(CLIENT, p.Submit(id=f.rid(), tasks=[spec])))
    (err,) = [i.msg for i in out if i.peer == CLIENT]
    assert isinstance(err, p.Error), err
    return err


def register(f: Farm, name: str, runtimes: list[str], peer: int = DAEMON, slots: int = 2):
    hardware = msgspec.structs.replace(HW, runtimes=runtimes)
    return f.handle(Received(peer, p.Register(id=f.rid(), name=name, hardware=hardware, slots=slots,
                                              instance=name + "-1")))


@pytest.fixture
def farm(tmp_path):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    return f


@pytest.mark.parametrize("stage,problem", [
    (p.StageSpec(name="s", cmds=[]), "has no commands"),
    (p.StageSpec(name="s", cmds=["true"], call=PY), "more than one"),
    (p.StageSpec(name="s", cmds=[], call=PY, container=p.ContainerCall(engine="docker", image="x")), "more than one"),
    (p.StageSpec(name="s", cmds=[], call=PY, stdin="x"), "stdin but no commands"),
    (p.StageSpec(name="s", cmds=[], call=p.PyCall(python="3.11")), "exactly one of pickled"),
    (p.StageSpec(name="s", cmds=[], call=p.PyCall(python="3.11", pickled="x", ref="m:f")), "exactly one"),
    (p.StageSpec(name="s", cmds=[], call=p.PyCall(python="three", pickled="x")), "major.minor"),
    (p.StageSpec(name="s", cmds=[], call=p.PyCall(python="3.11", pickled_file="nope.pkl")), "not one of the stage's data"),
    (p.StageSpec(name="s", cmds=[], call=p.PyCall(python="3.11", ref="os.system; rm -rf /")), "not 'module:function'"),
    (p.StageSpec(name="s", cmds=[], call=p.PyCall(python="3.11", ref="@grid:not a ref")), "not 'module:function'"),
    (p.StageSpec(name="s", cmds=[], call=p.PyCall(python="3.11", pickled="x", arg="y")), "arg goes with ref"),
])
def test_malformed_call_stages_are_refused_by_name(farm, stage, problem):
    err = refused(farm, call_spec(stage=stage))
    assert err.code == "bad_task" and problem in err.message and "'s'" in err.message


def test_runtime_requirement_waits_with_a_reason_naming_what_daemons_run(farm):
    register(farm, "d1", ["shell", "python3.11"])
    sub = farm.submit(call_spec(hardware={"runtime": "python9.9"}))
    assert assigned(farm.last) == []
    res = farm.handle(Received(CLIENT, p.GetResults(id=7, task_ids=sub.task_ids)))
    reason = res[0].msg.tasks[0].wait_reason
    assert "runtime=python9.9" in reason and "python3.11, shell" in reason
    # A matching daemon joining takes it.
    farm.connect(OTHER, OWNER)
    out = register(farm, "d2", ["shell", "python9.9"], peer=OTHER)
    assert [(i.peer, a.task_id) for i in out if isinstance(i, Send) and isinstance(i.msg, p.Assignments)
            for a in i.msg.items] == [(OTHER, sub.task_ids[0])]


def test_runtime_matching_rules():
    py = {"runtimes": ["shell", "python3.11"]}
    old = {}  # a daemon from before runtimes
    assert hw.matches(hw.normalize({"runtime": "python3.11"}), py)
    assert hw.matches(hw.normalize({"runtime": "Python"}), py) and hw.matches(hw.normalize({"runtime": "python3"}), py)
    assert not hw.matches(hw.normalize({"runtime": "python3.12"}), py)
    assert not hw.matches(hw.normalize({"runtime": "python3.11,docker"}), py)
    assert hw.matches(hw.normalize({"runtime": "shell"}), old) and not hw.matches(hw.normalize({"runtime": "python"}), old)
    assert hw.normalize({"runtime": "docker, python3.11"}) == {"runtime": "docker,python3.11"}
    for bad in ("py thon", 3, ["ok", 1], ","):
        with pytest.raises(hw.HardwareError, match="runtime"):
            hw.normalize({"runtime": bad})


def test_a_lost_attempt_is_retried_on_the_same_daemon_then_fails(farm):
    register(farm, "d1", ["shell", "python3.11"], slots=1)
    sub = farm.submit(call_spec(max_retries=1))
    tid = sub.task_ids[0]
    assert [a.attempt for a in assigned(farm.last)] == [1]
    out = farm.handle(Received(DAEMON, done(tid, 1, "lost", error="the Python worker (pid 7) was killed by signal 9")))
    # Not the daemon's fault: no exclusion, the retry comes straight back to it.
    assert [(a.task_id, a.attempt) for a in assigned(out)] == [(tid, 2)]
    out = farm.handle(Received(DAEMON, done(tid, 2, "lost", error="killed again")))
    res = farm.handle(Received(CLIENT, p.GetResults(id=8, task_ids=[tid])))
    rec = res[0].msg.tasks[0]
    assert rec.status == "failed" and rec.reason == "lost" and "killed again" in rec.error
    assert [a.state for a in rec.attempts] == ["lost", "lost"]
    assert "signal 9" in rec.attempts[0].reason


def test_a_stale_lost_report_changes_nothing(farm):
    register(farm, "d1", ["shell", "python3.11"], slots=1)
    sub = farm.submit(call_spec())
    tid = sub.task_ids[0]
    farm.handle(Received(DAEMON, done(tid, 1, "finished")))
    out = farm.handle(Received(DAEMON, done(tid, 1, "lost", error="late")))
    assert assigned(out) == []
    rec = farm.handle(Received(CLIENT, p.GetResults(id=8, task_ids=[tid])))[0].msg.tasks[0]
    assert rec.status == "finished"


def test_the_value_is_recorded_with_the_result(farm):
    register(farm, "d1", ["shell", "python3.11"])
    tid = farm.submit(call_spec()).task_ids[0]
    value = p.PyValue(pickled="gAVLKi4=", size=5, repr="42")
    farm.handle(Received(DAEMON, done(tid, 1, "finished", value=value)))
    rec = farm.handle(Received(CLIENT, p.GetResults(id=8, task_ids=[tid])))[0].msg.tasks[0]
    assert rec.value == value


def test_worker_keys_are_per_user_and_not_the_name(farm):
    farm.connect(OTHER, BOB)
    register(farm, "d1", ["shell", "python3.11"], slots=4)
    a = farm.submit(call_spec(), call_spec())
    keys_a = {x.user_key for x in assigned(farm.last)}
    b = farm.submit(call_spec(), peer=OTHER)
    keys_b = {x.user_key for x in assigned(farm.last)}
    assert len(keys_a) == 1 and len(keys_b) == 1 and keys_a != keys_b
    key = keys_a.pop()
    assert "alice" not in key and len(key) == 32 and a and b


def test_grid_tasks_need_a_daemon_with_a_handler_when_the_hub_has_none(farm):
    register(farm, "plain", ["shell", "python3.11"])
    grid = call_spec(p.PyCall(python="3.11", ref=gridcall.GRID_REF, arg='{"x": 1}'))
    sub = farm.submit(grid)
    assert assigned(farm.last) == []
    reason = farm.handle(Received(CLIENT, p.GetResults(id=8, task_ids=sub.task_ids)))[0].msg.tasks[0].wait_reason
    assert "runtime=grid" in reason
    farm.connect(OTHER, OWNER)
    out = register(farm, "gridded", ["shell", "python3.11", "grid"], peer=OTHER)
    (a,) = assigned(out)
    assert a.spec.stages[0].call.ref == gridcall.GRID_REF  # its own handler resolves it


@pytest.mark.parametrize("handler,runtimes,expect", [
    ("tasks.lambda_handler", None, None),  # not a module ref: a shell command
    ("mylambda:handler", ["shell", "python3.11"], "call"),
    ("python3 handler.py --fast", ["shell"], "cmds"),
])
def test_the_hubs_grid_handler_is_written_into_assignments(tmp_path, handler, runtimes, expect):
    f = Farm(tmp_path, grid_handler=handler)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    register(f, "d1", runtimes or ["shell"])
    f.submit(call_spec(p.PyCall(python="3.11", ref=gridcall.GRID_REF, arg='{"x": 1}')))
    (a,) = assigned(f.last)
    stage = a.spec.stages[0]
    if expect == "call":
        assert stage.call.ref == "@grid:mylambda:handler" and stage.call.arg == '{"x": 1}' and not stage.cmds
    else:
        assert stage.call is None and stage.cmds == [handler] and stage.stdin == '{"x": 1}'


def test_a_daemons_own_grid_handler_wins_over_the_hubs(tmp_path):
    f = Farm(tmp_path, grid_handler="python3 hub_default.py")
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    register(f, "d1", ["shell", "python3.11", "grid"])
    f.submit(call_spec(p.PyCall(python="3.11", ref=gridcall.GRID_REF, arg="{}")))
    (a,) = assigned(f.last)
    assert a.spec.stages[0].call.ref == gridcall.GRID_REF


def test_grid_handler_checks():
    assert gridcall.check_handler("") and gridcall.check_handler("a\nb")
    assert gridcall.check_handler("pkg.mod:fn") is None and gridcall.check_handler("./run.sh") is None
    assert gridcall.check_ref("@grid") is None and gridcall.check_ref("@grid:m:f") is None
    assert gridcall.check_ref("m") and gridcall.check_ref("@gridm:f")


def test_the_pool_frame_shows_runtimes():
    from hwf_jupyter.results import HardwarePool

    info = p.MachineInfo(machine_id="d1", name="d1", state="online", slots=2,
                         hardware={"os": "linux", "runtimes": ["shell", "python3.11", "docker"]})
    old = p.MachineInfo(machine_id="d0", name="d0", state="online", slots=1, hardware={"os": "linux"})
    df = HardwarePool.from_machines([info, old]).to_dataframe()
    assert list(df["runtimes"]) == ["shell, python3.11, docker", ""]


@pytest.mark.parametrize("prefetch,held", [(0, 1), (1, 2), (2, 3)])
def test_a_daemon_holds_prefetched_calls_but_shell_tasks_wait_for_a_slot(tmp_path, prefetch, held):
    f = Farm(tmp_path, prefetch=prefetch)
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)
    register(f, "d1", ["shell", "python3.11"], slots=1)
    f.submit(*[call_spec() for _ in range(5)])
    assert len(assigned(f.last)) == held
    g = Farm(tmp_path / "shell", prefetch=prefetch) if (tmp_path / "shell").mkdir() is None else None
    g.connect(CLIENT, ALICE)
    g.connect(DAEMON, OWNER)
    register(g, "d1", ["shell"], slots=1)
    g.submit(*[p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["true"])]) for _ in range(5)])
    assert len(assigned(g.last)) == 1


def test_python_calls_run_only_on_machines_of_their_user_or_a_trusted_owner(tmp_path):
    """A call's value is a pickle the client loads: a stranger's daemon must not make it."""
    f = Farm(tmp_path, trusted_owners=())
    f.connect(CLIENT, ALICE)
    f.connect(DAEMON, OWNER)  # owned by 'owner', not trusted here
    register(f, "strangers", ["shell", "python3.11"])
    call = p.StageSpec(name="f", cmds=[], call=p.PyCall(python="3.11", pickled="gAROLg=="))
    sub = f.submit(p.TaskSpec(stages=[call], hardware={"runtime": "python3.11"}))
    assert assigned(f.last) == []
    (rec,) = f.core._records(sub.task_ids, ALICE)
    assert "owned by alice" in rec.wait_reason
    shell = f.submit(p.TaskSpec(stages=[p.StageSpec(name="s", cmds=["true"])]))
    assert [a.task_id for a in assigned(f.last)] == shell.task_ids  # shell tasks still go anywhere
    f.connect(OTHER, Principal("tok-al", "daemon", "alice"))
    out = register(f, "alices-box", ["shell", "python3.11"], peer=OTHER)
    assert [a.task_id for a in assigned(out)] == sub.task_ids
    # A user cannot widen it: 'owners' is not a hardware key they may set.
    bad = f.handle(Received(CLIENT, p.Submit(id=f.rid(), tasks=[p.TaskSpec(stages=[call], hardware={"owners": ["owner"]})])))
    assert any(isinstance(i.msg, p.Error) and "unknown hardware key 'owners'" in i.msg.message for i in bad)

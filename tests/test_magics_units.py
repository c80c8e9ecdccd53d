"""Issue 13's magic pieces without a kernel: the output cap, the one-line
notices, the draft's lifecycle, sweeps (HWF_INDEX, params) and task env as
the hub and the daemon see it."""

from __future__ import annotations

import json

import pytest

from hub_server import protocol as p
from hub_server.events import Received
from hub_server.taskenv import env_problem
from hwf_jupyter import Stage, Task, TaskError
from hwf_jupyter.dispatch import MAX_TASKS, expand, param_grid
from hwf_jupyter.draft import Draft
from hwf_jupyter.notices import CancelReport, Interrupted, interrupted_line
from hwf_jupyter.stream import LineCap
from hwf_jupyter.widgets._common import as_hub
from test_core import ALICE, CLIENT, Farm, spec


# -- the streamed-output cap ---------------------------------------------------


def lines(a: int, b: int) -> str:
    return "".join(f"line {i}\n" for i in range(a, b))


def test_cap_shows_the_head_live_then_the_count_and_the_tail_at_the_end():
    cap = LineCap(8)  # 6 head lines, 2 tail lines
    live = cap.feed(lines(0, 5)) + cap.feed(lines(5, 30))
    assert live == lines(0, 6)
    end = cap.finish()
    assert end == "… 22 lines omitted (full output: %hwf_results --level command)\n" + lines(28, 30)
    assert cap.feed("late\n") == "late\n"  # after the end nothing is held back


def test_cap_counts_lines_split_across_chunks():
    cap = LineCap(4)  # 3 head, 1 tail
    text = lines(0, 10)
    live = "".join(cap.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    assert live == lines(0, 3)
    assert cap.finish() == "… 6 lines omitted (full output: %hwf_results --level command)\nline 9\n"


def test_cap_short_output_loses_nothing_and_zero_means_no_cap():
    cap = LineCap(8)
    assert cap.feed(lines(0, 7)) + cap.finish() == lines(0, 7)
    cap = LineCap(8)
    assert cap.feed(lines(0, 6) + "no newline") + cap.finish() == lines(0, 6) + "no newline\n"
    free = LineCap(0)
    assert free.feed(lines(0, 1000)) == lines(0, 1000) and free.finish() == ""
    with pytest.raises(ValueError, match="max_lines"):
        LineCap(-1)


# -- notices -------------------------------------------------------------------


def test_cancel_report_reads_as_a_sentence_and_stays_a_dict():
    r = CancelReport({"cancelled": ["t-1", "t-2", "t-3"], "by_state": {"running": 1, "queued": 2}})
    assert repr(r) == "cancelled 3 tasks (2 queued, 1 running)"
    assert r["by_state"]["queued"] == 2
    from IPython.lib.pretty import pretty
    assert pretty(r) == "cancelled 3 tasks (2 queued, 1 running)"
    assert repr(CancelReport({"cancelled": [], "by_state": {}})).startswith("cancelled 0 tasks: none")
    assert repr(CancelReport({"cancelled": ["t"], "by_state": {"running": 1}})) == "cancelled 1 task (1 running)"


def test_interrupted_line_says_what_runs_and_how_to_cancel():
    line = interrupted_line(["finished", "running", "queued", "queued", "failed"],
                            session_id="s-abc", cancel_hint="%hwf_cancel --session s-abc")
    assert line == ("interrupted: 3 of 5 tasks of session s-abc still run (2 queued, 1 running); "
                    "%hwf_cancel --session s-abc cancels them")
    assert "nothing to cancel" in interrupted_line(["finished"], session_id=None, cancel_hint="x")
    exc = Interrupted(line)
    assert isinstance(exc, KeyboardInterrupt) and exc._render_traceback_() == [line]


# -- the draft -----------------------------------------------------------------


def test_same_name_replaces_and_says_so_and_a_dispatch_spends_the_draft():
    d = Draft()
    assert d.add_stage(Stage("a", cmd="echo 1")) == "added stage 'a' (stage 1 of 1)"
    assert d.add_stage(Stage("b", cmd="echo 2")) == "added stage 'b' (stage 2 of 2)"
    assert d.add_stage(Stage("a", cmd="echo 3")) == "replaced stage 'a' (stage 1 of 2)"
    assert [s.cmd for s in d.stages] == [["echo 3"], ["echo 2"]]
    d.set_hardware({"ram": "1GB"})
    d.mark_dispatched("s-1")
    assert "dispatched as session s-1" in d.text()
    assert len(d.build().stages) == 2  # can still go out again until the next edit
    note = d.add_stage(Stage("c", cmd="true"))
    assert note == "new draft (the previous one went out as session s-1); added stage 'c' (stage 1 of 1)"
    assert [s.name for s in d.stages] == ["c"] and d.hardware == {}


def test_hardware_after_a_dispatch_starts_the_new_draft_too():
    d = Draft()
    d.add_stage(Stage("a", cmd="true"))
    d.set_hardware({"ram": "1GB"})
    d.mark_dispatched("s-1")
    d.set_hardware({"cores": 2})
    assert d.hardware == {"cores": 2} and d.stages == []
    d.add_stage(Stage("b", cmd="true"))
    assert d.hardware == {"cores": 2}  # an edit of the new draft is kept


def test_draft_text_shows_a_script_line_by_line():
    d = Draft()
    d.add_stage(Stage("loop", cmd="for i in 1 2; do\n  echo $i\ndone\n"))
    assert "$ for i in 1 2; do\n       >   echo $i\n       > done" in d.text()


# -- sweeps --------------------------------------------------------------------


def t(**kw) -> Task:
    return Task(Stage("s", cmd="true"), **kw)


def test_repeat_copies_get_their_index():
    items = expand(t(label="run"), repeat=3)
    assert [x.env for x in items] == [{"HWF_INDEX": "0"}, {"HWF_INDEX": "1"}, {"HWF_INDEX": "2"}]
    assert {x.label for x in items} == {"run"}


def test_params_make_the_cross_product_with_env_and_labels():
    items = expand(t(label="fit"), params={"lr": [0.1, 0.2], "seed": [1, 2, 3]}, repeat=2)
    assert len(items) == 12
    combos = [(x.env["HWF_PARAM_LR"], x.env["HWF_PARAM_SEED"]) for x in items[::2]]
    assert combos == [(lr, s) for lr in ("0.1", "0.2") for s in ("1", "2", "3")]
    assert items[0].label == "fit lr=0.1 seed=1" and items[-1].label == "fit lr=0.2 seed=3"
    assert [x.env["HWF_INDEX"] for x in items] == [str(i) for i in range(12)]
    spec_env = items[3].spec({}).env
    assert spec_env == {"HWF_PARAM_LR": "0.1", "HWF_PARAM_SEED": "2", "HWF_INDEX": "3"}


@pytest.mark.parametrize("params,problem", [
    ({"1lr": [1]}, "param name '1lr'"),
    ({"a-b": [1]}, "param name 'a-b'"),
    ({"lr": []}, "param 'lr' has no values"),
    ({"lr": "0.1,0.2"}, "give a list of values"),
    ({"lr": [1], "LR": [2]}, "same variable HWF_PARAM_LR"),
    ({"a": range(1000), "b": range(1000)}, "1000000 combinations"),
])
def test_bad_params_are_refused_by_name(params, problem):
    with pytest.raises(TaskError, match=problem):
        param_grid(params)


def test_too_many_copies_are_refused():
    with pytest.raises(TaskError, match=f"at most {MAX_TASKS}"):
        expand(t(), params={"a": range(1000)}, repeat=101)


# -- env: client, hub, daemon ----------------------------------------------------


@pytest.mark.parametrize("env,problem", [
    ({"1X": "a"}, "env name '1X'"),
    ({"A B": "a"}, "env name 'A B'"),
    ({"HWF_TASK_ID": "t-other"}, "reserved"),
    ({"HWF_TOKEN": "x"}, "reserved"),
    ({"X": 3}, "env X: value must be a string"),
    ({"X": "a\x00b"}, "NUL"),
    ({"X": "a" * 5000}, "at most 4096"),
    ({f"V{i}": "" for i in range(65)}, "at most 64"),
])
def test_bad_env_is_refused_by_the_client_naming_the_variable(env, problem):
    assert problem in env_problem(env)
    with pytest.raises(TaskError, match=problem.replace("(", r"\(")):
        t(env=env)


@pytest.mark.parametrize("env,problem", [
    ({"HWF_TASK_ID": "t-other"}, "reserved"),
    ({"HWF_ATTEMPT": "9"}, "reserved"),
    ({"X": "a\x00b"}, "NUL"),
])
def test_the_hub_refuses_a_bad_env_at_submit(tmp_path, env, problem):
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    out = f.handle(Received(CLIENT, p.Submit(id=f.rid(), tasks=[spec(env=env)])))
    (err,) = [i.msg for i in out if i.peer == CLIENT]
    assert isinstance(err, p.Error) and err.code == "bad_task" and problem in err.message
    assert "task 0" in err.message


def test_a_bad_env_name_or_size_fails_decoding_naming_the_field():
    good = json.loads(p.encode(p.Submit(id=1, tasks=[spec(env={"OK": "1"})])))
    assert p.decode(json.dumps(good)).tasks[0].env == {"OK": "1"}
    for env in ({"1X": "a"}, {"X": "a" * 5000}, {f"V{i}": "" for i in range(65)}, {"X": 1}):
        bad = dict(good, tasks=[dict(good["tasks"][0], env=env)])
        with pytest.raises(p.ProtocolError, match="env"):
            p.decode(json.dumps(bad))


def test_daemon_adds_the_spec_env_under_its_own_names():
    from hwf_daemon.accounts import task_env

    env = task_env({"PATH": "/bin", "HWF_TOKEN": "secret"}, task_id="t-1", attempt=2,
                   extra={"HWF_INDEX": "4", "HWF_TASK_ID": "t-other", "HWF_TOKEN": "x", "MY": "v"})
    assert env == {"PATH": "/bin", "HWF_INDEX": "4", "MY": "v", "HWF_TASK_ID": "t-1", "HWF_ATTEMPT": "2"}


# -- widgets take a Hub or a LocalCluster ---------------------------------------


def test_widgets_refuse_what_is_not_a_hub_naming_what_they_take():
    from hwf_jupyter.widgets import PoolView

    with pytest.raises(TypeError, match="PoolView takes a Hub .* or a LocalCluster, got str"):
        PoolView("ws://127.0.0.1:1", refresh=None, interactive=False)
    with pytest.raises(TypeError, match="got dict"):
        as_hub({}, "TaskBuilder")


def test_cell_stream_caps_each_task_and_stream_on_its_own(capsys):
    from hwf_jupyter.stream import CellStream

    s = CellStream(None, prefix=True, max_lines=4)  # 3 head + 1 tail each
    s._remaining = {"t-aaaaaa", "t-bbbbbb"}
    for i in range(6):
        s.on_output(p.Output(task_id="t-aaaaaa", attempt=1, stream="stdout", text=f"a{i}\n"))
    s.on_output(p.Output(task_id="t-bbbbbb", attempt=1, stream="stdout", text="b0\n"))
    s.on_output(p.Output(task_id="t-aaaaaa", attempt=1, stream="stderr", text="err\n"))
    s.on_event(p.TaskEvent(watch=1, task_id="t-aaaaaa", status="finished", time=1.0))
    s.on_event(p.TaskEvent(watch=1, task_id="t-aaaaaa", status="finished", time=1.0))  # twice: once shown
    out, err = capsys.readouterr()
    assert out.splitlines() == ["[aaaaaa] a0", "[aaaaaa] a1", "[aaaaaa] a2", "[bbbbbb] b0",
                                "[aaaaaa] … 2 lines omitted (full output: %hwf_results --level command)",
                                "[aaaaaa] a5"]
    assert err == "[aaaaaa] err\n"

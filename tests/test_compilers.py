"""Job compilers (``type`` + ``settings`` -> task specs), sans-I/O.

Every refusal is checked for the field it names: a Manager API caller only
sees the message, so it must say which input was wrong.
"""

from __future__ import annotations

import pytest

from hub_server import protocol as p
from hub_server.compilers import (
    MAX_COMMAND_CHARS,
    MAX_FRAMES,
    MAX_TASKS_PER_JOB,
    CompileError,
    compile_job,
)

SCRIPT = p.DataSpec("fractal_frame.py", "a" * 64, 1234)
OTHER = p.DataSpec("palette.txt", "b" * 64, 10)
FILES = {SCRIPT.filename: SCRIPT, OTHER.filename: OTHER}


def frames(**settings):
    base = {"frame_start": 1, "frame_end": 24, "chunk_size": 4, "command": "render {frame_start} {frame_end}"}
    return {**base, **settings}


def submit_roundtrip(specs):
    """The specs pass the protocol's own bounds (what the hub will decode)."""
    msg = p.decode(p.encode(p.Submit(id=1, tasks=specs)))
    assert msg.tasks == specs
    return msg.tasks


# ------------------------------------------------------------------ frames


def test_frames_24_in_chunks_of_4_makes_6_tasks():
    specs = submit_roundtrip(compile_job("frames", frames(label="fractal"), priority=5, job_id="j1"))
    assert [(s.frame_start, s.frame_end) for s in specs] == [(1, 4), (5, 8), (9, 12), (13, 16), (17, 20), (21, 24)]
    assert [s.stages[0].cmds for s in specs][1] == ["render 5 8"]
    assert specs[1].label == "fractal frames 5-8"
    assert {s.parser for s in specs} == {"frames"}
    assert {s.priority for s in specs} == {5}
    assert {s.job_id for s in specs} == {"j1"}


def test_frames_last_chunk_is_short_and_frame_means_one_command_per_frame():
    specs = compile_job("frames", frames(frame_end=10, command="r {frame:04d} -o f{frame}.png"))
    assert [(s.frame_start, s.frame_end) for s in specs] == [(1, 4), (5, 8), (9, 10)]
    assert specs[2].stages[0].cmds == ["r 0009 -o f9.png", "r 0010 -o f10.png"]
    assert specs[0].label == "frames 1-4"


def test_frames_without_chunk_size_is_one_task_and_keeps_the_external_id():
    specs = compile_job("frames", {"frame_start": -2, "frame_end": 3, "command": "r {frame_start}..{frame_end}"},
                        external_id="brender-7")
    assert len(specs) == 1
    assert specs[0].stages[0].cmds == ["r -2..3"]
    assert specs[0].external_id == "brender-7"


def test_frames_chunked_external_ids_are_unique_per_task():
    specs = submit_roundtrip(compile_job("frames", frames(), external_id="t9"))
    assert [s.external_id for s in specs][:2] == ["t9:1-4", "t9:5-8"]


def test_frames_parser_given_wins_and_options_apply():
    specs = compile_job("frames", frames(artifacts=["*.png"], hardware={"ram": "1GB"}, timeout=60,
                                         max_retries=0, data=["fractal_frame.py"]),
                        parser="hwf-progress", data=FILES)
    s = submit_roundtrip(specs)[0]
    assert s.parser == "hwf-progress"
    assert s.artifacts == ["*.png"] and s.hardware == {"ram": 2**30}
    assert s.timeout == 60 and s.max_retries == 0
    assert s.stages[0].data == [SCRIPT]


def test_data_defaults_to_every_given_file():
    s = compile_job("frames", frames(), data=FILES)[0]
    assert s.stages[0].data == [SCRIPT, OTHER]


def test_literal_braces_stay_and_values_are_ints_only():
    s = compile_job("frames", frames(command="awk '{{print}}' {frame_start}", chunk_size=24))[0]
    assert s.stages[0].cmds == ["awk '{print}' 1"]


@pytest.mark.parametrize("settings, field, words", [
    (frames(frame_start="1"), "settings.frame_start", "whole number"),
    (frames(frame_start=True), "settings.frame_start", "whole number"),
    (frames(frame_end=1.5), "settings.frame_end", "whole number"),
    (frames(frame_start=9, frame_end=3), "settings.frame_end", ">= frame_start"),
    (frames(frame_end=MAX_FRAMES + 1), "settings.frame_end", "limit"),
    (frames(frame_end=10**10), "settings.frame_end", "<="),
    (frames(chunk_size=0), "settings.chunk_size", "must be a whole number >= 1"),
    (frames(chunk_size="4"), "settings.chunk_size", "whole number"),
    (frames(frame_end=MAX_TASKS_PER_JOB + 1, chunk_size=1), "settings.chunk_size", "per job"),
    (frames(frame_end=5000, chunk_size=5000, command="r {frame}"), "settings.chunk_size", "commands per task"),
    (frames(command="r {frame} {scene}"), "settings.command", "{scene}"),
    (frames(command="r {frame.real}"), "settings.command", "unknown field"),
    (frames(command="r {frame[0]}"), "settings.command", "unknown field"),
    (frames(command="r {frame!r}"), "settings.command", "conversions"),
    (frames(command="r {frame:>999999999}"), "settings.command", "padding"),
    (frames(command="r {frame"), "settings.command", "template"),
    (frames(command=""), "settings.command", "non-empty"),
    (frames(command=["r"]), "settings.command", "string"),
    (frames(command="x" * (MAX_COMMAND_CHARS + 1)), "settings.command", "limit"),
    ({"frame_end": 3, "command": "r"}, "settings.frame_start", "missing"),
    ({"frame_start": 3, "frame_end": 3}, "settings.command", "missing"),
    (frames(chunksize=2), "settings.chunksize", "unknown setting"),
    (frames(artifacts="../x"), "settings.artifacts[0]", ""),
    (frames(artifacts=["ok.png", 3]), "settings.artifacts[1]", "string"),
    (frames(artifacts={"a": 1}), "settings.artifacts", "list"),
    (frames(hardware={"gpus": 1}), "settings.hardware", "gpus"),
    (frames(hardware="big"), "settings.hardware", "dict"),
    (frames(label=3), "settings.label", "string"),
    (frames(timeout=0), "settings.timeout", "> 0"),
    (frames(timeout="1h"), "settings.timeout", "seconds"),
    (frames(max_retries=101), "settings.max_retries", "<= 100"),
    (frames(data=["missing.bin"]), "settings.data[0]", "missing.bin"),
    (frames(data=5), "settings.data", "list"),
])
def test_frames_bad_settings_name_their_field(settings, field, words):
    with pytest.raises(CompileError) as info:
        compile_job("frames", settings, data=FILES)
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")
    assert words in str(info.value)


# ------------------------------------------------------------------- shell


def test_shell_commands_list_one_task():
    specs = submit_roundtrip(compile_job("shell", {"commands": ["echo a", " ", "echo b"], "artifacts": "out/*",
                                                   "label": "two", "data": ["palette.txt"]},
                                         data=FILES, parser="percent", external_id="x1"))
    (s,) = specs
    assert [st.name for st in s.stages] == ["run"]
    assert s.stages[0].cmds == ["echo a", "echo b"]
    assert s.stages[0].data == [OTHER]
    assert (s.artifacts, s.label, s.parser, s.external_id) == (["out/*"], "two", "percent", "x1")
    assert s.frame_start is None


def test_shell_one_string_is_one_bash_script():
    (s,) = compile_job("shell", {"commands": "set -e\nfor i in 1 2; do echo $i; done"})
    assert s.stages[0].cmds == ["set -e\nfor i in 1 2; do echo $i; done"]
    assert s.parser is None


def test_shell_stages_get_their_data_and_the_first_gets_the_jobs():
    (s,) = submit_roundtrip(compile_job("shell", {
        "stages": [{"name": "build", "commands": ["make"]},
                   {"name": "run", "commands": "./a.out", "data": ["palette.txt"]}],
        "data": ["fractal_frame.py"],
    }, data=FILES))
    assert [(st.name, st.cmds, st.data) for st in s.stages] == [
        ("build", ["make"], [SCRIPT]), ("run", ["./a.out"], [OTHER])]


@pytest.mark.parametrize("settings, field, words", [
    ({}, "settings.commands", "either"),
    ({"commands": ["a"], "stages": [{"name": "s", "commands": ["b"]}]}, "settings.commands", "exactly one"),
    ({"commands": []}, "settings.commands", "no commands"),
    ({"commands": "   "}, "settings.commands", "no commands"),
    ({"commands": 5}, "settings.commands", "list of strings"),
    ({"commands": ["ok", None]}, "settings.commands[1]", "string"),
    ({"commands": ["x"] * 1001}, "settings.commands", "limit"),
    ({"commands": ["x" * (MAX_COMMAND_CHARS + 1)]}, "settings.commands[0]", "limit"),
    ({"stages": []}, "settings.stages", "non-empty"),
    ({"stages": ["echo"]}, "settings.stages[0]", "object"),
    ({"stages": [{"commands": ["a"]}]}, "settings.stages[0].name", "non-empty"),
    ({"stages": [{"name": "a", "commands": ["a"]}, {"name": "a", "commands": ["b"]}]},
     "settings.stages[1].name", "repeated"),
    ({"stages": [{"name": "a"}]}, "settings.stages[0].commands", "missing"),
    ({"stages": [{"name": "a", "commands": [1]}]}, "settings.stages[0].commands[0]", "string"),
    ({"stages": [{"name": "a", "commands": ["b"], "cmd": "c"}]}, "settings.stages[0].cmd", "unknown"),
    ({"stages": [{"name": "a", "commands": ["b"], "data": ["nope"]}]}, "settings.stages[0].data[0]", "nope"),
    ({"commands": ["a"], "frame_start": 1}, "settings.frame_start", "unknown setting"),
    ({"commands": ["a"], "hardware": {"cores": 0}}, "settings.hardware", "cores"),
    ({"commands": ["a"], "artifacts": ["/etc/passwd"]}, "settings.artifacts[0]", ""),
])
def test_shell_bad_settings_name_their_field(settings, field, words):
    with pytest.raises(CompileError) as info:
        compile_job("shell", settings, data=FILES)
    assert info.value.field == field
    assert words in str(info.value)


# ------------------------------------------------------- the job's own fields


@pytest.mark.parametrize("kwargs, field, words", [
    ({"type": "blender"}, "type", "known: frames, shell"),
    ({"type": None}, "type", "known"),
    ({"settings": "{}"}, "settings", "object"),
    ({"priority": "high"}, "priority", "whole number"),
    ({"priority": 10**7}, "priority", "<="),
    ({"parser": "blender"}, "parser", "frames, percent, hwf-progress"),
    ({"job_id": "../x"}, "job_id", "letters"),
    ({"job_id": ""}, "job_id", "letters"),
    ({"external_id": "a" * 129}, "external_id", "1-128"),
    ({"data": {"x.py": SCRIPT}}, "data", "filename"),
    ({"data": {"../x": p.DataSpec("../x", "a" * 64, 1)}}, "data", ""),
])
def test_job_fields_name_themselves(kwargs, field, words):
    args = {"type": "shell", "settings": {"commands": ["true"]}, **kwargs}
    with pytest.raises(CompileError) as info:
        compile_job(args.pop("type"), args.pop("settings"), **args)
    assert info.value.field == field
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_float_that_is_whole_counts_as_int():
    """JSON bodies may carry 4.0; it means 4."""
    specs = compile_job("frames", frames(chunk_size=4.0, frame_end=8.0), priority=2.0)
    assert [(s.frame_start, s.frame_end) for s in specs] == [(1, 4), (5, 8)]
    assert specs[0].stages[0].cmds == ["render 1 4"] and specs[0].priority == 2


def test_hub_submit_job_compiles_before_it_connects(tmp_path):
    """A bad job fails in the caller's cell with the compiler's message, before
    any connection or upload (nothing listens on port 1: a good job would fail
    to connect instead)."""
    from hwf_jupyter import ConnectError, Hub

    hub = Hub("127.0.0.1:1", token="x", connect_timeout=2)
    with pytest.raises(CompileError, match=r"^settings\.chunk_size: must be a whole number >= 1"):
        hub.submit_job_sync("frames", frames(chunk_size=0))
    with pytest.raises(ConnectError):
        hub.submit_job_sync("frames", frames())

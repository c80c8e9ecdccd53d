"""Result objects and DataFrames built from hub records."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import pandas as pd
import pytest

from hub_server import protocol as p
from hwf_jupyter.results import (
    Artifact,
    HardwarePool,
    ResultList,
    TaskResult,
)

T0 = 1_700_000_000.0
GIB = 2**30
MIB = 2**20

HW_A = {
    "os": "linux",
    "distro": "ubuntu 22.04",
    "arch": "x86_64",
    "cpu": "AMD EPYC 7763",
    "cores": 64,
    "ram": 256 * GIB,
    "gpus": [{"name": "A100", "memory": 80 * GIB}, {"name": "A100", "memory": 80 * GIB}],
}
HW_B = {
    "os": "darwin",
    "distro": "macOS 14.2",
    "arch": "arm64",
    "cpu": "Apple M2",
    "cores": 8,
    "ram": 16 * GIB,
    "gpus": [],
}


def finished_record() -> p.TaskRecord:
    """Two stages, RAM and CPU tracked, one artifact stored and one missing."""
    return p.TaskRecord(
        task_id="3f2a9c0d1e2b4a5f",
        session_id="sess-1",
        status="finished",
        priority=5,
        label="train",
        hardware={"gpu": "a100"},
        submitted=T0,
        queued=T0,
        started=T0 + 2.5,
        finished=T0 + 10.0,
        machine="daemon-1",
        machine_hardware=HW_A,
        exit_code=0,
        parser="frames",
        progress=100.0,
        frame_start=1,
        frame_end=8,
        frame_current=8,
        attempts=[
            p.AttemptInfo(attempt=1, machine="daemon-2", state="lost", assigned=T0 + 0.5,
                          started=T0 + 1.0, ended=T0 + 2.0, reason="daemon disconnected"),
            p.AttemptInfo(attempt=2, machine="daemon-1", state="finished", assigned=T0 + 2.2,
                          started=T0 + 2.5, ended=T0 + 10.0),
        ],
        stages=[
            p.StageOutcome(
                name="prepare", status="finished", started=T0 + 2.5, duration=1.5,
                peak_ram=512 * MIB, cpu_percent=95.0, cpu_time=1.4, comment="unpack",
                commands=[
                    p.CommandOutcome(cmd="tar xf data.tar", exit_code=0, duration=1.0,
                                     cpu_time=0.9, peak_ram=256 * MIB),
                    p.CommandOutcome(cmd="ls", exit_code=0, stdout="a\nb\n", duration=0.5,
                                     cpu_time=0.5, peak_ram=512 * MIB),
                ],
            ),
            p.StageOutcome(
                name="train", status="finished", started=T0 + 4.0, duration=6.0,
                peak_ram=2 * GIB, cpu_percent=400.0, cpu_time=24.0, gpu_util=87.5,
                gpu_mem=40 * GIB, note="loss 0.12",
                commands=[
                    p.CommandOutcome(cmd="python train.py", exit_code=0, stdout="loss=0.12\n",
                                     stderr="warn\n" * 3, stderr_truncated=True, duration=6.0,
                                     cpu_time=24.0, peak_ram=2 * GIB),
                ],
            ),
        ],
        artifacts=[
            p.ArtifactInfo(pattern="model.pt", name="model.pt", sha256="ab" * 32, size=1234),
            p.ArtifactInfo(pattern="*.log", error="no file matches '*.log'"),
        ],
    )


def failed_record() -> p.TaskRecord:
    """Second stage never ran; nothing but time was tracked (RAM untracked)."""
    return p.TaskRecord(
        task_id="77aa",
        session_id="sess-1",
        status="failed",
        submitted=T0 + 1.0,
        started=T0 + 3.0,
        finished=T0 + 3.75,
        machine="daemon-2",
        machine_hardware=HW_B,
        exit_code=2,
        error="stage 'build' failed: exit code 2",
        attempts=[p.AttemptInfo(attempt=1, machine="daemon-2", state="failed",
                                assigned=T0 + 2.9, started=T0 + 3.0, ended=T0 + 3.75)],
        stages=[
            p.StageOutcome(
                name="build", status="failed", started=T0 + 3.0, duration=0.75,
                commands=[
                    p.CommandOutcome(cmd="echo start", exit_code=0, stdout="start\n",
                                     duration=0.25),
                    p.CommandOutcome(cmd="make", exit_code=2, stdout="compiling\n",
                                     stderr="error: boom\n", duration=0.5),
                ],
            ),
            p.StageOutcome(name="test", status="skipped"),
        ],
    )


def queued_record() -> p.TaskRecord:
    return p.TaskRecord(
        task_id="q1", session_id="sess-1", status="queued", submitted=T0 + 5.0,
        wait_reason="no machine has gpu=h100", hardware={"gpu": "h100"},
    )


@pytest.fixture
def results() -> ResultList:
    # Through JSON and back, as the records arrive from the hub.
    msg = p.Results(id=1, tasks=[finished_record(), failed_record()])
    decoded = p.decode(p.encode(msg))
    return ResultList.from_records(decoded.tasks)


# --------------------------------------------------------------- objects


def test_task_result_fields(results: ResultList) -> None:
    ok, bad = results
    assert ok.task_id == "3f2a9c0d1e2b4a5f"
    assert ok.machine == "daemon-1"
    assert ok.hardware["cpu"] == "AMD EPYC 7763"
    assert ok.requested_hardware == {"gpu": "a100"}
    assert ok.duration == pytest.approx(7.5)
    assert ok.queue_time == pytest.approx(2.5)
    assert ok.started_at == dt.datetime.fromtimestamp(T0 + 2.5, tz=dt.timezone.utc)
    assert [a.machine for a in ok.attempts] == ["daemon-2", "daemon-1"]
    assert ok.attempts[0].reason == "daemon disconnected"
    assert ok.done and ok.ok
    assert bad.done and not bad.ok
    assert bad.exit_code == 2
    assert (ok.progress, ok.frame_current) == (100.0, 8)
    assert (bad.progress, bad.frame_current) == (None, None)
    assert [s.status for s in bad.stages] == ["failed", "skipped"]


def test_queued_task_has_no_times_or_hardware() -> None:
    t = TaskResult.from_record(queued_record())
    assert t.hardware == {}
    assert t.duration is None and t.queue_time is None and t.finished_at is None
    assert not t.done and not t.ok
    assert t.output == ""
    assert repr(t) == "<TaskResult q1 queued>"


def test_output_is_stdout_of_last_command_that_ran(results: ResultList) -> None:
    ok, bad = results
    assert ok.output == "loss=0.12\n"
    # The skipped stage ran nothing: the failing command's stdout is the output.
    assert bad.output == "compiling\n"


def test_output_ignores_commands_that_never_started() -> None:
    rec = failed_record()
    rec.stages[0].commands.append(p.CommandOutcome(cmd="make install", exit_code=None))
    assert TaskResult.from_record(rec).output == "compiling\n"


def test_command_truncated(results: ResultList) -> None:
    train_cmd = results[0].stages[1].commands[0]
    assert train_cmd.stderr_truncated and not train_cmd.stdout_truncated
    assert train_cmd.truncated
    assert not results[0].stages[0].commands[0].truncated


def test_artifacts(results: ResultList) -> None:
    model, logs = results[0].artifacts
    assert model.ok and model.path is None and model.size == 1234
    assert not logs.ok and "no file matches" in logs.error
    assert not Artifact(pattern="x").ok  # neither stored nor failed: not ok


def test_repr_is_one_readable_line(results: ResultList) -> None:
    ok, bad = results
    assert repr(ok) == "<TaskResult 3f2a9c0d… 'train' finished on daemon-1 in 7.50s>"
    assert repr(bad) == "<TaskResult 77aa failed (exit 2) on daemon-2 in 0.75s>"


def test_result_list_summaries(results: ResultList) -> None:
    results.append(TaskResult.from_record(queued_record()))
    assert results.by_status() == {"queued": 1, "finished": 1, "failed": 1}
    assert list(results.by_status()) == ["queued", "finished", "failed"]
    assert [t.task_id for t in results.failed] == ["77aa"]
    assert isinstance(results.failed, ResultList)
    assert not results.ok
    assert results[:1].ok
    assert isinstance(results[:1], ResultList)
    assert isinstance(results[0], TaskResult)


# ------------------------------------------------------------ DataFrames


TASK_COLUMNS = [
    "task_id", "session_id", "label", "status", "exit_code", "machine", "os", "cpu", "cores",
    "ram_mb", "submitted", "queued", "started", "ended", "queue_time_s", "duration_s", "attempts",
    "error", "wait_reason", "priority", "n_stages", "artifacts", "credits",
    "progress_percent", "frame_current",
]
STAGE_COLUMNS = [
    "task_id", "machine", "stage", "stage_index", "status", "started", "ended", "duration_s",
    "peak_ram_mb", "cpu_percent", "cpu_time_s", "gpu_util_percent", "gpu_mem_mb", "comment", "note",
]
COMMAND_COLUMNS = [
    "task_id", "machine", "stage", "stage_index", "command_index", "cmd", "exit_code",
    "duration_s", "cpu_time_s", "peak_ram_mb", "stdout", "stderr", "truncated",
]
MACHINE_COLUMNS = [
    "machine_id", "name", "state", "os", "distro", "arch", "cpu", "cores", "ram_mb",
    "gpus", "slots", "running", "tags", "owner", "credits", "runtimes", "load_1m", "cpu_percent",
    "mem_percent", "disk_percent", "last_seen",
]


def assert_one_missing_marker(df: pd.DataFrame) -> None:
    """Every column that can be missing says so with <NA> (or NaT for times): no NaN, no None."""
    for name in df.columns:
        col = df[name]
        dtype = str(col.dtype)
        if dtype.startswith("datetime64"):
            assert dtype == "datetime64[us, UTC]", name
        elif dtype in ("int64", "category"):
            assert not col.isna().any(), name  # these never miss
        else:
            assert dtype in ("Int64", "Float64", "string", "boolean"), (name, dtype)
            assert all(v is pd.NA for v in col[col.isna()]), name
    text = df.to_string()
    assert "NaN" not in text and "None" not in text


def test_task_dataframe(results: ResultList) -> None:
    df = results.to_dataframe()
    assert df.shape == (2, 25)
    assert list(df.columns) == TASK_COLUMNS
    assert list(df["machine"]) == ["daemon-1", "daemon-2"]
    assert list(df["os"]) == ["linux", "darwin"]
    assert list(df["cores"]) == [64, 8]
    assert df["ram_mb"].tolist() == [256 * 1024, 16 * 1024]
    assert df["duration_s"].tolist() == pytest.approx([7.5, 0.75])
    assert df["queue_time_s"].tolist() == pytest.approx([2.5, 2.0])
    assert df["attempts"].tolist() == [2, 1]
    assert df["n_stages"].tolist() == [2, 2]
    assert df["artifacts"].tolist() == [1, 0]  # the failed '*.log' artifact is not counted
    assert df["exit_code"].tolist() == [0, 2]
    assert str(df["exit_code"].dtype) == "Int64"
    # Every time column has the same UTC dtype, whole or fractional seconds.
    assert {str(df[c].dtype) for c in ("submitted", "queued", "started", "ended")} == {
        "datetime64[us, UTC]"
    }
    assert df["started"][0] == pd.Timestamp(T0 + 2.5, unit="s", tz="UTC")
    assert df["ended"][1] == pd.Timestamp(T0 + 3.75, unit="s", tz="UTC")
    assert df["error"][0] is pd.NA and df["error"][1].startswith("stage 'build' failed")
    # Progress: the parser's last word; missing (not 0) for a task without a parser.
    assert df["progress_percent"][0] == 100.0 and df["progress_percent"][1] is pd.NA
    assert str(df["frame_current"].dtype) == "Int64"
    assert df["frame_current"][0] == 8 and pd.isna(df["frame_current"][1])
    assert_one_missing_marker(df)


def test_task_dataframe_missing_values_are_na_not_zero() -> None:
    df = ResultList.from_records([queued_record()]).to_dataframe("task")
    row = df.iloc[0]
    assert row["exit_code"] is pd.NA and row["cores"] is pd.NA and row["ram_mb"] is pd.NA
    assert row["started"] is pd.NaT and row["ended"] is pd.NaT
    assert row["duration_s"] is pd.NA and row["queue_time_s"] is pd.NA
    assert row["wait_reason"] == "no machine has gpu=h100"
    assert row["attempts"] == 0
    assert_one_missing_marker(df)


def test_stage_dataframe(results: ResultList) -> None:
    df = results.to_dataframe(level="stage")
    assert df.shape == (4, 15)
    assert list(df.columns) == STAGE_COLUMNS
    assert df["stage"].tolist() == ["prepare", "train", "build", "test"]
    assert df["stage_index"].tolist() == [0, 1, 0, 1]
    assert df["status"].tolist() == ["finished", "finished", "failed", "skipped"]
    assert df["machine"].tolist() == ["daemon-1", "daemon-1", "daemon-2", "daemon-2"]
    assert df["peak_ram_mb"][0] == pytest.approx(512.0)
    assert df["peak_ram_mb"][1] == pytest.approx(2048.0)
    assert df["gpu_mem_mb"][1] == pytest.approx(40 * 1024)
    # Failed task tracked no RAM/CPU/GPU: missing, never 0.
    assert df["peak_ram_mb"][2:].isna().all()
    assert df["cpu_percent"][2:].isna().all()
    assert df["gpu_util_percent"].isna().tolist() == [True, False, True, True]
    assert df["duration_s"].tolist()[:3] == pytest.approx([1.5, 6.0, 0.75])
    assert df["duration_s"][3] is pd.NA  # the skipped stage has no duration
    assert df["started"][3] is pd.NaT and df["ended"][3] is pd.NaT
    # ended = started + duration, per stage
    assert df["ended"][1] == pd.Timestamp(T0 + 10.0, unit="s", tz="UTC")
    assert (df["ended"][:3] - df["started"][:3]).dt.total_seconds().tolist() == pytest.approx([1.5, 6.0, 0.75])
    assert df["comment"][0] == "unpack" and df["note"][1] == "loss 0.12"
    # Aggregates skip untracked stages instead of averaging in zeros.
    assert df["peak_ram_mb"].mean() == pytest.approx((512 + 2048) / 2)
    assert_one_missing_marker(df)


def test_stage_column_keeps_the_tasks_order_not_the_alphabet(results: ResultList) -> None:
    df = results.to_dataframe(level="stage")
    assert isinstance(df["stage"].dtype, pd.CategoricalDtype) and df["stage"].cat.ordered
    # "prepare" before "train" and "build" before "test", although b < p < te < tr.
    assert list(df["stage"].cat.categories) == ["prepare", "train", "build", "test"]
    table = df.pivot_table(index="machine", columns="stage", values="duration_s", observed=True)
    assert list(table.columns) == ["prepare", "train", "build"]  # "test" never ran: no column
    assert list(df.groupby("stage", observed=True)["duration_s"].sum().index) == ["prepare", "train", "build", "test"]


def test_stage_order_merges_tasks_with_different_stages() -> None:
    from hwf_jupyter.frames import stage_order

    assert stage_order([["fetch", "zip"], ["fetch", "build", "zip"]]) == ["fetch", "build", "zip"]
    assert stage_order([["b", "a"], ["c"]]) == ["b", "a", "c"]
    assert stage_order([["x", "y"], ["y", "x"]]) == ["x", "y"]  # disagreement: first seen wins
    assert stage_order([]) == []


def test_command_dataframe(results: ResultList) -> None:
    df = results.to_dataframe("command")
    assert df.shape == (5, 13)
    assert list(df.columns) == COMMAND_COLUMNS
    assert df["cmd"].tolist() == ["tar xf data.tar", "ls", "python train.py", "echo start", "make"]
    assert df["stage_index"].tolist() == [0, 0, 1, 0, 0]
    assert list(df["stage"].cat.categories) == ["prepare", "train", "build", "test"]
    assert df["command_index"].tolist() == [0, 1, 0, 0, 1]
    assert df["exit_code"].tolist() == [0, 0, 0, 0, 2]
    assert df["truncated"].tolist() == [False, False, True, False, False]
    assert str(df["truncated"].dtype) == "boolean"
    assert df["peak_ram_mb"].tolist()[:3] == pytest.approx([256.0, 512.0, 2048.0])
    assert df["peak_ram_mb"].isna().tolist() == [False, False, False, True, True]
    assert df["cpu_time_s"].isna().tolist() == [False, False, False, True, True]
    assert df["stderr"][4] == "error: boom\n"
    assert_one_missing_marker(df)


@pytest.mark.parametrize(
    ("level", "columns"), [("task", TASK_COLUMNS), ("stage", STAGE_COLUMNS), ("command", COMMAND_COLUMNS)]
)
def test_empty_result_list_has_columns(level: str, columns: list[str]) -> None:
    full = ResultList.from_records([finished_record()]).to_dataframe(level)
    empty = ResultList().to_dataframe(level)
    assert list(empty.columns) == columns == list(full.columns)
    assert empty.shape == (0, len(columns))
    assert list(empty.dtypes.astype(str)) == [
        "category" if str(d) == "category" else str(d) for d in full.dtypes
    ]


def test_no_bytes_twins_and_units_in_names(results: ResultList) -> None:
    """One unit per kind: RAM/GPU memory in MiB (_mb), spans in seconds (_s), everywhere."""
    frames = [results.to_dataframe(lv) for lv in ("task", "stage", "command")]
    frames.append(HardwarePool.from_machines(machines()).to_dataframe())
    cols = [c for f in frames for c in f.columns]
    memory = [c for c in cols if c.startswith(("ram", "peak_ram", "gpu_mem"))]
    assert memory and all(c.endswith("_mb") for c in memory)
    spans = [c for c in cols if c.startswith(("duration", "queue_time", "cpu_time"))]
    assert spans and all(c.endswith("_s") for c in spans)
    # Numbers that are not counts/ids carry a unit suffix.
    floats = [c for f in frames for c in f.columns if str(f[c].dtype) == "Float64"]
    assert all(c.endswith(("_s", "_mb", "_percent")) or c == "load_1m" for c in floats), floats


def test_unknown_level_raises(results: ResultList) -> None:
    with pytest.raises(ValueError, match="'task', 'stage', 'command'"):
        results.to_dataframe("stages")


# -------------------------------------------------------------- machines


def machines() -> list[p.MachineInfo]:
    return [
        p.MachineInfo(
            machine_id="m-1", name="gpu-box", state="online", hardware=HW_A, slots=4,
            running=3, tags=["gpu", "fast"],
            load=p.Load(load_avg=(2.5, 2.0, 1.0), cpu_percent=40.0, mem_percent=55.5,
                        disk_percent=70.0),
            first_seen=T0, last_seen=T0 + 60,
        ),
        p.MachineInfo(machine_id="m-2", name="laptop", state="draining", hardware=HW_B, slots=1),
    ]


def test_hardware_pool_objects() -> None:
    pool = HardwarePool.from_machines(machines())
    assert len(pool) == 2
    assert pool.names == ["gpu-box", "laptop"]
    assert [m.machine_id for m in pool] == ["m-1", "m-2"]
    gpu_box, laptop = pool
    assert gpu_box.os == "linux" and gpu_box.cores == 64 and gpu_box.ram == 256 * GIB
    assert gpu_box.cpu == "AMD EPYC 7763"
    assert [g["name"] for g in gpu_box.gpus] == ["A100", "A100"]
    assert gpu_box.load["cpu_percent"] == 40.0
    assert laptop.gpus == [] and laptop.load is None
    assert repr(pool) == "<HardwarePool 2 machines: gpu-box, laptop>"
    assert repr(pool[1:]) == "<HardwarePool 1 machine: laptop>"


def test_hardware_pool_dataframe() -> None:
    df = HardwarePool.from_machines(machines()).to_dataframe()
    assert df.shape == (2, 21)
    assert list(df.columns) == MACHINE_COLUMNS
    assert df["name"].tolist() == ["gpu-box", "laptop"]
    assert df["ram_mb"].tolist() == pytest.approx([256.0 * 1024, 16.0 * 1024])
    assert df["gpus"].tolist() == ["A100, A100", ""]
    assert df["tags"].tolist() == ["gpu, fast", ""]
    assert df["slots"].tolist() == [4, 1]
    assert df["running"].tolist() == [3, 0]
    assert df["load_1m"][0] == 2.5 and df["load_1m"][1] is pd.NA
    assert df["mem_percent"][0] == 55.5 and df["mem_percent"][1] is pd.NA
    assert df["last_seen"][0] == pd.Timestamp(T0 + 60, unit="s", tz="UTC")
    assert pd.isna(df["last_seen"][1])
    assert_one_missing_marker(df)


def test_empty_hardware_pool() -> None:
    pool = HardwarePool.from_machines([])
    assert len(pool) == 0 and pool.names == []
    assert repr(pool) == "<HardwarePool 0 machines>"
    assert pool.to_dataframe().shape == (0, 21)


# ------------------------------------------------------------ display


def test_frames_display_short_ids_but_keep_the_full_id() -> None:
    from hwf_jupyter.frames import ResultFrame, short_id

    rec = finished_record()
    rec = p.TaskRecord(**{**{f: getattr(rec, f) for f in rec.__struct_fields__},
                          "task_id": "t-0123456789abcdef", "session_id": "s-fedcba9876543210",
                          "machine": "gpu-node-01"})
    df = ResultList.from_records([rec]).to_dataframe()
    assert isinstance(df, ResultFrame)
    assert df["task_id"][0] == "t-0123456789abcdef"  # the data keeps the full id
    assert short_id("t-0123456789abcdef") == "t-01234567…"
    assert short_id("77aa") == "77aa" and short_id(None) is None
    html = df._repr_html_()
    assert "t-01234567…" in html and "t-0123456789abcdef" not in html
    assert "s-fedcba98…" in html
    assert 'class="hwf-frame"' in html and "white-space: nowrap" in html
    text = repr(df)
    assert "t-01234567…" in text and "t-0123456789abcdef" not in text
    # Operations keep the display; the full ids are still there to use.
    sub = df[["task_id", "machine"]]
    assert isinstance(sub, ResultFrame) and "t-01234567…" in sub._repr_html_()
    assert df.set_index("task_id").index[0] == "t-0123456789abcdef"


def test_frame_html_escapes_names_from_daemons() -> None:
    rec = finished_record()
    rec = p.TaskRecord(**{**{f: getattr(rec, f) for f in rec.__struct_fields__},
                          "machine": "<img src=x onerror=alert(1)>", "label": "<b>x</b>"})
    html = ResultList.from_records([rec]).to_dataframe()._repr_html_()
    assert "<img" not in html and "<b>x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html

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


def test_task_dataframe(results: ResultList) -> None:
    df = results.to_dataframe()
    assert df.shape == (2, 25)
    assert list(df.columns) == [
        "task_id", "session_id", "status", "exit_code", "machine", "os", "cpu", "cores",
        "ram", "submitted", "queued", "started", "finished", "queue_time", "duration", "attempts",
        "error", "wait_reason", "label", "priority", "n_stages", "artifacts", "credits",
        "progress", "frame_current",
    ]
    assert list(df["machine"]) == ["daemon-1", "daemon-2"]
    assert list(df["os"]) == ["linux", "darwin"]
    assert list(df["cores"]) == [64, 8]
    assert df["ram"].tolist() == [256 * GIB, 16 * GIB]
    assert df["duration"].tolist() == pytest.approx([7.5, 0.75])
    assert df["queue_time"].tolist() == pytest.approx([2.5, 2.0])
    assert df["attempts"].tolist() == [2, 1]
    assert df["n_stages"].tolist() == [2, 2]
    assert df["artifacts"].tolist() == [1, 0]  # the failed '*.log' artifact is not counted
    assert df["exit_code"].tolist() == [0, 2]
    assert str(df["exit_code"].dtype) == "Int64"
    # Every time column has the same UTC dtype, whole or fractional seconds.
    assert {str(df[c].dtype) for c in ("submitted", "started", "finished")} == {
        "datetime64[us, UTC]"
    }
    assert df["started"][0] == pd.Timestamp(T0 + 2.5, unit="s", tz="UTC")
    assert pd.isna(df["error"][0]) and df["error"][1].startswith("stage 'build' failed")
    # Progress: the parser's last word; missing (not 0) for a task without a parser.
    assert df["progress"][0] == 100.0 and math.isnan(df["progress"][1])
    assert str(df["frame_current"].dtype) == "Int64"
    assert df["frame_current"][0] == 8 and pd.isna(df["frame_current"][1])


def test_task_dataframe_missing_values_are_na_not_zero() -> None:
    df = ResultList.from_records([queued_record()]).to_dataframe("task")
    row = df.iloc[0]
    assert pd.isna(row["exit_code"]) and pd.isna(row["cores"]) and pd.isna(row["ram"])
    assert pd.isna(row["started"]) and pd.isna(row["finished"])
    assert math.isnan(row["duration"]) and math.isnan(row["queue_time"])
    assert row["wait_reason"] == "no machine has gpu=h100"
    assert row["attempts"] == 0


def test_stage_dataframe(results: ResultList) -> None:
    df = results.to_dataframe(level="stage")
    assert df.shape == (4, 15)
    assert set(df.columns) == {
        "task_id", "machine", "stage", "stage_index", "status", "duration", "peak_ram",
        "peak_ram_mb", "cpu_percent", "cpu_time", "gpu_util", "gpu_mem", "comment", "note",
        "started",
    }
    assert df["stage"].tolist() == ["prepare", "train", "build", "test"]
    assert df["stage_index"].tolist() == [0, 1, 0, 1]
    assert df["status"].tolist() == ["finished", "finished", "failed", "skipped"]
    assert df["machine"].tolist() == ["daemon-1", "daemon-1", "daemon-2", "daemon-2"]
    assert str(df["peak_ram"].dtype) == "Int64"
    assert df["peak_ram"][1] == 2 * GIB
    assert df["peak_ram_mb"][0] == pytest.approx(512.0)
    # Failed task tracked no RAM/CPU/GPU: missing, never 0.
    assert df["peak_ram"][2:].isna().all()
    assert df["peak_ram_mb"][2:].isna().all()
    assert df["cpu_percent"][2:].isna().all()
    assert df["gpu_util"].isna().tolist() == [True, False, True, True]
    assert df["duration"].tolist()[:3] == pytest.approx([1.5, 6.0, 0.75])
    assert math.isnan(df["duration"][3])  # the skipped stage has no duration
    assert pd.isna(df["started"][3])
    assert df["comment"][0] == "unpack" and df["note"][1] == "loss 0.12"
    # Aggregates skip untracked stages instead of averaging in zeros.
    assert df["peak_ram_mb"].mean() == pytest.approx((512 + 2048) / 2)


def test_command_dataframe(results: ResultList) -> None:
    df = results.to_dataframe("command")
    assert df.shape == (5, 13)
    assert list(df.columns) == [
        "task_id", "machine", "stage", "stage_index", "command_index", "cmd", "exit_code",
        "duration", "cpu_time", "peak_ram", "stdout", "stderr", "truncated",
    ]
    assert df["cmd"].tolist() == ["tar xf data.tar", "ls", "python train.py", "echo start", "make"]
    assert df["stage_index"].tolist() == [0, 0, 1, 0, 0]
    assert df["command_index"].tolist() == [0, 1, 0, 0, 1]
    assert df["exit_code"].tolist() == [0, 0, 0, 0, 2]
    assert df["truncated"].tolist() == [False, False, True, False, False]
    assert df["truncated"].dtype == bool
    assert str(df["peak_ram"].dtype) == "Int64"
    assert df["peak_ram"].isna().tolist() == [False, False, False, True, True]
    assert df["cpu_time"].isna().tolist() == [False, False, False, True, True]
    assert df["stderr"][4] == "error: boom\n"


@pytest.mark.parametrize(
    ("level", "n_columns"), [("task", 25), ("stage", 15), ("command", 13)]
)
def test_empty_result_list_has_columns(level: str, n_columns: int) -> None:
    full = ResultList.from_records([finished_record()]).to_dataframe(level)
    empty = ResultList().to_dataframe(level)
    assert empty.shape == (0, n_columns)
    assert list(empty.columns) == list(full.columns)
    for col in ("peak_ram", "exit_code"):
        if col in empty:
            assert str(empty[col].dtype) == "Int64"


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
    assert list(df.columns) == [
        "machine_id", "name", "state", "os", "distro", "arch", "cpu", "cores", "ram_gb",
        "gpus", "slots", "running", "tags", "owner", "credits", "runtimes", "load_1m", "cpu_percent", "mem_percent",
        "disk_percent", "last_seen",
    ]
    assert df["name"].tolist() == ["gpu-box", "laptop"]
    assert df["ram_gb"].tolist() == pytest.approx([256.0, 16.0])
    assert df["gpus"].tolist() == ["A100, A100", ""]
    assert df["tags"].tolist() == ["gpu, fast", ""]
    assert df["slots"].tolist() == [4, 1]
    assert df["running"].tolist() == [3, 0]
    assert df["load_1m"][0] == 2.5 and math.isnan(df["load_1m"][1])
    assert df["mem_percent"][0] == 55.5 and math.isnan(df["mem_percent"][1])
    assert df["last_seen"][0] == pd.Timestamp(T0 + 60, unit="s", tz="UTC")
    assert pd.isna(df["last_seen"][1])


def test_empty_hardware_pool() -> None:
    pool = HardwarePool.from_machines([])
    assert len(pool) == 0 and pool.names == []
    assert repr(pool) == "<HardwarePool 0 machines>"
    assert pool.to_dataframe().shape == (0, 21)

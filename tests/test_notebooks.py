"""Each example notebook, executed end to end in a real kernel by nbclient."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from hwf_jupyter.notebook_runner import execute_notebook, widget_states

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
pytestmark = pytest.mark.e2e


def _run(name, tmp_path):
    shutil.copy(NOTEBOOKS / name, tmp_path / name)
    dest, nb = execute_notebook(tmp_path / name, timeout=300)
    assert dest.exists()
    return nb


def _tagged(nb, tag):
    return next(c for c in nb.cells if tag in c.metadata.get("tags", []))


def _progress_bars(nb):
    return [s for s in widget_states(nb).values() if s.get("_model_name") == "FloatProgressModel"]


def _check_line(nb):
    """The 'check' cell prints `(rows, cols) [columns]`."""
    text = "".join(o.get("text", "") for o in _tagged(nb, "check").outputs if o.output_type == "stream")
    shape_text, _, cols_text = text.strip().partition(") ")
    return ast.literal_eval(shape_text + ")"), ast.literal_eval(cols_text)


STAGE_COLUMNS = {"task_id", "machine", "stage", "started", "ended", "duration_s", "peak_ram_mb", "cpu_percent",
                 "cpu_time_s"}


def test_quickstart_notebook(tmp_path):
    nb = _run("quickstart.ipynb", tmp_path)
    bars = _progress_bars(nb)
    assert bars and bars[-1]["value"] == bars[-1]["max"] == 2
    shape, cols = _check_line(nb)
    assert shape[0] == 4 and STAGE_COLUMNS <= set(cols)
    html = "".join(o.get("data", {}).get("text/html", "") for o in _tagged(nb, "stages").outputs)
    assert "build" in html and "run" in html
    timeline = _tagged(nb, "timeline").outputs
    assert [o for o in timeline if "image/png" in o.get("data", {})], "the timeline is drawn"
    assert (tmp_path / "hwf_artifacts").is_dir()


def test_hardware_benchmark_notebook(tmp_path):
    nb = _run("hardware_benchmark.ipynb", tmp_path)
    bars = _progress_bars(nb)
    assert bars and bars[-1]["value"] == bars[-1]["max"] == 2  # one copy per machine
    shape, cols = _check_line(nb)
    assert shape[0] == 4 and STAGE_COLUMNS <= set(cols)
    pivot = "".join(o.get("data", {}).get("text/plain", "") for o in _tagged(nb, "stages").outputs)
    assert "daemon-1" in pivot and "daemon-2" in pivot
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the bar chart is drawn"


def test_python_api_notebook(tmp_path):
    nb = _run("python_api.ipynb", tmp_path)
    bars = _progress_bars(nb)
    assert bars and bars[-1]["value"] == bars[-1]["max"] == 2
    shape, cols = _check_line(nb)
    assert shape[0] == 4 and STAGE_COLUMNS <= set(cols)


def test_render_frames_notebook(tmp_path):
    nb = _run("render_frames.ipynb", tmp_path)
    bars = _progress_bars(nb)
    assert bars and bars[-1]["value"] == bars[-1]["max"] == 6  # 24 frames in chunks of 4
    outputs = _tagged(nb, "gif").outputs
    assert any("image/gif" in o.get("data", {}) for o in outputs), "the GIF is displayed"
    assert any("image/png" in o.get("data", {}) for o in _tagged(nb, "sheet").outputs)
    text = "".join(o.get("text", "") for o in _tagged(nb, "check").outputs if o.output_type == "stream")
    assert text.split() == ["24", "24"]  # 24 frames back, every one different
    assert (tmp_path / "julia.gif").read_bytes()[:6] == b"GIF89a"

"""The progress widget in a real kernel: stderr tails, wait reasons, the 1 s
tick reaching the front-end, and the final static snapshot that a saved
notebook keeps (also through nbclient, as a saved .ipynb)."""

from __future__ import annotations

import os
import re

import nbformat
import pytest

from hwf_jupyter import localfarm
from hwf_jupyter.notebook_runner import execute_notebook
from kernel_driver import Kernel

pytestmark = pytest.mark.e2e
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    k = Kernel(str(tmp_path_factory.mktemp("nb")), env=dict(os.environ, HWF_NONINTERACTIVE="0"))
    k.run("%load_ext hwf_jupyter\n%hwf_local --daemons 1")
    yield k
    k.close()


def _summaries(messages):
    """The progress summary HTML sent over widget comms (the live widget's text)."""
    out = []
    for m in messages:
        if m.get("msg_type") != "comm_msg":
            continue
        state = m.get("data", {}).get("state", {})
        value = state.get("value")
        if isinstance(value, str) and "<i>" in value and "done" in value:
            out.append(value)
    return out


def _final(run):
    """The update that replaced the widget with its static snapshot."""
    ups = [o for o in run.outputs if o["msg_type"] == "update_display_data"]
    return ups[-1]["data"] if ups else None


def test_failure_shows_stderr_tail_and_the_display_ends_as_a_static_snapshot(kernel):
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage slow\necho starting; sleep 1\npython3 work.py slow 30\n")
    r = kernel.run("sub = %hwf_dispatch --wait --max-retries 0")
    first = next(o for o in r.outputs if o["msg_type"] == "display_data" and WIDGET in o["data"])
    display_id = first["transient"]["display_id"]
    assert "text/html" in first["data"], "the widget's output carries an HTML fallback"
    final = _final(r)
    if final is None:  # the I/O thread published it after the cell went idle
        kernel.drain(1.0)
        final = next(m["data"] for m in reversed(kernel.stray) if m["msg_type"] == "update_display_data"
                     and m["transient"]["display_id"] == display_id)
    assert WIDGET not in final
    assert "1/1 failed" in final["text/plain"]
    # counted from 0, like the DataFrame's command_index (1 with a command per line, 0 as one script)
    assert re.search(r"stage 'slow' command [01] \('.*'\) exited with code 2", final["text/plain"])
    assert "can't open file" in final["text/plain"] and "can&#x27;t open file" in final["text/html"]
    assert re.search(r"stage 0 &#x27;slow&#x27;, command [01] \(exit code 2\)", final["text/html"])


def test_elapsed_ticks_every_second_while_a_task_runs(kernel):
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage nap\nsleep 4\n")
    kernel.run("sub = %hwf_dispatch")
    kernel.stray.clear()
    kernel.drain(3.2)  # no task event arrives in these seconds: only the ticker speaks
    running = [s for s in _summaries(kernel.stray) if "running 1" in s]
    elapsed = {re.search(r"<i>([^<]+)</i>", s).group(1) for s in running}
    assert len(elapsed) >= 3, f"elapsed should move every second, saw {sorted(elapsed)}"
    kernel.run("df = %hwf_results --wait")


def test_queued_task_says_why_it_waits(kernel):
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage big\ntrue\n")
    kernel.run("%hwf_hardware ram=4096GB")
    kernel.run("sub = %hwf_dispatch")
    kernel.stray.clear()
    kernel.drain(5.0)
    waits = [s for s in _summaries(kernel.stray) if "hwf-wait-reason" in s]
    assert waits, "the widget shows the hub's wait reason"
    assert "ram&gt;=4096.0GiB" in waits[-1] and "largest ram:" in waits[-1]
    kernel.run("%hwf_cancel")
    kernel.run("%hwf_draft --clear")


NOTEBOOK = [
    "%load_ext hwf_jupyter\n%hwf_local --daemons 1",
    "%%hwf_stage long\nsleep 30\n",
    "sub = %hwf_dispatch --repeat 2",
    "import time\ntime.sleep(2)\n%hwf_cancel",
    "time.sleep(2.5)",
]


def test_saved_notebook_keeps_the_true_final_state(tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in NOTEBOOK])
    path = tmp_path / "cancel.ipynb"
    nbformat.write(nb, path)
    monkeypatch.setenv("HWF_LOCAL_DIR", str(tmp_path / "farm"))  # its own farm (it outlives the kernel)
    try:
        dest, ran = execute_notebook(path, timeout=120)  # widgets on, as in a browser
    finally:
        localfarm.stop_farm(tmp_path / "farm")
    saved = nbformat.read(dest, as_version=4)
    outs = [o for o in saved.cells[2].outputs if o.output_type == "display_data"]
    assert outs, "the dispatch cell keeps its progress output"
    data = outs[0].data
    assert WIDGET not in data, "no widget view left to say 'model not found'"
    assert data["text/plain"].startswith("hwf session") and "2/2 cancelled" in data["text/plain"]
    assert "2/2 cancelled" in data["text/html"] and "running" not in data["text/plain"]

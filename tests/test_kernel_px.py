"""%%hwf_px and function futures in a real IPython kernel, against real daemons."""

from __future__ import annotations

import os

import pytest

from kernel_driver import Kernel

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kernel(cluster, tmp_path_factory):
    k = Kernel(str(tmp_path_factory.mktemp("px")), env=dict(os.environ, HWF_NONINTERACTIVE="0"))
    k.run("%load_ext hwf_jupyter")
    k.run(f"%hwf_connect {cluster.address} --token {cluster.token}")
    yield k
    k.close()


def test_px_runs_on_every_daemon_and_shows_output_and_value(kernel):
    r = kernel.run("%%hwf_px\nimport os\nprint('hello from', os.environ['HWF_TASK_ID'][:2])\n6 * 7\n")
    for d in ("daemon-1", "daemon-2"):
        assert f"[{d}] hello from t-" in r.stdout
        assert f"[{d}] Out: 42" in r.stdout
    assert r.stdout.index("[daemon-1]") < r.stdout.index("[daemon-2]")
    pinned = kernel.run("%%hwf_px --hardware daemon=daemon-2\n'only here'\n")
    assert pinned.stdout.strip() == "[daemon-2] Out: 'only here'"


def test_px_sends_the_notebook_names_it_uses(kernel):
    kernel.run("data = list(range(10))\ndef helper(xs):\n    return sum(xs) * 10\nimport threading\n"
               "lock = threading.Lock()")
    r = kernel.run("%%hwf_px --targets 3\nhelper(data)\n")
    outs = [line for line in r.stdout.splitlines() if "Out:" in line]
    assert len(outs) == 3 and all(line.endswith("Out: 450") for line in outs)
    assert sorted(line.split("]")[0].split(":")[0] for line in outs) == ["[0", "[1", "[2"]
    quiet = kernel.run("%%hwf_px --targets 1\nx = helper(data);\n")
    assert "Out:" not in quiet.stdout
    skipped = kernel.run("%%hwf_px --targets 1\nstr(lock) if 'lock' in dir() else 'no lock here'\n")
    assert "not sent (they do not pickle): lock" in skipped.stderr
    assert "Out: 'no lock here'" in skipped.stdout


def test_px_shows_a_remote_error_per_target_with_its_line(kernel):
    r = kernel.run("%%hwf_px --targets 2\nx = 1\ny = x / (x - 1)\n", allow_error=True)
    assert r.status == "error" and r.error["ename"] == "UsageError"
    assert "2 of 2 target(s) raised" in r.error["evalue"]
    assert "ZeroDivisionError: division by zero" in r.stderr
    assert "y = x / (x - 1)" in r.stderr, "the cell's line is in the remote traceback"
    assert "<hwf_px runner>" not in r.stderr
    bad = kernel.run("%%hwf_px --targets nine\n1\n", allow_error=True)
    assert bad.error["ename"] == "UsageError" and "--targets" in bad.error["evalue"]
    syntax = kernel.run("%%hwf_px --targets 1\nx = 1\ndef (:\n", allow_error=True)
    assert syntax.error["ename"] == "UsageError" and "syntax error on line 2" in syntax.error["evalue"]


def test_functions_and_progress_in_the_kernel(kernel, cluster):
    out = kernel.run(
        "import json\n"
        "hub = get_ipython().find_magic('hwf_connect').__self__.hub\n"
        "def cube(x):\n    return x ** 3\n"
        "fut = hub.submit(cube, 3)\n"
        "v = await fut\n"
        "futs = hub.map(cube, range(6))\n"
        "from hwf_jupyter.widgets import watch_progress\n"
        "prog = watch_progress(hub, futs)\n"
        "display(prog)\n"
        "vals = hub.gather(futs)\n"
        "df = hub.get_result_sync(futs).to_dataframe()\n"
        "print(json.dumps({'v': v, 'vals': vals, 'col': [int(x) for x in df['value']]}))"
    )
    assert out.json() == {"v": 27, "vals": [0, 1, 8, 27, 64, 125], "col": [0, 1, 8, 27, 64, 125]}
    # A live widget, or its final snapshot when the six calls had already ended at display time.
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               or "hwf-progress-snapshot" in o.get("data", {}).get("text/html", "") for o in out.outputs)


def test_after_nest_asyncio_apply(cluster, tmp_path):
    k = Kernel(str(tmp_path))
    try:
        k.run("import nest_asyncio; nest_asyncio.apply()")
        k.run("%load_ext hwf_jupyter")
        k.run(f"%hwf_connect {cluster.address} --token {cluster.token}")
        r = k.run("%%hwf_px --targets 1\n'nested'\n")
        assert r.stdout.strip().endswith("Out: 'nested'")
        out = k.run(
            "import asyncio\n"
            "hub = get_ipython().find_magic('hwf_connect').__self__.hub\n"
            "def inc(x):\n    return x + 1\n"
            "a = await hub.submit(inc, 1)\n"
            "b = asyncio.get_event_loop().run_until_complete(hub.gather_async(hub.map(inc, [2, 3])))\n"
            "print(a, b, hub.submit(inc, 9).result())"
        )
        assert out.stdout.strip() == "2 [3, 4] 10"
    finally:
        k.close()

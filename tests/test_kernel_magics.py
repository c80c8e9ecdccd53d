"""Every magic, in a real IPython kernel, against real hubs and daemons."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kernel_driver import Kernel

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("nb")
    (cwd / "input.txt").write_text("hello from the notebook\n")
    k = Kernel(str(cwd), env=dict(os.environ, HWF_NONINTERACTIVE="0"))
    k.run("%load_ext hwf_jupyter")
    yield k
    k.close()


@pytest.fixture
def fresh_kernel(tmp_path):
    k = Kernel(str(tmp_path))
    k.run("%load_ext hwf_jupyter")
    yield k
    k.close()


def test_the_seed_example_through_magics(kernel):
    shown = kernel.run("%hwf_local --daemons 2")
    card = shown.data("text/html")[0]
    assert "HWF LocalCluster" in card and "status page" in card and "href='http://127.0.0.1:" in card
    kernel.run("cluster = %hwf_local --daemons 2")
    r = kernel.run("%%hwf_stage build --data input.txt:in.txt\ncp in.txt copy.txt\n")
    assert "build" in r.data()[0] and "in.txt" in r.data()[0]
    kernel.run(
        "%%hwf_stage run --track time,ram,cpu --comment 'the real work'\n"
        "tr a-z A-Z < copy.txt > out.txt\n"
        "python3 -c 'b = b\"x\" * (60 * 2**20)'\n"
    )
    assert kernel.run("%hwf_artifacts out.txt").stdout.strip() == "hwf draft: artifacts out.txt"
    assert kernel.run("%hwf_hardware os=linux ram=1GB").stdout.strip() == "hwf draft: hardware os=linux, ram=1GB"
    draft = kernel.run("%hwf_draft").data()[0]
    assert "2 stage(s)" in draft and "artifacts: out.txt" in draft and "ram=1GB" in draft
    r = kernel.run("sub = %hwf_dispatch --wait --repeat 2")
    assert r.status == "ok"
    shown = [o for o in r.outputs if o["msg_type"] in ("display_data", "update_display_data")
             and "hwf-progress-snapshot" in o["data"].get("text/html", "")]
    assert shown, "the progress display (a live widget, or its snapshot when already done) is shown"
    last = shown[-1]["data"]  # what the saved notebook keeps: the true end, no widget model needed
    assert "application/vnd.jupyter.widget-view+json" not in last and "2/2 done" in last["text/plain"]
    found = kernel.run(
        "import json\nimport pandas as pd\n"
        "df = %hwf_results --level stage\n"
        "tasks = %hwf_results\n"
        "cmds = %hwf_results --level command\n"
        "print(json.dumps({'shape': df.shape, 'cols': list(df.columns), 'stages': list(df['stage']),"
        " 'ram': [None if v is pd.NA else float(v) for v in df['peak_ram_mb']],"
        " 'status': list(tasks['status']), 'ncmd': len(cmds), 'n': len(sub), 'session': sub.session_id,"
        " 'art': [open(a.path).read() for r in cluster.hub().get_result_sync(list(sub)) for a in r.artifacts]}))"
    ).json()
    assert found["shape"][0] == 4 and found["n"] == 2
    for col in ("duration_s", "peak_ram_mb", "cpu_percent", "cpu_time_s", "machine", "stage", "started", "ended"):
        assert col in found["cols"]
    assert found["stages"] == ["build", "run", "build", "run"]
    assert found["ram"][0] is None and found["ram"][1] >= 50
    assert found["status"] == ["finished", "finished"]
    assert found["ncmd"] == 4  # each stage cell is one script: 2 tasks x 2 stages
    assert found["art"] == ["HELLO FROM THE NOTEBOOK\n"] * 2


def test_pool_across_and_cancel_magics(kernel):
    kernel.run("%hwf_local")  # reuses the kernel's cluster
    pool = kernel.run("pool = %hwf_pool os=linux\nprint(sorted(pool['name']))").stdout
    assert "'daemon-1', 'daemon-2'" in pool
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage where\nhostname\n")
    found = kernel.run(
        "import json\nsub = %hwf_dispatch --across --wait\n"
        "df = %hwf_results\nprint(json.dumps(sorted(df['machine'])))"
    ).json()
    assert found == ["daemon-1", "daemon-2"]
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage slow\nsleep 30\n")
    kernel.run("sub = %hwf_dispatch --repeat 3")
    out = kernel.run("import json\nc = %hwf_cancel\nprint(json.dumps(c['by_state']))").json()
    assert sum(out.values()) == 3
    status = kernel.run("df = %hwf_results --wait\nprint(sorted(set(df['status'])))").stdout
    assert "['cancelled']" in status


def test_top_level_await_and_python_api_in_the_kernel(kernel):
    kernel.run("cluster = %hwf_local")
    out = kernel.run(
        "from hwf_jupyter import Task, Stage, dispatch\n"
        "hub = cluster.hub()\n"
        "ids = await dispatch(Task(Stage('s', cmd='echo awaited')), hub)\n"
        "res = await hub.get_result(ids, wait=True)\n"
        "print(res[0].output.strip())"
    ).stdout
    assert out.strip() == "awaited"


def test_streaming_goes_to_the_dispatching_cell_while_others_run(kernel):
    kernel.run("%hwf_local")
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage talk\nfor i in 1 2 3 4; do echo remote-line-$i; sleep 0.4; done\n")
    a = kernel.run("sub = %hwf_dispatch --stream")
    b = kernel.run("import time; time.sleep(2.5); print('other cell')")
    kernel.drain(1.0)
    routed = [m for m in kernel.stray if m["msg_type"] == "stream" and m.get("parent") == a.msg_id]
    text = "".join(m["text"] for m in routed) + a.stdout
    for i in range(1, 5):
        assert f"remote-line-{i}" in text
    during_b = [m for m in routed if b.started <= m["time"] <= b.ended]
    assert during_b, "lines arrived under the dispatching cell while another cell ran"
    assert "remote-line" not in b.stdout


def test_dispatch_with_a_progress_parser(kernel):
    kernel.run("%hwf_local")
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage render\nfor i in 1 2 3 4; do echo Fra:$i; sleep 0.3; done\n")
    out = kernel.run(
        "sub = %hwf_dispatch --parser frames --frames 1:4 --wait\n"
        "df = %hwf_results\n"
        "print(df['status'][0], df['progress_percent'][0], df['frame_current'][0])"
    ).stdout
    assert out.strip().splitlines()[-1].split() == ["finished", "100.0", "4"]  # after dispatch's session line


def test_kernel_stays_responsive_with_200_tasks_and_a_live_widget(kernel):
    kernel.run("%hwf_local")
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage nap\nsleep 0.05\n")
    kernel.run("sub = %hwf_dispatch --repeat 200")
    t0 = time.monotonic()
    r = kernel.run("1 + 1")
    assert time.monotonic() - t0 < 1.0
    assert r.data() == ["2"]
    done = kernel.run("df = %hwf_results --wait\nprint(len(df), sorted(set(df['status'])))").stdout
    assert done.strip() == "200 ['finished']"


def test_noninteractive_env_gives_text_progress(fresh_kernel):
    k = fresh_kernel  # started with HWF_NONINTERACTIVE=1 (see conftest)
    k.run("%hwf_local --daemons 1")
    k.run("%%hwf_stage s\ntrue\n")
    r = k.run("sub = %hwf_dispatch --repeat 3 --wait")
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in r.outputs)
    texts = r.data()
    assert texts and "hwf session" in texts[0] and "0/3 done" in texts[0] or "done" in texts[0]
    assert "3/3 done [finished 3]" in texts[-1]


def test_nest_asyncio_applied_magics_still_work(fresh_kernel):
    k = fresh_kernel
    k.run("import nest_asyncio; nest_asyncio.apply()")
    k.run("%hwf_local --daemons 1")
    k.run("%%hwf_stage s\necho nested-ok\n")
    out = k.run("sub = %hwf_dispatch --wait\nr = %hwf_results --level command\nprint(r['stdout'][0].strip())")
    assert out.stdout.strip().endswith("nested-ok")
    out = k.run(
        "from hwf_jupyter import Task, Stage, dispatch\nhub = %hwf_local\nhub = hub.hub()\n"
        "ids = await dispatch(Task(Stage('s', cmd='echo a')), hub)\n"
        "print((await hub.get_result(ids, wait=True))[0].output.strip())"
    )
    assert out.stdout.strip() == "a"


def _usage_error(k, code):
    r = k.run(code, allow_error=True)
    assert r.status == "error" and r.error["ename"] == "UsageError", r.error
    assert "\n" not in r.error["evalue"].strip()
    shown = r.stderr.strip()
    assert shown.startswith("UsageError: ") and "\n" not in shown and "Traceback" not in shown, shown
    return r.error["evalue"]


def test_misuse_gets_one_line_errors(fresh_kernel):
    k = fresh_kernel
    assert "not connected to a hub" in _usage_error(k, "%hwf_results")
    assert "no stages" in _usage_error(k, "%hwf_dispatch")
    assert "bogus" in _usage_error(k, "%hwf_dispatch --bogus")
    assert "KEY=VALUE" in _usage_error(k, "%hwf_hardware ram")
    assert "cannot parse 'lots'" in _usage_error(k, "%hwf_hardware ram=lots")
    assert "unknown hardware key 'vram'" in _usage_error(k, "%hwf_hardware vram=8GB")
    assert "does not exist" in _usage_error(k, "%%hwf_stage s --data nope.txt\ntrue\n")
    assert "climbs out" in _usage_error(k, "%%hwf_stage s --data x:../y\ntrue\n")
    assert "unknown --track" in _usage_error(k, "%%hwf_stage s --track disk\ntrue\n")
    assert "parser must be one of 'frames', 'percent', 'hwf-progress'" in _usage_error(
        k, "%hwf_dispatch --parser blender")
    assert "--frames takes START:END" in _usage_error(k, "%hwf_dispatch --parser frames --frames 5")
    assert "frame_start (9) must be <= frame_end (1)" in _usage_error(k, "%hwf_dispatch --frames 9:1")
    msg = _usage_error(k, "%hwf_connect 127.0.0.1:9 --token t")
    assert "cannot reach hub at ws://127.0.0.1:9" in msg
    # help is there
    help_text = str(k.run("%hwf_dispatch?").reply.get("payload"))
    assert "--repeat" in help_text and "--across" in help_text


def test_config_traitlets_and_reattach_after_kernel_restart(cluster, tmp_path):
    k = Kernel(str(tmp_path), env=dict(os.environ, HWF_NONINTERACTIVE="0"))
    try:
        k.run("%load_ext hwf_jupyter")
        k.run(f"%config HWFMagics.hub_url = {cluster.address!r}\n%config HWFMagics.token = {cluster.token!r}")
        k.run("%%hwf_stage s\nsleep 8\necho late\n")  # still running after the restart
        shown = k.run("sub = %hwf_dispatch --repeat 2\nprint(sub.session_id)").stdout.strip().splitlines()
        session = shown[-1]
        assert shown[0].startswith("hwf: dispatched 2 task(s) in session " + session)  # printed, to copy
        k.km.restart_kernel(now=True)
        k.kc.wait_for_ready(timeout=60)
        k.run("%load_ext hwf_jupyter")
        k.run(f"%hwf_connect {cluster.address} --token {cluster.token}")
        r = k.run(f"df = %hwf_results --session {session}\nprint(len(df))")
        assert r.stdout.strip() == "2"
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in r.outputs), \
            "unfinished session shows live progress again"
        out = k.run(
            "from hwf_jupyter import Hub\n"
            f"hub = Hub({cluster.address!r}, token={cluster.token!r})\n"
            f"s = hub.session_sync({session!r})\n"
            "res = s.results_sync(wait=True)\n"
            "print(len(s.task_ids), [r.output.strip() for r in res])"
        ).stdout
        assert out.strip() == "2 ['late', 'late']"
    finally:
        k.close()


def test_kernel_shutdown_leaves_the_local_farm_until_stopped(tmp_path):
    import psutil

    from hwf_jupyter import localfarm

    def alive(p):
        return psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE

    k = Kernel(str(tmp_path))
    k.run("%load_ext hwf_jupyter")
    pids = k.run("c = %hwf_local --daemons 2\nprint(' '.join(map(str, c.pids)))").stdout.split()[-3:]
    pids = [int(p) for p in pids]
    assert len(pids) == 3 and all(alive(p) for p in pids)
    k.kc.stop_channels()
    k.km.shutdown_kernel(now=False)
    time.sleep(1)
    assert all(alive(p) for p in pids), "the local farm outlives its kernel (see test_kernel_restart)"
    assert sorted(localfarm.stop_farm(Path(k.local_dir))) == sorted(pids)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_connect_over_tls_from_a_notebook(fresh_kernel, tmp_path):
    from hwf_jupyter import LocalCluster
    from tlsfiles import make_tls_files

    pem, key, ca_pem = make_tls_files(tmp_path)
    with LocalCluster(daemons=1, state_dir=tmp_path / "c", tls=(pem, key, ca_pem)) as c:
        k = fresh_kernel
        msg = _usage_error(k, f"%hwf_connect {c.address} --token {c.token}")
        assert "TLS with hub at wss://127.0.0.1" in msg and "CERTIFICATE_VERIFY_FAILED" in msg
        assert "no such file" in _usage_error(k, f"%hwf_connect {c.address} --token {c.token} --ca-file nope.pem").lower()
        k.run(f"%hwf_connect {c.address} --token {c.token} --ca-file {ca_pem}")
        k.run("%%hwf_stage s\necho over-tls\n")
        out = k.run("sub = %hwf_dispatch --wait\ndf = %hwf_results\nprint(df['status'].tolist())").stdout
        assert "['finished']" in out

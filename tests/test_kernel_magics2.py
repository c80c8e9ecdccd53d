"""Issue 13's magic fixes in a real IPython kernel, against a real local farm:
bash scripts as stages, the draft's lifecycle, one last submission, Ctrl-C,
token files, the output cap, sweeps, a quiet %load_ext and PoolView(cluster)."""

from __future__ import annotations

import json
import os
import re
import threading

import pytest

from kernel_driver import Kernel

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("nb2")
    k = Kernel(str(cwd))
    k.run("%load_ext hwf_jupyter")
    k.run("cluster = %hwf_local --daemons 2 --slots 2")
    yield k
    k.close()


def stdouts(k: Kernel, code: str = "%hwf_results --level command") -> list[str]:
    return k.run(f"import json\ndf = {code}\nprint(json.dumps([str(s) for s in df['stdout']]))").json()


def test_a_stage_cell_runs_as_one_bash_script(kernel):
    kernel.run("%hwf_draft --clear")
    r = kernel.run(
        "%%hwf_stage script\n"
        "greet() { echo \"hi $1\"; }\n"
        "for i in 1 2 3; do\n"
        "  echo loop-$i\n"
        "done\n"
        "if [ -n \"$HOME\" ]; then\n"
        "  greet there\n"
        "fi\n"
        "cat <<EOF\n"
        "heredoc line\n"
        "EOF\n"
        "echo continued \\\n"
        "  line\n"
        "false  # a failing command in the middle does not stop the script (no set -e)\n"
        "echo last\n"
    )
    assert "added stage 'script'" in r.stdout
    kernel.run("sub = %hwf_dispatch --wait")
    found = kernel.run("import json\ndf = %hwf_results --level command\n"
                       "print(json.dumps({'n': len(df), 'out': str(df['stdout'][0]), 'status': str(df['exit_code'][0])}))").json()
    assert found["n"] == 1, "the whole cell is one command"
    assert found["out"] == "loop-1\nloop-2\nloop-3\nhi there\nheredoc line\ncontinued line\nlast\n"
    assert found["status"] == "0"


def test_a_script_fails_with_its_last_commands_status_counted_from_zero(kernel):
    kernel.run("%%hwf_stage bad\necho before\nexit 3\n")
    kernel.run("%%hwf_stage never\necho never\n")
    kernel.run("sub = %hwf_dispatch --wait")
    err = kernel.run("df = %hwf_results\nprint(df['error'][0])").stdout.strip()
    assert err == "stage 'bad' command 0 ('echo before exit 3') exited with code 3"
    kernel.run("%%hwf_stage lines --per-line\necho one\n# a comment\nfalse\necho never\n")
    kernel.run("sub = %hwf_dispatch --wait")
    found = kernel.run("import json\ndf = %hwf_results\ncmds = %hwf_results --level command\n"
                       "print(json.dumps({'err': df['error'][0], 'idx': [int(i) for i in cmds['command_index']],"
                       " 'codes': [int(c) for c in cmds['exit_code']]}))").json()
    assert found["err"] == "stage 'lines' command 1 ('false') exited with code 1"
    assert found["idx"] == [0, 1] and found["codes"] == [0, 1]  # the error's number is the row's index


def test_rerunning_a_stage_cell_replaces_it_and_a_dispatch_starts_a_new_draft(kernel):
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage a\necho a1\n")
    kernel.run("%%hwf_stage b\necho b\n")
    again = kernel.run("%%hwf_stage a\necho a2\n")
    assert "replaced stage 'a' (stage 1 of 2)" in again.stdout
    draft = kernel.run("%hwf_draft").data()[0]
    assert "2 stage(s)" in draft and "a2" in draft and "a1" not in draft
    session = kernel.run("sub = %hwf_dispatch --wait\nprint(sub.session_id)").stdout.strip().splitlines()[-1]
    assert stdouts(kernel) == ["a2\n", "b\n"]
    assert f"dispatched as session {session}" in kernel.run("%hwf_draft").data()[0]
    fresh = kernel.run("%%hwf_stage c\necho c\n")
    assert f"new draft (the previous one went out as session {session})" in fresh.stdout
    assert "1 stage(s)" in kernel.run("%hwf_draft").data()[0]
    kernel.run("sub = %hwf_dispatch --wait")
    assert stdouts(kernel) == ["c\n"]


def help_text(k: Kernel, magic: str) -> str:
    """What ``magic?`` shows, with colours dropped and whitespace runs made one space."""
    (page,) = k.run(f"{magic}?").reply["payload"]
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", page["data"]["text/plain"]).split())


def test_help_documents_the_script_the_draft_and_clear(kernel):
    stage_help = help_text(kernel, "%%hwf_stage")
    for words in ("the cell is one bash script", "No ``set -e`` is added", "its last command's", "--per-line",
                  "replaces it", "``%hwf_draft --clear`` empties it", "the next stage starts a new draft"):
        assert words in stage_help, words
    draft_help = help_text(kernel, "%hwf_draft")
    assert "--clear" in draft_help and "after a dispatch the next edit starts a new draft" in draft_help
    dispatch_help = help_text(kernel, "%hwf_dispatch")
    assert "HWF_INDEX" in dispatch_help and "--param" in dispatch_help and "--stream-lines" in dispatch_help


def test_results_and_cancel_default_to_a_python_or_widget_dispatch(kernel):
    out = kernel.run(
        "from hwf_jupyter import Task, Stage, dispatch_sync\n"
        "pysub = dispatch_sync(Task(Stage('py', cmd='echo from-python')), cluster.hub(), repeat=2)\n"
        "df = %hwf_results --wait\n"
        "print(sorted(df['task_id']) == sorted(pysub), list(df['status']))"
    ).stdout.strip()
    assert out == "True ['finished', 'finished']"
    out = kernel.run(
        "from hwf_jupyter.widgets import TaskBuilder\n"
        "b = TaskBuilder(cluster)\n"  # a LocalCluster is accepted as its hub
        "b.stage_name.value = 'w'\nb.commands.value = 'sleep 30'\nb.repeat.value = 3\n"
        "b.click_dispatch()\n"
        "print(b.error, len(b.submission))"
    ).stdout.strip()
    assert out == "None 3"
    r = kernel.run("%hwf_cancel")
    text = r.data()[0]
    assert text.startswith("cancelled 3 tasks (") and text.endswith(")"), text
    states = kernel.run("df = %hwf_results --wait\nprint(sorted(df['task_id']) == sorted(b.submission),"
                        " sorted(set(df['status'])))").stdout.strip()
    assert states == "True ['cancelled']"


def _interrupt_after(k: Kernel, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, k.km.interrupt_kernel)
    timer.start()
    return timer


def test_ctrl_c_on_wait_prints_one_line_saying_what_runs_and_how_to_cancel(kernel):
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage slow\nsleep 30\n")
    session = kernel.run("sub = %hwf_dispatch --repeat 2\nprint(sub.session_id)").stdout.strip().splitlines()[-1]
    _interrupt_after(kernel, 1.5)
    r = kernel.run("%hwf_results --wait", allow_error=True, timeout=20)
    assert r.status == "error" and r.error["ename"] == "Interrupted"
    (line,) = r.error["traceback"]
    assert line == "interrupted: 2 of 2 tasks of session %s still run (2 running); %%hwf_cancel cancels them" % session
    assert "Traceback" not in r.stderr and "hwf_jupyter" not in json.dumps(r.error)
    # the same from %hwf_dispatch --wait, which names its session to cancel
    _interrupt_after(kernel, 1.5)
    r = kernel.run("sub2 = %hwf_dispatch --wait", allow_error=True, timeout=20)
    (line,) = r.error["traceback"]
    assert line.startswith("interrupted: ") and "%hwf_cancel --session s-" in line and "still run" in line
    assert kernel.run("print(1 + 1)").stdout.strip() == "2", "the kernel is fine afterwards"
    kernel.run(f"%hwf_cancel --session {session}")
    kernel.run("%hwf_cancel")  # the interrupted dispatch is the last submission


def test_connect_with_a_token_file_and_a_warning_for_a_literal_token(kernel, tmp_path):
    token_file = tmp_path / "token"
    address = kernel.run("print(cluster.address)").stdout.strip()
    token_file.write_text(kernel.run("print(cluster.token)").stdout.strip() + "\n")
    r = kernel.run(f"%hwf_connect {address} --token-file {token_file}")
    assert r.stderr == ""
    kernel.run("%%hwf_stage t\necho via-file\n")
    kernel.run("sub = %hwf_dispatch --wait")
    assert stdouts(kernel) == ["via-file\n"]
    r = kernel.run(f"%hwf_connect {address} --token {token_file.read_text().strip()}")
    assert r.stderr.strip() == ("hwf: warning: --token is saved in this notebook with the cell; "
                                "use --token-file PATH or $HWF_TOKEN to keep it out")
    r = kernel.run(f"import os\nos.environ['HWF_TOKEN'] = cluster.token\n%hwf_connect {address}\n"
                   "del os.environ['HWF_TOKEN']")
    assert r.stderr == ""
    r = kernel.run(f"%hwf_connect {address}", allow_error=True)  # no token at all now
    assert r.error["ename"] == "UsageError" and "token" in r.error["evalue"], r.error
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for args, words in ((f"--token-file {empty}", "is empty"), (f"--token-file {tmp_path}/nope", "No such file"),
                        (f"--token x --token-file {empty}", "not both")):
        r = kernel.run(f"%hwf_connect {address} {args}", allow_error=True)
        assert r.error["ename"] == "UsageError" and words in r.error["evalue"], r.error
    kernel.run(f"%hwf_connect {address} --token-file {token_file}")


def test_streamed_output_is_capped_per_task_and_the_results_keep_it_all(kernel):
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage chatty\nfor i in $(seq 1 1000); do echo chat-$i; done\n")
    r = kernel.run("sub = %hwf_dispatch --stream --stream-lines 20 --wait")
    kernel.drain(1.5)
    shown = r.stdout + "".join(m["text"] for m in kernel.stray
                               if m["msg_type"] == "stream" and m.get("parent") == r.msg_id and m["name"] == "stdout")
    got = [line for line in shown.splitlines() if not line.startswith("hwf: dispatched")]
    assert got[:15] == [f"chat-{i}" for i in range(1, 16)]
    assert got[15] == "… 980 lines omitted (full output: %hwf_results --level command)"
    assert got[16:] == [f"chat-{i}" for i in range(996, 1001)]
    assert stdouts(kernel)[0].splitlines() == [f"chat-{i}" for i in range(1, 1001)]


def test_repeat_copies_get_hwf_index_and_params_make_every_combination(kernel):
    kernel.run("%hwf_draft --clear")
    kernel.run("%%hwf_stage show\necho \"$HWF_INDEX ${HWF_PARAM_LR:-} ${HWF_PARAM_SEED:-}\"\n")
    kernel.run("sub = %hwf_dispatch --repeat 3 --wait")
    assert sorted(stdouts(kernel)) == ["0  \n", "1  \n", "2  \n"]
    kernel.run("sub = %hwf_dispatch --param lr=0.1,0.2 --param seed=7,8 --label fit --wait")
    found = kernel.run("import json\ndf = %hwf_results\ncmds = %hwf_results --level command\n"
                       "print(json.dumps({'labels': sorted(df['label']), 'out': sorted(map(str, cmds['stdout']))}))").json()
    assert found["out"] == ["0 0.1 7\n", "1 0.1 8\n", "2 0.2 7\n", "3 0.2 8\n"]
    assert found["labels"] == ["fit lr=0.1 seed=7", "fit lr=0.1 seed=8", "fit lr=0.2 seed=7", "fit lr=0.2 seed=8"]
    r = kernel.run("%hwf_dispatch --param 9x=1", allow_error=True)
    assert r.error["ename"] == "UsageError" and "param name '9x'" in r.error["evalue"]
    r = kernel.run("%hwf_dispatch --param lr", allow_error=True)
    assert "NAME=V1,V2" in r.error["evalue"]


def test_pool_view_takes_a_local_cluster_and_refuses_other_things(kernel):
    out = kernel.run("from hwf_jupyter.widgets import PoolView\n"
                     "v = PoolView(cluster, refresh=None)\nprint(sorted(v.to_dataframe()['name']))").stdout
    assert out.strip() == "['daemon-1', 'daemon-2']"
    r = kernel.run("PoolView('ws://127.0.0.1:1')", allow_error=True)
    assert r.error["ename"] == "TypeError" and "PoolView takes a Hub" in r.error["evalue"]


def test_load_ext_is_quiet_when_a_profile_preloads_hwf(tmp_path):
    ipdir = tmp_path / "ipython"
    (ipdir / "profile_default").mkdir(parents=True)
    # the line `make lab` writes
    makefile = open(os.path.join(os.path.dirname(__file__), "..", "Makefile")).read()
    (line,) = [ln for ln in makefile.splitlines() if "InteractiveShellApp.extensions" in ln]
    config = line.split("echo '", 1)[1].split("'", 1)[0]
    (ipdir / "profile_default" / "ipython_kernel_config.py").write_text(config + "\n")
    k = Kernel(str(tmp_path), env=dict(os.environ, IPYTHONDIR=str(ipdir)))
    try:
        assert "hwf draft: empty" in k.run("%hwf_draft").data()[0], "preloaded"
        r = k.run("%load_ext hwf_jupyter")
        assert r.stdout == "" and r.stderr == "" and r.outputs == []
        assert "hwf draft: empty" in k.run("%hwf_draft").data()[0]
    finally:
        k.close()

"""daemon.shellwords: which commands skip bash, and that they run exactly as under bash."""

from __future__ import annotations

import asyncio
import os
import shlex
import stat
import sys
from pathlib import Path

import pytest

from hwf_daemon import shellwords
from hwf_daemon.accounts import DEFAULT_SLOT_UID_BASE, TaskUser
from hwf_daemon.shellwords import direct, plain_words
from hwf_daemon.tracking import TrackedProcess

ROOT = os.geteuid() == 0

PLAIN = {
    "true": ["true"],
    "false": ["false"],
    "ls": ["ls"],
    "sleep 0.1": ["sleep", "0.1"],
    "  python3   train.py  --lr 0.1 ": ["python3", "train.py", "--lr", "0.1"],
    "dd if=/dev/zero of=out bs=1k count=1": ["dd", "if=/dev/zero", "of=out", "bs=1k", "count=1"],
    "./run.sh a,b c:d e@f 50% x+y": ["./run.sh", "a,b", "c:d", "e@f", "50%", "x+y"],
    "/usr/bin/env": ["/usr/bin/env"],
    "make -j4 all": ["make", "-j4", "all"],
    "python -m pip install --user foo==1.0": ["python", "-m", "pip", "install", "--user", "foo==1.0"],
    "tar -czf out.tgz dir/": ["tar", "-czf", "out.tgz", "dir/"],
    "echo-not-a-builtin x": ["echo-not-a-builtin", "x"],
    "trueish": ["trueish"],
}

SHELL_NEEDED = [
    "", "   ",
    # quoting, expansion, substitution
    "echo 'a b'", 'echo "a"', "echo \\a", "echo $HOME", "echo ${x}", "echo `date`", "echo $(date)",
    # separators, pipes, redirections, subshells, background
    "a; b", "a && b", "a || b", "a | b", "a & b", "a &", "a > out", "a < in", "a 2>&1", "(a)", "a >> x",
    "a\nb", "a\tb", "a\r",
    # globs, braces, tilde, comments, history, negation
    "ls *.txt", "ls ?", "ls [ab]", "ls a]", "echo {a,b}", "echo {}", "cd ~", "ls ~/x", "x a=~/y", "a # c",
    "echo a#b", "!x", "x !", "x ^y",
    # assignments in the first word
    "FOO=1 cmd", "=x", "a=b",
    # keywords
    "if", "then x", "for i in a", "while x", "until x", "case x", "select x", "function f", "time sleep 1",
    "coproc x", "do", "done", "fi", "esac", "elif", "else", "in",
    # builtins (their program may differ, or there is none)
    "cd /tmp", "export A", "source f", ". f", "exit 3", "ulimit -n", "umask 077", "echo hi", "printf x",
    "pwd", "kill 1", "test -f x", "[ -f x ]", "read x", "type ls", "command ls", "exec ls", "eval x",
    "set -e", "shift", "wait", "trap x", "alias a=b", "true 1", "false --help", "true --version", ":",
    "hash ls", "builtin cd", "let x", "local x", "declare x", "unset x", "times", "jobs", "history",
    # anything non-ASCII
    "ls é", "cat ａ",
]


@pytest.mark.parametrize("cmd,words", sorted(PLAIN.items()))
def test_plain_commands_are_split_as_bash_would(cmd, words):
    assert plain_words(cmd) == words


@pytest.mark.parametrize("cmd", SHELL_NEEDED)
def test_anything_else_needs_bash(cmd):
    assert plain_words(cmd) is None


def _env(**kw):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    env.update(kw)
    return env


def test_the_direct_plan_is_what_bash_execs(tmp_path):
    plan = direct("ls -l", _env(SHLVL="2", PWD="/somewhere/else", OLDPWD="/"), tmp_path)
    assert plan is not None
    ls = plan.env["_"]
    assert ls in ("/usr/local/bin/ls", "/usr/bin/ls", "/bin/ls") and plan.exe == ls
    assert plan.argv == ["ls", "-l"]
    assert plan.env["PWD"] == os.path.realpath(tmp_path)
    assert plan.env["SHLVL"] == "2" and plan.env["OLDPWD"] == "/"
    assert {k: v for k, v in plan.env.items() if k not in ("_", "PWD", "SHLVL", "OLDPWD")} == _env()


def test_true_and_false_are_bash_builtins_whatever_the_path(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "true").write_text("#!/bin/sh\necho not the builtin\n")
    (fake / "true").chmod(0o755)
    plan = direct("true", _env(PATH=f"{fake}:/usr/bin:/bin"), tmp_path)
    assert plan is not None and plan.exe in ("/usr/bin/true", "/bin/true")


@pytest.mark.parametrize("name,value", [
    ("BASH_ENV", "/etc/profile"), ("ENV", "x"), ("SHELLOPTS", "xtrace"), ("BASHOPTS", "x"),
    ("BASH_FUNC_ls%%", "() { echo; }"), ("EXECIGNORE", "*"), ("POSIXLY_CORRECT", "1"), ("IFS", ":"),
    ("PS4", "x"), ("RANDOM", "1"), ("PPID", "1"), ("OPTIND", "2"), ("BASH_XTRACEFD", "1"), ("BASHPID", "1"),
    ("SHLVL", "999"), ("LC_ALL", "no_SUCH.locale"),
])
def test_an_environment_that_changes_bash_keeps_bash(tmp_path, name, value):
    assert direct("ls", _env(), tmp_path) is not None
    assert direct("ls", _env(**{name: value}), tmp_path) is None


@pytest.mark.parametrize("path", ["", "bin:/usr/bin", ":/usr/bin", "/usr/bin::/bin", "~/bin:/usr/bin", ".:/usr/bin"])
def test_a_path_bash_would_read_its_own_way_keeps_bash(tmp_path, path):
    # Up to the first entry that is not a plain absolute dir (the cwd, a tilde).
    assert direct("no-such-program-hwf", _env(PATH=path), tmp_path) is None
    found = direct("ls", _env(PATH=path), tmp_path)
    assert (found is not None) == path.startswith("/usr/bin:")


def test_what_bash_would_report_as_an_error_goes_to_bash(tmp_path):
    (tmp_path / "noexec").write_text("#!/bin/sh\n")
    (tmp_path / "dir").mkdir()
    for cmd in ("no-such-program-hwf", "./missing", "./noexec", "./dir"):
        assert direct(cmd, _env(), tmp_path) is None, cmd
    # A file that is there but not executable comes first on the PATH: bash's
    # search would skip it; the plan does not guess, bash decides.
    (tmp_path / "ls").write_text("")
    assert direct("ls", _env(PATH=f"{tmp_path}:/usr/bin:/bin"), tmp_path) is None


@pytest.mark.skipif(not ROOT, reason="the mode-bit rules of another user matter only as root")
def test_executable_means_by_the_task_user(tmp_path):
    user = TaskUser(DEFAULT_SLOT_UID_BASE + 4100, DEFAULT_SLOT_UID_BASE + 4100, "x", per_slot=True)
    prog = tmp_path / "prog"
    prog.write_text("#!/bin/sh\n")
    for mode, ok in ((0o700, False), (0o770, False), (0o701, True), (0o755, True)):
        prog.chmod(mode)
        assert (direct("./prog", _env(), tmp_path, user) is not None) == ok, oct(mode)
        assert direct("./prog", _env(), tmp_path) is not None  # root may run any of them
    os.chown(prog, user.uid, 0)
    prog.chmod(0o677)  # the owner's bits count for the owner, not the others'
    assert direct("./prog", _env(), tmp_path, user) is None
    prog.chmod(0o100)
    assert direct("./prog", _env(), tmp_path, user) is not None


@pytest.mark.skipif(not ROOT, reason="needs another user")
def test_oldpwd_stays_only_if_the_task_user_could_see_it(tmp_path):
    user = TaskUser(DEFAULT_SLOT_UID_BASE + 4100, DEFAULT_SLOT_UID_BASE + 4100, "x", per_slot=True)
    private = tmp_path / "private"
    (private / "inner").mkdir(parents=True)
    private.chmod(0o700)
    os.chmod(tmp_path, 0o755)
    plan = direct("ls", _env(OLDPWD=str(private / "inner")), tmp_path, user)
    assert plan is not None and "OLDPWD" not in plan.env
    plan = direct("ls", _env(OLDPWD=str(private / "inner")), tmp_path)
    assert plan is not None and plan.env["OLDPWD"] == str(private / "inner")
    plan = direct("ls", _env(OLDPWD=str(tmp_path / "missing")), tmp_path)
    assert plan is not None and "OLDPWD" not in plan.env


# ---------------------------------------------------- the same both ways (e2e)

SCRIPTS = {
    "noshebang": ("echo from a script without '#!'; exit 4\n", 0o755),
    "badinterp": ("#!/no/such/interpreter\necho never\n", 0o755),
    "selfkill": ("#!/bin/sh\necho dying >&2\nkill -9 $$\n", 0o755),
    "readonly": ("#!/bin/sh\necho never\n", 0o644),
    "exit3": ("#!/bin/sh\necho out; echo err >&2; exit 3\n", 0o755),
}

SAME_BOTH_WAYS = [
    "true", "false", "sleep 0.01", "ls -a", "ls -a no-such-file", "printenv PWD", "printenv SHLVL",
    "printenv _", "printenv OLDPWD", "printenv HOME", "env", "id -u", "no-such-program-hwf --x",
    "./no-such", "./noshebang", "./badinterp", "./selfkill", "./readonly", "./exit3 a b", "./sub",
    "sub/../exit3", "cat no-file", f"{sys.executable} -c pass", "/usr/bin/env",
]


async def _outcome(cmd, cwd, env, user, force_shell):
    if force_shell:
        real = shellwords.direct
        shellwords_direct_off = lambda *a, **k: None  # noqa: E731
        import hwf_daemon.tracking as tracking

        tracking.direct = shellwords_direct_off
    try:
        proc = await TrackedProcess.start(cmd, cwd, env=env, user=user, track_ram=False)
    finally:
        if force_shell:
            tracking.direct = real
    loop = asyncio.get_running_loop()
    out, err = await asyncio.gather(loop.run_in_executor(None, proc.stdout.read),
                                    loop.run_in_executor(None, proc.stderr.read))
    proc.stdout.close()
    proc.stderr.close()
    usage = await proc.wait()
    return proc.direct, usage.exit_code, out.decode(), err.decode()


def _normal(cmd, out):
    # bash exports the same variables in its hash table's order
    return "".join(sorted(out.splitlines(keepends=True))) if cmd in ("env", "/usr/bin/env") else out


@pytest.mark.e2e
@pytest.mark.parametrize("as_user", [False, True])
def test_commands_give_the_same_results_with_and_without_bash(tmp_path, as_user):
    if as_user and not ROOT:
        pytest.skip("running as another user needs root")
    user = TaskUser(DEFAULT_SLOT_UID_BASE + 4200, DEFAULT_SLOT_UID_BASE + 4200, "x", per_slot=True) if as_user else None
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    for name, (text, mode) in SCRIPTS.items():
        (work / name).write_text(text)
        (work / name).chmod(mode)
    if user is not None:
        for p in [work, *work.rglob("*")]:
            os.chown(p, user.uid, user.gid)
        os.chmod(tmp_path, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HWF_", "PYTEST_"))}
    env.update(SHLVL="3", OLDPWD="/", PWD="/elsewhere", HWF_TASK_ID="t-1")
    went_direct = set()

    async def main():
        for cmd in SAME_BOTH_WAYS:
            was_direct, *fast = await _outcome(cmd, work, env, user, force_shell=False)
            _, *slow = await _outcome(cmd, work, env, user, force_shell=True)
            if was_direct:
                went_direct.add(cmd)
            fast[1], slow[1] = _normal(cmd, fast[1]), _normal(cmd, slow[1])
            assert fast == slow, cmd

    asyncio.run(main())
    # Most of them did skip bash (errors and scripts bash reads itself did not).
    assert {"true", "false", "ls -a", "env", "printenv _", "./exit3 a b", "./selfkill"} <= went_direct
    assert not {"no-such-program-hwf --x", "./no-such", "./readonly", "./sub"} & went_direct

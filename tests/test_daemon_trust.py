"""What a task can reach on its daemon, written as the attacks that found it.

Each e2e test runs a task that tries to steal the daemon's token, poison
the blob cache, read another task's files, smuggle files out as
artifacts, outlive itself, or drown the daemon in output, and asserts on
what the task saw and what the daemon did.  As root, daemons run tasks as
unprivileged per-slot uids (the default these tests check); elsewhere they
run tasks as the daemon's own user, and the tests that need another uid
say so in their skip reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from hwf_daemon.accounts import DEFAULT_SLOT_UID_BASE, AccountError, TaskAccounts, TaskUser, task_env
from hwf_daemon.artifacts import collect_artifacts, match_files
from hwf_daemon.blobcache import copy_verified
from hwf_daemon.output import OutputPump, dropped_marker
from hwf_daemon.taskdirs import _lock_root, remove_stale_roots
from hwf_daemon.tokens import TokenError, read_token_file
from hwf_jupyter import Artifacts, Data, LocalCluster, Stage, Task, dispatch_sync

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not ROOT, reason="tasks run as other users only when the daemon runs as root (this test is not root)"
)
HAND_BASE = DEFAULT_SLOT_UID_BASE + 100_000  # the hand-started daemon's slot uids

# Everything a task can learn about the processes around it, then every
# string that looks like a daemon token in it.
HUNT = r"""
echo "uid=$(id -u)"
: > seen.txt
for f in /proc/[0-9]*/cmdline /proc/[0-9]*/environ; do
  tr '\0' '\n' < "$f" >> seen.txt 2>/dev/null
done
ps auxww >> seen.txt 2>&1
for f in /proc/[0-9]*/cmdline; do
  tr '\0' '\n' < "$f" 2>/dev/null | grep -A1 -x -e '--token-file' | grep -v -x -e '--token-file' -e '--'
done | sort -u > token-files.txt
while read -r path; do
  echo "token-file: $path"
  if [ "$path" != "-" ]; then cat "$path" >> seen.txt 2>&1 || echo "cannot read $path"; fi
done < token-files.txt
grep -ao 'hwf_d_[A-Za-z0-9_-]*' seen.txt | sort -u | sed 's/^/FOUND /'
echo "seen-bytes: $(wc -c < seen.txt)"
"""


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """One hub and one 2-slot daemon for these attacks (a heartbeat gap of 6 s loses it)."""
    root = tmp_path_factory.mktemp("trust")
    with LocalCluster(daemons=1, slots=2, state_dir=root, heartbeat_timeout=6.0) as c:
        yield c


@pytest.fixture
def client(farm, tmp_path):
    h = farm.hub(artifacts_dir=tmp_path / "hwf_artifacts")
    yield h
    h.close_sync()


def _run(client, task, **kw):
    [result] = client.get_result_sync(dispatch_sync(task, client, **kw), wait=True)
    return result


def _daemon_log(farm, name="daemon-1") -> str:
    return (farm.log_dir / f"{name}.log").read_text(errors="replace")


def _slot_uids(log: str) -> list[int]:
    m = re.search(r"tasks run as per-slot uids ([\d, ]+)", log)
    assert m, "the daemon did not log its slot uids"
    return [int(u) for u in m.group(1).split(",")]


def _wait(cond, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _hunt(client, daemon: str, tmp_path: Path):
    r = _run(client, Task(Stage("hunt", cmd=HUNT), Artifacts("seen.txt"), hardware={"daemon": daemon}))
    assert r.ok, r.error
    [seen] = r.artifacts
    assert seen.ok, seen.error
    return r.output, seen.path.read_text(errors="replace")


def _assert_found_nothing(token: str, output: str, seen: str, daemon_cmd: str, visible: bool = True) -> None:
    if visible:
        assert daemon_cmd in seen  # the hunt did see the daemon's command line
        assert "--token-file" in seen
    else:  # /proc with hidepid=2 (isolation.py): no other uid's process at all
        assert daemon_cmd not in seen
    # Only our daemon's token counts: other software on a shared machine may
    # show its own hwf_d_ strings (an older hwf passing --token, say).
    assert f"FOUND {token}" not in output, output
    assert token not in output and token not in seen


# ------------------------------------------------------------------ tokens


@pytest.mark.e2e
def test_task_hunting_for_the_token_on_a_local_cluster(farm, client, tmp_path):
    output, seen = _hunt(client, "daemon-1", tmp_path)
    _assert_found_nothing(farm.daemon_token, output, seen, "-m\nhwf_daemon\n--hub", visible=not ROOT)
    if not ROOT:
        assert "token-file: -" in output  # LocalCluster hands it over on a pipe
    uid = int(re.search(r"uid=(\d+)", output).group(1))
    if ROOT:
        assert uid != 0 and uid in _slot_uids(_daemon_log(farm))
    else:
        assert uid == os.geteuid()


@pytest.mark.e2e
def test_task_hunting_for_the_token_of_a_daemon_started_by_hand(farm, client, tmp_path):
    # The token file sits in a directory everyone may enter: only its mode protects it.
    tokdir = Path(tempfile.mkdtemp(prefix="hwf-test-token-"))
    try:
        os.chmod(tokdir, 0o755)
        token_file = tokdir / "daemon.token"
        token_file.write_text(farm.daemon_token + "\n")
        os.chmod(token_file, 0o600)
        log = open(tmp_path / "hand.log", "wb")
        # A careless admin also left the token in the daemon's environment.
        env = dict(os.environ, HWF_TOKEN=farm.daemon_token, HWF_CANARY="hwf-canary-value")
        proc = subprocess.Popen(
            [sys.executable, "-m", "hwf_jupyter.cli", "daemon", "--hub", farm.address,
             "--token-file", str(token_file), "--name", "hand", "--workdir", str(tmp_path / "hand"),
             "--slot-uid-base", str(HAND_BASE), "--parent-pid", str(os.getpid()),
             # Without the hidepid /proc, so the hunt finds the token file: its mode must stop it.
             "--isolation", "none"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        log.close()
        try:
            _wait(lambda: proc.poll() is not None or "hand" in client.get_hardware_pool_sync().names,
                  what="the hand-started daemon")
            assert proc.poll() is None, (tmp_path / "hand.log").read_text()
            output, seen = _hunt(client, "hand", tmp_path)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
        _assert_found_nothing(farm.daemon_token, output, seen, "hwf_jupyter.cli daemon --hub")
        assert f"token-file: {token_file}" in output
        assert "HWF_TASK_ID=" in seen  # it read its own environment ...
        assert "hwf-canary-value" not in seen  # ... which holds no HWF_* of the daemon
        uid = int(re.search(r"uid=(\d+)", output).group(1))
        if ROOT:
            assert uid == HAND_BASE
            assert f"cat: {token_file}: Permission denied" in seen
        else:
            assert uid == os.geteuid()
    finally:
        shutil.rmtree(tokdir, ignore_errors=True)


def _hwf_daemon(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hwf_jupyter.cli", "daemon", "--hub", "ws://127.0.0.1:9",
                           *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.e2e
def test_token_on_the_command_line_is_refused():
    r = _hwf_daemon("--token", "hwf_d_SECRET_ON_ARGV")
    assert r.returncode == 2
    assert "a token on the command line is visible to every local user in `ps`" in r.stderr
    assert "--token-file" in r.stderr
    assert "hwf_d_SECRET_ON_ARGV" not in r.stderr + r.stdout


@pytest.mark.e2e
def test_token_file_readable_by_others_is_refused(tmp_path):
    f = tmp_path / "daemon.token"
    f.write_text("hwf_d_whatever\n")
    os.chmod(f, 0o644)
    r = _hwf_daemon("--token-file", str(f), "--workdir", str(tmp_path / "w"))
    assert r.returncode == 2
    assert f"permissions 0644 for token file {f} are too open" in r.stderr
    assert f"chmod 600 {f}" in r.stderr


@pytest.mark.e2e
def test_a_daemon_running_tasks_as_itself_says_what_that_exposes(farm, client, tmp_path):
    log_path = tmp_path / "self.log"
    env = dict(os.environ, HWF_TOKEN=farm.daemon_token, HWF_CANARY="hwf-canary-value")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hwf_daemon", "--hub", farm.address, "--run-as", "self", "--name", "self",
             "--workdir", str(tmp_path / "w"), "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        _wait(lambda: proc.poll() is not None or "self" in client.get_hardware_pool_sync().names,
              what="the daemon started with --run-as self")
        assert proc.poll() is None, log_path.read_text()
        r = _run(client, Task(Stage("s", cmd="id -u; env | grep ^HWF_ | sort"), hardware={"daemon": "self"}))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    text = log_path.read_text()
    assert "WARNING tasks run as the daemon's own user" in text
    assert "its hub token included" in text and "--run-as USER" in text
    assert r.ok, r.error
    uid, *hwf_vars = r.output.split("\n")[:-1]
    assert int(uid) == os.geteuid()
    assert [v.split("=")[0] for v in hwf_vars] == ["HWF_ATTEMPT", "HWF_INDEX", "HWF_TASK_ID"], "no HWF_TOKEN"


@pytest.mark.e2e
def test_run_as_an_unknown_user_is_refused_by_the_cli(tmp_path):
    r = _hwf_daemon("--run-as", "no-such-hwf-user", "--workdir", str(tmp_path / "w"))
    assert r.returncode == 2
    assert "--run-as no-such-hwf-user: no such user on this machine" in r.stderr


def test_token_file_rules(tmp_path):
    f = tmp_path / "t"
    f.write_text("hwf_d_abc\nsecond line\n")
    os.chmod(f, 0o600)
    assert read_token_file(str(f)) == "hwf_d_abc"
    os.chmod(f, 0o640)
    with pytest.raises(TokenError, match=r"permissions 0640 for token file .* are too open"):
        read_token_file(str(f))
    assert read_token_file("-", io.StringIO("hwf_d_piped\n")) == "hwf_d_piped"
    with pytest.raises(TokenError, match="no token on the first line of stdin"):
        read_token_file("-", io.StringIO(""))
    with pytest.raises(TokenError, match="cannot read token file .*missing"):
        read_token_file(str(tmp_path / "missing"))


def test_task_environment_drops_every_hwf_variable(tmp_path):
    base = {"PATH": "/usr/bin", "HWF_TOKEN": "hwf_d_x", "HWF_ANYTHING": "y", "HOME": "/root", "LANG": "C"}
    user = TaskUser(1234, 1234, "slotty", per_slot=True)
    env = task_env(base, task_id="t-1", attempt=2, user=user, home=tmp_path, tmpdir=tmp_path / "tmp")
    assert env == {"PATH": "/usr/bin", "LANG": "C", "HWF_TASK_ID": "t-1", "HWF_ATTEMPT": "2",
                   "HOME": str(tmp_path), "USER": "slotty", "LOGNAME": "slotty", "TMPDIR": str(tmp_path / "tmp")}
    assert task_env(base, task_id="t-1", attempt=1) == {
        "PATH": "/usr/bin", "HOME": "/root", "LANG": "C", "HWF_TASK_ID": "t-1", "HWF_ATTEMPT": "1"}


def test_run_as_an_unknown_user_is_refused():
    with pytest.raises(AccountError, match="--run-as no-such-hwf-user: no such user"):
        TaskAccounts.configure("no-such-hwf-user", slots=1)


@needs_root
def test_daemons_on_one_machine_never_share_slot_uids(tmp_path):
    base = DEFAULT_SLOT_UID_BASE + 200_000
    a = TaskAccounts.configure(None, 2, base, lock_dir=tmp_path / "locks")
    b = TaskAccounts.configure(None, 2, base, lock_dir=tmp_path / "locks")
    try:
        assert [a.user(k).uid for k in range(2)] == [base, base + 1]
        assert [b.user(k).uid for k in range(2)] == [base + 2, base + 3]
    finally:
        a.close()
        b.close()
    c = TaskAccounts.configure(None, 1, base, lock_dir=tmp_path / "locks")
    assert c.user(0).uid == base  # released on close
    c.close()


def test_temp_task_roots_of_dead_daemons_are_removed(tmp_path):
    alive, dead, unlocked_old, unlocked_new = (tmp_path / f"hwf-tasks-{n}" for n in ("a", "b", "c", "d"))
    for d in (alive, dead, unlocked_old, unlocked_new):
        (d / "t-1.1").mkdir(parents=True)
    held = _lock_root(alive)  # a running daemon holds its lock
    os.close(_lock_root(dead))  # a daemon that died released it
    os.utime(unlocked_old, (time.time() - 3600, time.time() - 3600))
    try:
        assert sorted(remove_stale_roots(tmp_path)) == [dead, unlocked_old]
    finally:
        os.close(held)
    assert alive.exists() and unlocked_new.exists()
    assert not dead.exists() and not unlocked_old.exists()


# ------------------------------------------------------------------ the cache


def _cache_file(farm, sha: str, daemon="daemon-1") -> Path:
    return farm.root / daemon / "blob-cache" / sha[:2] / sha


POISON = r"""
sha=$(sha256sum in.txt | cut -d' ' -f1)
workdir=$(for f in /proc/[0-9]*/cmdline; do tr '\0' '\n' < "$f" 2>/dev/null | grep -A1 -x -e '--workdir' | tail -n1; done | sort -u)
for d in .. ../.. ../../.. $workdir $1; do
  target="$d/blob-cache/${sha:0:2}/$sha"
  echo "try $target"
  if printf 'POISON' > "$target"; then echo "POISONED $target"; fi
done
"""


@pytest.mark.e2e
def test_task_cannot_poison_the_blob_cache(farm, client, tmp_path):
    src = tmp_path / "in.txt"
    src.write_bytes(b"the original bytes\n")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    # The workdir as if guessed: as root, /proc (hidepid) no longer shows it.
    guess = f"set -- {farm.root / 'daemon-1'}\n"
    r = _run(client, Task(Stage("poison", data=[Data(src, "in.txt")], cmd=guess + POISON),
                          hardware={"daemon": "daemon-1"}))
    assert r.ok, r.error
    assert f"/{farm.root.name}/daemon-1/blob-cache/" in r.output  # it tried the real cache path
    if ROOT:
        assert "POISONED" not in r.output, r.output
        # Refused by the cache's mode, or not even there (a workdir under /tmp: the task's is private).
        stderr = r.stages[0].commands[0].stderr
        assert "Permission denied" in stderr or "No such file or directory" in stderr, stderr
        assert _cache_file(farm, sha).read_bytes() == b"the original bytes\n"
    second = _run(client, Task(Stage("read", data=[Data(src, "in.txt")], cmd="cat in.txt"),
                               hardware={"daemon": "daemon-1"}))
    assert second.ok and second.output == "the original bytes\n"


@pytest.mark.e2e
def test_corrupt_cache_entry_is_downloaded_again(farm, client, tmp_path):
    src = tmp_path / "data.bin"
    src.write_bytes(b"good data, corrupted later on disk\n")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    task = Task(Stage("read", data=[Data(src, "data.bin")], cmd="cat data.bin"), hardware={"daemon": "daemon-1"})
    assert _run(client, task).output == "good data, corrupted later on disk\n"
    cached = _cache_file(farm, sha)
    cached.write_bytes(b"bad data\n")
    again = _run(client, task)
    assert again.ok and again.output == "good data, corrupted later on disk\n"
    assert cached.read_bytes() == src.read_bytes()  # the entry was replaced
    assert f"blob cache entry {sha} does not match its sha256" in _daemon_log(farm)


def test_copy_verified_detects_a_changed_file(tmp_path):
    src = tmp_path / "blob"
    src.write_bytes(b"x" * 3_000_000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    with open(tmp_path / "dest", "w+b") as dest:
        assert copy_verified(src, dest, good)
        src.write_bytes(b"y" * 10)
        assert not copy_verified(src, dest, good)
        assert copy_verified(src, dest, hashlib.sha256(b"y" * 10).hexdigest())
    assert (tmp_path / "dest").read_bytes() == b"y" * 10  # each try starts from an empty file


# ------------------------------------------------------------ task privacy


PEEK = r"""
victim="$(dirname "$PWD")/{victim}.1"
echo "victim dir: $victim"
ls "$(dirname "$PWD")" 2>&1 | sed 's/^/ls tasks: /'
cat "$victim/secret.txt" 2>&1 | sed 's/^/cat: /'
for p in /proc/[0-9]*; do
  cwd=$(readlink "$p/cwd" 2>/dev/null) || continue
  case "$cwd" in *"{victim}"*) echo "found cwd $cwd"; cat "$cwd/secret.txt" 2>&1 | sed 's/^/via proc: /';; esac
  cat "$p/cwd/secret.txt" 2>/dev/null | sed 's/^/via proc cwd: /'
done
true
"""


@pytest.mark.e2e
@needs_root
def test_a_task_cannot_read_another_running_tasks_dir(farm, client, tmp_path):
    secret = "s3cret-" + os.urandom(6).hex()
    victim = dispatch_sync(Task(Stage("victim", cmd=f"echo {secret} > secret.txt; sleep 60"),
                                hardware={"daemon": "daemon-1"}), client)
    [vid] = list(victim)
    task_root = farm.root / "daemon-1" / "tasks"
    roots = [task_root, *Path(tempfile.gettempdir()).glob("hwf-tasks-*")]
    _wait(lambda: any((r / f"{vid}.1" / "secret.txt").exists() for r in roots), what="the victim's secret")
    try:
        r = _run(client, Task(Stage("peek", cmd=PEEK.replace("{victim}", vid)), hardware={"daemon": "daemon-1"}))
    finally:
        client.cancel_sync(victim)
    assert r.ok, r.error
    assert secret not in r.output, r.output
    # It tried the exact path: refused, or not even there (task dirs under /tmp: its /tmp is private).
    assert "cat: cat: " in r.output and ("Permission denied" in r.output or "No such file" in r.output)
    assert f"ls tasks: {vid}.1" not in r.output


# --------------------------------------------------------------- artifacts


ESCAPES = "ln -s /etc d; ln -s /etc/passwd p; echo inside > real.txt; ln -s real.txt good; mkdir sub; ln -s ../real.txt sub/up"


@pytest.mark.e2e
def test_symlinks_cannot_smuggle_files_out_as_artifacts(farm, client, tmp_path):
    r = _run(client, Task(Stage("s", cmd=ESCAPES), Artifacts("d/hostname", "p", "d/*", "good", "sub/up"),
                          hardware={"daemon": "daemon-1"}))
    assert r.ok, r.error
    by = {a.pattern: a for a in r.artifacts}
    assert len(r.artifacts) == 5
    assert by["d/hostname"].error == "'d/hostname' resolves outside the task directory"
    assert by["p"].error == "'p' resolves outside the task directory"
    assert by["d/*"].error == "'d/*' resolves outside the task directory"
    for pattern in ("d/hostname", "p", "d/*"):
        assert by[pattern].sha256 is None
    assert by["good"].ok and by["good"].path.read_text() == "inside\n"
    assert by["sub/up"].ok and by["sub/up"].path.read_text() == "inside\n"
    downloaded = sorted(p.name for p in (tmp_path / "hwf_artifacts" / r.task_id).rglob("*") if p.is_file())
    assert downloaded == ["good", "up"]
    blobs = farm.state_dir / "blobs"
    for outside in ("/etc/hostname", "/etc/passwd"):
        sha = hashlib.sha256(Path(outside).read_bytes()).hexdigest()
        assert not (blobs / sha[:2] / sha).exists(), f"{outside} reached the hub"


def test_glob_does_not_descend_through_links_that_lead_out(tmp_path):
    root = tmp_path / "task"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "x.txt").write_text("x")
    (root / "inner").symlink_to("sub")
    (root / "outer").symlink_to(tmp_path)
    (tmp_path / "y.txt").write_text("y")
    assert [(m.name, m.error) for m in match_files(root, "*/*.txt")] == [
        ("inner/x.txt", None),
        ("outer/*.txt", "'outer/*.txt' resolves outside the task directory"),
        ("sub/x.txt", None),
    ]
    assert [m.name for m in match_files(root, "**/*.txt")] == ["sub/x.txt"]  # ** follows no links


def test_artifacts_the_task_does_not_own_are_refused(tmp_path):
    # A hard link to someone else's file would look like this to the daemon.
    root = tmp_path / "task"
    root.mkdir()
    (root / "mine.txt").write_text("mine")
    uploaded = []

    async def upload(f, name):
        uploaded.append((name, f.read()))
        return hashlib.sha256(b"mine").hexdigest(), 4

    def collect(owner):
        return asyncio.run(collect_artifacts(["mine.txt"], root, upload, owner=owner))

    [info] = collect(os.geteuid() + 1)
    assert info.error == "'mine.txt' is not owned by the task's user" and uploaded == []
    [info] = collect(os.geteuid())
    assert info.error is None and uploaded == [("mine.txt", b"mine")]


# ------------------------------------------------------- leftover processes

# A process that leaves the command's group (its own session) and stays; the
# command ends only once it has left, so the group kill at exit cannot win.
ESCAPE = ("rm -f escaped.pid; setsid sh -c 'echo $$ > escaped.pid; exec sleep 1000' > /dev/null 2>&1 < /dev/null & "
          "while [ ! -s escaped.pid ]; do sleep 0.01; done; echo \"pid=$(cat escaped.pid) uid=$(id -u)\"")


@pytest.mark.e2e
@needs_root
def test_processes_a_task_leaves_behind_are_killed(farm, client):
    r = _run(client, Task(Stage("s", cmd=ESCAPE), hardware={"daemon": "daemon-1"}))
    assert r.ok, r.error
    pid, uid = map(int, re.search(r"pid=(\d+) uid=(\d+)", r.output).groups())
    assert uid in _slot_uids(_daemon_log(farm))

    def left() -> list[int]:
        out = []
        for p in psutil.process_iter(["uids", "status"]):
            if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        return out

    # The result is sent as soon as the task is over and the slot is cleaned
    # right after (before it takes another task): wait for that, briefly.
    _wait(lambda: left() == [], timeout=5.0, what="the slot's uid to have no process left")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# The next task on a slot lists every live process of its uid that is not its own.
STRANGERS = r"""
me=$(id -u); sid=$(ps -o sid= -p $$ | tr -d ' ')
echo "uid=$me"
ps -e -o pid=,ruid=,sid=,stat=,args= | awk -v u="$me" -v s="$sid" '$2 == u && $3 != s && $4 !~ /^Z/ {print "STRANGER", $0}'
true
"""


@pytest.mark.e2e
@needs_root
def test_the_next_task_on_a_slot_never_meets_what_the_last_one_left(tmp_path):
    # One slot, so both tasks run as the same uid; the second is queued
    # behind the first and starts as soon as the first one's result is in.
    with LocalCluster(daemons=1, slots=1, state_dir=tmp_path / "c") as c:
        h = c.hub()
        try:
            leave = ESCAPE
            for _ in range(3):
                first, second = h.get_result_sync(
                    dispatch_sync([Task(Stage("leave", cmd=leave)), Task(Stage("look", cmd=STRANGERS))], h),
                    wait=True)
                assert first.ok and second.ok, (first.error, second.error)
                uid = int(re.search(r"uid=(\d+)", first.output).group(1))
                assert f"uid={uid}" in second.output  # the same slot uid
                assert "STRANGER" not in second.output, second.output
        finally:
            h.close_sync()


# ------------------------------------------------------------ output flood


def _flooding(daemon: psutil.Process) -> bool:
    try:
        return any(p.name() == "head" for p in daemon.children(recursive=True))
    except psutil.Error:
        return False


@pytest.mark.e2e
def test_output_flood_keeps_the_daemon_small_and_online(farm, client):
    daemon = psutil.Process(farm.daemon_processes["daemon-1"].pid)
    hub = psutil.Process(farm.hub_process.pid)
    start_rss = daemon.memory_info().rss
    flood = "yes 'a line of output that a task prints far too often' | head -c 200000000; echo done"
    ids = dispatch_sync(Task(Stage("flood", cmd=flood), hardware={"daemon": "daemon-1"}), client, stream=True)
    _wait(lambda: client.get_result_sync(ids, download=False)[0].status == "running", what="the flood to start")
    peak = start_rss
    # A hub that does not keep up at all: stopped while the task prints (for
    # less than the heartbeat timeout, so the hub itself keeps the daemon).
    hub.suspend()
    try:
        stall_ends = time.monotonic() + 3.0
        while time.monotonic() < stall_ends and _flooding(daemon):
            peak = max(peak, daemon.memory_info().rss)
            time.sleep(0.02)
    finally:
        hub.resume()
    offline_seen = False
    while True:
        peak = max(peak, daemon.memory_info().rss)
        if "daemon-1" not in client.get_hardware_pool_sync().names:
            offline_seen = True
        [r] = client.get_result_sync(ids, download=False)
        if r.done:
            break
        time.sleep(0.05)
    assert r.ok, r.error
    assert len(r.attempts) == 1  # never declared lost, never retried
    assert not offline_seen
    assert peak < start_rss + 100 * 2**20, f"daemon grew from {start_rss >> 20} MiB to {peak >> 20} MiB"
    [cmd] = r.stages[0].commands
    assert cmd.stdout_truncated and cmd.stdout.startswith("a line of output")  # the kept head, as before
    assert "daemon-1" in client.get_hardware_pool_sync().names


def test_output_pump_bounds_what_waits_and_sends_one_at_a_time():
    sent: list[tuple[str, str]] = []
    in_flight = 0
    most_in_flight = 0

    async def slow_send(stream: str, text: str) -> None:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await asyncio.sleep(0.01)  # a hub far slower than the task
        sent.append((stream, text))
        in_flight -= 1

    async def main() -> OutputPump:
        pump = OutputPump(slow_send, limit=256 * 1024, message_bytes=16 * 1024)
        chunk = "z" * 65536
        most_pending = 0
        for i in range(800):  # 50 MiB, far faster than it can be sent
            pump("stdout", chunk)
            most_pending = max(most_pending, pump.pending)
            if i % 50 == 0:
                await asyncio.sleep(0.02)
        pump("stdout", "the end\n")
        await pump.close()
        assert most_pending <= 256 * 1024
        return pump

    pump = asyncio.run(main())
    text = "".join(t for _, t in sent)
    assert most_in_flight == 1
    markers = [int(n) for n in re.findall(r"\[hwf: (\d+) bytes of output dropped", text)]
    assert markers and sum(markers) == pump.dropped_total
    assert len(text) - sum(len(dropped_marker(n)) for n in markers) + pump.dropped_total == 800 * 65536 + 8
    assert all(len(t) <= 16 * 1024 for _, t in sent)


@needs_root
@pytest.mark.e2e
def test_commands_as_another_user_get_exactly_that_account(tmp_path):
    """Through the spawner (a fork of a small root process, never of the
    daemon), with bash or without: the slot's uid and gid and no
    supplementary group of root's; the leftover killer, forked by the
    spawner, and the blocking one of the daemon's start-up both work."""
    from hwf_daemon import spawner
    from hwf_daemon.leftovers import kill_leftovers, kill_processes_of, processes_of
    from hwf_daemon.tracking import TrackedProcess

    uid = DEFAULT_SLOT_UID_BASE + 4000
    user = TaskUser(uid=uid, gid=uid, name="hwf-test", per_slot=True)
    os.chmod(tmp_path, 0o777)

    async def run(cmd):
        proc = await TrackedProcess.start(cmd, tmp_path, user=user, track_ram=False)
        out = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.read)
        proc.stdout.close()
        proc.stderr.close()
        return proc, out.decode(), await proc.wait()

    async def main():
        with_bash, out, usage = await run(f"id -u; id -g; id -G; {ESCAPE}")
        assert not with_bash.direct and usage.exit_code == 0
        assert out.split()[:3] == [str(uid), str(uid), str(uid)]
        plain, out, usage = await run("id")
        assert plain.direct and usage.exit_code == 0
        assert out.split() == [f"uid={uid}", f"gid={uid}", f"groups={uid}"]
        assert psutil.Process(os.getpid()).pid != spawner.current().pid
        assert processes_of(uid)  # the setsid'd sleep escaped the command's group
        assert await kill_leftovers(user) == []
        assert processes_of(uid) == []

    asyncio.run(main())

    async def leave_one():
        _, out, _ = await run(ESCAPE)
        return int(re.search(r"pid=(\d+)", out).group(1))

    pid = asyncio.run(leave_one())
    assert pid in processes_of(uid)
    assert kill_processes_of(user) == []  # the blocking killer of the daemon's start-up
    assert processes_of(uid) == []

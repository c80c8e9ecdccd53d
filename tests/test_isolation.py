"""A task is alone on its machine (issue 18, rows 1, 8, 9), written as the attacks.

Every test runs real hubs and daemons on 127.0.0.1; user-a and user-b are
two client tokens of one LocalCluster.  The daemon runs as root (per-slot
uids) for the attacks; the tests that need that say so in their skip
reason.  Each ends by checking that a normal user still dispatches and that
what was stored before is intact.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import cloudpickle
import psutil
import pytest
from waiting import wait_until

from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync

pytestmark = pytest.mark.e2e
cloudpickle.register_pickle_by_value(sys.modules[__name__])
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="per-slot uids, namespaces and cgroups need the daemon to run as root")


@pytest.fixture
def lone(tmp_path):
    """Start LocalClusters of one daemon (``daemon-1``) with one slot; closed after the test."""
    clusters: list[LocalCluster] = []

    def make(*daemon_args: str, slots: int = 1) -> LocalCluster:
        c = LocalCluster(daemons=1, slots=slots, state_dir=tmp_path / f"c{len(clusters)}",
                         daemon_args=list(daemon_args))
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.close()


def _users(c: LocalCluster):
    a = c.hub()
    b = c.hub(token=c.create_token(role="client", user="user-b"))
    return a, b


def _shell(hub, cmd: str, **hardware):
    [r] = hub.get_result_sync(dispatch_sync(Task(Stage("s", cmd=cmd), hardware=hardware or {}), hub), wait=True,
                              timeout=180)
    return r


def _assert_still_serves(hub, before) -> None:
    """A normal task still runs, and a result stored earlier reads the same."""
    r = _shell(hub, "echo fine")
    assert r.ok and r.output.strip() == "fine", (r.error, r.output)
    [again] = hub.get_result_sync([before.task_id])
    assert (again.status, again.output) == (before.status, before.output)


# ------------------------------------------------ row 1: the warm worker's memory


def _cache_secret(secret: str) -> str:
    """user-a's call: a secret stays in the warm worker's globals."""
    import builtins
    builtins._hwf_test_secret = "".join(reversed(secret))  # built here: only the worker's heap holds it
    return "cached"


def _read_secret() -> object:
    import builtins
    return getattr(builtins, "_hwf_test_secret", None)


# user-b's shell task: find Python workers in /proc, read and write their
# memory, attach with ptrace (python) and gdb.
PEEK = r"""
/usr/bin/python3 - "$1" <<'EOF'
import ctypes, os, sys, subprocess
needle = sys.argv[1].encode()
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) in (os.getpid(), os.getppid()):  # not this script nor its shell
        continue
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if b"pyworker" not in cmd:
        continue
    print("WORKER", pid, flush=True)
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "r+b", buffering=0)
    except OSError as exc:
        print("MEM-REFUSED", exc.strerror)
    else:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            lo, hi = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except OSError:
                continue
            i = data.find(needle)
            while i >= 0:
                print("FOUND-SECRET", flush=True)
                mem.seek(lo + i)
                mem.write(b"X" * len(needle))  # overwrite it: user-a's next call would return this
                i = data.find(needle, i + 1)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, int(pid), 0, 0) == 0:  # PTRACE_ATTACH
        print("PTRACE-ATTACHED", flush=True)
        os.waitpid(int(pid), 0)  # stopped by the attach
        libc.ptrace(17, int(pid), 0, 0)  # PTRACE_DETACH, and it runs on
    else:
        print("PTRACE-REFUSED", os.strerror(ctypes.get_errno()))
    gdb = subprocess.run(["timeout", "30", "gdb", "-nx", "-batch", "-p", pid, "-ex", "print (int)getpid()"],
                         capture_output=True, text=True)
    print("GDB-ATTACHED" if f"$1 = {pid}" in gdb.stdout else "GDB-REFUSED", flush=True)
EOF
"""


@needs_root
@pytest.mark.parametrize("attacker", ["user-b", "user-a"])
def test_a_shell_task_cannot_read_or_ptrace_a_warm_worker(lone, attacker):
    """user-b's task: the worker of user-a is retired before it runs; user-a's
    own shell task: the worker stays warm but is not dumpable."""
    c = lone()
    a, b = _users(c)
    try:
        secret = f"hwf-secret-{uuid.uuid4().hex}"
        assert a.submit(_cache_secret, secret[::-1], hardware={"daemon": "daemon-1"}).result(timeout=120) == "cached"
        before = _shell(a, "echo stored")
        # user-a's next call still finds its secret: the worker stays warm for user-a.
        assert a.submit(_read_secret, hardware={"daemon": "daemon-1"}).result(timeout=120) == secret

        attack = _shell(b if attacker == "user-b" else a, f"set -- {secret}\n{PEEK}", daemon="daemon-1")
        assert attack.ok, (attack.error, attack.output)
        out = attack.output
        assert "FOUND-SECRET" not in out and "PTRACE-ATTACHED" not in out and "GDB-ATTACHED" not in out, out

        # user-a's next call returns its own value (or nothing, on a fresh worker), never user-b's.
        got = a.submit(_read_secret, hardware={"daemon": "daemon-1"}).result(timeout=120)
        assert got in (secret, None), got
        _assert_still_serves(a, before)
    finally:
        a.close_sync()
        b.close_sync()


# ------------------------------------------------ row 8: another task's command line


def _wait_running(hub, ids, marker: str) -> None:
    """Until the task runs and its process (``marker`` on its command line) exists."""
    def seen():
        [r] = hub.get_result_sync(list(ids))
        if r.status != "running":
            return False
        return any(marker in " ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"]))
    wait_until(seen, timeout=60, what="user-a's task to run")


HUNT_CMDLINES = r"""
for f in /proc/[0-9]*/cmdline; do tr '\0' ' ' < "$f" 2>/dev/null; echo; done > seen.txt
ps auxww >> seen.txt 2>&1
grep -c . seen.txt | sed 's/^/lines: /'
grep -o 'hunter-[a-z0-9]*' seen.txt | sort -u
grep -o 'password=[A-Za-z0-9-]*' seen.txt | sort -u | sed 's/^/STOLEN /'
"""


@needs_root
def test_a_task_cannot_read_the_command_line_of_another_users_task(lone):
    c = lone(slots=2)
    a, b = _users(c)
    try:
        before = _shell(a, "echo stored")
        password = f"pw-{uuid.uuid4().hex}"
        victim = dispatch_sync(Task(Stage("v", cmd=f"sleep 60; : --password={password}")), a)
        _wait_running(a, victim, password)
        try:
            r = _shell(b, f": hunter-{password[3:11]}\n{HUNT_CMDLINES}")
        finally:
            a.cancel_sync(victim)
        assert r.ok, (r.error, r.output)
        assert f"hunter-{password[3:11]}" in r.output  # the hunt read /proc: it saw itself
        assert "STOLEN password=pw-" not in r.output and password not in r.output, r.output
        _assert_still_serves(a, before)
    finally:
        a.close_sync()
        b.close_sync()


def _hunt_cmdlines(needle: str) -> list[str]:
    """A Python call looks through /proc for ``needle`` on any command line."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and pid != str(os.getpid()):
            found.append(cmd)
    return found


@needs_root
def test_a_python_call_cannot_read_the_command_line_of_another_users_task(lone):
    """The warm worker's /proc is a hidepid one too."""
    c = lone(slots=2)
    a, b = _users(c)
    try:
        before = _shell(a, "echo stored")
        password = f"pw-{uuid.uuid4().hex}"
        victim = dispatch_sync(Task(Stage("v", cmd=f"sleep 60; : --password={password}")), b)
        _wait_running(b, victim, password)
        try:
            seen = a.submit(_hunt_cmdlines, "pw-", hardware={"daemon": "daemon-1"}).result(timeout=120)
        finally:
            b.cancel_sync(victim)
        assert not any(password in cmd for cmd in seen), seen
        _assert_still_serves(a, before)
    finally:
        a.close_sync()
        b.close_sync()


# ------------------------------------------------ row 9: what one task leaves behind


LEAVE = r"""
umask 077
for d in /tmp /var/tmp /dev/shm; do echo "secret-$1" > "$d/hwf-left-$1"; done
ipcmk -M 4096 -p 0600 | sed 's/^/ipc: /'
ipcs -m | grep -c '^0x' | sed 's/^/segments: /'
"""

FIND = r"""
for d in /tmp /var/tmp /dev/shm; do cat "$d/hwf-left-$1" 2>/dev/null | sed "s|^|FOUND $d |"; done
ipcs -m | grep -c '^0x' | sed 's/^/segments: /'
true
"""


def _host_file_of_call(name: str) -> str:
    """A Python call writes into the host's /tmp (workers keep the host's dirs)."""
    path = f"/tmp/{name}"
    with open(path, "w") as f:
        f.write("from a call")
    return path


@needs_root
def test_files_and_ipc_a_task_leaves_are_not_another_users(lone):
    c = lone()
    a, b = _users(c)
    tag = uuid.uuid4().hex[:12]
    try:
        left = _shell(a, f"set -- {tag}\n{LEAVE}", daemon="daemon-1")
        assert left.ok, (left.error, left.output)
        assert "ipc: " in left.output
        # Nothing of it reached the machine's own dirs.
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            assert not os.path.exists(f"{d}/hwf-left-{tag}")

        found = _shell(b, f"set -- {tag}\n{FIND}", daemon="daemon-1")
        assert found.ok, (found.error, found.output)
        assert "FOUND" not in found.output, found.output
        assert "segments: 0" in found.output, found.output  # its own IPC namespace: none of user-a's

        # A Python call writes outside the task's private dirs: removed after its task.
        path = a.submit(_host_file_of_call, f"hwf-call-{tag}", hardware={"daemon": "daemon-1"}).result(timeout=120)
        wait_until(lambda: not os.path.exists(path), timeout=30, what="the call's /tmp file to be removed")
        _assert_still_serves(a, left)
    finally:
        a.close_sync()
        b.close_sync()


@needs_root
def test_the_stages_of_one_task_share_its_private_tmp(lone):
    c = lone()
    a = c.hub()
    tag = uuid.uuid4().hex[:12]
    try:
        task = Task(Stage("write", cmd=f"echo kept-{tag} > /tmp/x-{tag}; echo shm > /dev/shm/y-{tag}"),
                    Stage("read", cmd=[f"cat /tmp/x-{tag}", f"cat /dev/shm/y-{tag}", "ls -ld /tmp | cut -c1-10"]))
        [r] = a.get_result_sync(dispatch_sync(task, a), wait=True, timeout=120)
        assert r.ok, (r.error, r.output)
        got = [cmd.stdout.strip() for cmd in r.stages[1].commands]
        assert got == [f"kept-{tag}", "shm", "drwx------"], got  # the task's own dir, nobody else's
        assert not os.path.exists(f"/tmp/x-{tag}") and not os.path.exists(f"/dev/shm/y-{tag}")
    finally:
        a.close_sync()


# ------------------------------------------------ row 9: limits per task


LIMITS = ("--task-max-pids", "50", "--task-memory", "200MB", "--task-disk", "50MB")


def _in_slot_cgroups(c: LocalCluster) -> list[str]:
    """Pids still in the cluster daemon's slot cgroups (v1 pids hierarchy)."""
    pid = c.daemon_processes["daemon-1"].pid
    [top] = Path("/sys/fs/cgroup/pids/hwf").glob(f"*.{pid}")
    return [p for slot in top.glob("slot-*") for p in (slot / "cgroup.procs").read_text().split()]


@needs_root
@pytest.mark.parametrize("attack, limit, flag", [
    # Bounded: 200 sleeps at most, each gone with the task.
    ("for i in $(seq 200); do sleep 60 & done; wait", "process limit (50 processes", "--task-max-pids"),
    ("/usr/bin/python3 -c \"b = b'x' * (400 * 2**20); import time; time.sleep(30)\"",
     "memory limit (200 MiB", "--task-memory"),
    ("head -c 120M /dev/zero > big; sleep 30", "disk limit (50 MiB", "--task-disk"),
    ("head -c 120M /dev/zero > /dev/shm/fill", "disk limit (50 MiB", "--task-disk"),
], ids=["fork-bomb", "memory-hog", "disk-filler", "shm-filler"])
def test_a_task_past_its_limit_fails_naming_it_and_the_machine_goes_on(lone, attack, limit, flag):
    c = lone(*LIMITS)
    a, b = _users(c)
    try:
        before = _shell(a, "echo stored")
        r = _shell(b, attack)
        assert r.status == "failed", (r.status, r.error, r.output)
        assert limit in r.error and f"hwf daemon {flag}" in r.error, r.error
        assert r.error.startswith("stage 's' hit the task's "), r.error
        assert c.daemon_processes["daemon-1"].poll() is None  # the daemon is up
        _assert_still_serves(a, before)
        assert _shell(b, "echo again").ok  # the attacker's next normal task runs too
        assert not _in_slot_cgroups(c)  # nothing of the attack is left in its slot's cgroup
    finally:
        a.close_sync()
        b.close_sync()


# ------------------------------------------------ where the daemon cannot isolate


def test_a_daemon_that_cannot_isolate_says_what_it_cannot_do_and_falls_back(lone):
    c = lone("--run-as", "self", "--task-memory", "200MB")
    log = (c.log_dir / "daemon-1.log").read_text()
    lines = [ln for ln in log.splitlines() if "cannot isolate:" in ln]
    assert len(lines) == 3, log
    tmp, proc, limits = lines
    assert "no private /tmp, /var/tmp, /dev/shm per task" in tmp and "run the daemon as root" in tmp
    assert "namespaces" in tmp
    assert "see every process of this machine in /proc" in proc and "root" in proc
    assert "no per-task process or memory limit" in limits and "cgroup" in limits
    assert "RLIMIT_AS of 200 MiB (--task-memory)" in limits
    hub = c.hub()
    try:
        # The fallbacks: a TMPDIR of the task's own, and RLIMIT_AS.
        r = _shell(hub, 'echo "$TMPDIR"; test -d "$TMPDIR" && test -w "$TMPDIR" && echo usable')
        assert r.ok, (r.error, r.output)
        assert r.output.splitlines()[0].endswith("/.hwf-tmp") and "usable" in r.output
        # RLIMIT_AS is set a moment after the start (no hook before the exec on the vfork path).
        hog = _shell(hub, "/usr/bin/python3 -c \"import time; time.sleep(0.2); b = b'x' * (400 * 2**20)\"")
        assert hog.status == "failed" and "MemoryError" in hog.stages[0].commands[0].stderr, hog.error
        _assert_still_serves(hub, r)
    finally:
        hub.close_sync()


def test_isolation_none_says_it_is_off(lone):
    c = lone("--isolation", "none")
    log = (c.log_dir / "daemon-1.log").read_text()
    assert "cannot isolate: isolation is off (--isolation none)" in log, log
    r = _shell(c.hub(), "echo fine")
    assert r.ok and r.output.strip() == "fine"

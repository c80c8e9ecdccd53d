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

import cloudpickle
import pytest

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

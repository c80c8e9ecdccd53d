"""CreditPiggy's line protocol and the hub's unix socket, against a real hub process.

Raw sockets play the job manager (unix, TCP and UDP, as CreditPiggy's
daemon serves them); the ledger is read back over the websocket with the
admin token and must hold exactly what the lines said.  Attacks: garbage,
over-long lines, idle connections, non-loopback binds, a second hub on the
same socket, another user's slots.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hwf_jupyter import Hub, LocalCluster, RemoteError, Stage, Task, dispatch_sync

from rawpeer import RawPeer

pytestmark = pytest.mark.e2e

MAX_CONNECTIONS = 8
SECRET = "line-secret-0123"


def secret_file(root: Path) -> Path:
    f = root / "creditpiggy.secret"
    f.write_text(SECRET + "\n")
    os.chmod(f, 0o600)
    return f


class Farm:
    """A hub with --unix and three --creditpiggy endpoints, and no daemons."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = str(root / "hub.sock")
        self.cp_sock = str(root / "cp.sock")
        self.secret_file = secret_file(root)
        self.cluster = LocalCluster(daemons=0, state_dir=root, hub_args=[
            "--unix", self.sock,
            "--creditpiggy", f"unix:{self.cp_sock}",
            "--creditpiggy", "tcp:127.0.0.1:0",
            "--creditpiggy", "udp:127.0.0.1:0",
            "--creditpiggy-secret-file", str(self.secret_file),
            "--creditpiggy-idle-timeout", "2",
            "--creditpiggy-max-connections", str(MAX_CONNECTIONS),
        ])
        log = (self.cluster.log_dir / "hub.log").read_text()
        self.tcp = _address(log, "tcp")
        self.udp = _address(log, "udp")

    def line(self, kind: str, data: "bytes | str", timeout: float = 30) -> bytes:
        """Send one command the way CreditPiggy clients do (over tcp/udp with the
        secret as its first field); the whole answer."""
        data = data.encode() if isinstance(data, str) else data
        if kind != "unix":
            data = f"SECRET={SECRET},".encode() + data
        if kind == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(data, self.udp)
                return s.recvfrom(65536)[0]
        with self.connect(kind, timeout) as s:
            s.sendall(data)
            return _read_to_end(s)

    def connect(self, kind: str, timeout: float = 30) -> socket.socket:
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.cp_sock)
            return s
        return socket.create_connection(self.tcp, timeout=timeout)

    def admin(self) -> RawPeer:
        return RawPeer(self.cluster.address, self.cluster.admin_token)

    def slots(self, *slot_ids: str) -> dict[str, dict]:
        """Slots by the names the line used (the admin sees them as creditpiggy/NAME)."""
        keys = [s if s.startswith("t-") else f"creditpiggy/{s}" for s in slot_ids]
        with self.admin() as peer:
            reply = peer.request({"type": "get_credit_slots", "slots": keys})
        assert reply["type"] == "credit_slots", reply
        return {s["slot"].removeprefix("creditpiggy/"): s for s in reply["slots"]}

    def all_slots(self) -> list[dict]:
        with self.admin() as peer:
            reply = peer.request({"type": "get_credit_slots", "limit": 100_000})
        assert reply["type"] == "credit_slots", reply
        return sorted(reply["slots"], key=lambda s: s["slot"])

    def tally(self, by: str) -> dict:
        with self.admin() as peer:
            reply = peer.request({"type": "get_credit_tally", "by": by})
        assert reply["type"] == "credit_tally", reply
        return {row["key"]: row for row in reply["rows"]}


def _address(log: str, kind: str) -> tuple[str, int]:
    m = re.search(rf"creditpiggy line protocol on {kind}:([0-9.]+):(\d+)", log)
    assert m, f"no {kind} listener in the hub's log:\n{log}"
    return m.group(1), int(m.group(2))


def _read_to_end(s: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    f = Farm(tmp_path_factory.mktemp("creditline"))
    try:
        yield f
    finally:
        f.cluster.close()


def wait_until(cond, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


KINDS = ["unix", "tcp", "udp"]


# ------------------------------------------------------------ the ledger


@pytest.mark.parametrize("kind", KINDS)
def test_every_command_lands_in_the_ledger(farm, kind):
    k = kind
    sent = [
        f"ALLOC,slot={k}-range,min=5,max=50,expire=30",
        f"ALLOC,slot={k}-fixed,credits=7",
        f"ALLOC,slot={k}-low,min=10,max=20",
        f"ALLOC,slot={k}-gone,credits=3",
        f"COUNTERS,slot={k}-range,events=1000,errors=2",
        f"COUNTERS,slot={k}-fixed,events=10",
        f"META,slot={k}-range,generator=pythia,tune=A14",
        f"CLAIM,slot={k}-range,machine=vm-{k}-1,credits=500",   # clamped to max
        f"CLAIM,slot={k}-fixed,machine=vm-{k}-2,credits=999",   # fixed credits win
        f"CLAIM,slot={k}-low,machine=vm-{k}-1,credits=1",       # clamped to min
        f"DISCARD,slot={k}-gone,reason=invalid",
    ]
    for line in sent:
        assert farm.line(kind, line + "\n") == b"OK", line
    slots = farm.slots(f"{k}-range", f"{k}-fixed", f"{k}-low", f"{k}-gone")
    r, f, lo, g = slots[f"{k}-range"], slots[f"{k}-fixed"], slots[f"{k}-low"], slots[f"{k}-gone"]
    assert (r["state"], r["credits"], r["min"], r["max"], r["machine"]) == ("claimed", 50, 5, 50, f"vm-{k}-1")
    assert (f["state"], f["credits"], f["machine"]) == ("claimed", 7, f"vm-{k}-2")
    assert (lo["state"], lo["credits"]) == ("claimed", 10)
    assert (g["state"], g["reason"], g.get("machine")) == ("discarded", "invalid", None)
    assert r["counters"] == {"events": 1000, "errors": 2} and r["meta"] == {"generator": "pythia", "tune": "A14"}
    assert f["counters"] == {"events": 10} and f["meta"] == {}
    assert r["expires"] == pytest.approx(r["allocated"] + 30 * 60, abs=1)
    assert {s["user"] for s in slots.values()} == {"creditpiggy"}
    # the tally per machine is the sum of its claims (no owner yet: pending)
    tally = farm.tally("machine")
    assert tally[f"vm-{k}-1"]["credits"] == 60 and tally[f"vm-{k}-1"]["pending"] == 60
    assert tally[f"vm-{k}-1"]["counters"]["events"] == 1000
    assert tally[f"vm-{k}-2"]["credits"] == 7 and tally[f"vm-{k}-2"]["counters"]["events"] == 10


def test_the_creditpiggy_librarys_exact_wire(farm):
    """Its library sends no line end, lower-case commands, fields in dict order,
    then ``recv(4)`` and compares with "OK": so the answer is exactly OK."""
    for kind in ("unix", "tcp"):
        secret = "" if kind == "unix" else f"secret={SECRET},"  # tcp: the one field it must add
        with farm.connect(kind) as s:
            s.send(f"{secret}alloc,max=9,slot=lib-{kind},min=1".encode())
            assert s.recv(4) == b"OK"
            assert s.recv(4) == b""  # one command per connection: the hub closes
        with farm.connect(kind) as s:
            s.send(f"{secret}claim,machine=lib-m,slot=lib-{kind},credits=4".encode())
            assert s.recv(4) == b"OK"
    assert farm.slots("lib-unix")["lib-unix"]["credits"] == 4


# ------------------------------------------------------------ refusals


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_answer_ER_and_change_nothing(farm, kind):
    k = f"bad-{kind}"
    assert farm.line(kind, f"ALLOC,slot={k},credits=5") == b"OK"
    assert farm.line(kind, f"CLAIM,slot={k},machine=m1") == b"OK"
    assert farm.line(kind, f"ALLOC,slot={k}-d,credits=5") == b"OK"
    assert farm.line(kind, f"DISCARD,slot={k}-d,reason=lost") == b"OK"
    before = farm.all_slots()
    for line in [
        f"CLAIM,slot={k},machine=m2",                 # double claim
        f"CLAIM,slot={k}-d,machine=m2",               # claim a discarded slot
        f"DISCARD,slot={k},reason=late",              # discard a claimed slot
        f"ALLOC,slot={k},credits=1",                  # slot exists
        f"COUNTERS,slot={k}-nope,events=1",           # unknown slot
        f"META,slot={k}-nope,a=b",
        f"CLAIM,slot={k}-nope,machine=m1",
        f"DISCARD,slot={k}-nope",
        "FROB,slot=1",                                # unknown command
        "ALLOC,credits=3",                            # missing slot
        "CLAIM,machine=m",
        f"CLAIM,slot={k}",                            # missing machine
        f"ALLOC,slot={k}-x,credits=lots",             # bad number
        f"ALLOC,slot={k}-x,min=9,max=3",              # empty range
        b"\xff\xfe\x00garbage",
        b"\n",
        f"ALLOC,slot={k}-y,credits=1\nALLOC,slot={k}-z,credits=1\n",  # one command per connection
    ]:
        assert farm.line(kind, line) == b"ER", line
    assert farm.all_slots() == before


@pytest.mark.parametrize("kind", KINDS)
def test_over_long_line_refused(farm, kind):
    before = farm.all_slots()
    line = b"META,slot=long-" + kind.encode() + b",note=" + b"x" * 60_000
    assert farm.line(kind, line) == b"ER"
    assert farm.all_slots() == before


def test_line_slots_belong_to_the_line_user_not_to_clients(farm):
    """A client cannot touch (or learn about) the line protocol's slots, nor claim at all."""
    assert farm.line("unix", "ALLOC,slot=owned-by-line,credits=3") == b"OK"
    bob = RawPeer(farm.cluster.address, farm.cluster.create_token("client", "bob"))
    with bob:
        for req in ({"type": "credit_discard", "slot": "owned-by-line"},
                    {"type": "credit_counters", "slot": "owned-by-line", "counters": {"a": 1}},
                    {"type": "credit_meta", "slot": "owned-by-line", "meta": {"a": "b"}}):
            real = bob.request(req)
            fake = bob.request(dict(req, slot="never-allocated"))
            assert real["type"] == fake["type"] == "error" and real["code"] == fake["code"] == "unknown_slot"
            assert real["message"].replace("owned-by-line", "X") == fake["message"].replace("never-allocated", "X")
        claim = bob.request({"type": "credit_claim", "slot": "owned-by-line", "machine": "bobs-pc"})
        assert claim["type"] == "error" and claim["code"] == "unknown_slot"
        slots = bob.request({"type": "get_credit_slots"})
        assert "owned-by-line" not in {s["slot"] for s in slots["slots"]}
    assert farm.slots("owned-by-line")["owned-by-line"]["state"] == "allocated"


# ------------------------------------------------------------ the sockets


def test_socket_files_modes(farm):
    assert stat.S_IMODE(os.lstat(farm.cp_sock).st_mode) == 0o600  # the line protocol trusts the file mode
    assert stat.S_IMODE(os.lstat(farm.sock).st_mode) == 0o660    # tokens still decide on the websocket one
    assert stat.S_ISSOCK(os.lstat(farm.cp_sock).st_mode)


def _hub_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "hub_server", "--port", "0", "--http-port", "0", "--state-dir", str(root / "state"), *args]


def test_non_loopback_bind_refused_without_the_flag(tmp_path):
    for spec in ("tcp:0.0.0.0:0", "udp:0.0.0.0:0", "tcp:[::]:0"):
        run = subprocess.run(_hub_cmd(tmp_path, "--creditpiggy", spec), capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, run
        assert "not a loopback address" in run.stderr and "--creditpiggy-allow-remote" in run.stderr
    run = subprocess.run(_hub_cmd(tmp_path, "--creditpiggy", "unix:relative.sock"), capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "absolute" in run.stderr


def test_a_second_hub_cannot_take_the_sockets(farm, tmp_path):
    for args in (["--creditpiggy", f"unix:{farm.cp_sock}"], ["--unix", farm.sock],
                 ["--creditpiggy", f"tcp:{farm.tcp[0]}:{farm.tcp[1]}", "--creditpiggy-secret-file",
                  str(farm.secret_file)]):
        run = subprocess.run(_hub_cmd(tmp_path, *args), capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, (args, run)
        assert "another process is listening" in run.stderr or "address already in use" in run.stderr.lower()
    # the first hub still serves, its socket files untouched
    assert farm.line("unix", "ALLOC,slot=after-second-hub,credits=1") == b"OK"
    assert farm.line("tcp", "DISCARD,slot=after-second-hub") == b"OK"


def test_stale_socket_file_replaced_and_removed_at_exit(tmp_path):
    cp = tmp_path / "cp.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(cp))
    dead.close()  # as a hub killed with -9 leaves it
    ready = tmp_path / "ready"
    proc = subprocess.Popen(_hub_cmd(tmp_path, "--creditpiggy", f"unix:{cp}", "--ready-file", str(ready),
                                     "--parent-pid", str(os.getpid())),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, 60, "the hub to start")
        assert proc.poll() is None, proc.stderr.read()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(cp))
            s.sendall(b"DISCARD,slot=none\n")
            assert _read_to_end(s) == b"ER"  # a live hub answers there now
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert not cp.exists()


def test_idle_connections_are_bounded_and_closed(farm):
    def fill_then_knock():
        """MAX idle connections, then one more: answered ER at once.  The unix and
        tcp listeners accept independently, so the extra one can be counted
        before an idle one: then all are dropped and the round is tried again."""
        idle = [farm.connect("tcp" if i % 2 else "unix") for i in range(MAX_CONNECTIONS)]
        time.sleep(0.2)  # let the hub accept (and count) them
        with farm.connect("unix") as s:  # answered before it says anything
            s.settimeout(1.0)
            try:
                got = _read_to_end(s)
            except socket.timeout:
                got = b""
        if got == b"ER":
            return idle
        for sock in idle:
            sock.close()
        return None

    idle = wait_until(fill_then_knock, what="the connection limit to apply")
    try:
        # the hub closes the idle ones by itself (--creditpiggy-idle-timeout 2)
        for s in idle:
            s.settimeout(60)
            assert s.recv(16) == b""
    finally:
        for s in idle:
            s.close()
    assert farm.line("unix", "ALLOC,slot=after-idle,credits=1") == b"OK"


def test_many_line_clients_at_once_keep_the_totals(farm):
    n = 300

    def one(i: int) -> tuple[bytes, bytes]:
        kind = KINDS[i % 3]
        a = farm.line(kind, f"ALLOC,slot=par-{i},min=1,max=100")
        c = farm.line(kind, f"CLAIM,slot=par-{i},machine=par-m{i % 4},credits={i % 120}")
        return a, c

    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # within the connection limit
        answers = list(pool.map(one, range(n)))
    assert answers == [(b"OK", b"OK")] * n
    tally = farm.tally("machine")
    for m in range(4):
        want = sum(min(max(i % 120, 1), 100) for i in range(n) if i % 4 == m)
        assert tally[f"par-m{m}"]["credits"] == want
        assert tally[f"par-m{m}"]["slots"] == n // 4


# ------------------------------------------------------------ the websocket on a unix socket


def test_client_and_daemon_over_the_unix_socket(farm, tmp_path):
    over_tcp = farm.cluster.hub()
    try:
        sub = dispatch_sync(Task(Stage("s", cmd="true")), over_tcp)  # queued: no daemon yet
        for url in (f"unix:{farm.sock}", f"unix://{farm.sock}"):
            hub = Hub(url, token=farm.cluster.token, artifacts_dir=tmp_path / "a")
            try:  # the same hub, the same user's session, seen over the socket
                assert hub.session_sync(sub.session_id).task_ids == list(sub)
            finally:
                hub.close_sync()
        over_tcp.cancel_sync(session=sub.session_id)
    finally:
        over_tcp.close_sync()
    log = open(tmp_path / "unixd.log", "wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "hwf_daemon", "--hub", f"unix://{farm.sock}", "--token-file", "-", "--name", "unixd",
         "--slots", "1", "--workdir", str(tmp_path / "unixd"), "--parent-pid", str(os.getpid())],
        stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    daemon.stdin.write(farm.cluster.daemon_token.encode() + b"\n")
    daemon.stdin.close()
    hub = Hub(f"unix:{farm.sock}", token=farm.cluster.token, artifacts_dir=tmp_path / "a")
    try:
        wait_until(lambda: "unixd" in hub.get_hardware_pool_sync().names or daemon.poll() is not None,
                   60, "the daemon to register over the unix socket")
        assert daemon.poll() is None, (tmp_path / "unixd.log").read_text()
        ids = dispatch_sync(Task(Stage("s", cmd="echo over-unix"), hardware={"daemon": "unixd"}), hub)
        r = hub.get_result_sync(ids, wait=True, timeout=120)[0]
        assert (r.status, r.output, r.machine) == ("finished", "over-unix\n", "unixd"), r.error
        # the task's slot was claimed for the machine that ran it, read back over the unix socket too
        slot = farm.slots(ids[0])[ids[0]]
        assert (slot["state"], slot["machine"], slot["credits"] >= 1) == ("claimed", "unixd", True)
    finally:
        hub.close_sync()
        daemon.send_signal(signal.SIGINT)
        daemon.wait(30)


def test_unix_socket_still_needs_a_token(farm):
    from websockets.sync.client import unix_connect
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        with unix_connect(farm.sock):
            pass
    assert info.value.response.status_code == 401
    bad = Hub(f"unix:{farm.sock}", token="hwf_c_not-a-token")
    try:
        with pytest.raises(Exception, match="refused|invalid token"):
            bad.get_hardware_pool_sync()
    finally:
        bad.close_sync()

"""Credits come only from work done: issue 18's rows 2, 3 and 10, as the attacks.

Real hubs, real daemons, raw websockets and raw line-protocol sockets on
127.0.0.1.  Row 2: a daemon token of another owner (``owner-m``) tries to
claim a running task's slot, to mint credits with alloc + claim, and to
inflate or overflow the numbers of a result.  Row 3: the CreditPiggy line
endpoint over tcp/udp without (or with a wrong) secret, and with the right
secret against another user's slots.  Row 10: another user's task id and
slot names.  Every test ends with: a normal user still dispatches, its
task's slot is settled once to the machine that ran it, and the tallies
still equal the claimed slots they sum.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync

from rawpeer import RawPeer
from test_creditline_e2e import _address, _read_to_end
from waiting import wait_until

pytestmark = pytest.mark.e2e

SECRET = "s3cr3t-line-key-for-tests"


# ------------------------------------------------------------ shared checks


def admin_slots(cluster: LocalCluster, **kw) -> list[dict]:
    with RawPeer(cluster.address, cluster.admin_token) as admin:
        reply = admin.request({"type": "get_credit_slots", "limit": 100_000, **kw})
    assert reply["type"] == "credit_slots", reply
    return reply["slots"]


def admin_tally(cluster: LocalCluster, by: str) -> dict:
    with RawPeer(cluster.address, cluster.admin_token) as admin:
        reply = admin.request({"type": "get_credit_tally", "by": by})
    assert reply["type"] == "credit_tally", reply
    return {row["key"]: row for row in reply["rows"]}


def task_slot(cluster: LocalCluster, task_id: str) -> dict:
    (slot,) = [s for s in admin_slots(cluster, slots=[task_id]) if s["task_id"] == task_id]
    return slot


def still_sound(cluster: LocalCluster, token: str, machine: str, owner: str, tmp_path: Path) -> None:
    """A normal user still dispatches; its task's slot is claimed once, for the
    machine that ran it; every tally equals the claimed slots it sums."""
    hub = cluster.hub(token=token, artifacts_dir=tmp_path / "sound")
    try:
        ids = dispatch_sync(Task(Stage("ok", cmd="echo sound"), hardware={"daemon": machine}), hub)
        r = hub.get_result_sync(ids, wait=True, timeout=120)[0]
        assert (r.status, r.output, r.machine) == ("finished", "sound\n", machine), r.error
    finally:
        hub.close_sync()
    slot = task_slot(cluster, ids[0])
    assert (slot["state"], slot["machine"], slot["owner"]) == ("claimed", machine, owner)
    assert slot["counters"]["tasks"] == 1  # settled once
    claimed = [s for s in admin_slots(cluster) if s["state"] == "claimed"]
    for by, field in (("machine", "machine"), ("owner", "owner"), ("user", "user")):
        for key, row in admin_tally(cluster, by).items():
            mine = [s for s in claimed if s[field] == key]
            assert row["credits"] == sum(s["credits"] for s in mine), (by, key)
            assert row["slots"] == len(mine), (by, key)
            for name, total in row["counters"].items():
                assert math.isfinite(total) and total >= 0, (by, key, name, total)


def queued_task(cluster: LocalCluster, token: str, tmp_path: Path) -> str:
    """A task of ``token``'s user that stays queued (no such machine): its slot stays allocated."""
    hub = cluster.hub(token=token, artifacts_dir=tmp_path / "queued")
    try:
        return dispatch_sync(Task(Stage("s", cmd="true"), hardware={"daemon": "nowhere"}), hub)[0]
    finally:
        hub.close_sync()


def wait_status(hub, task_id: str, status: str, timeout: float = 60) -> None:
    wait_until(lambda: hub.get_result_sync([task_id])[0].status == status, timeout, f"{task_id} {status}")


# ------------------------------------------------------------ rows 2 and 10: the websocket


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """lab's real daemon ``lab-1``; clients user-a and user-b; owner-m's daemon token."""
    with LocalCluster(daemons=0, slots=2, state_dir=tmp_path_factory.mktemp("credit-attacks")) as c:
        c.add_daemon("lab-1", token=c.create_token("daemon", "lab"))
        c.user_a = c.create_token("client", "user-a")
        c.user_b = c.create_token("client", "user-b")
        c.owner_m = c.create_token("daemon", "owner-m")
        yield c


CREDIT_WRITES = [
    {"type": "credit_alloc", "slot": "minted", "credits": 10**12},
    {"type": "credit_claim", "slot": "minted", "machine": "rogue-m", "credits": 10**12},
    {"type": "credit_discard", "slot": "minted", "reason": "gone"},
    {"type": "credit_counters", "slot": "minted", "counters": {"cpu_seconds": 10**12}},
    {"type": "credit_meta", "slot": "minted", "meta": {"who": "owner-m"}},
]


def test_row2_a_daemon_cannot_touch_any_slot(farm, tmp_path):
    """owner-m's daemon: claim of user-a's running task's slot, alloc + claim
    to mint 1e12, discard/counters/meta: all forbidden, nothing changes."""
    alice = farm.hub(token=farm.user_a, artifacts_dir=tmp_path / "a")
    try:
        ids = dispatch_sync(Task(Stage("s", cmd="sleep 600"), hardware={"daemon": "lab-1"}), alice)
        wait_status(alice, ids[0], "running")
        before = admin_slots(farm)
        with RawPeer(farm.address, farm.owner_m) as rogue:
            assert rogue.register("rogue-m")["type"] == "registered"
            asks = [dict(req, slot=slot) for slot in (ids[0], "minted") for req in CREDIT_WRITES]
            for req in asks:
                reply = rogue.request(req)
                assert reply["type"] == "error" and reply["code"] == "forbidden", (req, reply)
                assert "daemon token cannot" in reply["message"], reply
        assert admin_slots(farm) == before
        assert "owner-m" not in admin_tally(farm, "owner")
        assert task_slot(farm, ids[0])["state"] == "allocated"
        alice.cancel_sync(list(ids))  # its slot ends once, discarded: nobody was paid for it
        wait_status(alice, ids[0], "cancelled")
    finally:
        alice.close_sync()
    slot = task_slot(farm, ids[0])
    assert (slot["state"], slot["reason"], slot["machine"], slot["owner"]) == ("discarded", "cancelled", None, None)
    still_sound(farm, farm.user_a, "lab-1", "lab", tmp_path)


def test_row2_inflated_cpu_seconds_are_bounded_by_wall_time_and_cores(farm, tmp_path):
    """cpu_seconds 1e11 in a result: the slot gets at most the attempt's wall
    time x the machine's cores, never 1e11 credits."""
    alice = farm.hub(token=farm.user_a, artifacts_dir=tmp_path / "a")
    try:
        with RawPeer(farm.address, farm.owner_m) as rogue:
            assert rogue.register("rogue-infl", hardware=dict(rogue_hw(), cores=2))["type"] == "registered"
            t0 = time.time()
            ids = dispatch_sync(Task(Stage("s", cmd="true"), hardware={"daemon": "rogue-infl"}), alice)
            a = rogue.wait_push("assign")
            now = time.time()
            done = rogue.request({"type": "task_done", "task_id": a["task_id"], "attempt": a["attempt"],
                                  "outcome": {"status": "finished", "exit_code": 0, "started": now - 1e6,
                                              "finished": now, "cpu_seconds": 1e11, "gpu_seconds": 1e11}})
            assert done["type"] == "ok", done
        r = alice.get_result_sync(ids, wait=True, timeout=60)[0]
        elapsed = time.time() - t0
    finally:
        alice.close_sync()
    assert r.status == "finished"
    slot = task_slot(farm, ids[0])
    bound = math.ceil(elapsed * 2)  # wall time (less than the test saw) x 2 cores
    assert slot["state"] == "claimed" and 1 <= slot["credits"] <= bound, (slot, bound)
    assert slot["counters"]["cpu_seconds"] <= elapsed * 2
    assert slot["counters"]["wall_seconds"] <= elapsed
    assert slot["counters"].get("gpu_seconds", 0) == 0  # no GPU on that machine
    assert admin_tally(farm, "owner")["owner-m"]["credits"] <= bound
    still_sound(farm, farm.user_a, "lab-1", "lab", tmp_path)


@pytest.mark.parametrize("field,value", [("cpu_seconds", "1e300"), ("cpu_seconds", "-5"),
                                         ("gpu_seconds", "1e400"), ("stages.peak_ram", "-1"),
                                         ("cpu_seconds", "NaN")])
def test_row2_a_bad_number_is_refused_naming_it_and_the_task_is_retried(farm, tmp_path, field, value):
    """1e300 (OverflowError in 0.2: ``internal``, task stuck ``assigned``), a
    negative, an infinity, NaN: refused with an error naming the field; the
    attempt is over (lost) and the task runs again on an honest machine."""
    tag = f"bad-{field.replace('.', '-')}-{len(value)}-{value[0].isdigit()}"
    alice = farm.hub(token=farm.user_a, artifacts_dir=tmp_path / "a")
    try:
        with RawPeer(farm.address, farm.owner_m) as rogue:
            assert rogue.register(f"rogue-{tag}", tags=(tag,))["type"] == "registered"
            ids = dispatch_sync(Task(Stage("s", cmd="echo honest"), hardware={"tags": [tag]}), alice)
            a = rogue.wait_push("assign")
            if field == "stages.peak_ram":
                number = f'"stages": [{{"name": "s", "status": "finished", "peak_ram": {value}}}]'
            else:
                number = f'"{field}": {value}'
            frame = ('{"type": "task_done", "id": 77, "task_id": "%s", "attempt": %d, "outcome": '
                     '{"status": "finished", "exit_code": 0, %s}}' % (a["task_id"], a["attempt"], number))
            reply = rogue.request(frame)
            assert reply["type"] == "error" and reply["code"] == "bad_message", reply
            assert field.split(".")[-1] in reply["message"], reply
            # not stuck: the attempt is over, the task waits for another machine
            wait_status(alice, ids[0], "queued")
        farm.add_daemon(f"honest-{tag}", tags=[tag], token=farm.create_token("daemon", "lab"))
        r = alice.get_result_sync(ids, wait=True, timeout=120)[0]
    finally:
        alice.close_sync()
    assert (r.status, r.output, r.machine) == ("finished", "honest\n", f"honest-{tag}"), r.error
    assert [a.state for a in r.attempts] == ["lost", "finished"]
    slot = task_slot(farm, ids[0])
    assert (slot["state"], slot["machine"], slot["owner"]) == ("claimed", f"honest-{tag}", "lab")
    farm.stop_daemon(f"honest-{tag}")
    still_sound(farm, farm.user_a, "lab-1", "lab", tmp_path)


def rogue_hw() -> dict:
    from rawpeer import HW
    return dict(HW)


def test_row10_other_users_slots_answer_as_unknown_and_names_are_per_user(farm, tmp_path):
    tid = queued_task(farm, farm.user_a, tmp_path)
    with RawPeer(farm.address, farm.user_a) as alice, RawPeer(farm.address, farm.user_b) as bob:
        # a task's slot is the hub's: its own user cannot alloc, claim, discard, count or meta it
        for req in ({"type": "credit_alloc", "slot": tid, "credits": 5}, *CREDIT_WRITES[1:]):
            reply = alice.request(dict(req, slot=tid))
            assert reply["type"] == "error" and reply["code"] == "task_slot", reply
        # user-b: user-a's task id answers exactly as a never-used id, for every request
        for req in ({"type": "credit_discard", "reason": "x"},
                    {"type": "credit_counters", "counters": {"cpu_seconds": 1e15}},
                    {"type": "credit_meta", "meta": {"a": "b"}},
                    {"type": "credit_claim", "machine": "bobs-pc", "credits": 7}):
            real = bob.request(dict(req, slot=tid))
            fake = bob.request(dict(req, slot="t-0000000000000000"))
            assert real["type"] == fake["type"] == "error" and real["code"] == fake["code"] == "unknown_slot"
            assert real["message"].replace(tid, "X") == fake["message"].replace("t-0000000000000000", "X")
        a1 = bob.request({"type": "credit_alloc", "slot": tid, "credits": 3})
        a2 = bob.request({"type": "credit_alloc", "slot": "t-0000000000000000", "credits": 3})
        assert a1["type"] == a2["type"] == "ok", (a1, a2)  # as for any free name: bob's own slot
        assert bob.request({"type": "credit_claim", "slot": tid, "machine": "bobs-pc"})["type"] == "credit_claimed"
        # squatting: user-b's "job-17" and user-a's "job-17" are two slots
        assert bob.request({"type": "credit_alloc", "slot": "job-17", "credits": 9})["type"] == "ok"
        assert alice.request({"type": "credit_alloc", "slot": "job-17", "credits": 4})["type"] == "ok"
        assert alice.request({"type": "credit_counters", "slot": "job-17", "counters": {"events": 5}})["type"] == "ok"
        claimed = alice.request({"type": "credit_claim", "slot": "job-17", "machine": "alices-pc"})
        assert (claimed["type"], claimed["credits"]) == ("credit_claimed", 4), claimed
        again = bob.request({"type": "credit_alloc", "slot": "job-17", "credits": 1})
        assert again["type"] == "error" and again["code"] == "slot_exists"  # bob's own, still there
        mine_b = {s["slot"]: s for s in bob.request({"type": "get_credit_slots"})["slots"]}
        mine_a = {s["slot"]: s for s in alice.request({"type": "get_credit_slots"})["slots"]}
    assert (mine_b["job-17"]["state"], mine_b["job-17"]["credits"]) == ("allocated", 9)
    assert (mine_a["job-17"]["state"], mine_a["job-17"]["counters"]) == ("claimed", {"events": 5})
    assert mine_a[tid]["state"] == "allocated" and mine_a[tid]["task_id"] == tid  # untouched by bob
    assert mine_b[tid]["task_id"] is None and mine_b[tid]["state"] == "claimed"
    still_sound(farm, farm.user_a, "lab-1", "lab", tmp_path)


# ------------------------------------------------------------ row 3: the line endpoint


def _hub_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "hub_server", "--port", "0", "--http-port", "0",
            "--state-dir", str(root / "state"), *args]


def _secret_file(root: Path, mode: int = 0o600) -> Path:
    f = root / "creditpiggy.secret"
    f.write_text(SECRET + "\n")
    os.chmod(f, mode)
    return f


class LineFarm:
    """A hub whose line endpoint (unix, tcp, udp) runs as user ``jobs`` with a secret."""

    def __init__(self, root: Path) -> None:
        self.cp_sock = str(root / "cp.sock")
        secret = _secret_file(root)
        self.cluster = LocalCluster(daemons=0, slots=2, state_dir=root / "farm", hub_args=[
            "--creditpiggy", f"unix:{self.cp_sock}", "--creditpiggy", "tcp:127.0.0.1:0",
            "--creditpiggy", "udp:127.0.0.1:0", "--creditpiggy-user", "jobs",
            "--creditpiggy-secret-file", str(secret)])
        self.cluster.add_daemon("lab-1", token=self.cluster.create_token("daemon", "lab"))
        self.user_a = self.cluster.create_token("client", "user-a")
        self.log = self.cluster.log_dir / "hub.log"
        text = self.log.read_text()
        self.tcp = _address(text, "tcp")
        self.udp = _address(text, "udp")

    def line(self, kind: str, text: str) -> bytes:
        data = text.encode()
        if kind == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(30)
                s.sendto(data, self.udp)
                return s.recvfrom(65536)[0]
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(self.cp_sock)
        else:
            s = socket.create_connection(self.tcp, timeout=30)
        with s:
            s.sendall(data)
            return _read_to_end(s)


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    f = LineFarm(tmp_path_factory.mktemp("credit-lines"))
    try:
        yield f
    finally:
        f.cluster.close()


def test_row3_tcp_and_udp_lines_need_the_secret(lines, tmp_path):
    c = lines.cluster
    before = admin_slots(c)
    for kind in ("tcp", "udp"):
        for line in (f"ALLOC,slot=free-{kind},credits=1000000",      # no secret: as before 0.3
                     f"SECRET=wrong,ALLOC,slot=free-{kind},credits=1000000",
                     f"SECRET={SECRET[:-1]},ALLOC,slot=free-{kind},credits=1000000",
                     f"ALLOC,slot=free-{kind},credits=1000000,SECRET={SECRET}"):  # first field only
            assert lines.line(kind, line) == b"ER", (kind, line)
    assert admin_slots(c) == before
    for kind in ("tcp", "udp"):
        assert lines.line(kind, f"SECRET={SECRET},ALLOC,slot=job-{kind},min=1,max=50") == b"OK"
        assert lines.line(kind, f"secret={SECRET},claim,slot=job-{kind},machine=vm-{kind},credits=20") == b"OK"
    # unix sockets keep file-permission trust: the plain CreditPiggy line works
    assert lines.line("unix", "ALLOC,slot=job-unix,credits=3") == b"OK"
    assert lines.line("unix", "CLAIM,slot=job-unix,machine=vm-unix") == b"OK"
    got = {s["slot"]: s for s in admin_slots(c) if s["user"] == "jobs"}
    assert {k: (v["state"], v["credits"]) for k, v in got.items()} == {
        "jobs/job-tcp": ("claimed", 20), "jobs/job-udp": ("claimed", 20), "jobs/job-unix": ("claimed", 3)}
    still_sound(c, lines.user_a, "lab-1", "lab", tmp_path)


def test_row3_the_line_user_sees_only_its_own_slots(lines, tmp_path):
    """With the right secret: DISCARD of user-a's task slot, COUNTERS cpu_seconds=-1e15,
    CLAIM of user-a's own slot -- ER, the log says unknown, nothing changes."""
    c = lines.cluster
    tid = queued_task(c, lines.user_a, tmp_path)
    with RawPeer(c.address, lines.user_a) as alice:
        assert alice.request({"type": "credit_alloc", "slot": "alice-job", "credits": 5})["type"] == "ok"
    before = admin_slots(c)
    s = f"SECRET={SECRET},"
    for kind, prefix in (("tcp", s), ("udp", s), ("unix", "")):
        for line in (f"DISCARD,slot={tid},reason=gone", f"COUNTERS,slot={tid},cpu_seconds=-1e15",
                     f"COUNTERS,slot={tid},cpu_seconds=1e15",
                     f"CLAIM,slot={tid},machine=m", f"META,slot={tid},a=b",
                     "CLAIM,slot=alice-job,machine=m,credits=5", "DISCARD,slot=alice-job",
                     "CLAIM,slot=user-a/alice-job,machine=m,credits=5"):
            assert lines.line(kind, prefix + line) == b"ER", (kind, line)
    assert admin_slots(c) == before
    log = lines.log.read_text()
    assert re.search(rf"creditpiggy .*: ER: unknown_slot: unknown slot '{tid}'", log), log[-3000:]
    assert re.search(r"creditpiggy .*: ER: unknown_slot: unknown slot 'alice-job'", log)
    assert task_slot(c, tid)["state"] == "allocated"
    still_sound(c, lines.user_a, "lab-1", "lab", tmp_path)


def _start(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_hub_cmd(root, *args), capture_output=True, text=True, timeout=60)


def test_row3_tcp_or_udp_without_a_secret_the_hub_refuses_to_start(tmp_path):
    for spec in ("tcp:127.0.0.1:0", "udp:127.0.0.1:0"):
        run = _start(tmp_path, "--creditpiggy", spec, "--creditpiggy-user", "jobs")
        assert run.returncode == 2, run
        assert "--creditpiggy-secret-file" in run.stderr, run.stderr
    loose = _secret_file(tmp_path, 0o644)
    run = _start(tmp_path, "--creditpiggy", "tcp:127.0.0.1:0", "--creditpiggy-secret-file", str(loose))
    assert run.returncode == 2 and "too open" in run.stderr and "chmod 600" in run.stderr, run.stderr
    empty = tmp_path / "empty.secret"
    empty.write_text("\n")
    os.chmod(empty, 0o600)
    run = _start(tmp_path, "--creditpiggy", "udp:127.0.0.1:0", "--creditpiggy-secret-file", str(empty))
    assert run.returncode == 2 and "empty" in run.stderr, run.stderr
    run = _start(tmp_path, "--creditpiggy", f"unix:{tmp_path / 'cp.sock'}", "--creditpiggy-user", "admin")
    assert run.returncode == 2 and "--creditpiggy-user" in run.stderr and "admin" in run.stderr, run.stderr
    from hub_server import auth
    store = auth.open_state_dir(tmp_path / "state")
    auth.create_token(store, "admin", "boss", "an admin user")
    store.close()
    run = _start(tmp_path, "--creditpiggy", f"unix:{tmp_path / 'cp.sock'}", "--creditpiggy-user", "boss")
    assert run.returncode == 2 and "--creditpiggy-user boss" in run.stderr and "admin token" in run.stderr

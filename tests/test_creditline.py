"""CreditPiggy's line protocol without a hub: parsing, replies, endpoints, socket files."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import stat

import pytest

from hub_server import creditline as cl
from hub_server import protocol as p
from hub_server.creditserver import Endpoint, parse_endpoint
from hub_server.link import normalize_url
from hub_server.unixsock import ListenError, bind_unix


def parse(line: "bytes | str", rid: int = 7):
    return cl.parse(line.encode() if isinstance(line, str) else line, rid)


def refused(line: "bytes | str") -> str:
    with pytest.raises(cl.LineError) as info:
        parse(line)
    return str(info.value)


# ------------------------------------------------------------ every command


def test_alloc_range_fixed_and_expire_in_minutes():
    assert parse("ALLOC,slot=job-1,min=2,max=40,expire=90") == p.CreditAlloc(
        id=7, slot="job-1", min=2, max=40, expire=5400.0)
    assert parse("ALLOC,slot=job-2,credits=12") == p.CreditAlloc(id=7, slot="job-2", credits=12)
    assert parse("ALLOC,slot=job-3,expire=0.5") == p.CreditAlloc(id=7, slot="job-3", expire=30.0)
    assert parse("ALLOC,slot=job-4") == p.CreditAlloc(id=7, slot="job-4")


def test_claim_with_and_without_credits():
    assert parse("CLAIM,slot=s1,machine=vm-17.cern.ch") == p.CreditClaim(id=7, slot="s1", machine="vm-17.cern.ch")
    assert parse("CLAIM,slot=s1,machine=m,credits=5") == p.CreditClaim(id=7, slot="s1", machine="m", credits=5)
    # the daemon's own comment spells it credit=
    assert parse("CLAIM,slot=s1,machine=m,credit=5") == p.CreditClaim(id=7, slot="s1", machine="m", credits=5)


def test_discard_with_and_without_reason():
    assert parse("DISCARD,slot=s1") == p.CreditDiscard(id=7, slot="s1")
    assert parse("DISCARD,slot=s1,reason=lost") == p.CreditDiscard(id=7, slot="s1", reason="lost")


def test_counters_are_numbers_and_meta_are_text():
    assert parse("COUNTERS,slot=s1,events=1000,errors=0,ratio=0.25") == p.CreditCounters(
        id=7, slot="s1", counters={"events": 1000, "errors": 0, "ratio": 0.25})
    msg = parse("META,slot=s1,generator=pythia 8.2,tune=A14")
    assert msg == p.CreditMeta(id=7, slot="s1", meta={"generator": "pythia 8.2", "tune": "A14"})
    assert isinstance(parse("COUNTERS,slot=s1,n=3").counters["n"], int)


def test_the_creditpiggy_librarys_own_lines():
    """What its Python library sends: lower-case command, no line end, fields from a dict in any order."""
    assert parse(b"alloc,max=10,slot=abc,min=1") == p.CreditAlloc(id=7, slot="abc", min=1, max=10)
    assert parse(b"claim,machine=m1,slot=abc") == p.CreditClaim(id=7, slot="abc", machine="m1")
    assert parse(b"counters,b=2,slot=abc,a=1") == p.CreditCounters(id=7, slot="abc", counters={"b": 2, "a": 1})
    # nc and friends end the line; a CRLF or stray blanks around it are fine
    assert parse(b"  Discard,slot=abc,reason=invalid\r\n") == p.CreditDiscard(id=7, slot="abc", reason="invalid")


def test_a_secret_opens_the_line_where_one_is_needed():
    """Issue 18 row 3: over tcp/udp the first field is SECRET=<secret>; the
    error never echoes what was given."""
    line = b"SECRET=k3y-abcdef,ALLOC,slot=a,credits=3"
    assert cl.parse(line, 1, secret="k3y-abcdef", need_secret=True) == p.CreditAlloc(id=1, slot="a", credits=3)
    assert cl.parse(b"secret=k3y-abcdef,claim,slot=a,machine=m", 1, secret="k3y-abcdef",
                    need_secret=True) == p.CreditClaim(id=1, slot="a", machine="m")
    for bad, words in [(b"ALLOC,slot=a,credits=3", "no secret"),
                       (b"SECRET=k3y-abcdeX,ALLOC,slot=a", "wrong secret"),
                       (b"SECRET=k3y-abcde,ALLOC,slot=a", "wrong secret"),
                       (b"SECRET=,ALLOC,slot=a", "wrong secret"),
                       (b"ALLOC,slot=a,SECRET=k3y-abcdef", "no secret"),  # the first field only
                       (b"SECRET=k3y-abcdef", "no command")]:
        with pytest.raises(cl.LineError, match=words) as info:
            cl.parse(bad, 1, secret="k3y-abcdef", need_secret=True)
        assert "k3y" not in str(info.value)
    # a unix socket needs none; one given is checked all the same
    assert cl.parse(b"ALLOC,slot=a", 1, secret="k3y-abcdef") == p.CreditAlloc(id=1, slot="a")
    assert cl.parse(b"SECRET=k3y-abcdef,ALLOC,slot=a", 1, secret="k3y-abcdef") == p.CreditAlloc(id=1, slot="a")
    with pytest.raises(cl.LineError, match="wrong secret"):
        cl.parse(b"SECRET=nope,ALLOC,slot=a", 1, secret="k3y-abcdef")
    with pytest.raises(cl.LineError, match="--creditpiggy-secret-file"):
        cl.parse(b"SECRET=x,ALLOC,slot=a", 1)


def test_request_id_is_the_one_given():
    assert parse("DISCARD,slot=x", rid=123456).id == 123456


# ------------------------------------------------------------ refusals


def test_unknown_command():
    assert "unknown command 'BOGUS'" in refused("BOGUS,slot=1")
    assert "unknown command" in refused("LINK,slot=1,machine=m")
    assert "unknown command" in refused("slot=1")


@pytest.mark.parametrize("command", ["ALLOC", "CLAIM,machine=m", "DISCARD", "COUNTERS,a=1", "META,a=b"])
def test_missing_slot(command):
    assert "missing 'slot'" in refused(command)


def test_claim_needs_a_machine():
    assert "missing 'machine'" in refused("CLAIM,slot=1,credits=3")


@pytest.mark.parametrize("line, words", [
    ("ALLOC,slot=1,credits=ten", "not an integer"),
    ("ALLOC,slot=1,credits=1.5", "not an integer"),
    ("ALLOC,slot=1,credits=-1", ">= 0"),
    ("ALLOC,slot=1,credits=+3", "not an integer"),
    ("ALLOC,slot=1,credits=1_000", "not an integer"),
    ("ALLOC,slot=1,credits=10000000000000", "<= 1000000000000"),
    ("ALLOC,slot=1,min=0x10", "not an integer"),
    ("ALLOC,slot=1,max=٣", "not an integer"),  # unicode digits are not digits here
    ("ALLOC,slot=1,expire=0", "positive"),
    ("ALLOC,slot=1,expire=-5", "positive"),
    ("ALLOC,slot=1,expire=soon", "not a number"),
    ("ALLOC,slot=1,expire=99999999", "expire"),
    ("CLAIM,slot=1,machine=m,credits=1e3", "not an integer"),
    ("COUNTERS,slot=1,events=many", "not a number"),
    ("COUNTERS,slot=1,events=nan", "not a number"),
    ("COUNTERS,slot=1,events=inf", "not a number"),
    ("COUNTERS,slot=1,events=1e400", "not a finite number"),
    ("COUNTERS,slot=1,events=1e300", "counter 'events'"),
    ("COUNTERS,slot=1,cpu_seconds=-1e15", "counter 'cpu_seconds'"),  # issue 18 row 3
    ("COUNTERS,slot=1,events=-1", "counter 'events'"),
])
def test_bad_numbers_name_the_field(line, words):
    assert words in refused(line)


@pytest.mark.parametrize("line, words", [
    ("ALLOC,slot=1,credits=3,credits=4", "given twice"),
    ("ALLOC,slot=1,slot=2", "given twice"),
    ("CLAIM,slot=1,machine=m,credit=1,credits=1", "not both"),
    ("ALLOC,slot=1,bonus=3", "unknown key 'bonus'"),
    ("DISCARD,slot=1,machine=m", "unknown key 'machine'"),
    ("ALLOC,slot=1,credits", "not key=value"),
    ("ALLOC,slot=1,=3", "no key"),
    ("ALLOC,slot=", "empty value"),
    ("ALLOC,slot=1,", "not key=value"),
    ("COUNTERS,slot=1,9lives=1", "counter name '9lives'"),
    ("META,slot=1,a b=c", "meta name 'a b'"),
    ("DISCARD,slot=1,reason=" + "r" * 65, "reason"),
    ("ALLOC,slot=" + "s" * 129, "slot"),
    ("CLAIM,slot=1,machine=" + "m" * 129, "machine"),
    ("META,slot=1,k=" + "v" * 4090, "exceeds the limit"),
])
def test_malformed_fields(line, words):
    assert words in refused(line)


def test_garbage_bytes():
    assert "not UTF-8" in refused(b"ALLOC,slot=\xff\xfe")
    assert "control character" in refused(b"ALLOC,slot=a\x00b")
    assert "control character" in refused(b"\x1b[2JALLOC,slot=1")
    assert "empty line" in refused(b"")
    assert "empty line" in refused(b" \r\n")
    assert "one command" in refused(b"ALLOC,slot=1\nALLOC,slot=2\n")
    rng = random.Random(10)
    for _ in range(2000):  # nothing but a LineError (or a valid request) ever comes out
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        try:
            cl.parse(data, 1)
        except cl.LineError:
            pass


def test_over_long_lines_and_too_many_fields():
    assert f"limit of {cl.MAX_LINE_BYTES}" in refused(b"ALLOC,slot=1," + b"x" * cl.MAX_LINE_BYTES)
    many = "COUNTERS,slot=1," + ",".join(f"c{i}=1" for i in range(cl.MAX_FIELDS))
    assert f"limit of {cl.MAX_FIELDS}" in refused(many)
    # at the protocol's limit of 64 counters: accepted; one more: refused by name
    assert len(parse("COUNTERS,slot=1," + ",".join(f"c{i}=1" for i in range(64))).counters) == 64
    assert "meta" in refused("META,slot=1," + ",".join(f"m{i}=v" for i in range(65)))


def test_replies_are_two_bytes_without_a_line_end():
    """The CreditPiggy library reads recv(4) and compares it with "OK"."""
    assert cl.reply(p.Ok(id=1)) == b"OK"
    assert cl.reply(p.CreditClaimed(id=1, slot="s", credits=3, owner=None)) == b"OK"
    assert cl.reply(p.Error(id=1, code="slot_not_allocated", message="claimed")) == b"ER"
    assert cl.reply(object()) == b"ER"


# ------------------------------------------------------------ endpoints


def test_endpoints():
    assert parse_endpoint("unix:/run/cp.sock") == Endpoint("unix", path="/run/cp.sock")
    assert parse_endpoint("unix:///run/cp.sock") == Endpoint("unix", path="/run/cp.sock")
    assert parse_endpoint("tcp:127.0.0.1:9999") == Endpoint("tcp", host="127.0.0.1", port=9999)
    assert parse_endpoint("udp:localhost:0") == Endpoint("udp", host="localhost", port=0)
    assert parse_endpoint("tcp:[::1]:9999") == Endpoint("tcp", host="::1", port=9999)
    assert str(parse_endpoint("tcp:[::1]:9999")) == "tcp:[::1]:9999"
    assert parse_endpoint("tcp:127.9.9.9:1").host == "127.9.9.9"
    for bad, words in [("unix:run/cp.sock", "absolute"), ("http://x", "expected unix:PATH"),
                       ("tcp:127.0.0.1", "HOST:PORT"), ("tcp:127.0.0.1:70000", "0-65535"),
                       ("udp:127.0.0.1:-1", "0-65535"), ("/run/cp.sock", "expected unix:PATH")]:
        with pytest.raises(ValueError, match=words):
            parse_endpoint(bad)


@pytest.mark.parametrize("spec", ["tcp:0.0.0.0:9999", "udp:10.1.2.3:9999", "tcp:[::]:9999",
                                  "tcp:hub.example.org:9999"])
def test_non_loopback_binds_need_the_allow_flag(spec):
    with pytest.raises(ValueError, match="not a loopback address.*--creditpiggy-allow-remote"):
        parse_endpoint(spec)
    assert parse_endpoint(spec, allow_remote=True).port == 9999


def test_hub_urls_for_the_unix_socket():
    assert normalize_url("unix:/tmp/hub.sock") == "unix:/tmp/hub.sock"
    assert normalize_url("unix:///tmp/hub.sock") == "unix:/tmp/hub.sock"
    assert normalize_url("127.0.0.1:9") == "ws://127.0.0.1:9"
    for bad in ("unix:tmp/hub.sock", "unix://host/tmp/hub.sock", "unix:"):
        with pytest.raises(ValueError, match="absolute"):
            normalize_url(bad)


# ------------------------------------------------------------ socket files


def test_socket_file_is_private_from_birth_and_mode_is_applied(tmp_path):
    f = bind_unix(tmp_path / "cp.sock", 0o600)
    try:
        assert stat.S_ISSOCK(os.lstat(f.path).st_mode)
        assert stat.S_IMODE(os.lstat(f.path).st_mode) == 0o600
    finally:
        f.remove()
    assert not os.path.exists(f.path)
    g = bind_unix(tmp_path / "hub.sock", 0o660)
    try:
        assert stat.S_IMODE(os.lstat(g.path).st_mode) == 0o660
    finally:
        g.remove()


def test_stale_socket_replaced_live_one_and_other_files_refused(tmp_path):
    path = str(tmp_path / "cp.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays: a crashed process's socket
    f = bind_unix(path, 0o600)
    f.sock.listen()
    try:
        with pytest.raises(ListenError, match="another process is listening"):
            bind_unix(path, 0o600)
        assert os.path.exists(path)  # not deleted from under its owner
    finally:
        f.remove()
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    with pytest.raises(ListenError, match="not a socket"):
        bind_unix(plain, 0o600)
    assert plain.read_text() == "keep me"
    with pytest.raises(ListenError, match="absolute"):
        bind_unix("relative.sock", 0o600)
    with pytest.raises(ListenError, match="longer than"):
        bind_unix("/" + "d" * 120 + "/x.sock", 0o600)


def test_remove_leaves_a_newer_socket_alone(tmp_path):
    path = str(tmp_path / "cp.sock")
    old = bind_unix(path, 0o600)
    old.sock.close()
    new = bind_unix(path, 0o600)  # the old one is stale now: replaced
    new.sock.listen()
    try:
        old.remove()  # the first hub shutting down late must not delete the second's socket
        assert os.path.exists(path)
    finally:
        new.remove()
    assert not os.path.exists(path)


# ------------------------------------------------------------ the edge, over a stand-in core


class _Port:
    """Stands in for HubServer's local-peer port: answers like the core would."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.peers: dict[int, object] = {}
        self.got: list = []
        self._ids = iter(range(1, 1000))

    def attach(self, peer, who):
        pid = next(self._ids)
        self.peers[pid] = (peer, who)
        return pid

    def submit(self, pid, msg):
        self.got.append((pid, msg))
        peer = self.peers[pid][0]
        reply = self.answer(msg)
        if reply is not None:
            asyncio.get_running_loop().call_soon(peer.post, reply)

    def detach(self, pid):
        del self.peers[pid]


def _core_like(msg):
    if isinstance(msg, p.CreditClaim):
        return p.CreditClaimed(id=msg.id, slot=msg.slot, credits=1)
    if msg.slot == "silent":
        return None
    if msg.slot == "bad":
        return p.Error(id=msg.id, code="unknown_slot", message="no slot 'bad'")
    return p.Ok(id=msg.id)


async def _ask(server, path, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    got = await reader.read()
    writer.close()
    return got


def test_edge_turns_core_replies_into_OK_ER_and_acts_as_the_configured_user(tmp_path):
    from hub_server.creditserver import CreditLineServer

    async def main():
        port = _Port(_core_like)
        path = str(tmp_path / "cp.sock")
        server = CreditLineServer(port, [Endpoint("unix", path=path), Endpoint("udp", host="127.0.0.1")],
                                  user="jobs", reply_timeout=0.5, secret="k3y-for-udp")
        await server.start()
        try:
            (pid, (_, who)), = port.peers.items()
            assert (who.role, who.user) == ("client", "jobs")  # a client user, never an admin
            assert await _ask(server, path, b"alloc,slot=a,credits=3") == b"OK"
            assert await _ask(server, path, b"CLAIM,slot=a,machine=m\n") == b"OK"
            assert await _ask(server, path, b"DISCARD,slot=bad") == b"ER"
            assert await _ask(server, path, b"nonsense") == b"ER"  # never reaches the core
            assert await _ask(server, path, b"META,slot=silent,a=b") == b"ER"  # no answer in time
            assert [type(m).__name__ for _, m in port.got] == ["CreditAlloc", "CreditClaim", "CreditDiscard",
                                                                "CreditMeta"]
            assert {q for q, _ in port.got} == {pid} and len({m.id for _, m in port.got}) == 4
            with pytest.raises(ValueError, match="--creditpiggy-secret-file"):
                CreditLineServer(port, [Endpoint("tcp", host="127.0.0.1")], user="jobs")
            # over UDP, the answer is a datagram to the sender
            udp_port = int(server.bound[1].rsplit(":", 1)[1])
            loop = asyncio.get_running_loop()
            got = loop.create_future()

            class Client(asyncio.DatagramProtocol):
                def datagram_received(self, data, addr):
                    got.set_result(data)

            transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", udp_port))
            transport.sendto(b"DISCARD,slot=x")  # no secret: refused before the core
            assert await asyncio.wait_for(got, 10) == b"ER"
            got = loop.create_future()
            transport.sendto(b"SECRET=k3y-for-udp,DISCARD,slot=x")
            assert await asyncio.wait_for(got, 10) == b"OK"
            transport.close()
            # the core dropping the pseudo-peer: what waits gets ER, the next command a fresh peer
            old_peer = port.peers[pid][0]
            old_peer.close(1008, "dropped")
            assert pid not in port.peers and len(port.peers) == 1
            assert await _ask(server, path, b"DISCARD,slot=y") == b"OK"
        finally:
            await server.close()
        assert port.peers == {} and not os.path.exists(path)

    asyncio.run(main())

"""Bad input gets a clear error naming the problem, and the hub keeps serving."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.asyncio.client import connect

from hub_server import protocol as p
from hwf_jupyter import (
    ConnectError, Data, Hub, LocalCluster, RemoteError, Stage, Task, TaskError, dispatch_sync,
)


def test_missing_data_path():
    with pytest.raises(TaskError, match="no/such/file.c.*does not exist"):
        Task(Stage("s", data=Data("no/such/file.c", "main.c"), cmd="true"))


@pytest.mark.parametrize("name,why", [("../evil.c", r"climbs out"), ("/etc/passwd", "absolute"),
                                      ("a/../../b", "climbs out")])
def test_data_filename_escape_refused(tmp_path, name, why):
    f = tmp_path / "x.c"
    f.write_text("x")
    with pytest.raises(TaskError, match=why):
        Data(f, name)


def test_unknown_hardware_key_and_bad_ram():
    with pytest.raises(TaskError, match="unknown hardware key 'vram'"):
        Task(Stage("s", cmd="true"), hardware={"vram": "8GB"})
    with pytest.raises(TaskError, match="cannot parse 'sixteen gigs'"):
        Task(Stage("s", cmd="true"), hardware={"ram": "sixteen gigs"})


def test_stage_and_task_shape_errors():
    with pytest.raises(TaskError, match="no commands"):
        Stage("s", cmd=[])
    with pytest.raises(TaskError, match="at least one Stage"):
        Task()
    with pytest.raises(TaskError, match="unique"):
        Task(Stage("s", cmd="a"), Stage("s", cmd="b"))
    with pytest.raises(TaskError, match="artifact '../x'"):
        from hwf_jupyter import Artifacts
        Artifacts("../x")


def test_wrong_and_missing_token(cluster):
    with pytest.raises(ConnectError, match="invalid token"):
        Hub(cluster.address, token="nope").get_hardware_pool_sync()
    with pytest.raises(ConnectError, match="missing token"):
        Hub(cluster.address, token="").get_hardware_pool_sync()


def test_hub_down_names_the_url():
    with pytest.raises(ConnectError, match="cannot reach hub at ws://127.0.0.1:9"):
        Hub("127.0.0.1:9", token="t", connect_timeout=2).get_hardware_pool_sync()


async def _raw(cluster, token, frames):
    """Send raw frames after hello; return every reply decoded as JSON."""
    async with connect(cluster.address, additional_headers={"Authorization": f"Bearer {token}"},
                       proxy=None) as ws:
        await ws.send(p.encode(p.Hello(version=p.PROTOCOL_VERSION)).decode())
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome"
        replies = []
        for f in frames:
            await ws.send(f)
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
        return replies


def test_malformed_and_unknown_messages_get_errors_and_hub_keeps_serving(cluster):
    frames = [
        "{not json",
        json.dumps({"type": "launch_missiles", "id": 5}),
        json.dumps({"type": "get_results", "id": 6}),
        json.dumps({"type": "get_pool", "id": 7, "extra": 1}),
        json.dumps({"type": "register", "id": 8, "name": "x", "hardware": {}, "slots": 1}),
        json.dumps({"type": "get_results", "id": 9, "task_ids": ["t-doesnotexist"]}),
        json.dumps({"type": "get_pool", "id": 10}),
    ]
    r = asyncio.run(_raw(cluster, cluster.token, frames))
    assert r[0]["type"] == "error" and "malformed JSON" in r[0]["message"]
    assert r[1]["type"] == "error" and "unknown message type 'launch_missiles'" in r[1]["message"]
    assert r[1]["id"] == 5
    assert r[2]["type"] == "error" and "task_ids" in r[2]["message"] and r[2]["id"] == 6
    assert r[3]["type"] == "pool"  # a field from a newer peer is ignored, not refused
    assert r[4]["type"] == "error" and r[4]["code"] == "forbidden"
    assert r[5]["type"] == "error" and "t-doesnotexist" in r[5]["message"]
    assert r[6]["type"] == "pool" and len(r[6]["machines"]) >= 2


def test_bad_hardware_on_the_wire_is_refused_by_hub(cluster):
    spec = {"stages": [{"name": "s", "cmds": ["true"]}], "hardware": {"ram": "lots"}}
    r = asyncio.run(_raw(cluster, cluster.token, [json.dumps({"type": "submit", "id": 1, "tasks": [spec]})]))
    assert r[0]["type"] == "error" and r[0]["code"] == "bad_hardware" and "'lots'" in r[0]["message"]
    spec = {"stages": [{"name": "s", "cmds": ["true"], "data": [
        {"filename": "../x", "sha256": "0" * 64, "size": 1}]}]}
    r = asyncio.run(_raw(cluster, cluster.token, [json.dumps({"type": "submit", "id": 2, "tasks": [spec]})]))
    assert r[0]["code"] == "bad_path" and "climbs out" in r[0]["message"]


def test_file_above_size_limit_is_refused(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"z" * 5000)
    with LocalCluster(daemons=1, max_file_bytes=4096, state_dir=tmp_path / "c") as c:
        hub = c.hub()
        with pytest.raises(RemoteError, match=r"big.bin.*5000 bytes.*max_file_bytes=4096"):
            dispatch_sync(Task(Stage("s", data=Data(big), cmd="true")), hub)
        # a raw oversized blob_put is refused by the hub itself, and nothing is lost
        ok = dispatch_sync(Task(Stage("s", cmd="echo fine")), hub)
        r = asyncio.run(_raw(c, c.token, [json.dumps(
            {"type": "blob_put", "id": 3, "sha256": "a" * 64, "size": 10**6})]))
        assert r[0]["code"] == "too_large" and "max_file_bytes=4096" in r[0]["message"]
        assert hub.get_result_sync(ok, wait=True)[0].output == "fine\n"
        hub.close_sync()


def test_unknown_session_and_bad_credits(hub):
    with pytest.raises(RemoteError, match="unknown session 's-nope'"):
        dispatch_sync(Task(Stage("s", cmd="true")), hub, session="s-nope")
    with pytest.raises(TaskError, match=r"min <= max, got \(5, 2\)"):
        dispatch_sync(Task(Stage("s", cmd="true")), hub, credits=(5, 2))


def test_protocol_version_mismatch_refused(cluster):
    async def go():
        async with connect(cluster.address, additional_headers={"Authorization": f"Bearer {cluster.token}"},
                           proxy=None) as ws:
            await ws.send(json.dumps({"type": "hello", "version": 0}))
            return json.loads(await ws.recv())

    reply = asyncio.run(go())
    assert reply["code"] == "version" and "protocol version 0 is not supported" in reply["message"]

"""Hub operations a farm admin and a daemon go through: tokens, roles, restarts, big files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from hub_server import auth
from hwf_jupyter import (
    Artifacts, ConnectError, Data, Hub, LocalCluster, RemoteError, Stage, Task, dispatch_sync,
)


def test_admin_token_file_is_private(cluster):
    f = cluster.state_dir / auth.ADMIN_TOKEN_FILE
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert f.read_text().strip() == cluster.admin_token
    # the store keeps hashes only
    db = (cluster.state_dir / auth.DB_FILE).read_bytes()
    assert cluster.admin_token.encode() not in db and cluster.token.encode() not in db


def test_token_cli_creates_a_working_client_token(cluster):
    out = subprocess.run(
        [sys.executable, "-m", "hwf_jupyter.cli", "token", "create", "--role", "client",
         "--label", "ci", "--state-dir", str(cluster.state_dir)],
        capture_output=True, text=True, check=True,
    )
    token = out.stdout.strip()
    hub = Hub(cluster.address, token=token)
    assert len(hub.get_hardware_pool_sync()) >= 2
    hub.close_sync()
    listing = subprocess.run(
        [sys.executable, "-m", "hwf_jupyter.cli", "token", "list", "--state-dir", str(cluster.state_dir)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "client" in listing and "ci" in listing and token not in listing


def test_daemon_token_cannot_submit(cluster):
    hub = Hub(cluster.address, token=cluster.daemon_token)
    with pytest.raises(RemoteError, match="a daemon may not send 'submit'"):
        dispatch_sync(Task(Stage("s", cmd="true")), hub)
    hub.close_sync()


def test_admin_token_can_do_client_work(cluster):
    hub = Hub(cluster.address, token=cluster.admin_token)
    ids = dispatch_sync(Task(Stage("s", cmd="echo admin")), hub)
    assert hub.get_result_sync(ids, wait=True)[0].output == "admin\n"
    hub.close_sync()


def test_token_from_environment(cluster, monkeypatch):
    monkeypatch.setenv("HWF_TOKEN", cluster.token)
    hub = Hub(cluster.address)
    assert len(hub.get_hardware_pool_sync()) >= 2
    hub.close_sync()


def test_multi_chunk_data_and_artifact_round_trip(hub, in_tmp):
    payload = os.urandom(3 * 2**20 + 12345)  # > 3 chunks of 1 MiB
    src = in_tmp / "big.bin"
    src.write_bytes(payload)
    task = Task(
        Stage("copy", data=Data(src, "in/big.bin"), cmd=["cp in/big.bin out.bin", "sha256sum out.bin"]),
        Artifacts("*.bin"),
    )
    r = hub.get_result_sync(dispatch_sync(task, hub), wait=True)[0]
    assert r.ok, r.error
    digest = hashlib.sha256(payload).hexdigest()
    assert r.output.split()[0] == digest
    (art,) = r.artifacts
    assert art.name == "out.bin" and art.size == len(payload)
    assert art.path.read_bytes() == payload


def test_hub_restart_keeps_results_and_daemons_reconnect(tmp_path):
    with LocalCluster(daemons=2, state_dir=tmp_path / "c") as c:
        hub = c.hub()
        before = dispatch_sync(Task(Stage("s", cmd="echo before")), hub, repeat=3)
        assert all(r.ok for r in hub.get_result_sync(before, wait=True))
        c.hub_process.kill()
        c.hub_process.wait()
        c.restart_hub()
        c.wait_for_daemons(2, timeout=30)  # they come back by themselves, with backoff
        old = hub.get_result_sync(before)  # the client reconnects by itself too
        assert [r.output for r in old] == ["before\n"] * 3
        after = dispatch_sync(Task(Stage("s", cmd="echo after")), hub, repeat=4)
        res = hub.get_result_sync(after, wait=True, timeout=30)
        assert [r.output for r in res] == ["after\n"] * 4
        hub.close_sync()


def test_api_works_after_nest_asyncio_apply(cluster):
    script = textwrap.dedent(f"""
        import asyncio, nest_asyncio
        nest_asyncio.apply()
        from hwf_jupyter import Hub, Stage, Task, dispatch, dispatch_sync
        hub = Hub({cluster.address!r}, token={cluster.token!r})
        ids = dispatch_sync(Task(Stage("s", cmd="echo sync")), hub)
        print(hub.get_result_sync(ids, wait=True)[0].output.strip())
        async def main():
            ids = await dispatch(Task(Stage("s", cmd="echo async")), hub)
            return (await hub.get_result(ids, wait=True))[0].output.strip()
        print(asyncio.run(main()))
        # nested: a sync call made while a loop runs (what a patched kernel allows)
        async def nested():
            return hub.get_result_sync(dispatch_sync(Task(Stage("s", cmd="echo nested")), hub), wait=True)
        print(asyncio.get_event_loop().run_until_complete(nested())[0].output.strip())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sync", "async", "nested"]


def test_client_in_a_running_loop_with_sync_call_from_thread(cluster):
    """A sync twin inside a coroutine would deadlock a naive client; ours runs I/O elsewhere."""

    async def main():
        hub = cluster.hub()
        ids = await asyncio.to_thread(dispatch_sync, Task(Stage("s", cmd="echo x")), hub)
        res = hub.get_result_sync(ids, wait=True)  # blocks this loop briefly, but completes
        await hub.close()
        return res

    assert asyncio.run(main())[0].output == "x\n"


def test_hello_negotiates_the_protocol_version(cluster, tmp_path):
    """A protocol-1 daemon still gets work (one ``assign`` per task); a newer
    peer gets the hub's newest version; a too-old one a clear refusal."""
    import sys as _sys
    _sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from rawpeer import RawPeer

    from hub_server import protocol as p

    with RawPeer(cluster.address, cluster.admin_token, version=99) as newer:
        assert newer.welcome["version"] == p.PROTOCOL_VERSION
    old_daemon_token = cluster.create_token("daemon", cluster.user)
    hub = cluster.hub(artifacts_dir=tmp_path)
    with RawPeer(cluster.address, old_daemon_token, version=1) as old:
        assert old.welcome["version"] == 1
        assert old.register("protocol-1-box")["type"] == "registered"
        ids = dispatch_sync(Task(Stage("s", cmd="true"), hardware={"daemon": "protocol-1-box"}), hub, repeat=2)
        got = []
        for _ in range(2):  # one slot: the next assign comes once the first is done
            tid = old.wait_push("assign")["task_id"]
            got.append(tid)
            assert old.request({"type": "task_done", "task_id": tid, "attempt": 1,
                                "outcome": {"status": "finished", "exit_code": 0}})["type"] == "ok"
        assert sorted(got) == sorted(ids)
    assert [r.status for r in hub.get_result_sync(list(ids), wait=True)] == ["finished", "finished"]
    hub.close_sync()
    from websockets.sync.client import connect
    with connect(cluster.address, additional_headers={"Authorization": f"Bearer {cluster.token}"},
                 proxy=None) as ws:
        ws.send('{"type": "hello", "version": 0}')
        import json
        err = json.loads(ws.recv(timeout=5))
        assert err["code"] == "version" and "protocol version 0 is not supported (hub speaks 1 to 2)" in err["message"]

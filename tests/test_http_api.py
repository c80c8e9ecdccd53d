"""The Manager HTTP API over real HTTP against a real hub and daemons:
status codes, shapes, tenancy, roles, bad input (never a 500)."""

from __future__ import annotations

import io
import json
import time
import zipfile

import pytest
import requests

from hwf_jupyter import LocalCluster
from waiting import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    with LocalCluster(daemons=1, slots=2, state_dir=root,
                      hub_args=["--http-trust", "127.0.0.0/8=render"]) as c:
        yield c


def h(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def alice(farm):
    return h(farm.create_token("client", "alice"))


@pytest.fixture(scope="module")
def bob(farm):
    return h(farm.create_token("client", "bob"))


def url(farm, path):
    return farm.http_url + path


def shell_job(commands, **extra):
    return {"type": "shell", "settings": {"commands": commands}, **extra}


def test_post_get_list_and_the_seed_fields(farm, alice):
    r = requests.post(url(farm, "/tasks"), json=shell_job(["echo hi"], priority=5, task_id="77"), headers=alice)
    assert r.status_code == 202, r.text
    task = r.json()
    for field in ("id", "worker_id", "priority", "status", "frame_start", "frame_end", "frame_current", "format"):
        assert field in task
    assert task["priority"] == 5 and task["task_id"] == "77" and task["user"] == "alice"
    tid = task["id"]
    def finished():
        t = requests.get(url(farm, f"/tasks/{tid}"), headers=alice).json()
        return t if t["status"] == "finished" else None

    done = wait_until(finished, timeout=60, what="finished")
    assert done["stages"][0]["commands"][0]["stdout_tail"] == "hi\n" and done["worker_id"] == "daemon-1"
    assert requests.get(url(farm, "/tasks/77"), headers=alice).json()["id"] == tid, "found by the caller's own id"
    listed = requests.get(url(farm, "/tasks?status=finished&limit=5"), headers=alice).json()
    assert tid in [t["id"] for t in listed["tasks"]] and listed["limit"] == 5


def test_another_user_gets_404_for_my_task_and_sees_none_of_mine(farm, alice, bob):
    tid = requests.post(url(farm, "/tasks"), json=shell_job(["sleep 30"]), headers=alice).json()["id"]
    for method in ("get", "delete"):
        r = getattr(requests, method)(url(farm, f"/tasks/{tid}"), headers=bob)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = requests.patch(url(farm, f"/tasks/{tid}"), json={"status": "cancelled"}, headers=bob)
    assert r.status_code == 404
    assert all(t["user"] == "bob" for t in requests.get(url(farm, "/tasks"), headers=bob).json()["tasks"])
    assert requests.get(url(farm, "/tasks?user=alice"), headers=bob).json()["total"] == 0
    # still running for alice: bob's attempts changed nothing
    assert requests.get(url(farm, f"/tasks/{tid}"), headers=alice).json()["status"] in ("queued", "assigned", "running")
    r = requests.delete(url(farm, f"/tasks/{tid}"), headers=alice)
    assert r.status_code == 202 and "frame_current" in r.json()
    assert wait_until(lambda: requests.get(url(farm, f"/tasks/{tid}"), headers=alice).json()["status"] == "cancelled",
                      timeout=30, what="cancelled")
    assert tid not in [t["id"] for t in requests.get(url(farm, "/tasks"), headers=alice).json()["tasks"]], "hidden"


def test_priority_only_while_queued_and_cancel_by_patch(farm, alice):
    admin = h(farm.admin_token)
    assert requests.patch(url(farm, "/workers/daemon-1"), json={"status": "disabled"}, headers=admin).status_code == 204
    try:
        tid = requests.post(url(farm, "/tasks"), json=shell_job(["true"]), headers=alice).json()["id"]
        assert requests.patch(url(farm, f"/tasks/{tid}"), json={"priority": 9}, headers=alice).status_code == 204
        task = requests.get(url(farm, f"/tasks/{tid}"), headers=alice).json()
        assert task["priority"] == 9 and task["status"] == "queued"
        assert requests.patch(url(farm, f"/tasks/{tid}"), data={"status": "cancelled"}, headers=alice).status_code == 204
        r = requests.patch(url(farm, f"/tasks/{tid}"), json={"priority": 1}, headers=alice)
        assert r.status_code == 409 and "queued" in r.json()["message"]
    finally:
        requests.patch(url(farm, "/workers/daemon-1"), json={"status": "enabled"}, headers=admin)


def test_only_an_admin_disables_a_worker_and_a_disabled_worker_gets_no_new_tasks(farm, alice):
    admin = h(farm.admin_token)
    r = requests.patch(url(farm, "/workers/daemon-1"), json={"status": "disabled"}, headers=alice)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert requests.patch(url(farm, "/workers/daemon-1"), json={"status": "disabled"}, headers=admin).status_code == 204
    try:
        workers = requests.get(url(farm, "/workers"), headers=alice).json()
        assert workers["daemon-1"]["status"] == "disabled" and workers["daemon-1"]["connection"] == "online"
        tid = requests.post(url(farm, "/tasks"), json=shell_job(["true"]), headers=alice).json()["id"]
        time.sleep(1.0)
        assert requests.get(url(farm, f"/tasks/{tid}"), headers=alice).json()["status"] == "queued"
    finally:
        assert requests.patch(url(farm, "/workers/daemon-1"), json={"status": "enabled"}, headers=admin).status_code == 204
    wait_until(lambda: requests.get(url(farm, f"/tasks/{tid}"), headers=alice).json()["status"] == "finished",
               timeout=60, what="runs once enabled")
    w = requests.get(url(farm, "/workers/daemon-1"), headers=alice).json()
    assert set(w["load_average"]) == {"1min", "5min", "15min"} and w["update_less_frequent"]["worker_num_cpus"] >= 1
    assert w["ip_address"] == "127.0.0.1"
    assert requests.get(url(farm, "/workers/nope"), headers=alice).status_code == 404
    r = requests.post(url(farm, "/workers"), json={"hostname": "x"}, headers=alice)
    assert r.status_code == 400 and "websocket" in r.json()["message"]


@pytest.mark.parametrize("body, status, names", [
    ({"settings": {}}, 422, "type"),
    ({"type": "nope"}, 422, "nope"),
    ({"type": "shell", "settings": "{not json"}, 422, "settings"),
    ({"type": "shell", "settings": {"commands": []}}, 422, "settings.commands"),
    ({"type": "frames", "settings": {"frame_start": 1, "frame_end": 4, "chunk_size": 0, "command": "x"}}, 422,
     "chunk_size"),
    ({"type": "shell", "priority": "high", "settings": {"commands": ["true"]}}, 422, "priority"),
    ({"type": "shell", "parser": "magic", "settings": {"commands": ["true"]}}, 422, "parser"),
    ({"type": "shell", "bogus": 1, "settings": {"commands": ["true"]}}, 422, "bogus"),
])
def test_bad_jobs_get_4xx_naming_the_field(farm, alice, body, status, names):
    r = requests.post(url(farm, "/tasks"), json=body, headers=alice)
    assert r.status_code == status, r.text
    assert names in r.json()["message"]


def test_bad_bodies_and_tokens(farm, alice):
    r = requests.post(url(farm, "/tasks"), data="{", headers={**alice, "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    r = requests.post(url(farm, "/tasks"), data="x", headers={**alice, "Content-Type": "text/plain"})
    assert r.status_code == 415
    r = requests.get(url(farm, "/tasks"), headers=h("hwf_c_wrong"))
    assert r.status_code == 401 and r.json()["message"] == "invalid token"
    r = requests.get(url(farm, "/tasks?limit=100000"), headers=alice)
    assert r.status_code == 422 and "limit" in r.json()["message"]
    r = requests.get(url(farm, "/tasks/%00%ff"), headers=alice)
    assert r.status_code == 404
    daemon = h(farm.daemon_token)
    assert requests.get(url(farm, "/tasks"), headers=daemon).status_code == 403


def test_token_less_calls_only_from_a_trusted_address_and_as_its_user(farm, tmp_path):
    # The module's hub trusts 127.0.0.0/8 as "render"; a hub without --http-trust refuses.
    r = requests.get(url(farm, "/api/whoami"), headers=BRENDER)
    assert r.json() == {"user": "render", "role": "client"}
    # without the header a page on another site cannot send, a trusted address is not enough
    r = requests.get(url(farm, "/api/whoami"))
    assert r.status_code == 403 and "X-HWF-Client" in r.json()["message"]
    with LocalCluster(daemons=0, state_dir=tmp_path) as plain:
        r = requests.get(plain.http_url + "/tasks")
        assert r.status_code == 401 and "Bearer" in r.json()["message"]


BRENDER = {"X-HWF-Client": "brender"}  # what a token-less client under --http-trust sends


def test_a_brender_shaped_client_runs_a_frames_job_without_a_token(farm, tmp_path):
    """What a brender server does with requests: form posts, settings as a JSON
    string, a multipart jobfile, GET /tasks/file/{job_id}, DELETE reading frame_current."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("scene/render.sh", "echo Fra:$1; echo frame $1 > out_$1.txt\n")
    base = farm.http_url
    assert requests.get(f"{base}/tasks/file/42", headers=BRENDER).json() == {"file": False}
    # brender splits a job into tasks itself: one POST per task, each its own frame range.
    settings = {"frame_start": 1, "frame_end": 3, "chunk_size": 3, "command": "bash scene/render.sh {frame}",
                "artifacts": ["out_*.txt"]}
    params = {"priority": 10, "type": "frames", "parser": "frames", "task_id": 1001, "job_id": 42,
              "settings": json.dumps(settings)}
    r = requests.post(f"{base}/tasks", data=params, files={"jobfile": ("job.zip", buf.getvalue())}, headers=BRENDER)
    assert r.status_code == 202, r.text
    first = r.json()
    assert (first["frame_start"], first["frame_end"], first["task_id"]) == (1, 3, "1001")
    assert requests.get(f"{base}/tasks/file/42", headers=BRENDER).json() == {"file": True}
    ids = [first["id"]]
    for tid, (lo, hi) in ((1002, (4, 6)), (1003, (7, 7))):  # no jobfile: the job's file is reused
        more = dict(params, task_id=tid, settings=json.dumps(dict(settings, frame_start=lo, frame_end=hi)))
        r2 = requests.post(f"{base}/tasks", data=more, headers=BRENDER)
        assert r2.status_code == 202, r2.text
        ids.append(r2.json()["id"])
    # a job compiled into several tasks answers with all of them
    r3 = requests.post(f"{base}/tasks", data=dict(params, task_id=1004, settings=json.dumps(
        dict(settings, frame_start=8, frame_end=9, chunk_size=1))), headers=BRENDER)
    assert r3.status_code == 202 and [t["frame_start"] for t in r3.json()["tasks"]] == [8, 9]
    ids += [t["id"] for t in r3.json()["tasks"]]

    def all_done():
        ts = [requests.get(f"{base}/tasks/{i}", headers=BRENDER).json() for i in ids]
        return ts if all(t["status"] == "finished" for t in ts) else None

    final = wait_until(all_done, timeout=120, what="frames done")
    assert [t["frame_current"] for t in final] == [3, 6, 7, 8, 9]
    assert all(t["progress"] == 100.0 for t in final)
    names = sorted(a["name"] for t in final for a in t["artifacts"] if a["name"])
    assert names == sorted(f"out_{i}.txt" for i in range(1, 10))
    workers = requests.get(f"{base}/workers", headers=BRENDER).json()
    assert isinstance(workers, dict) and "daemon-1" in workers
    d = requests.delete(f"{base}/tasks/1001", headers=BRENDER)
    assert d.status_code == 202 and d.json()["frame_current"] == 3


def test_sessions_snapshot_and_credits(farm, alice, bob):
    r = requests.post(url(farm, "/tasks"), json=shell_job(["true"]), headers=alice).json()
    sid = r["session_id"]
    s = requests.get(url(farm, f"/sessions/{sid}"), headers=alice).json()
    assert s["session_id"] == sid and s["total"] == 1 and r["id"] in s["task_ids"]
    assert requests.get(url(farm, f"/sessions/{sid}"), headers=bob).status_code == 404
    snap = requests.get(url(farm, "/api/snapshot"), headers=alice).json()
    assert snap["user"] == "alice" and all(t["user"] == "alice" for t in snap["tasks"])
    assert sid in [x["session_id"] for x in snap["sessions"]]
    assert sid not in [x["session_id"] for x in requests.get(url(farm, "/sessions"), headers=bob).json()["sessions"]]
    c = requests.get(url(farm, "/credits?by=user"), headers=alice)
    assert c.status_code == 200 and c.json()["by"] == "user"
    assert requests.get(url(farm, "/credits?by=planet"), headers=alice).status_code == 422


def test_the_event_stream_pushes_snapshots(farm, alice):
    with requests.get(url(farm, "/api/events"), headers=alice, stream=True, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = r.iter_lines(decode_unicode=True)
        assert next(lines) == "event: snapshot"
        first = json.loads(next(lines)[len("data: "):])
        assert first["user"] == "alice"
        requests.post(url(farm, "/tasks"), json=shell_job(["true"], task_id="sse-1"), headers=alice)
        for line in lines:
            if line.startswith("data: ") and any(t["task_id"] == "sse-1" for t in json.loads(line[6:])["tasks"]):
                break


def test_the_page_and_the_openapi_document(farm):
    r = requests.get(url(farm, "/"))
    assert r.status_code == 200 and "text/html" in r.headers["Content-Type"]
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    doc = requests.get(url(farm, "/api/openapi.json")).json()
    assert doc["openapi"].startswith("3.") and {"/tasks", "/tasks/{id}", "/workers", "/workers/{id}",
                                                 "/tasks/file/{job_id}", "/credits"} <= set(doc["paths"])


def test_the_hub_and_the_cluster_link_their_status_page(farm):
    from hwf_jupyter import Hub

    hub = Hub(farm.address, token=farm.token)
    try:
        hub.connect_sync()
        assert hub.status_url == farm.http_url + "/"
        assert f"href='{farm.http_url}/'" in hub._repr_html_()
    finally:
        hub.close_sync()
    assert f"{farm.http_url}/" in farm._repr_html_() and "status page" in repr(farm)


def test_a_tls_hub_serves_the_api_over_https_only(tmp_path):
    from tlsfiles import make_tls_files

    pem, key, ca_pem = make_tls_files(tmp_path)
    with LocalCluster(daemons=0, state_dir=tmp_path / "c", tls=(pem, key, ca_pem)) as c:
        assert c.http_url.startswith("https://127.0.0.1:")
        r = requests.get(c.http_url + "/api/whoami", headers=h(c.token), verify=str(ca_pem))
        assert r.json()["role"] == "client"
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(c.http_url.replace("https://", "http://") + "/api/whoami", headers=h(c.token), timeout=5)

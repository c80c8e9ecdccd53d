"""The hub's live status page in a real headless Chromium against a real hub.

Each test drives the page the way a person would (type a token, click a
button) and then asks the hub itself, over its HTTP API, whether the click
did what it says: the page's own display is not taken as proof.  A
screenshot of every step lands in tests/artifacts/.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Optional

import pytest

from browser import browser, page, screenshot  # noqa: F401  (fixtures)
from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync
from waiting import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A hub with its HTTP API and 2 daemons of 2 slots (own cluster: tests disable workers)."""
    with LocalCluster(daemons=2, slots=2, state_dir=tmp_path_factory.mktemp("statuspage")) as c:
        assert c.http_url, "LocalCluster started no HTTP API"
        yield c


@pytest.fixture(scope="module")
def client(farm):
    h = farm.hub(artifacts_dir=farm.root / "artifacts")
    yield h
    h.close_sync()


def http(farm: LocalCluster, method: str, path: str, token: str, body: Optional[dict] = None) -> tuple[int, Any]:
    """One call to the hub's HTTP API: (status, parsed JSON or None)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(farm.http_url + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


def log_in(page, farm: LocalCluster, token: str) -> None:
    """Open the page, type the token, wait for the first live snapshot."""
    page.goto(farm.http_url + "/")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_selector("[data-testid=connection][data-state=live]")


def task_status(farm: LocalCluster, task_id: str) -> str:
    code, body = http(farm, "GET", f"/tasks/{task_id}", farm.token)
    assert code == 200, body
    return body["status"]


def test_wrong_token_shows_error_and_keeps_nothing(farm, page, request):
    page.goto(farm.http_url + "/")
    screenshot(page, request, "1-login-form")
    page.get_by_label("Token").fill("hwf_not-a-real-token")
    page.get_by_role("button", name="Log in").click()
    error = page.get_by_test_id("error")
    error.wait_for(state="visible")
    assert "Token refused" in error.inner_text()
    assert page.get_by_test_id("login-panel").is_visible()
    assert not page.get_by_test_id("tasks-panel").is_visible()
    assert page.evaluate("sessionStorage.length") == 0
    assert page.evaluate("localStorage.length") == 0
    screenshot(page, request, "2-token-refused")
    assert page.js_errors == []


def test_login_then_session_progress_advances_without_reload(farm, client, page, request):
    log_in(page, farm, farm.token)
    # The token lives in this tab's sessionStorage only: no localStorage, no cookie.
    assert page.evaluate("sessionStorage.getItem('hwf-token')") == farm.token
    assert page.evaluate("localStorage.length") == 0
    assert page.context.cookies() == []
    assert page.get_by_test_id("whoami").inner_text().endswith("(client)")
    # A marker on window: a reload would wipe it.
    page.evaluate("window.__noReload = 'still here'")
    screenshot(page, request, "1-logged-in")

    # 6 tasks of 2 frames (~0.8 s each) on 4 slots: at least two waves.
    sub = client.submit_job_sync("frames", {"frame_start": 1, "frame_end": 12, "chunk_size": 2, "label": "browser",
                                            "command": "echo Fra:{frame}; sleep 0.4"})
    row = page.locator(f"[data-testid=session-row][data-session='{sub.session_id}']")
    row.wait_for()
    seen: list[float] = []
    shot_mid = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        value = float(row.get_attribute("data-progress") or "0")
        if not seen or value != seen[-1]:
            seen.append(value)
            if 0 < value < 100 and not shot_mid:
                screenshot(page, request, "2-session-mid-way")
                shot_mid = True
        if value >= 100:
            break
        page.wait_for_timeout(100)
    assert seen and seen[-1] == 100, f"session progress never reached 100: {seen}"
    assert any(0 < v < 100 for v in seen), f"no intermediate progress seen: {seen}"
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert page.evaluate("window.__noReload") == "still here"
    assert "finished 6" in row.inner_text()
    # Finished tasks paid credits: the leaderboard shows this user's.
    credit = page.locator("[data-testid=credit-row]", has_text=farm.user)
    credit.wait_for()
    assert int(credit.locator("td").nth(2).inner_text()) >= 6
    screenshot(page, request, "3-session-done")
    assert page.js_errors == []


def test_running_task_shows_frame_progress(farm, client, page, request):
    log_in(page, farm, farm.token)
    sub = client.submit_job_sync("frames", {"frame_start": 1, "frame_end": 8, "chunk_size": 8, "label": "frames",
                                            "command": "echo Fra:{frame}; sleep 0.5"})
    task_row = page.locator(f"[data-testid=task-row][data-task='{sub[0]}']")
    frame = task_row.get_by_test_id("task-frame")
    try:
        frame.wait_for()
    except Exception:
        screenshot(page, request, "debug")
        print(http(farm, "GET", f"/tasks/{sub[0]}", farm.token))
        raise
    first = frame.inner_text()
    wait_until(lambda: task_row.get_attribute("data-status") != "running" or
               (frame.count() and frame.inner_text() != first), timeout=20, what="frame_current to advance")
    screenshot(page, request, "1-frame-progress")
    wait_until(lambda: task_row.get_attribute("data-status") == "finished", timeout=30, what="the task to finish")
    assert page.js_errors == []


def test_cancel_and_reprioritise_by_clicking(farm, client, page, request):
    log_in(page, farm, farm.token)
    # Fill all 4 slots, so one more task stays queued (priority editable).
    blockers = dispatch_sync(Task(Stage("block", cmd="sleep 60"), label="blocker"), client, repeat=4)
    queued = dispatch_sync(Task(Stage("wait", cmd="true"), label="<img src=x onerror=\"window.__pwned=1\">"),
                           client)
    try:
        for tid in blockers:
            wait_until(lambda: task_status(farm, tid) == "running", timeout=30, what=f"{tid} running")
        qrow = page.locator(f"[data-testid=task-row][data-task='{queued[0]}']")
        qrow.wait_for()
        # The hostile label is text, not markup.
        assert qrow.locator("img").count() == 0
        assert "<img src=x" in qrow.inner_text()
        assert page.evaluate("window.__pwned") is None
        assert qrow.get_by_test_id("wait-reason").inner_text().strip()

        prio = qrow.get_by_test_id("priority-input")
        prio.fill("7")
        qrow.get_by_test_id("priority-button").click()
        wait_until(lambda: http(farm, "GET", f"/tasks/{queued[0]}", farm.token)[1]["priority"] == 7,
                   timeout=10, what="the hub to store priority 7")
        screenshot(page, request, "1-queued-task-reprioritised")

        page.get_by_test_id("status-filter").select_option("running")
        page.get_by_test_id("text-filter").fill("blocker")
        rows = page.locator("[data-testid=task-row]")
        wait_until(lambda: rows.count() == 4, timeout=10, what="the filter to show the 4 running blockers")
        screenshot(page, request, "2-filtered-running")

        victim = blockers[0]
        page.locator(f"[data-testid=task-row][data-task='{victim}']").get_by_role("button", name="Cancel").click()
        wait_until(lambda: task_status(farm, victim) == "cancelled", timeout=15, what="the hub to cancel the task")
        page.get_by_test_id("status-filter").select_option("")
        page.get_by_test_id("text-filter").fill("")
        vrow = page.locator(f"[data-testid=task-row][data-task='{victim}']")
        wait_until(lambda: vrow.get_attribute("data-status") == "cancelled", timeout=10,
                   what="the page to show the cancel")
        assert vrow.get_by_test_id("cancel-button").count() == 0  # finished tasks have none
        assert task_status(farm, blockers[1]) == "running"  # only the clicked one
        screenshot(page, request, "3-cancelled")
    finally:
        client.cancel_sync([*blockers, *queued])
    assert page.js_errors == []


def test_admin_disables_a_worker_a_client_cannot(farm, browser, page, request):  # noqa: F811
    log_in(page, farm, farm.admin_token)
    assert page.get_by_test_id("whoami").inner_text().endswith("(admin)")
    rows = page.locator("[data-testid=worker-row]")
    wait_until(lambda: rows.count() == 2, timeout=15, what="2 workers on the page")
    screenshot(page, request, "1-admin-workers")
    worker_id = rows.first.get_attribute("data-worker")
    try:
        rows.first.get_by_role("button", name="Disable").click()
        wait_until(lambda: http(farm, "GET", f"/workers/{worker_id}", farm.admin_token)[1]["status"] == "disabled",
                   timeout=15, what="the hub to disable the worker")
        row = page.locator(f"[data-testid=worker-row][data-worker='{worker_id}']")
        wait_until(lambda: row.get_attribute("data-status") == "disabled", timeout=10,
                   what="the page to show the worker disabled")
        screenshot(page, request, "2-worker-disabled")

        # A client's page has the same workers and no buttons to change them.
        ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            other = ctx.new_page()
            log_in(other, farm, farm.token)
            crow = other.locator(f"[data-testid=worker-row][data-worker='{worker_id}']")
            crow.wait_for()
            assert crow.get_attribute("data-status") == "disabled"
            assert other.locator("[data-testid=workers-panel] button").count() == 0
            # ...and forging the request from that page is refused by the hub.
            code = other.evaluate(
                """async (id) => (await fetch('/workers/' + id, {method: 'PATCH',
                     headers: {'Authorization': 'Bearer ' + sessionStorage.getItem('hwf-token'),
                               'Content-Type': 'application/json'},
                     body: JSON.stringify({status: 'enabled'})})).status""", worker_id)
            assert code == 403
            screenshot(other, request, "3-client-sees-no-buttons")
        finally:
            ctx.close()
        assert http(farm, "GET", f"/workers/{worker_id}", farm.admin_token)[1]["status"] == "disabled"

        row.get_by_role("button", name="Enable").click()
        wait_until(lambda: row.get_attribute("data-status") == "enabled", timeout=15, what="re-enabled")
    finally:
        http(farm, "PATCH", f"/workers/{worker_id}", farm.admin_token, {"status": "enabled"})
    assert page.js_errors == []


def test_log_out_forgets_the_token(farm, page, request):
    log_in(page, farm, farm.token)
    page.get_by_role("button", name="Log out").click()
    assert page.get_by_test_id("login-panel").is_visible()
    assert page.evaluate("sessionStorage.length") == 0
    assert page.locator("[data-testid=task-row]").count() == 0
    page.reload()
    assert page.get_by_test_id("login-panel").is_visible()  # nothing remembered it
    screenshot(page, request, "1-logged-out")


def test_revoked_token_while_watching_drops_to_login(farm, page, request):
    token = farm.create_token("client", farm.user, label="to revoke")
    log_in(page, farm, token)
    farm.revoke_token(token)
    page.get_by_test_id("login-panel").wait_for(state="visible", timeout=20_000)
    assert "refused" in page.get_by_test_id("error").inner_text().lower() or \
           "closed" in page.get_by_test_id("error").inner_text().lower()
    assert page.evaluate("sessionStorage.length") == 0
    screenshot(page, request, "1-revoked")


def test_event_stream_ends_when_its_token_is_revoked(farm):
    """The attack without a browser: a stream opened with a token that is then
    revoked must stop, not keep showing the farm to whoever held the token."""
    token = farm.create_token("client", farm.user, label="stream to revoke")
    req = urllib.request.Request(farm.http_url + "/api/events", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert resp.readline() == b"event: snapshot\n"
        farm.revoke_token(token)
        rest = resp.read()  # returns only when the hub ends the stream
    events = [line for line in rest.split(b"\n") if line.startswith(b"event:")]
    assert events[-1] == b"event: error", events
    assert b'"unauthorized"' in rest.split(b"event: error\n", 1)[1]


def test_sse_parser_handles_split_chunks_crlf_comments_and_multiline_data(farm, page):
    """The page parses the stream itself (fetch, not EventSource): chunks cut
    anywhere, CRLF or LF, ping comments and multi-line data all count."""
    page.goto(farm.http_url + "/")
    got = page.evaluate("""() => {
        const p = new window.HWFStatus.SSEParser();
        const out = [];
        for (const chunk of [": ping\\n\\nev", "ent: snapshot\\r\\ndata: {\\"a\\"", ":1}\\r\\n\\r\\n",
                             "data: line1\\ndata: line2\\n", "\\nevent: error\\ndata:x\\n\\n", "data: partial"])
            out.push(...p.feed(chunk));
        return out;
    }""")
    assert got == [{"event": "snapshot", "data": '{"a":1}'},
                   {"event": "message", "data": "line1\nline2"},
                   {"event": "error", "data": "x"}]


def test_hub_restart_shows_reconnecting_then_live_again(farm, page, request):
    """Runs last: it restarts the module's hub."""
    log_in(page, farm, farm.token)
    farm.hub_process.kill()
    farm.hub_process.wait()
    conn = page.get_by_test_id("connection")
    page.wait_for_selector("[data-testid=connection][data-state=retry]")
    assert "reconnecting" in conn.inner_text()
    assert "reconnecting" in page.get_by_test_id("error").inner_text()
    assert "stale" in page.locator("#panels").get_attribute("class")
    page.evaluate("window.__noReload = 1")
    screenshot(page, request, "1-hub-down-reconnecting")
    farm.restart_hub()
    page.wait_for_selector("[data-testid=connection][data-state=live]", timeout=30_000)
    assert page.get_by_test_id("error").is_hidden()  # the lost-connection notice is gone
    assert "stale" not in (page.locator("#panels").get_attribute("class") or "")
    assert page.evaluate("window.__noReload") == 1
    screenshot(page, request, "2-live-again")

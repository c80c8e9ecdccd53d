"""JupyterLab in a real headless Chromium: Run All on notebooks/quickstart.ipynb.

The test starts JupyterLab itself (127.0.0.1, a free port, a token, a temp
notebook dir, kernels that load the extension like ``make lab``), clicks
Run > Run All Cells, waits for the progress display to reach done, checks
no widget says "model not found", saves, reads the .ipynb back with
nbformat, and re-opens the notebook under a fresh kernel (no widget models)
to see that the saved final state still shows.  Screenshots go to
tests/artifacts/.  Skips only where Chromium/Playwright or JupyterLab cannot
run, and says which.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from browser import browser, page, screenshot  # noqa: F401  (fixtures)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
WIDGET = "application/vnd.jupyter.widget-view+json"
BROKEN = ("model not found", "Error displaying widget")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read() or b"null")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    try:
        import jupyterlab  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"jupyterlab is not installed ({exc}): pip install -e '.[test]'")
    base = tmp_path_factory.mktemp("lab")
    nbdir, ipydir, settings = base / "notebooks", base / "ipython", base / "settings"
    nbdir.mkdir()
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", nbdir / "quickstart.ipynb")
    (ipydir / "profile_default").mkdir(parents=True)  # like `make lab`: kernels load the extension
    (ipydir / "profile_default" / "ipython_kernel_config.py").write_text(
        'c.InteractiveShellApp.extensions = ["hwf_jupyter"]\n')
    # No news or update pop-ups over the notebook.
    notif = settings / "@jupyterlab" / "apputils-extension"
    notif.mkdir(parents=True)
    (notif / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    farm = base / "farm"  # %hwf_local's farm outlives the kernels: this module's own, stopped below
    env = dict(os.environ, IPYTHONDIR=str(ipydir), HWF_NONINTERACTIVE="0", HWF_LOCAL_DIR=str(farm),
               JUPYTER_CONFIG_DIR=str(base / "jcfg"), JUPYTER_RUNTIME_DIR=str(base / "runtime"))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--notebook-dir={nbdir}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={base / 'ws'}",
           "--ServerApp.port_retries=0"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(base / "lab.log", "wb")
    proc = subprocess.Popen(cmd, cwd=nbdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(f"{url}/api/status?token={token}")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start: {(base / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield {"url": url, "token": token, "dir": nbdir, "log": base / "lab.log"}
    finally:
        for k in _kernels(url, token):
            _delete(f"{url}/api/kernels/{k['id']}?token={token}")
        if farm.exists():
            from hwf_jupyter import localfarm

            localfarm.stop_farm(farm)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _kernels(url: str, token: str) -> list:
    try:
        return list(_get(f"{url}/api/kernels?token={token}") or [])
    except OSError:
        return []


def _delete(url: str) -> None:
    req = urllib.request.Request(url, method="DELETE")
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except OSError:
        pass


def _open_notebook(page, lab, name: str = "quickstart.ipynb") -> None:
    # A workspace per notebook: JupyterLab does not restore the other test's tabs (and dialogs).
    workspace = name.replace(".", "-")
    page.goto(f"{lab['url']}/lab/workspaces/{workspace}/tree/{name}?token={lab['token']}")
    page.locator(".jp-Notebook").first.wait_for(state="visible", timeout=30_000)
    # The shipped notebook names no kernel: JupyterLab asks, as it would ask a user.  Wait
    # until a kernel is idle and no dialog has come for a moment (the dialog can come late).
    select = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first
    deadline, calm_since = time.monotonic() + 40, None
    while time.monotonic() < deadline:
        if select.is_visible():
            select.click()
            calm_since = None
        elif idle.is_visible():
            calm_since = calm_since or time.monotonic()
            if time.monotonic() - calm_since > 1.5:
                return
        time.sleep(0.2)
    raise AssertionError("the notebook's kernel did not become idle")


def _progress_cell(page):
    return page.locator(".jp-Cell").filter(has_text="%hwf_dispatch").first


def test_run_all_quickstart_then_reopen_without_widget_models(lab, page, request):
    try:
        _run_all_save_reopen(lab, page, request)
    except BaseException:
        screenshot(page, request, "failure")  # what the browser showed when it failed
        raise


def _run_all_save_reopen(lab, page, request) -> None:
    _open_notebook(page, lab)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

    cell = _progress_cell(page)
    snapshot = cell.locator(".hwf-progress-snapshot")
    snapshot.wait_for(timeout=40_000)  # the final state replaces the live widget
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=30_000)
    text = snapshot.inner_text()
    assert "2/2 done" in text and "finished 2" in text, text
    body = page.locator(".jp-Notebook").first.inner_text()
    for bad in BROKEN:
        assert bad not in body
    assert "checksum" not in body or True  # (the C program's output stays on the daemons)
    assert page.locator(".jp-OutputArea-output").filter(has_text="(4, ").count() >= 1, "the check cell ran"
    cell.scroll_into_view_if_needed()
    screenshot(page, request, "run-all-done")

    # Save (Ctrl+S in the notebook) and read the .ipynb back.
    page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    path = lab["dir"] / "quickstart.ipynb"
    deadline = time.monotonic() + 15
    while True:
        saved = nbformat.read(path, as_version=4)
        dispatch = next(c for c in saved.cells if "dispatch" in c.metadata.get("tags", []))
        htmls = [o.data.get("text/html", "") for o in dispatch.outputs if o.output_type == "display_data"]
        if any("hwf-progress-snapshot" in h for h in htmls) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    progress_out = next(o for o in dispatch.outputs
                        if o.output_type == "display_data" and "hwf-progress-snapshot" in o.data.get("text/html", ""))
    assert WIDGET not in progress_out.data, "a saved widget view would read 'model not found'"
    assert "2/2 done" in progress_out.data["text/html"] and "2/2 done" in progress_out.data["text/plain"]
    assert "running" not in progress_out.data["text/plain"]

    # Re-open under a fresh kernel: no widget model exists any more.
    for k in _kernels(lab["url"], lab["token"]):
        _delete(f"{lab['url']}/api/kernels/{k['id']}?token={lab['token']}")
    page.reload()
    _open_notebook(page, lab)
    snapshot = _progress_cell(page).locator(".hwf-progress-snapshot")
    snapshot.wait_for(timeout=15_000)
    assert "2/2 done" in snapshot.inner_text()
    body = page.locator(".jp-Notebook").first.inner_text()
    for bad in BROKEN:
        assert bad not in body
    _progress_cell(page).scroll_into_view_if_needed()
    screenshot(page, request, "reopened")
    assert not page.js_errors, page.js_errors


LIVE_CELLS = [
    "cluster = %hwf_local --daemons 2",  # the quickstart's farm, when that test ran first
    "%%hwf_stage nap\nsleep 4\n",
    "nap = %hwf_dispatch --repeat 2",
    "%hwf_draft --clear",
    "%%hwf_stage long\nsleep 60\n",
    "long = %hwf_dispatch --repeat 2",
    "import threading\nhub = cluster.hub()\n"
    "threading.Timer(2.0, lambda: hub.cancel_sync(session=long.session_id)).start()",
]


def test_live_widget_ticks_then_ends_as_snapshot_after_the_cells_finished(lab, page, request):
    """No --wait: every cell is done long before the tasks, so only the kernel's
    I/O thread can end the displays; JupyterLab must still show the true end."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in LIVE_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, lab["dir"] / "live.ipynb")
    try:
        _open_notebook(page, lab, "live.ipynb")
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        cells = page.locator(".jp-CodeCell")
        nap, long_ = cells.nth(2), cells.nth(5)
        live = nap.locator(".widget-html-content").filter(has_text="running 2").first
        live.wait_for(timeout=30_000)
        first = live.inner_text()
        time.sleep(1.6)  # no task event in between: only the 1 s ticker changes the text
        assert live.inner_text() != first, "elapsed time should tick while tasks run"
        screenshot(page, request, "live")
        done = nap.locator(".hwf-progress-snapshot")
        done.wait_for(timeout=20_000)
        assert "2/2 done" in done.inner_text()
        cancelled = long_.locator(".hwf-progress-snapshot")
        cancelled.wait_for(timeout=20_000)
        assert "2/2 cancelled" in cancelled.inner_text()
        assert cancelled.locator('[title="cancelled 2"]').count() == 1  # grey segment, not a blue "done"
        assert long_.locator('[title="finished 2"]').count() == 0
        body = page.locator(".jp-Notebook").first.inner_text()
        for bad in BROKEN:
            assert bad not in body
        long_.scroll_into_view_if_needed()
        screenshot(page, request, "ended")
    except BaseException:
        screenshot(page, request, "failure")
        raise

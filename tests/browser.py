"""A real headless browser for the status page tests: Debian's Chromium driven by Playwright.

Playwright cannot download its own browsers here, so it drives the system's
``/usr/bin/chromium`` (``make browser`` installs it with apt-get).  Where
Chromium or Playwright is missing the tests skip and say which, instead of
failing on a machine that cannot run a browser at all.

Screenshots go to ``tests/artifacts/`` (gitignored) with descriptive names,
so a human can look at what the test saw.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

CHROMIUM = os.environ.get("HWF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]
ARTIFACTS = Path(__file__).with_name("artifacts")


def missing_reason() -> str | None:
    """Why no browser test can run here, or None when one can."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium) to enable the browser tests"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"playwright is not installed ({exc}): pip install -e '.[test]'"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module (starting one costs about a second)."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page in its own context (own sessionStorage), 1280x900, 10 s default waits."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.js_errors = errors  # type: ignore[attr-defined]
    try:
        yield pg
    finally:
        context.close()


def screenshot(page: Any, request: Any, step: str) -> Path:
    """Save a full-page PNG as tests/artifacts/<test name>--<step>.png and return its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{request.node.name}--{step}")
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path

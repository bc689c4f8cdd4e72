"""The demo page in a real browser: Debian's Chromium driven by Playwright's Python package.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright install``:
the browser is the system's). Screenshots are saved under ``<pytest basetemp>/artifacts/`` or under
``$ROSIM_TEST_ARTIFACTS`` when set.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("ROSIM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python package)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("ROSIM_TEST_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def server(sim):
    """The app on uvicorn in a thread, on a free loopback port."""
    import uvicorn

    from rosim.server import create_app
    from tests.helpers import SENTENCES
    from tests.server.conftest import ListIndex

    app = create_app(sim, ListIndex(sim, SENTENCES), max_n=32)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        # Playwright starts Chromium with a new empty profile (--user-data-dir) of its own
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def test_submit_a_sentence_and_see_results(server, browser, artifacts):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    page.goto(server)
    page.wait_for_selector('#status[data-state="ok"]', timeout=10_000)
    assert "ready" in page.inner_text("#status-text")

    page.fill("#text", "今天天气不错")
    page.click("#submit")
    page.wait_for_selector("#similar-list li.result", timeout=20_000)
    page.wait_for_selector("#search-list li.result", timeout=20_000)
    page.wait_for_function("!document.querySelector('#submit').disabled")

    generated = page.locator("#similar-list li.result")
    assert 1 <= generated.count() <= 10
    score = float(generated.first.locator(".num").inner_text())
    assert -1.0 <= score <= 1.0
    neighbours = page.locator("#search-list li.result")
    assert neighbours.first.locator(".text").inner_text() == "今天天气不错"  # the index holds the sentence itself
    assert page.is_hidden("#error")
    page.screenshot(path=str(artifacts / "demo-results.png"), full_page=True)
    assert (artifacts / "demo-results.png").stat().st_size > 10_000

    # an example chip submits on its own
    page.click(".chip >> nth=1")
    page.wait_for_function("document.querySelector('#similar-meta').textContent.includes('ms')")
    assert page.locator("#search-list li.result").first.locator(".text").inner_text() == "广州和深圳哪个好？"

    # a request the server refuses shows the server's message
    page.click(".options summary")
    page.fill("#n", "64")
    page.fill("#k", "5")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert "less than or equal to 32" in page.inner_text("#error")
    page.screenshot(path=str(artifacts / "demo-error.png"), full_page=True)
    assert not console_errors or all("422" in e or "Failed to load resource" in e for e in console_errors)
    page.close()

"""The web page in a real browser: Playwright drives Debian's chromium (the system executable; Playwright's own
browser download is not used) against `vitkit serve` started as a command on the tiny digit model with an index.
A digit is uploaded, and the test checks the predicted label (the one `vitkit predict` gives), the attention
overlay and its controls, the neighbour grid, that nothing is loaded from another origin (the page works offline),
keyboard and label basics, the layout at phone width, and that /docs (Swagger UI) renders from the server's own
files. The screenshot goes to the test's temp folder (and to
$VITKIT_SCREENSHOT when set: docs/serve.png is made so)."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from require_deps import missing

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system chromium, checked before the model is trained and the server started."""
    path = os.environ.get("VITKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        missing("chromium", "the browser test drives the system chromium; install it with `apt-get install "
                "chromium` (make install does, where apt is available)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(served, tmp_path):
    ckpt, _, _, index, _ = served
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vitkit", "serve", str(ckpt), "--index", str(index), "--port",
                             str(port), "--no-fast", "--quiet"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() - t0 > 60:
                raise AssertionError("vitkit serve did not get ready: " + (tmp_path / "server.log").read_text())
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.mark.timeout(120)
def test_page_in_a_real_browser(chromium, server, served, tmp_path):
    from vitkit.tasks.classify import predict

    ckpt, _, files, _, _ = served
    digit = files[3]
    want = predict(ckpt, [digit])[0]["label"]
    foreign, errors = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.on("request", lambda r: r.url.startswith((server, "data:", "blob:")) or foreign.append(r.url))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            sync_api.expect(page.locator("#status")).to_contain_text("Ready", timeout=20_000)
            sync_api.expect(page.locator("#card-list")).to_contain_text("3 blocks")
            page.keyboard.press("Tab")  # the skip link, then the file chooser: reachable by keyboard
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.id") == "file"

            page.set_input_files("#file", str(digit))
            sync_api.expect(page.locator("#status")).to_contain_text(f"Predicted {want}", timeout=20_000)
            bars = page.locator("#bars li")
            sync_api.expect(bars).to_have_count(5)
            assert bars.first.get_attribute("aria-label").startswith(f"{want}: ")
            overlay = page.locator("#overlay")
            sync_api.expect(overlay).to_be_visible()
            assert overlay.get_attribute("src").startswith("data:image/png;base64,")
            assert page.evaluate("document.getElementById('overlay').naturalWidth") == 224
            grid = page.locator("#neighbours li img")
            sync_api.expect(grid).to_have_count(8)
            # polled from here: wait_for_function's in-page polling evals its string, which the page's CSP
            # (script-src 'self') refuses whenever the first check is not already true (a flaky EvalError)
            deadline = time.monotonic() + 30
            while not page.evaluate("[...document.querySelectorAll('#neighbours img')].every(i => i.naturalWidth > 0)"):
                assert time.monotonic() < deadline, "the neighbour thumbnails did not load within 30 s"
                page.wait_for_timeout(100)
            sync_api.expect(page.locator("#neighbours li").first).to_contain_text("#1")
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            if os.environ.get("VITKIT_SCREENSHOT"):
                page.screenshot(path=os.environ["VITKIT_SCREENSHOT"], full_page=True)

            # the controls, by keyboard: the opacity slider and the head selector
            page.focus("#opacity")
            page.keyboard.press("Home")
            assert page.evaluate("getComputedStyle(document.getElementById('overlay')).opacity") == "0"
            page.select_option("#head", "2")
            sync_api.expect(page.locator("#overlay-caption")).to_have_text("Last block, head 2")
            assert page.locator("#head option").count() == 5  # all heads + the 4 of the last block
            # every image has alternative text, every control a label
            assert page.evaluate("[...document.querySelectorAll('img')].every(i => i.hasAttribute('alt'))")
            assert page.evaluate("[...document.querySelectorAll('input, select')].every(e => e.labels.length)")

            page.set_viewport_size({"width": 375, "height": 740})  # phone width: nothing wider than the screen
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
            page.screenshot(path=str(tmp_path / "serve-phone.png"), full_page=True)

            # /docs: Swagger UI renders the API from this server's files alone (the request check above covers it)
            page.set_viewport_size({"width": 1100, "height": 760})
            page.goto(server + "/docs")
            sync_api.expect(page.locator(".swagger-ui .info .title")).to_contain_text("vitkit serve", timeout=20_000)
            sync_api.expect(page.locator(".opblock-summary-path", has_text="/v1/classify").first).to_be_visible()
        finally:
            browser.close()
    assert not foreign, f"the page loaded from other origins: {foreign}"
    assert not errors, errors
    assert (tmp_path / "serve.png").stat().st_size > 10_000

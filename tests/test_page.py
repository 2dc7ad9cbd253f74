"""The page at / in a real headless Chromium: tokens appear live, Stop cancels the generation on the server.

Uses Debian's ``chromium`` (``/usr/bin/chromium``, installed by ``.ci/run``) through Playwright's
``executable_path``: Playwright never downloads a browser here. The screenshot goes to ``out/page.png``.
"""

import shutil
import time
from pathlib import Path

import pytest

from labserver.serve.app import create_app
from labserver.serve.background import UvicornServer
from tests.waiting import wait_for

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
OUT = Path(__file__).resolve().parents[1] / "out"

pytestmark = [
    pytest.mark.model,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not Path(CHROMIUM).exists() and not shutil.which("chromium"),
                       reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)"),
]

# Records every change of the output and of the page state, with the browser's clock.
RECORDER = """
window.__updates = []; window.__states = [];
new MutationObserver(() => __updates.push([performance.now(), document.getElementById('output').textContent.length]))
  .observe(document.getElementById('output'), {childList: true, subtree: true, characterData: true});
new MutationObserver(() => __states.push([performance.now(), document.body.dataset.state]))
  .observe(document.body, {attributes: true, attributeFilter: ['data-state']});
"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists()
                                             else shutil.which("chromium"), args=ARGS)
        yield browser
        browser.close()


def test_tokens_appear_live_and_stop_cancels(browser, default_engine):
    with UvicornServer(create_app(default_engine)) as server:
        page = browser.new_page(viewport={"width": 900, "height": 760})
        page.goto(server.url + "/")
        assert page.title() == "labserver"
        page.evaluate(RECORDER)
        page.fill("#prompt", "Write a long story about a dragon who learns to bake bread.")
        # Long enough (~1.5 s of steps) that a browser starved of CPU for a moment still sees many reads.
        page.fill("#max-tokens", "240")
        page.fill("#temperature", "0")
        page.click("#send")
        # Selectors, not wait_for_function: the page's Content-Security-Policy forbids eval.
        page.wait_for_selector("body:not([data-state=running])", timeout=180_000)

        assert page.get_attribute("body", "data-state") == "done", page.inner_text("#status")
        updates = page.evaluate("window.__updates")
        states = page.evaluate("window.__states")
        sent_at = next(t for t, s in states if s == "running")
        done_at = next(t for t, s in states if s == "done")
        lengths = [n for _, n in updates if n > 0]
        n_tokens = int(page.inner_text("#tokens"))
        finish = page.inner_text("#finish")
        assert n_tokens == 240 or finish == "stop"
        # Tokens arrived one after another: many separate updates, growing, spread over the decode
        # (a buffered answer would arrive as one update, or as a burst at the very end). The spread is
        # measured from the first token, not from Send: a cold prefill may take seconds on its own.
        assert len(set(lengths)) >= 10 and lengths == sorted(lengths), (len(updates), sorted(set(lengths))[:20])
        first, last = min(t for t, n in updates if n > 0), max(t for t, _ in updates)
        assert sent_at < first < done_at and (last - first) >= 0.5 * (done_at - first), (first, last, sent_at, done_at)
        assert float(page.inner_text("#ttft")) > 0 and float(page.inner_text("#mean-gap")) > 0
        assert page.inner_text("#output").strip()
        OUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUT / "page.png"), full_page=True)

        # A second run, stopped from the page: the server must stop generating.
        page.fill("#max-tokens", "1000")
        page.click("#send")
        assert wait_for(lambda: int(page.inner_text("#tokens")) >= 3, timeout_s=120)
        assert default_engine.running == 1
        page.click("#stop")
        page.wait_for_selector("body[data-state=stopped]", timeout=30_000)
        assert wait_for(lambda: default_engine.running == 0, timeout_s=10), "generation still running after Stop"
        produced = default_engine.tokens_generated
        time.sleep(0.3)
        assert default_engine.tokens_generated == produced
        assert server.app.state.admission.active == 0
        assert "stopped after" in page.inner_text("#status")
        page.close()

"""Real-browser tests: `qkatlas serve` in a subprocess, driven by Playwright in Debian's
Chromium (apt `chromium`; launched by executable path, no browser download). Screenshots go
to test-artifacts/browser/."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from viz_fixtures import image_run, text_run  # noqa: F401  (fixtures)

CHROMIUM = os.environ.get("QKATLAS_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-quic", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
ROOT = Path(__file__).resolve().parent.parent

if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.timeout(240)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(*arguments: str, command: tuple[str, ...] = ("-m", "workflows.cli", "serve")):
    """Start a server (`qkatlas serve ARGUMENTS` unless `command` says otherwise; `--port P` is
    appended) and wait until it answers; -> (process, url)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, *command, *arguments, "--port", str(port)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(command)} exited: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{' '.join(command)} did not answer within 90 s")


def stop(process):
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists()
                                              else shutil.which("chromium"), args=ARGS)
        yield chromium
        chromium.close()


def new_page(browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    return page, errors


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def shot(page, name: str, locator=None) -> bytes:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target = locator if locator is not None else page
    return target.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def has_colour(image: np.ndarray, rgb, tolerance=40) -> bool:
    return bool((np.abs(image - np.array(rgb)).sum(axis=-1) < tolerance).any())


def text_of(locator) -> str:
    """Text of a Panel pane, whose content sits in the element's shadow root."""
    return locator.evaluate("e => e.shadowRoot ? Array.from(e.shadowRoot.children).filter("
                            "c => c.tagName != 'STYLE' && c.tagName != 'LINK').map(c => c.innerText).join(' ') "
                            ": e.innerText")


def click_until(page, plot, done, tries: int = 60) -> bool:
    """Click points of `plot` (spiralling out from its centre) until `done()` is true."""
    box = plot.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2 + 15
    for i in range(tries):
        angle, radius = i * 0.9, 4 * i
        x, y = cx + radius * np.cos(angle), cy + radius * np.sin(angle)
        page.mouse.move(x, y)
        page.mouse.click(x, y)
        try:
            page.wait_for_function("1", timeout=50)
            page.wait_for_timeout(250)
        except Exception:
            pass
        if done():
            return True
    return False


def test_text_dashboard(browser, text_run):  # noqa: F811
    from pipeline.store import open_run

    run = open_run(text_run)
    process, url = serve(text_run)
    try:
        page, errors = new_page(browser)
        page.goto(url, wait_until="networkidle")
        matrix = page.locator(".qk-matrix").first
        matrix.wait_for(state="visible", timeout=60_000)
        caption = page.locator(".qk-matrix-caption").first
        assert f"{run.n_layers * run.n_heads} of {run.n_layers * run.n_heads} heads" in text_of(caption)
        page.wait_for_timeout(1500)
        image = pixels(shot(page, "01-matrix", matrix))
        assert has_colour(image, (95, 185, 108)) and has_colour(image, (227, 55, 143))  # queries green, keys pink

        # clicking a head opens the single-head view
        box = matrix.bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.6)
        title = page.locator(".qk-head-title").first
        title.wait_for(state="visible", timeout=30_000)
        page.wait_for_function("() => true")
        assert "Layer" in text_of(title)
        plot = page.locator(".qk-head-plot").first
        plot.wait_for(state="visible", timeout=30_000)
        page.wait_for_timeout(2000)
        before = pixels(shot(page, "02-head-query-key", plot))
        assert has_colour(before, (95, 185, 108))

        # changing the colour mode changes the image
        page.locator("select").filter(has_text="sequence length").first.select_option("position")
        page.wait_for_timeout(2500)
        after = pixels(shot(page, "03-head-position", plot))
        assert before.shape != after.shape or np.abs(before - after).sum() > 1000

        # hover shows the token, query or key, position i of n
        box = plot.bounding_box()
        hover = page.locator(".qk-hover").first
        for i in range(40):
            page.mouse.move(box["x"] + box["width"] / 2 + 5 * i * np.cos(i),
                            box["y"] + box["height"] / 2 + 5 * i * np.sin(i))
            page.wait_for_timeout(150)
            if "position" in text_of(hover):
                break
        text = text_of(hover)
        assert "position" in text and " of " in text and "undefined" not in text
        assert "query" in text or "key" in text

        # search reports a count
        expected = int((run.tokens()["token"].str.lower() == "cat").sum())
        search = page.locator("input[placeholder='a token, or re:regex']").first
        search.fill("cat")
        search.press("Enter")
        count = page.locator(".qk-count").first
        count.wait_for(state="visible", timeout=20_000)
        assert count.inner_text() == f"{expected:,} matches"
        page.wait_for_timeout(1500)
        shot(page, "04-search", plot)

        # clicking a point opens the sequence view
        info = page.locator(".qk-sequence-info").first
        assert click_until(page, plot, lambda: "in sequence" in text_of(info))
        sequence = page.locator(".qk-sequence").first
        sequence.wait_for(state="visible", timeout=20_000)
        page.wait_for_timeout(1500)
        shot(page, "05-sequence")
        assert not [e for e in errors if "undefined" in e.lower() or "error" in e.lower()], errors
    finally:
        stop(process)


def test_url_cannot_reach_files_and_picks_a_head(browser, text_run):  # noqa: F811
    process, url = serve(text_run)
    try:
        page, errors = new_page(browser)
        page.goto(url + "?layer=1&head=2&colour=norm&method=../../../../etc/passwd", wait_until="networkidle")
        title = page.locator(".qk-head-title").first
        title.wait_for(state="visible", timeout=60_000)
        assert "Layer 1, head 2" in text_of(title)
        assert "passwd" not in page.content()
    finally:
        stop(process)


def test_vit_image_view_shows_a_heatmap(browser, image_run):  # noqa: F811
    process, url = serve(image_run)
    try:
        page, errors = new_page(browser)
        page.goto(url + "?layer=1&head=0", wait_until="networkidle")
        plot = page.locator(".qk-head-plot").first
        plot.wait_for(state="visible", timeout=60_000)
        page.wait_for_timeout(2000)
        view = page.locator(".qk-image-view img").first
        assert click_until(page, plot, lambda: view.count() > 0 and view.is_visible())
        page.wait_for_timeout(1000)
        image = pixels(shot(page, "06-vit-image-view", view))
        shot(page, "07-vit-page")
        # the heatmap's palette (dark purple .. orange, blended over the image) and the white patch grid
        assert image.shape[0] >= 300 and (image.max(axis=-1) > 250).any()
        assert not errors, errors
    finally:
        stop(process)

"""Real-browser tests of the keyboard shortcuts, the norm in the hover card and the dark theme
(issue 12): `qkatlas serve` in a subprocess, Chromium driven by Playwright (see
tests/test_browser.py); screenshots in test-artifacts/browser/keys-*.png."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_browser import browser, new_page, pixels, serve, shot, stop, text_of  # noqa: F401
from test_browser_parity import settle, wait_until
from viz_fixtures import text_run  # noqa: F401  (fixture)

HEAD = "?layer=0&head=1&method=pca&dim=2"


@pytest.fixture(scope="module")
def server(text_run):  # noqa: F811
    process, url = serve(text_run)
    yield url
    stop(process)


def open_page(browser, url):  # noqa: F811
    """A page at `url` with its head plot or matrix shown; -> (page, errors), errors including
    the console's."""
    page, errors = new_page(browser)
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(url, wait_until="networkidle")
    page.locator(".qk-head-plot, .qk-matrix").first.wait_for(state="visible", timeout=60_000)
    settle(page, 1000)
    return page, errors


def title(page) -> str:
    return text_of(page.locator(".qk-head-title").first)


def test_arrow_keys_step_heads_and_layers_escape_returns_and_typing_does_not(browser, server):  # noqa: F811
    page, errors = open_page(browser, server + HEAD)
    assert "Layer 0, head 1" in title(page)
    assert "← → head" in text_of(page.locator(".qk-keys").first)
    page.locator(".qk-next-head button").first.hover()  # the button's tooltip names its key
    assert wait_until(page, lambda: page.get_by_text("key: →").first.is_visible(), 5_000)
    page.mouse.move(5, 5)
    for key, expected in (("ArrowRight", "Layer 0, head 2"), ("ArrowDown", "Layer 1, head 2"),
                          ("ArrowLeft", "Layer 1, head 1"), ("ArrowUp", "Layer 0, head 1")):
        page.keyboard.press(key)
        assert wait_until(page, lambda want=expected: want in title(page), 10_000), (key, title(page))
    settle(page)
    shot(page, "keys-01-head-after-arrows", page.locator(".qk-head-plot").first)

    search = page.locator("input[placeholder='a token, or re:regex']").first
    search.click()
    for key in ("ArrowRight", "ArrowDown", "r", "m", "Escape"):
        search.press(key)
    page.wait_for_timeout(1500)
    assert "Layer 0, head 1" in title(page) and page.locator(".qk-head-plot").first.is_visible()
    assert search.input_value() == "rm"  # the letters went into the box, not to the buttons
    search.fill("")
    search.blur()

    page.keyboard.press("Escape")
    assert wait_until(page, lambda: page.locator(".qk-matrix").first.is_visible(), 10_000)
    settle(page)
    shot(page, "keys-02-escape-to-matrix")
    assert not errors, errors


def test_r_resets_the_zoom_of_the_head(browser, server):  # noqa: F811
    page, errors = open_page(browser, server + HEAD)
    plot = page.locator(".qk-head-plot").first
    full = pixels(shot(page, "keys-03-full", plot))
    box = plot.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(4):
        page.mouse.wheel(0, -100)
        page.wait_for_timeout(300)
    settle(page)
    zoomed = pixels(shot(page, "keys-04-zoomed", plot))
    page.mouse.move(5, 5)  # off the plot: no hover mark in the pictures compared
    page.keyboard.press("r")
    settle(page, 1500)
    reset = pixels(shot(page, "keys-05-reset", plot))
    assert np.abs(reset - full).sum() < 0.5 * np.abs(zoomed - full).sum()
    assert not errors, errors


def test_hover_card_shows_the_norm(browser, server):  # noqa: F811
    page, errors = open_page(browser, server + HEAD)
    plot = page.locator(".qk-head-plot").first
    hover = page.locator(".qk-hover").first
    box = plot.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for i in range(40):
        page.mouse.move(cx + 5 * i * np.cos(i), cy + 5 * i * np.sin(i))
        page.wait_for_timeout(150)
        if "norm" in text_of(hover):
            break
    text = text_of(hover)
    assert re.search(r"(query|key) · position \d+ of \d+ · norm \d", text), text
    assert float(re.search(r"norm ([0-9.e+-]+)", text).group(1)) > 0
    shot(page, "keys-06-hover-norm", hover)
    assert not errors, errors


def darkness(image: np.ndarray) -> float:
    """The share of a screenshot's pixels that are dark."""
    return float((image.mean(axis=-1) < 80).mean())


def test_dark_theme_from_the_url_and_the_switch(browser, server):  # noqa: F811
    page, errors = open_page(browser, server + HEAD)
    light = pixels(shot(page, "keys-07-light"))
    light_plot = pixels(shot(page, "keys-08-light-head", page.locator(".qk-head-plot").first))
    assert darkness(light) < 0.2 and darkness(light_plot) < 0.2

    page.locator(".qk-theme button").first.click()  # the switch reloads the page with ?theme=dark
    assert wait_until(page, lambda: "theme=dark" in page.url, 20_000), page.url
    assert "layer=0" in page.url and "head=1" in page.url
    page.locator(".qk-head-plot").first.wait_for(state="visible", timeout=60_000)
    settle(page, 1500)
    dark = pixels(shot(page, "keys-09-dark"))
    plot = pixels(shot(page, "keys-10-dark-head", page.locator(".qk-head-plot").first))
    assert darkness(dark) > 0.6, darkness(dark)
    assert darkness(plot) > 0.6, darkness(plot)  # the plot's background follows the theme
    assert (np.abs(plot - np.array([95, 185, 108])).sum(axis=-1) < 60).sum() > 50  # queries still drawn
    assert "Layer 0, head 1" in title(page)

    page.keyboard.press("Escape")  # the matrix, dark too
    matrix = page.locator(".qk-matrix").first
    assert wait_until(page, lambda: matrix.is_visible(), 10_000)
    settle(page, 1500)
    assert (np.abs(pixels(shot(page, "keys-11-dark-matrix", matrix)) - np.array([95, 185, 108])).sum(axis=-1)
            < 60).sum() > 50
    page.locator(".qk-theme button").first.click()  # back to light, on the matrix: no head in the URL
    assert wait_until(page, lambda: "theme=dark" not in page.url, 20_000), page.url
    assert "head=" not in page.url
    page.locator(".qk-matrix").first.wait_for(state="visible", timeout=60_000)
    settle(page)
    assert darkness(pixels(shot(page, "keys-12-light-again"))) < 0.2
    assert not errors, errors

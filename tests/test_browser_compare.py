"""The compare view in a real browser (Debian's Chromium, Playwright; see test_browser.py):
`qkatlas serve-compare` over a group of two checkpoints and a model with another tokenizer.
Moving the member slider redraws the head's layout; a search counts matches in both runs; a
click selects a token and names the linked token(s) of the other run. Screenshots go to
test-artifacts/browser/compare-*.png."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_browser import ARTIFACTS, browser, click_until, has_colour, pixels, serve, stop, text_of  # noqa: F401  (fixture)
from test_compare import bpe_gpt2, checkpoints, corpus, group, members  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)


def serve_compare(url: str):
    return serve(url, command=("-m", "workflows.cli", "serve-compare"))


def shot(locator, name: str) -> np.ndarray:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return pixels(locator.screenshot(path=str(ARTIFACTS / f"{name}.png")))


def changed(before: np.ndarray, after: np.ndarray) -> float:
    if before.shape != after.shape:
        return float("inf")
    return float(np.abs(before - after).sum())


def test_compare_view_slider_search_and_linked_selection(browser, group):  # noqa: F811
    url, _ = group
    process, address = serve_compare(url)
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 1200})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(address, wait_until="networkidle")
        left = page.locator(".qk-compare-left").first
        left.wait_for(state="visible", timeout=60_000)
        page.wait_for_timeout(2000)
        shot(page, "compare-01-side-by-side")

        # a search counts its matches in both runs
        search = page.locator("input[placeholder='a token, or re:regex']").first
        search.fill("the")
        search.press("Enter")
        counts = page.locator(".qk-compare-count")
        for _ in range(80):
            if counts.count() == 2:
                break
            page.wait_for_timeout(250)
        assert counts.count() == 2
        assert all(re.fullmatch(r"[1-9][\d,]* matches", counts.nth(i).inner_text()) for i in range(2))
        page.wait_for_timeout(1500)
        shot(page, "compare-02-search")

        # a click selects a token here and names the linked token(s) there
        selection = page.locator(".qk-compare-selection").first
        assert click_until(page, left, lambda: "↔" in text_of(selection) and "no token" not in text_of(selection))
        assert re.search(r" in early ↔ \S.* in bpe", text_of(selection)), text_of(selection)
        page.wait_for_timeout(1500)
        shot(page, "compare-03-linked-selection")
        right = page.locator(".qk-compare-right").first
        for plot in (left, right):  # the token marked in both runs
            assert has_colour(pixels(plot.screenshot()), (31, 63, 255)), "no selection mark"

        # the member slider animates the head's layout
        page.locator(".bk-tab").filter(has_text=re.compile("^Over members$")).click()
        frame = page.locator(".qk-compare-frame").first
        frame.wait_for(state="visible", timeout=30_000)
        caption = page.locator(".qk-compare-frame-caption").first
        page.wait_for_timeout(2000)
        assert "early" in text_of(caption) and "step 0" in text_of(caption)
        before = shot(frame, "compare-04-member-0")
        handle = page.locator(".qk-compare-slider .noUi-handle").first
        track = page.locator(".qk-compare-slider .noUi-base").first
        box, end = handle.bounding_box(), track.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(end["x"] + end["width"] / 2, box["y"] + box["height"] / 2, steps=8)
        page.mouse.up()
        for _ in range(80):
            if "late" in text_of(caption):
                break
            page.wait_for_timeout(250)
        assert "late" in text_of(caption) and "moved" in text_of(caption)
        page.wait_for_timeout(2000)
        after = shot(frame, "compare-05-member-1")
        assert changed(before, after) > 5000, "the layout did not change when the slider moved"
        trajectories = page.locator(".qk-compare-trajectories").first
        assert trajectories.is_visible()
        shot(page, "compare-06-over-members")
        assert "Largest change" in text_of(page.locator(".qk-compare-changes").first)
        assert not [e for e in errors if "error" in e.lower()], errors
    finally:
        stop(process)

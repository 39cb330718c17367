"""Real-browser test of the head view's region labels: `qkatlas serve` in a subprocess, Chromium
driven by Playwright (see tests/test_browser.py). The labels are canvas text, so they are read
from the page's Bokeh document (the renderer `viz.labels` names) and seen in screenshots."""

from __future__ import annotations

import numpy as np
from test_browser import browser, new_page, pixels, serve, shot, stop  # noqa: F401  (fixture, helpers)
from viz_fixtures import text_run  # noqa: F401  (fixture)

from viz.labels import RENDERER_NAME

SHOWN_LABELS = """(name) => {
  for (const doc of (window.Bokeh && window.Bokeh.documents) || [])
    for (const model of doc.all_models)
      if (model.name === name && model.visible)
        return [Array.from(model.data_source.data[model.glyph.text.field] || []), Array.from(model.tags)];
  return [[], []];
}"""


def shown(page) -> tuple[list[str], list[int]]:
    """The label texts drawn and the region scales they come from."""
    texts, scales = page.evaluate(SHOWN_LABELS, RENDERER_NAME)
    return texts, scales


def wait_for_labels(page, differ_from=None, timeout_ms: int = 20_000) -> tuple[list[str], list[int]]:
    """The labels on the page once some are drawn (and, given `differ_from`, once they changed)."""
    labels = ([], [])
    for _ in range(timeout_ms // 250):
        labels = shown(page)
        if labels[0] and (differ_from is None or labels != differ_from):
            return labels
        page.wait_for_timeout(250)
    return labels


def test_region_labels_refine_with_zoom_and_toggle(browser, text_run):  # noqa: F811
    process, url = serve(text_run)
    try:
        page, errors = new_page(browser)
        page.goto(url + "?layer=1&head=0&method=pca&dim=2", wait_until="networkidle")
        plot = page.locator(".qk-head-plot").first
        plot.wait_for(state="visible", timeout=60_000)

        full = wait_for_labels(page)
        assert full[0], "no region labels drawn in the head view"
        assert full[1] == [0]  # zoomed out: the coarse regions
        page.wait_for_timeout(1500)
        with_labels = pixels(shot(page, "labels-01-full", plot))

        toggle = page.locator(".qk-labels-toggle input").first
        toggle.uncheck()
        for _ in range(80):
            if not shown(page)[0]:
                break
            page.wait_for_timeout(250)
        assert not shown(page)[0]
        page.wait_for_timeout(1500)
        without = pixels(shot(page, "labels-02-hidden", plot))
        assert with_labels.shape == without.shape
        assert (np.abs(with_labels - without).sum(axis=-1) > 150).sum() > 100  # the labels were drawn, and are gone
        toggle.check()
        assert wait_for_labels(page) == full

        box = plot.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(4):  # the wheel zooms in about the pointer
            page.mouse.wheel(0, -250)
            page.wait_for_timeout(300)
        zoomed = wait_for_labels(page, differ_from=full)
        assert zoomed[0] and zoomed[0] != full[0]
        assert zoomed[1] and zoomed[1][0] > 0  # zoomed in: finer regions
        page.wait_for_timeout(1000)
        shot(page, "labels-03-zoomed", plot)
        assert not [e for e in errors if "error" in e.lower()], errors
    finally:
        stop(process)

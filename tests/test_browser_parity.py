"""Real-browser tests of AttentionViz parity in the head and matrix views (issue 12, items 2, 3, 4,
7 and 10): `qkatlas serve` in a subprocess, Chromium driven by Playwright (see tests/test_browser.py).
Canvas text and lines are read from the page's Bokeh document by the renderer names the views
give them, and seen in screenshots (test-artifacts/browser/parity-*.png)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_browser import browser, click_until, has_colour, new_page, pixels, serve, shot, stop, text_of  # noqa: F401
from viz_fixtures import text_run  # noqa: F401  (fixture)

from viz import attention_lines, tokens_layer
from viz.data import MOD5_COLOURS, MODE_DESCRIPTIONS

HEAD = "?layer=1&head=0&method=pca&dim=2"

RENDERER_DATA = """([name, field]) => {
  for (const doc of (window.Bokeh && window.Bokeh.documents) || [])
    for (const model of doc.all_models)
      if (model.name === name && model.visible)
        return Array.from(model.data_source.data[field] || []);
  return null;
}"""

# records whether any model of the page got Panel's loading class, whatever the timing
WATCH_LOADING = """() => {
  window.qkSawLoading = false;
  for (const doc of window.Bokeh.documents)
    doc.on_change((event) => {
      const value = event.value !== undefined ? event.value : (event.new_ !== undefined ? event.new_ : null);
      if (event.attr === 'css_classes' && Array.isArray(value) && value.includes('pn-loading'))
        window.qkSawLoading = true;
    });
}"""


LOADING_NOW = """() => {
  let n = 0;
  const walk = (root) => { for (const e of root.querySelectorAll('*')) {
    if (e.classList.contains('pn-loading')) n++;
    if (e.shadowRoot) walk(e.shadowRoot); } };
  walk(document);
  return n;
}"""


@pytest.fixture(scope="module")
def server(text_run):  # noqa: F811
    process, url = serve(text_run)
    yield url
    stop(process)


def renderer(page, name: str, field: str) -> list:
    return page.evaluate(RENDERER_DATA, [name, field]) or []


def wait_until(page, condition, timeout_ms: int = 20_000) -> bool:
    for _ in range(timeout_ms // 200):
        if condition():
            return True
        page.wait_for_timeout(200)
    return condition()


def settle(page, ms: int = 1000):
    """Waits until no view shows Panel's loading indicator, then `ms` more for the redraw."""
    page.wait_for_timeout(300)
    wait_until(page, lambda: page.evaluate(LOADING_NOW) == 0)
    page.wait_for_timeout(ms)


def steady(page, read, quiet_ms: int = 1500, timeout_ms: int = 20_000):
    """Waits until `read()` has not changed for `quiet_ms` (the taps still queued by
    `click_until` have been answered)."""
    last, since = read(), 0
    for _ in range(timeout_ms // 250):
        page.wait_for_timeout(250)
        now = read()
        since = since + 250 if now == last else 0
        last = now
        if since >= quiet_ms:
            return


def open_head(browser, url):  # noqa: F811
    page, errors = new_page(browser)
    page.goto(url + HEAD, wait_until="networkidle")
    plot = page.locator(".qk-head-plot").first
    plot.wait_for(state="visible", timeout=60_000)
    settle(page, 1500)
    return page, errors, plot


def check(page, css: str, on: bool):
    box = page.locator(f"{css} input").first
    box.check() if on else box.uncheck()


def colour_select(page):
    return page.locator("select").filter(has_text="sequence length").first


def size_spread(image: np.ndarray) -> float:
    """How much the dots' sizes differ: the 90th over the 10th percentile of the areas of the
    coloured blobs in a screenshot."""
    from scipy import ndimage

    coloured = (image.max(axis=-1) - image.min(axis=-1)) > 40
    blobs, count = ndimage.label(coloured)
    areas = np.bincount(blobs.ravel())[1:]
    areas = areas[areas >= 2]
    return float(np.percentile(areas, 90) / max(np.percentile(areas, 10), 1)) if len(areas) else 0.0


def green(image: np.ndarray) -> int:
    """Pixels of the query colour at full strength."""
    return int((np.abs(image - np.array([95, 185, 108])).sum(axis=-1) < 40).sum())


def no_errors(errors):
    assert not [e for e in errors if "error" in e.lower() or "undefined" in e.lower()], errors


def test_colour_modes_descriptions_and_size_by_norm(browser, server):  # noqa: F811
    page, errors, plot = open_head(browser, server)
    legend = page.locator(".qk-legend").first
    assert MODE_DESCRIPTIONS["query / key"] in text_of(legend)

    colour_select(page).select_option("position mod 5")
    assert wait_until(page, lambda: MODE_DESCRIPTIONS["position mod 5"] in text_of(legend))
    settle(page, 1500)
    mod5 = pixels(shot(page, "parity-01-position-mod-5", plot))
    rgb = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in MOD5_COLOURS]
    assert sum(has_colour(mod5, c, 60) for c in rgb) >= 4  # the five stripes' colours

    colour_select(page).select_option("token frequency")
    assert wait_until(page, lambda: MODE_DESCRIPTIONS["token frequency"] in text_of(legend))
    assert "seen 1-" in text_of(legend)
    settle(page, 1500)
    frequency = pixels(shot(page, "parity-02-token-frequency", plot))
    assert np.abs(frequency - mod5).sum() > 1000

    colour_select(page).select_option("query / key")
    check(page, ".qk-labels-toggle", False)  # region labels off: only dots are coloured
    assert wait_until(page, lambda: MODE_DESCRIPTIONS["query / key"] in text_of(legend))
    settle(page, 1500)
    one_size = pixels(shot(page, "parity-03-one-size", plot))
    check(page, ".qk-size-norm", True)
    assert wait_until(page, lambda: "dot size" in text_of(legend))
    settle(page, 1500)
    sized = pixels(shot(page, "parity-04-size-by-norm", plot))
    assert size_spread(sized) > 1.5 * size_spread(one_size)  # small, medium and large dots
    shot(page, "parity-05-legend", legend)
    no_errors(errors)


def test_token_labels_appear_as_the_user_zooms_in(browser, server, text_run):  # noqa: F811
    from pipeline.store import open_run

    tokens = set(open_run(text_run).tokens()["token"].astype(str))
    page, errors, plot = open_head(browser, server)
    shown = lambda: renderer(page, tokens_layer.RENDERER_NAME, "text")  # noqa: E731
    assert not shown()  # every point in view: no token labels
    box = plot.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(30):  # the wheel zooms in about the pointer, a small step at a time
        page.mouse.wheel(0, -100)
        page.wait_for_timeout(700)
        if shown():
            break
    assert wait_until(page, lambda: bool(shown())), "no token labels after zooming in"
    labels = shown()
    assert set(labels) <= tokens
    settle(page)
    with_labels = pixels(shot(page, "parity-06-token-labels", plot))
    check(page, ".qk-token-labels-toggle", False)
    assert wait_until(page, lambda: not shown())
    settle(page)
    without = pixels(shot(page, "parity-07-token-labels-off", plot))
    assert (np.abs(with_labels - without).sum(axis=-1) > 150).sum() > 100
    no_errors(errors)


def sequence_of(page) -> int:
    return int(re.search(r"in sequence (\d+)", text_of(page.locator(".qk-sequence-info").first)).group(1))


def click_and_check_sentence(page, plot, run, tokens, kind: str) -> str:
    """Clicks points until one of `kind` is picked, then checks its sentence's lines (every
    query's top 2 keys with weight >= 0.05, opacity = weight), the clicked point's own links and
    the "pos:token" labels; returns the kind finally clicked (a queued tap may pick another)."""
    info = page.locator(".qk-sequence-info").first
    assert click_until(page, plot, lambda: f"({kind}," in text_of(info))
    steady(page, lambda: text_of(info))
    clicked = re.search(r"\((query|key),", text_of(info)).group(1)
    seq_id = sequence_of(page)
    expected = attention_lines.sentence_lines(run.attention(seq_id, 1, 0))
    assert len(expected) > 0
    lines = lambda: renderer(page, attention_lines.RENDERER_NAME, "alpha")  # noqa: E731
    own = lambda: renderer(page, attention_lines.SELECTED_RENDERER_NAME, "x0")  # noqa: E731
    assert wait_until(page, lambda: len(lines()) == len(expected) and bool(own()))
    assert np.allclose(sorted(lines()), sorted(expected["weight"]), atol=1e-4)
    sequence = tokens[tokens["seq_id"] == seq_id]
    pos_token = {f"{p}:{t}" for p, t in zip(sequence["pos"], sequence["token"].astype(str))}
    words = set(sequence["token"].astype(str))
    labels = lambda: set(renderer(page, tokens_layer.RENDERER_NAME, "text"))  # noqa: E731
    assert wait_until(page, lambda: bool(labels() & pos_token) and labels() <= pos_token | words), sorted(labels())
    settle(page)
    shot(page, f"parity-08-attention-lines-{clicked}", plot)
    return clicked


def test_attention_lines_for_a_clicked_sentence_and_key(browser, server, text_run):  # noqa: F811
    from pipeline.store import open_run

    run = open_run(text_run)
    page, errors, plot = open_head(browser, server)
    tokens = run.tokens()
    kinds = set()
    for _ in range(4):  # a clicked query and a clicked key
        if kinds == {"query", "key"}:
            break
        kinds.add(click_and_check_sentence(page, plot, run, tokens, min({"query", "key"} - kinds)))
    assert kinds == {"query", "key"}

    check(page, ".qk-lines-toggle", False)
    assert wait_until(page, lambda: not renderer(page, attention_lines.RENDERER_NAME, "alpha"))
    no_errors(errors)


def test_loading_indicator_clear_selection_and_search_emphasis(browser, server):  # noqa: F811
    page, errors, plot = open_head(browser, server)
    page.evaluate(WATCH_LOADING)
    head_select = page.locator("select").nth(2)
    head_select.select_option("1")
    title = page.locator(".qk-head-title").first
    assert wait_until(page, lambda: "Layer 1, head 1" in text_of(title))
    assert wait_until(page, lambda: page.evaluate("window.qkSawLoading"), 5_000), "no loading indicator"
    settle(page, 1500)
    before = pixels(shot(page, "parity-10-head", plot))

    # clear selection: the clicked sentence, its lines and the sequence view go, the fade with them
    info = page.locator(".qk-sequence-info").first
    assert click_until(page, plot, lambda: "in sequence" in text_of(info))
    steady(page, lambda: text_of(info))
    assert wait_until(page, lambda: bool(renderer(page, attention_lines.SELECTED_RENDERER_NAME, "x0")))
    settle(page, 1500)
    selected = pixels(shot(page, "parity-11-selected", plot))
    assert green(selected) < 0.6 * green(before)  # the rest faded under the sentence
    page.locator(".qk-clear button").first.click()
    assert wait_until(page, lambda: "click a point" in text_of(info))
    assert wait_until(page, lambda: not renderer(page, attention_lines.SELECTED_RENDERER_NAME, "x0")
                      and not renderer(page, attention_lines.RENDERER_NAME, "alpha"))
    assert wait_until(page, lambda: not page.locator(".qk-sequence").first.is_visible())
    settle(page, 1500)
    cleared = pixels(shot(page, "parity-12-cleared", plot))
    assert green(cleared) > 0.8 * green(before)  # no longer faded

    # search: hits enlarged and outlined, the rest faded, in the head and in the matrix
    search = page.locator("input[placeholder='a token, or re:regex']").first
    search.fill("cat")
    search.press("Enter")
    page.locator(".qk-count").first.wait_for(state="visible", timeout=20_000)
    settle(page, 2000)
    emphasised = pixels(shot(page, "parity-13-search-head", plot))
    assert green(emphasised) < 0.6 * green(before)  # the rest faded
    assert has_colour(emphasised, (32, 32, 32), 20)  # the hits' outlines
    page.get_by_text("Matrix", exact=True).first.click()
    matrix = page.locator(".qk-matrix").first
    matrix.wait_for(state="visible", timeout=20_000)
    settle(page, 2000)
    tiles = pixels(shot(page, "parity-14-search-matrix", matrix))
    assert has_colour(tiles, (255, 127, 0), 30)  # hits marked in the thumbnails
    assert "marked orange in every head" in text_of(page.locator(".qk-matrix-caption").first)
    no_errors(errors)


SENTENCE_WEIGHTS = """() => {
  for (const doc of (window.Bokeh && window.Bokeh.documents) || [])
    for (const model of doc.all_models)
      if (model.name === 'qk-sentence-attention') return Array.from(model.data.w || []);
  return [];
}"""


def test_value_norm_weighting_in_the_sentence_view(browser, server, text_run):  # noqa: F811
    """The run stores values: "weight by value norm" redraws the clicked sentence with
    a_ij |v_j| renormalized per query, exactly the store's `value_norm` weighting."""
    from pipeline.store import open_run

    run = open_run(text_run)
    page, errors, plot = open_head(browser, server)
    info = page.locator(".qk-sequence-info").first
    assert click_until(page, plot, lambda: "in sequence" in text_of(info))
    steady(page, lambda: text_of(info))
    seq_id = sequence_of(page)
    weights = lambda: np.asarray(page.evaluate(SENTENCE_WEIGHTS))  # noqa: E731
    plain = run.attention(seq_id, 1, 0)
    assert wait_until(page, lambda: weights().size == plain.size and np.allclose(weights(), plain.ravel(), atol=1e-4))
    check(page, ".qk-value-weighted", True)
    weighted = run.attention(seq_id, 1, 0, weighting="value_norm")
    assert not np.allclose(weighted, plain, atol=1e-3)
    assert wait_until(page, lambda: weights().size == weighted.size
                      and np.allclose(weights(), weighted.ravel(), atol=1e-4)), "the view kept plain attention"
    settle(page)
    shot(page, "parity-15-value-weighted", page.locator(".qk-sentence-plot").first)
    no_errors(errors)


RANGES = """() => { const out = [];
  for (const doc of window.Bokeh.documents) for (const model of doc.all_models)
    if (model.type === 'Range1d') out.push(model.end - model.start);
  return out; }"""


def test_zooming_in_without_end_stops_at_a_millionth_of_the_head(browser, server):  # noqa: F811
    """A wheel held down used to shrink the head's ranges to nothing, then NaN, and the view broke."""
    page, errors, plot = open_head(browser, server)
    box = plot.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    widths = page.evaluate(RANGES)
    for _ in range(40):
        page.mouse.wheel(0, -600)
    settle(page, 1500)
    zoomed = page.evaluate(RANGES)
    assert all(np.isfinite(width) and width > 0 for width in zoomed), zoomed
    assert min(zoomed) < 1e-3 * max(widths)
    page.locator(".qk-reset-zoom button").first.click()
    assert wait_until(page, lambda: max(page.evaluate(RANGES)) >= 0.5 * max(widths))
    no_errors(errors)

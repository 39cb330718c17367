"""The head atlas in a real browser (Debian's Chromium, Playwright; see test_browser.py): the
Heads tab draws every head, redraws on an axis change and opens the clicked head; the matrix
is coloured, filtered and sorted by a measurement; the head view lists the head's ranks and
top sequences. The Heads tab's screenshot goes to test-artifacts/heads_tab.png (README)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_browser import ARTIFACTS, browser, has_colour, pixels, serve, stop, text_of  # noqa: F401  (fixture)
from test_heads_view import measured_run  # noqa: F401  (fixture)
from viz_fixtures import text_run  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(240)
SCREENSHOT = ARTIFACTS.parent / "heads_tab.png"

# The Heads tab's glyphs as the browser drew them: data and page coordinates of every point.
SCATTER_JS = """() => {
  const views = [...Bokeh.index.query(v => v.model.data_source != null && v.model.data_source.data != null
                 && 'x_value' in v.model.data_source.data && 'layer' in v.model.data_source.data)];
  return views.map(v => {
    const d = v.model.data_source.data, box = v.parent.el.getBoundingClientRect();
    return {layer: Array.from(d.layer), head: Array.from(d.head), x: Array.from(d.x_value),
            y: Array.from(d.y_value),
            px: Array.from(d.x_value).map(x => box.left + v.coordinates.x_scale.compute(x)),
            py: Array.from(d.y_value).map(y => box.top + v.coordinates.y_scale.compute(y))};
  });
}"""
# Page coordinates of matrix point (x, y) (cell (r, c) spans x in [c, c + 1], y from the bottom).
MATRIX_CELL_JS = """([n_heads, n_layers, x, y]) => {
  const [v] = [...Bokeh.index.query(u => u.model.data_source != null && u.model.data_source.data != null
               && 'image' in u.model.data_source.data && u.model.data_source.data.dw[0] == n_heads
               && u.model.data_source.data.dh[0] == n_layers)];
  const box = v.parent.el.getBoundingClientRect();
  return [box.left + v.coordinates.x_scale.compute(x), box.top + v.coordinates.y_scale.compute(y)];
}"""


@pytest.fixture(scope="module")
def served(measured_run):  # noqa: F811
    process, url = serve(measured_run)
    yield url
    stop(process)


def open_page(browser, url):  # noqa: F811
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(url, wait_until="networkidle")
    page.locator(".qk-matrix").first.wait_for(state="visible", timeout=60_000)
    return page, errors


def open_tab(page, name: str):
    page.locator(".bk-tab").filter(has_text=re.compile(f"^{name}$")).click()


def wait_for_scatter(page, done, timeout_ms: int = 20_000) -> dict:
    """The drawn scatter, once `done(drawn)` holds (Bokeh redraws asynchronously)."""
    for _ in range(timeout_ms // 250):
        drawn = page.evaluate(SCATTER_JS)
        if len(drawn) == 1 and done(drawn[0]):
            return drawn[0]
        page.wait_for_timeout(250)
    raise AssertionError(f"the scatter never reached the expected state: {page.evaluate(SCATTER_JS)}")


def choose(page, label: str, value: str):
    """Select `value` in the Panel select widget labelled `label`."""
    page.locator(".bk-input-group").filter(has=page.locator(f"label:text-is('{label}')")).locator(
        "select").select_option(value)


def test_heads_tab_draws_every_head_redraws_and_opens_the_clicked_one(browser, served, measured_run):  # noqa: F811
    from pipeline.store import open_run

    run = open_run(measured_run)
    table = run.head_measurements()
    page, errors = open_page(browser, served)
    open_tab(page, "Heads")
    drawn = wait_for_scatter(page, lambda d: len(d["layer"]) > 0)

    # every head, once, at its own measurements
    assert sorted(zip(drawn["layer"], drawn["head"])) == sorted(zip(table["layer"], table["head"]))
    mine = table.set_index(["layer", "head"])
    for layer, head, x, y in zip(drawn["layer"], drawn["head"], drawn["x"], drawn["y"]):
        assert x == pytest.approx(mine.loc[(layer, head), "prev_weight"])
        assert y == pytest.approx(mine.loc[(layer, head), "sink_weight"])
    assert len(set(np.round(drawn["px"]))) > len(table) // 2  # spread over the plot, not stacked

    # hover shows the head and its numbers
    i = int(np.argmax(drawn["y"]))
    page.mouse.move(drawn["px"][i], drawn["py"][i])
    tip = page.get_by_text(f"L{drawn['layer'][i]} H{drawn['head'][i]}", exact=True)
    tip.wait_for(state="visible", timeout=10_000)
    assert page.get_by_text(f"{drawn['y'][i]:.3f}", exact=True).first.is_visible()
    page.mouse.move(5, 5)

    # an axis change redraws with the new measurement
    choose(page, "X axis", "confidence")
    redrawn = wait_for_scatter(page, lambda d: np.allclose(
        d["x"], [mine.loc[(layer, head), "confidence"] for layer, head in zip(d["layer"], d["head"])]))
    assert redrawn["px"] != drawn["px"]
    page.wait_for_timeout(800)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    png = page.locator(".qk-heads-scatter").first.screenshot()
    legend = page.locator(".qk-heads-legend").first.bounding_box()
    page.screenshot(path=str(SCREENSHOT), clip={"x": 0, "y": 0, "width": 1000,
                                                "height": legend["y"] + legend["height"] + 12})
    assert has_colour(pixels(png), (68, 1, 84)) and has_colour(pixels(png), (253, 231, 37))  # viridis by layer

    # a click opens that head, whose view shows its numbers, ranks and top sequences
    target = int(np.argmax(redrawn["x"]))
    layer, head = redrawn["layer"][target], redrawn["head"][target]
    page.mouse.click(redrawn["px"][target], redrawn["py"][target])
    title = page.locator(".qk-head-title").first
    page.wait_for_function("1")
    for _ in range(40):
        if title.is_visible() and f"Layer {layer}, head {head}" in text_of(title):
            break
        page.wait_for_timeout(250)
    assert f"Layer {layer}, head {head}" in text_of(title)
    numbers = text_of(page.locator(".qk-head-numbers").first)
    assert re.search(rf"confidence\s+{mine.loc[(layer, head), 'confidence']:.3g}\s+rank 1 of {len(table)}", numbers)
    aggregate = page.locator(".qk-aggregate").first  # attention by offset over the corpus (the aggregate view)
    aggregate.wait_for(state="visible", timeout=20_000)
    assert aggregate.locator("canvas").count() > 0

    top = run.head_top_sequences()
    best = int(top[(top["layer"] == layer) & (top["head"] == head)].sort_values("rank")["seq_id"].iloc[0])
    entry = page.locator(".qk-top-sequence button").first
    assert f"seq {best} " in entry.inner_text()
    entry.click()
    info = page.locator(".qk-sequence-info").first
    for _ in range(40):
        if f"in sequence {best}" in text_of(info):
            break
        page.wait_for_timeout(250)
    assert f"in sequence {best}" in text_of(info)
    page.locator(".qk-sequence").first.wait_for(state="visible", timeout=20_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(ARTIFACTS / "heads-head-view.png"), full_page=True)
    assert not errors, errors


def test_matrix_coloured_filtered_and_sorted_by_a_measurement(browser, served, measured_run):  # noqa: F811
    from pipeline.store import open_run

    run = open_run(measured_run)
    table = run.head_measurements()
    page, errors = open_page(browser, served)
    matrix = page.locator(".qk-matrix").first
    page.wait_for_timeout(1500)
    plain = pixels(matrix.screenshot())
    assert not has_colour(plain, (253, 231, 37), tolerance=20)

    choose(page, "Measurement", "sink_weight")
    legend = page.locator(".qk-matrix-legend").first
    for _ in range(40):
        if "sink_weight" in text_of(legend):
            break
        page.wait_for_timeout(250)
    page.wait_for_timeout(1500)
    coloured = pixels(matrix.screenshot(path=str(ARTIFACTS / "heads-matrix-coloured.png")))
    # borders from the viridis ends: the heads with the least and the most sink weight
    assert has_colour(coloured, (68, 1, 84), tolerance=20) and has_colour(coloured, (253, 231, 37), tolerance=20)

    threshold = float(np.median(table["sink_weight"]))
    choose(page, "Show", ">")
    field = page.locator(".bk-input-group").filter(has=page.locator("label:text-is('Threshold')")).locator("input")
    field.fill(f"{threshold:.6f}")
    field.press("Enter")
    expected = int((table["sink_weight"] > float(f"{threshold:.6f}")).sum())
    for _ in range(40):
        if f"{expected} of {len(table)} heads" in text_of(legend):
            break
        page.wait_for_timeout(250)
    assert f"{expected} of {len(table)} heads with sink_weight >" in text_of(legend)
    page.wait_for_timeout(1500)
    veiled = pixels(matrix.screenshot())
    assert np.abs(veiled - coloured).sum() > 10_000  # the failing heads are veiled

    # sorted: the first cell of the first row is that layer's head with the most sink weight
    page.locator(".qk-matrix-sort input[type=checkbox]").check()
    page.wait_for_timeout(2000)
    shot = matrix.screenshot(path=str(ARTIFACTS / "heads-matrix-sorted.png"))
    assert pixels(shot).shape == coloured.shape
    first = table[table["layer"] == run.layers[0]].sort_values("sink_weight", ascending=False, kind="stable")
    at = page.evaluate(MATRIX_CELL_JS, [run.n_heads, len(run.layers), 0.5, len(run.layers) - 0.5])
    page.mouse.click(*at)
    title = page.locator(".qk-head-title").first
    want = f"Layer {run.layers[0]}, head {int(first['head'].iloc[0])}"
    for _ in range(40):
        if want in text_of(title):
            break
        page.wait_for_timeout(250)
    assert want in text_of(title)
    assert not errors, errors


def test_heads_tab_says_how_to_measure_an_unmeasured_run(browser, text_run):  # noqa: F811
    process, url = serve(text_run)
    try:
        page, errors = open_page(browser, url)
        open_tab(page, "Heads")
        message = page.locator(".qk-heads-missing").first
        message.wait_for(state="visible", timeout=20_000)
        assert f"qkatlas heads {text_run}" in message.inner_text()
        assert not page.evaluate(SCATTER_JS)
        assert not errors, errors
    finally:
        stop(process)

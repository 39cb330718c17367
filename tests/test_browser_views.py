"""Real-browser tests of issue 12's sentence view (item 5), semantic zoom (item 1) and several
runs in one server (item 9): a server in a subprocess, Chromium driven by Playwright (see
tests/test_browser.py). Sources are read from the page's Bokeh document by the names the views
give them; screenshots go to each test's tmp dir."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_browser import browser, new_page, serve, stop, text_of  # noqa: F401  (fixture)
from test_browser_parity import HEAD, settle, steady, wait_until
from viz_fixtures import image_run, text_run  # noqa: F401  (fixtures)

from viz.data import KEY_COLOUR, QUERY_COLOUR
from viz.sequence_view import sentence_lines

SOURCE = """(name) => {
  for (const doc of (window.Bokeh && window.Bokeh.documents) || [])
    for (const model of doc.all_models)
      if (model.name === name && model.data !== undefined) {
        const out = {};
        const data = model.data instanceof Map ? model.data : new Map(Object.entries(model.data));
        for (const [key, value] of data) out[key] = Array.from(value);
        return out;
      }
  return null;
}"""

# page coordinates of data point (x, y) of the Bokeh plot named `name`
SCREEN = """([name, x, y]) => {
  const view = Bokeh.index.query_one((v) => v.model.name === name);
  if (!view) return null;
  const box = view.canvas_view.el.getBoundingClientRect();
  return [box.left + view.frame.x_scale.compute(x), box.top + view.frame.y_scale.compute(y)];
}"""

# a server over several runs (and a sentence window of 8 tokens), as `qkatlas serve A B` would start it
SEVERAL = """
import sys
import viz.sequence_view
from viz.server import make_server
viz.sequence_view.WINDOW = 8
server = make_server(sys.argv[1:-2], port=int(sys.argv[-1]))  # RUN ... --port P
server.start()
server.io_loop.start()
"""


def source(page, name: str) -> dict:
    return page.evaluate(SOURCE, name) or {}


def screen(page, name: str, x: float, y: float) -> tuple[float, float]:
    return tuple(page.evaluate(SCREEN, [name, x, y]))


def clean(errors: list[str]) -> list[str]:
    return [e for e in errors if "error" in e.lower() or "undefined" in e.lower()]


def open_sentence(browser, url, query: str = HEAD):  # noqa: F811
    """A head page with a point clicked, its sentence view drawn."""
    page, errors = new_page(browser)
    page.goto(url + query, wait_until="networkidle")
    plot = page.locator(".qk-head-plot").first
    plot.wait_for(state="visible", timeout=60_000)
    settle(page, 1500)
    info = page.locator(".qk-sequence-info").first
    box = plot.bounding_box()
    for i in range(80):
        angle, radius = i * 0.9, 4 * i
        x = box["x"] + box["width"] / 2 + radius * np.cos(angle)
        y = box["y"] + box["height"] / 2 + 15 + radius * np.sin(angle)
        page.mouse.click(x, y)
        page.wait_for_timeout(250)
        if "in sequence" in text_of(info):
            break
    assert wait_until(page, lambda: len(source(page, "qk-sentence-tokens").get("text", [])) > 0)
    steady(page, lambda: (source(page, "qk-sentence-state"), source(page, "qk-sentence-tokens")["text"]))
    return page, errors


def expected_lines(page, active, focus, side) -> set:
    tokens, attention = source(page, "qk-sentence-tokens"), source(page, "qk-sentence-attention")
    n = len(tokens["text"])
    frame = sentence_lines(np.array(attention["w"]).reshape(n, n), np.asarray(active), focus, side)
    return {(int(q), int(k), round(float(w), 4)) for q, k, w in zip(frame["query"], frame["key"], frame["weight"])}


def drawn_lines(page) -> set:
    lines = source(page, "qk-sentence-lines")
    return {(int(q), int(k), round(float(w), 4)) for q, k, w in zip(lines["query"], lines["key"], lines["weight"])}


@pytest.fixture(scope="module")
def server(text_run):  # noqa: F811
    process, url = serve(text_run)
    yield url
    stop(process)


def test_sentence_view_hover_toggle_hide_and_reset(browser, server, tmp_path):  # noqa: F811
    page, errors = open_sentence(browser, server)
    tokens, state = source(page, "qk-sentence-tokens"), source(page, "qk-sentence-state")
    n, selected = len(tokens["text"]), state["selected"][0]
    side = "query" if state["kind"][0] == 0 else "key"
    assert drawn_lines(page) == expected_lines(page, np.ones(n), selected, side)  # the server's lines

    hovered = (selected + 1) % n  # hover a query on the left: its lines, drawn in the browser
    page.mouse.move(*screen(page, "qk-sentence-plot", -0.4, -hovered))
    assert wait_until(page, lambda: source(page, "qk-sentence-state")["hover"][0] == hovered, 5000)
    lines = source(page, "qk-sentence-lines")
    strong = [q for q, c in zip(lines["query"], lines["colour"]) if c == QUERY_COLOUR]
    assert strong and set(strong) == {hovered}
    assert drawn_lines(page) == expected_lines(page, np.ones(n), hovered, "query")

    off = (hovered + 2) % n  # click a key off: no line touches it, the rest renormalized
    page.mouse.click(*screen(page, "qk-sentence-plot", 1.4, -off))
    assert wait_until(page, lambda: source(page, "qk-sentence-tokens")["active"][off] == 0, 5000)
    page.mouse.move(*screen(page, "qk-sentence-plot", -0.4, -hovered))
    page.wait_for_timeout(300)
    active = np.ones(n)
    active[off] = 0
    lines = source(page, "qk-sentence-lines")
    assert off not in lines["query"] and off not in lines["key"]
    mine = [w for q, w in zip(lines["query"], lines["weight"]) if q == hovered]
    assert abs(sum(mine) - 1) < 1e-6 and drawn_lines(page) == expected_lines(page, active, hovered, "query")
    page.screenshot(path=str(tmp_path / "sentence-toggled.png"))

    page.mouse.move(*screen(page, "qk-sentence-plot", 1.4, -hovered))  # a key: the queries that look at it
    assert wait_until(page, lambda: source(page, "qk-sentence-state")["side"][0] == 1, 5000)
    lines = source(page, "qk-sentence-lines")
    assert {k for k, c in zip(lines["key"], lines["colour"]) if c == KEY_COLOUR} == {hovered}

    special = np.asarray(tokens["special"]) > 0  # [CLS], [SEP], the first token
    assert special[0] and special.sum() >= 2
    page.locator(".qk-sentence-controls input[type=checkbox]").first.check()
    assert wait_until(page, lambda: source(page, "qk-sentence-state")["hide"][0] == 1, 5000)
    lines = source(page, "qk-sentence-lines")
    hidden = set(np.flatnonzero(special))
    assert lines["query"] and not hidden & (set(lines["query"]) | set(lines["key"]))
    page.screenshot(path=str(tmp_path / "sentence-hidden.png"))

    page.locator(".qk-sentence-controls button").first.click()
    assert wait_until(page, lambda: source(page, "qk-sentence-state")["hide"][0] == 0, 5000)
    page.mouse.move(10, 10)
    page.wait_for_timeout(300)
    assert all(a == 1 for a in source(page, "qk-sentence-tokens")["active"])
    assert drawn_lines(page) == expected_lines(page, np.ones(n), selected, side)
    assert not clean(errors), errors


def test_semantic_zoom_arrows_reset_and_view_all(browser, server, tmp_path):  # noqa: F811
    page, errors = new_page(browser)
    page.goto(server, wait_until="networkidle")
    page.locator(".qk-matrix").first.wait_for(state="visible", timeout=60_000)
    settle(page, 1000)
    layer_select = page.locator("select").nth(1)  # method, layer, head: Panel's selects in order
    head_select = page.locator("select").nth(2)
    x, y = screen(page, "qk-matrix-plot", 2.5, 0.5)  # head 2 of the bottom row (layer 1)
    page.mouse.move(x, y)
    for _ in range(40):
        page.mouse.wheel(0, -200)
        page.wait_for_timeout(150)
        if page.locator(".qk-head-plot").first.is_visible():
            break
    assert wait_until(page, lambda: page.locator(".qk-head-plot").first.is_visible())
    assert wait_until(page, lambda: (layer_select.input_value(), head_select.input_value()) == ("1", "2"))
    settle(page, 1500)
    page.screenshot(path=str(tmp_path / "zoomed-into-head.png"))

    for button, expected in ((".qk-prev-head", ("1", "1")), (".qk-prev-layer", ("0", "1")),
                             (".qk-next-head", ("0", "2")), (".qk-next-layer", ("1", "2"))):
        page.locator(f"{button} button").first.click()
        assert wait_until(page, lambda want=expected: (layer_select.input_value(), head_select.input_value()) == want)
    page.locator(".qk-reset-zoom button").first.click()
    settle(page, 1000)

    plot = page.locator(".qk-head-plot").first  # zooming out of the head returns to every head
    box = plot.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(30):
        page.mouse.wheel(0, 300)
        page.wait_for_timeout(200)
        if page.locator(".qk-matrix").first.is_visible():
            break
    assert wait_until(page, lambda: page.locator(".qk-matrix").first.is_visible())
    page.screenshot(path=str(tmp_path / "zoomed-out-to-matrix.png"))

    page.goto(server + HEAD, wait_until="networkidle")  # "view all heads"
    page.locator(".qk-head-plot").first.wait_for(state="visible", timeout=60_000)
    page.locator(".qk-all-heads button").first.click()
    assert wait_until(page, lambda: page.locator(".qk-matrix").first.is_visible())
    assert not clean(errors), errors


def serve_several(runs: list[str]):
    return serve(*runs, command=("-c", SEVERAL))


def test_several_runs_picker_names_only_and_window(browser, text_run, tmp_path):  # noqa: F811
    nightly = tmp_path / "nightly"
    for name in ("2026-01-01", "2026-01-02"):
        shutil.copytree(text_run, nightly / name)
    process, url = serve_several([text_run, str(nightly)])
    try:
        page, errors = new_page(browser)
        page.goto(url, wait_until="networkidle")
        picker = page.locator(".qk-run-picker select").first
        picker.wait_for(state="attached", timeout=60_000)
        names = picker.locator("option").all_inner_texts()
        assert names == ["text", "2026-01-02", "2026-01-01"]  # the directory's runs newest first
        assert not any("/" in name for name in names)
        picker.select_option("2026-01-01")
        page.wait_for_url("**?run=2026-01-01", timeout=20_000)
        page.locator(".qk-matrix").first.wait_for(state="visible", timeout=60_000)
        assert page.locator(".qk-run-picker select").first.input_value() == "2026-01-01"
        page.screenshot(path=str(tmp_path / "second-run.png"))

        for refused in ("nope", text_run, "../text"):
            page.goto(url + "?run=" + refused, wait_until="networkidle")
            message = page.locator(".qk-run-refused").first
            message.wait_for(state="attached", timeout=30_000)
            assert "No run named" in text_of(message) and str(tmp_path) not in page.content()

        page, errors2 = open_sentence(browser, url, HEAD + "&run=text")  # a window of 8 tokens at most
        tokens = source(page, "qk-sentence-tokens")
        assert 0 < len(tokens["text"]) <= 8
        assert len(source(page, "qk-sentence-attention")["w"]) == len(tokens["text"]) ** 2
        assert not clean(errors + errors2), errors + errors2
    finally:
        stop(process)


def test_image_grid_opens_an_image(browser, image_run, tmp_path):  # noqa: F811
    process, url = serve(image_run)
    try:
        page, errors = new_page(browser)
        page.goto(url, wait_until="networkidle")
        page.locator(".bk-tab").filter(has_text="Images").click()
        assert wait_until(page, lambda: len(source(page, "qk-image-grid").get("x", [])) == 1)
        settle(page, 800)
        page.screenshot(path=str(tmp_path / "image-grid.png"))
        page.mouse.click(*screen(page, "qk-image-grid-plot", 2.5, 4.5))  # the third image
        info = page.locator(".qk-sequence-info").first
        assert wait_until(page, lambda: "in sequence" in text_of(info))
        page.locator(".qk-image-view").first.wait_for(state="visible", timeout=20_000)
        assert "in sequence 2" in text_of(info)
        page.screenshot(path=str(tmp_path / "image-opened.png"))
        assert not clean(errors), errors
    finally:
        stop(process)

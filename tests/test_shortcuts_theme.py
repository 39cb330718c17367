"""Keyboard shortcuts of the navigation buttons, the vector's norm in the hover card, and the
light / dark theme (issue 12), without a browser (tests/test_browser_keys.py drives them in one)."""

from __future__ import annotations

from urllib.parse import parse_qs

import numpy as np
import panel as pn
import pytest
from viz_fixtures import text_run  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def data(text_run):  # noqa: F811
    import holoviews as hv

    from pipeline.store import open_run
    from viz.data import RunData

    hv.extension("bokeh", logo=False)
    return RunData(open_run(text_run))


def nav_buttons(dashboard) -> dict[str, pn.widgets.Button]:
    return {widget.css_classes[0]: widget for widget in dashboard.nav if isinstance(widget, pn.widgets.Button)}


def test_every_shortcut_clicks_a_navigation_button_named_in_its_tooltip(data):
    from viz.views import KEY_LABELS, SHORTCUTS, Dashboard, KeyShortcuts

    dashboard = Dashboard(data)
    buttons = nav_buttons(dashboard)
    assert set(SHORTCUTS.values()) == {"qk-prev-head", "qk-next-head", "qk-prev-layer", "qk-next-layer",
                                       "qk-reset-zoom", "qk-all-heads"} <= set(buttons)
    for key, css in SHORTCUTS.items():
        assert KEY_LABELS.get(key, key) in str(buttons[css].description), (key, css)
    keys = [widget for widget in dashboard.nav if isinstance(widget, KeyShortcuts)]
    assert len(keys) == 1 and keys[0].keys == SHORTCUTS
    assert all(KEY_LABELS.get(key, key) in keys[0].hint for key in ("ArrowLeft", "ArrowUp", "r", "Escape"))
    assert "INPUT" in KeyShortcuts._esm and "composedPath" in KeyShortcuts._esm  # typed keys are left alone


def test_the_buttons_the_keys_click_step_heads_and_layers(data):
    from viz.state import HEAD_TAB, MATRIX_TAB
    from viz.views import SHORTCUTS, Dashboard

    dashboard = Dashboard(data, {"layer": "0", "head": "1"})
    buttons, state = nav_buttons(dashboard), dashboard.state
    assert state.tab == HEAD_TAB
    for key, expected in (("ArrowRight", (0, 2)), ("ArrowDown", (1, 2)), ("ArrowLeft", (1, 1)), ("ArrowUp", (0, 1))):
        buttons[SHORTCUTS[key]].clicks += 1
        assert (state.layer, state.head) == expected, key
    buttons[SHORTCUTS["Escape"]].clicks += 1
    assert state.tab == MATRIX_TAB


def test_hover_card_shows_the_hovered_vectors_norm_without_reading_the_head(data):
    """The norm comes from the one vector hovered (a read of one chunk), or from the head's norms
    once a colour mode has computed them: both equal the stored vector's norm."""
    from viz.data import point_info

    n = data.n
    queries, keys = data.run.queries(1, 2), data.run.keys(1, 2)
    for point, vector in ((5, queries[5]), (n + 7, keys[7]), (2 * n - 1, keys[n - 1])):
        expected = float(np.linalg.norm(vector))
        assert data.point_norm(1, 2, point) == pytest.approx(expected, rel=1e-5)
        assert (1, 2) not in data._caches["norms"], "a hover read the whole head"
        info = point_info(data.tokens, data.sequences, point, norm=data.point_norm(1, 2, point))
        assert info["norm"] == pytest.approx(expected, rel=1e-5)
        assert info["kind"] == ("query" if point < n else "key")
    norms = data.norms(1, 2)
    assert data.point_norm(1, 2, n + 7) == pytest.approx(float(norms[n + 7]))
    assert "norm" not in point_info(data.tokens, None, 5)


def test_hover_card_html_names_the_norm(data):
    from viz.views import Dashboard

    dashboard = Dashboard(data, {"layer": "0", "head": "3"})
    head = dashboard.head
    x, y = head.raster.coords[9]
    head._on_pointer(x=float(x), y=float(y))
    assert head.hover is not None
    expected = float(np.linalg.norm(np.concatenate([data.run.queries(0, 3), data.run.keys(0, 3)])[head.hover]))
    assert f"norm {expected:.3g}" in head.hover_pane.object


def test_theme_switch_reopens_the_view_in_the_other_theme(data):
    from viz.views import Dashboard, page_query

    light = Dashboard(data, {"layer": "1", "head": "2", "run": [b"nightly"]})
    assert nav_buttons(light)["qk-theme"].label.endswith("dark")
    query = parse_qs(page_query(light.args, light.state, "dark")[1:])
    assert query == {"run": ["nightly"], "method": ["pca"], "dim": ["2"], "colour": [light.state.colour],
                     "layer": ["1"], "head": ["2"], "theme": ["dark"]}
    light.state.tab = 0  # the matrix: no head in the URL, or it would open one
    assert set(parse_qs(page_query(light.args, light.state, "default")[1:])) == {"run", "method", "dim", "colour"}

    with pn.config.set(theme="dark"):
        dark = Dashboard(data, {"theme": [b"dark"]})
        assert nav_buttons(dark)["qk-theme"].label.endswith("light")
        assert "theme" not in parse_qs(page_query(dark.args, dark.state, "default")[1:])

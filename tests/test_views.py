"""The dashboard's views without a browser (issue 12, items 1, 5 and 9): the sentence view's
lines and window, adjacent-head steps, the head's zoom-out return, and a server's run table."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from viz_fixtures import image_run, text_run  # noqa: F401  (fixtures)

from viz.sequence_view import sentence_lines, sequence_window


@pytest.fixture(scope="module")
def dashboard(text_run):  # noqa: F811
    import holoviews as hv

    from pipeline.store import open_run
    from viz.data import RunData
    from viz.views import Dashboard

    hv.extension("bokeh", logo=False)
    return Dashboard(RunData(open_run(text_run)), {"layer": "1", "head": "0"})


def test_sentence_lines_renormalize_over_the_tokens_left_on():
    attention = np.random.default_rng(0).random((7, 7))
    attention /= attention.sum(axis=1, keepdims=True)
    active = np.ones(7)
    active[[0, 3]] = 0
    lines = sentence_lines(attention, active, 2, "query", threshold=0.0)
    assert not ({0, 3} & (set(lines["query"]) | set(lines["key"])))
    sums = lines.groupby("query")["weight"].sum()
    assert np.allclose(sums, 1) and len(sums) == 5
    kept = attention[2, [1, 2, 4, 5, 6]]
    two_four = lines.loc[(lines["query"] == 2) & (lines["key"] == 4), "weight"].iat[0]
    assert np.isclose(two_four, attention[2, 4] / kept.sum())
    strong = lines["colour"] != "#b0b0b0"
    assert set(lines.loc[strong, "query"]) == {2} and strong.sum() == 5
    keyed = sentence_lines(attention, np.ones(7), 4, "key")
    assert set(keyed.loc[keyed["colour"] != "#b0b0b0", "key"]) == {4}


def test_sequence_window_keeps_the_clicked_token_and_never_every_pair():
    for n, pos in ((500, 0), (500, 250), (500, 499), (30, 29)):
        start, stop = sequence_window(n, pos, 64)
        assert start <= pos < stop and stop - start == min(n, 64) and 0 <= start and stop <= n


def test_sentence_view_and_its_window(dashboard, monkeypatch):
    import viz.sequence_view

    d = dashboard
    d.tabs.active = 1
    d.selected_point = 3
    view = d.sequence
    n = int(d.data.tokens["seq_len"].iat[3])
    assert len(view.sentence.tok.data["text"]) == n and view.sequence_pane.visible
    assert len(view.sentence.att.data["w"]) == n * n and view.sentence.tok.data["special"][0] == 1
    monkeypatch.setattr(viz.sequence_view, "WINDOW", 4)
    d.selected_point = None
    d.selected_point = 3
    assert len(view.sentence.tok.data["text"]) == 4 and len(view.sentence.att.data["w"]) == 16
    assert "of" in view.window_info.object
    d.clear_selection()


def test_adjacent_heads_and_zoom_out_return(dashboard):
    d, state = dashboard, dashboard.state
    state.open_head(1, 0)
    state.step_head(-1)
    assert (state.layer, state.head) == (1, 0)  # stays within the layer
    state.step_head(1)
    state.step_layer(-1)
    assert (state.layer, state.head) == (0, 1)
    state.step_layer(1)
    state.tab = 1
    (x0, x1), (y0, y1) = d.head.raster.x_full, d.head.raster.y_full
    d.head.range_stream.event(x_range=(x0, x1), y_range=(y0, y1))
    assert state.tab == 1
    grow = 1.1 * (x1 - x0), 1.1 * (y1 - y0)
    d.head.range_stream.event(x_range=(x0 - grow[0], x1 + grow[0]), y_range=(y0 - grow[1], y1 + grow[1]))
    assert state.tab == 0


def test_run_table_names_runs_by_directory(text_run, tmp_path):  # noqa: F811
    from viz.server import ServeError, run_table

    nightly = tmp_path / "nightly"
    for name in ("2026-01-01", "2026-01-02"):
        shutil.copytree(text_run, nightly / name)
    (nightly / "not-a-run").mkdir()
    table = run_table([text_run, str(nightly)])
    assert list(table) == ["text", "2026-01-02", "2026-01-01"]
    with pytest.raises(ServeError, match="named 'text'"):
        run_table([text_run, text_run])
    with pytest.raises(ServeError, match="neither a run"):
        run_table([str(tmp_path / "nightly" / "not-a-run")])


def test_app_refuses_a_run_name_not_listed(text_run):  # noqa: F811
    from viz.server import run_table
    from viz.views import app

    page = app(run_table([text_run]), {"run": [b"/etc/passwd"]})
    assert "No run named" in page.object and "qk-run-refused" in page.object
    chosen = app(run_table([text_run]), {"run": [b"text"]})
    assert chosen.objects[0].value == "text"


def test_image_grid_pages_and_opens_an_image(image_run):  # noqa: F811
    import holoviews as hv

    from pipeline.store import open_run
    from viz.data import RunData
    from viz.image_grid_view import SIDE, grid_image
    from viz.views import Dashboard

    hv.extension("bokeh", logo=False)
    d = Dashboard(RunData(open_run(image_run)))
    assert len(d.tabs) == 4  # Matrix, Head, Heads, Images
    grid = d.images
    ids = grid.shown()
    assert len(ids) == len(d.data.sequences) and grid.image.data["image"][0].shape[1] == 8 * (SIDE + 4)
    first = np.asarray(d.data.image(int(ids[1])).convert("RGBA").resize((SIDE, SIDE)))
    assert np.array_equal(grid_image([d.data.image(int(i)) for i in ids])[2:2 + SIDE, SIDE + 6:2 * SIDE + 6], first)
    grid._on_tap(1.5, 4.5)  # the second image of the top row
    assert d.state.tab == 1 and d.selected_point == d.data.token_offset(int(ids[1]))
    assert f"in sequence {int(ids[1])}" in d.sequence.sequence_info.object and d.sequence.image_pane.visible

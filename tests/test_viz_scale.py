"""The dashboard at scale: the token index answers exact and prefix searches as a scan of every
token would, and sessions that open the same head share its arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd


def scan(tokens: pd.DataFrame, keep) -> np.ndarray:
    """The token rows whose search form (lower case, no sub-word marker) passes `keep`: a scan."""
    from viz.data import clean_tokens

    forms = clean_tokens(tokens["token"]).str.lower()
    return np.flatnonzero(np.array([keep(form) for form in forms], dtype=bool))


def random_tokens(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    stems = ["the", "The", "then", "them", "##the", "Ġthere", "▁un", "un", "under", "unable", "a", "ab", "é",
             "éclair", ",", "[CLS]", "x" * 30]
    return pd.DataFrame({"token": np.array(stems, dtype=object)[rng.integers(0, len(stems), n)]})


def test_token_index_exact_and_prefix_equal_a_scan():
    from viz.data import search_tokens, token_vocabulary

    tokens = random_tokens(5_000)
    index = token_vocabulary(tokens)
    assert (np.diff(index.starts) > 0).all() and list(index.forms) == sorted(index.forms)
    for word in ["the", "THE", "##the", "un", "é", ",", "[cls]", "nothing", "x" * 30]:
        expected = scan(tokens, lambda form, w=word.lower().lstrip("#"): form == w)
        assert np.array_equal(search_tokens(tokens, word, index), expected), word
    for prefix in ["th", "the", "un", "é", "[", "x", "zz", "a"]:
        expected = scan(tokens, lambda form, p=prefix: form.startswith(p))
        found = search_tokens(tokens, prefix + "*", index)
        assert np.array_equal(found, expected) and len(found) == len(expected), prefix
    assert np.array_equal(search_tokens(tokens, "re:th.*", index), scan(tokens, lambda form: form.startswith("th")))


def test_sessions_share_the_open_heads_frames():
    import holoviews as hv

    from workflows.bench.serve import SyntheticRun
    from viz.data import RunData
    from viz.views import Dashboard

    hv.extension("bokeh", logo=False)
    data = RunData(SyntheticRun(2_000))
    first, second = Dashboard(data, {"layer": "1", "head": "2"}), Dashboard(data, {"layer": "1", "head": "2"})
    a, b = first.head.raster, second.head.raster
    assert a is not b and a.frame is b.frame and a.points is b.points
    assert np.shares_memory(a.frame["x"].to_numpy(), a.points.frame["x"].to_numpy())

    second.state.search = "cat"  # one session's search and colour stay its own
    assert first.head.raster.hits is None and second.head.raster.hits is not None
    assert first.head.raster.frame is second.head.raster.frame
    second.state.colour = "position"
    assert second.head.raster.frame is not first.head.raster.frame
    assert second.head.raster.points is first.head.raster.points
    assert first.head.raster.frame is a.frame

    first.head.size_by_norm = second.head.size_by_norm = True
    assert first.head.raster.tier_frames is not None
    first.state.colour = "position"
    assert first.head.raster.tier_frames is second.head.raster.tier_frames


def test_the_density_grid_bounds_the_points_in_any_range():
    from workflows.bench.serve import synthetic_coords
    from viz.raster import head_points
    from viz.tokens_layer import points_in_view

    coords = synthetic_coords(50_000, seed=3)
    points = head_points(coords)
    assert points.grid.sum() == len(coords)
    rng = np.random.default_rng(0)
    (x0, x1), (y0, y1) = points.x_full, points.y_full
    for _ in range(50):
        xs, ys = np.sort(rng.uniform(x0, x1, 2)), np.sort(rng.uniform(y0, y1, 2))
        assert points.most_in(xs, ys) >= len(points_in_view(coords, xs, ys))
    cx, cy = coords[0]
    tiny = ((cx - 1e-3, cx + 1e-3), (cy - 1e-3, cy + 1e-3))
    assert 1 <= points.most_in(*tiny) < len(coords) // 100

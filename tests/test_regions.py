"""Labelled regions of a head's layout (`pipeline.regions`) and their drawing in the head view
(`viz.labels`)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from viz_fixtures import text_run  # noqa: F401  (fixture)

from pipeline.regions import COLUMNS, head_regions, token_terms
from viz.labels import (
    cull_overlaps,
    pick_scale,
    region_frame,
    text_boxes,
    visible_labels,
)

BLOBS = {(0.0, 0.0): ["cat", "##dog", "Ġcat", "▁dog"], (10.0, 0.0): ["paris", "france"],
         (0.0, 10.0): [",", ".", ";"]}


def layout(blobs: dict, n_per: int, spread: float = 0.5, seed: int = 1):
    """A head's points (queries then keys) in Gaussian blobs, each blob's tokens drawn from its
    own words; a token's query and key sit in the same blob."""
    rng = np.random.default_rng(seed)
    centres = np.repeat(np.array(list(blobs), dtype=np.float64), n_per, axis=0)
    words = np.concatenate([rng.choice(w, n_per) for w in blobs.values()])
    queries = centres + rng.normal(0, spread, centres.shape)
    keys = centres + rng.normal(0, spread, centres.shape)
    return np.concatenate([queries, keys]).astype(np.float32), pd.Series(np.concatenate([words, words]))


def test_three_blobs_make_three_coarse_regions_named_by_their_words():
    coords, tokens = layout(BLOBS, 1500)
    regions = head_regions(coords, tokens)
    assert list(regions.columns) == COLUMNS
    coarse = regions[regions["scale"] == 0]
    assert len(coarse) == 3
    by_centre = {}
    for row in coarse.itertuples():
        centre = min(BLOBS, key=lambda c: (c[0] - row.x) ** 2 + (c[1] - row.y) ** 2)
        assert np.hypot(centre[0] - row.x, centre[1] - row.y) < 1.0  # the anchor sits inside its blob
        by_centre[centre] = set(row.label.split(" · "))
        assert 2500 <= row.n_points <= 3000  # a blob's 3000 points, less HDBSCAN's noise
        assert row.share_queries == pytest.approx(0.5, abs=0.05)
    assert by_centre[(0.0, 0.0)] == {"cat", "dog"}  # word-piece marks removed, pieces merged
    assert by_centre[(10.0, 0.0)] == {"paris", "france"}
    assert by_centre[(0.0, 10.0)] <= {",", ".", ";"} and len(by_centre[(0.0, 10.0)]) >= 2


def test_labels_are_the_distinctive_tokens_not_the_common_ones():
    """'the' fills every blob; each region is still named by its own words."""
    rng = np.random.default_rng(2)
    coords, tokens = layout({(0.0, 0.0): ["cat"], (10.0, 0.0): ["paris"], (0.0, 10.0): ["."]}, 1000)
    tokens = tokens.where(rng.random(len(tokens)) < 0.4, "the")  # 60% of every blob is "the"
    labels = head_regions(coords, tokens).query("scale == 0")["label"]
    assert sorted(label.split(" · ")[0] for label in labels) == [".", "cat", "paris"]


def test_share_of_queries():
    """Queries of the punctuation in one blob, its keys in another."""
    coords, tokens = layout(BLOBS, 1000)
    n = len(tokens) // 2
    punctuation = np.flatnonzero(tokens.iloc[:n].isin([",", ".", ";"]).to_numpy())
    coords[n + punctuation] += np.array([10.0, 0.0], dtype=np.float32)  # keys move to (10, 10)
    coarse = head_regions(coords, tokens).query("scale == 0")

    def near(x, y):
        return coarse.loc[np.hypot(coarse["x"] - x, coarse["y"] - y).idxmin()]

    assert len(coarse) == 4
    assert near(0, 10)["share_queries"] == 1.0 and near(10, 10)["share_queries"] == 0.0
    assert near(0, 0)["share_queries"] == pytest.approx(0.5, abs=0.05)


def test_finer_scales_split_what_the_coarse_scale_keeps_whole():
    """Three groups of four tight sub-blobs: 3 regions when coarse, 12 when fine."""
    blobs = {}
    for gx, gy in [(0, 0), (40, 0), (0, 40)]:
        for k, (dx, dy) in enumerate([(0, 0), (4, 0), (0, 4), (4, 4)]):
            blobs[(gx + dx, gy + dy)] = [f"w{gx}{gy}{k}"]
    coords, tokens = layout(blobs, 400, spread=0.3)
    regions = head_regions(coords, tokens, scales=(0.2, 0.02))
    counts = regions.groupby("scale").size()
    assert counts[0] == 3 and counts[1] == 12
    fine = regions[regions["scale"] == 1]
    assert sorted(fine["label"]) == sorted(w[0] for w in blobs.values())


def test_deterministic_given_a_seed_and_sampled_above_max_points():
    coords, tokens = layout(BLOBS, 4000, spread=1.5)
    first = head_regions(coords, tokens, max_points=3000, seed=7)
    again = head_regions(coords, tokens, max_points=3000, seed=7)
    pd.testing.assert_frame_equal(first, again)
    coarse = first[first["scale"] == 0]
    assert len(coarse) == 3
    assert coarse["n_points"].sum() == pytest.approx(len(coords), rel=0.15)  # sample counts scaled to the head


def test_degenerate_inputs():
    assert head_regions(np.zeros((0, 2), np.float32), pd.Series([], dtype=object)).empty
    assert list(head_regions(np.zeros((0, 2)), pd.Series([], dtype=object)).columns) == COLUMNS
    assert head_regions(np.ones((5, 2)), pd.Series(["a"] * 5)).empty  # too few for a region
    same = head_regions(np.ones((500, 2), np.float32), pd.Series(["a"] * 500))  # every point at one place
    assert len(same) <= 3 and (same["n_points"] <= 500).all()
    coords, tokens = layout(BLOBS, 500)
    coords[::7] = np.nan
    regions = head_regions(coords, tokens)
    assert len(regions[regions["scale"] == 0]) == 3 and np.isfinite(regions[["x", "y"]].to_numpy()).all()
    with pytest.raises(ValueError, match="one token per point"):
        head_regions(coords, tokens[:10])
    with pytest.raises(ValueError, match="n_points, 2"):
        head_regions(np.zeros(10), pd.Series(["a"] * 10))


def test_token_terms():
    assert token_terms(pd.Series(["##ing", "ĠThe", "▁Paris", "Ġ", "[CLS]", ","])).tolist() == \
        ["ing", "the", "paris", "␣", "[cls]", ","]


def test_a_million_points_are_fitted_on_a_sample_in_seconds():
    rng = np.random.default_rng(3)
    n = 1_000_000
    centres = rng.normal(0, 20, (40, 2))
    which = rng.integers(0, 40, n)
    coords = (centres[which] + rng.normal(0, 1, (n, 2))).astype(np.float32)
    tokens = pd.Series(np.array([f"w{i}" for i in range(40)], dtype=object)[which])
    head_regions(coords[:2000], tokens[:2000])  # numba compilation is not what this test times
    start = time.perf_counter()
    regions = head_regions(coords, tokens)
    assert time.perf_counter() - start < 60  # about 2 s on 2 cores; an exact fit of 1M points takes minutes
    assert regions["n_points"].max() > 10_000 and regions.query("scale == 0")["label"].str.match(r"w\d+").all()


# --- viz.labels ----------------------------------------------------------------------------------


def test_scale_follows_zoom_and_labels_never_overlap():
    coords, tokens = layout({(x, y): [f"t{x}_{y}"] for x in range(0, 100, 10) for y in range(0, 100, 10)}, 120,
                            spread=0.6)
    regions = head_regions(coords, tokens, scales=(0.2, 0.005))
    assert set(regions["scale"]) == {0, 1} and (regions["scale"] == 1).sum() == 100
    full, zoom = ((-5, 100), (-5, 100)), ((-2, 22), (-2, 22))
    assert pick_scale(regions, *full) == 0  # 100 fine regions in view: coarse
    assert pick_scale(regions, *zoom) == 1  # 9 fine regions in view: fine
    shown = visible_labels(regions, *zoom, 640, 560)
    assert set(shown["scale"]) == {1} and len(shown) == 9
    crowded = visible_labels(regions, *full, 120, 100, max_labels=1000)  # fine labels in a tiny plot
    boxes = text_boxes(crowded, *full, 120, 100)
    assert 0 < len(crowded) < 100
    for i in range(len(boxes)):
        for j in range(i):
            a, b = boxes[i], boxes[j]
            assert not (a[0] < b[2] and a[2] > b[0] and a[1] < b[3] and a[3] > b[1])
    assert visible_labels(None, *full, 640, 560).empty


def test_cull_overlaps_keeps_the_first_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 0, 30, 10], [9, 9, 21, 11]], dtype=float)
    assert cull_overlaps(boxes).tolist() == [0, 2]


def test_region_frame_prefers_the_stored_regions():
    stored = pd.DataFrame({"scale": [0], "region": [0], "x": [0.0], "y": [0.0], "n_points": [1], "label": ["x"],
                           "share_queries": [0.5]})
    data = SimpleNamespace(run=SimpleNamespace(regions=lambda method, dim, layer, head: stored))
    assert region_frame(data, "pca", 2, 0, 0) is stored


def test_head_view_draws_labels_and_the_checkbox_hides_them(text_run):  # noqa: F811
    import holoviews as hv

    from pipeline.store import open_run
    from viz.data import RunData
    from viz.views import Dashboard

    hv.extension("bokeh", logo=False)
    data = RunData(open_run(text_run))
    dash = Dashboard(data)
    labels = dash._region_labels()
    regions = region_frame(data, dash.method_w.value, 2, dash.layer_w.value, dash.head_w.value)
    assert len(regions) and len(labels) >= 1
    assert set(labels.dimension_values("label")) <= set(regions["label"])
    dash.labels_w.value = False
    assert len(dash._region_labels()) == 0


def test_labels_at_the_edge_move_inside_the_plot():
    regions = pd.DataFrame({"scale": [0, 0], "region": [0, 1], "x": [99.9, 50.0], "y": [0.1, 50.0],
                            "n_points": [10, 5], "label": ["a long label at the edge", "middle"],
                            "share_queries": [0.5, 0.5]})
    shown = visible_labels(regions, (0, 100), (0, 100), 400, 300)
    boxes = text_boxes(shown, (0, 100), (0, 100), 400, 300)
    assert (boxes[:, 0] >= -1e-9).all() and (boxes[:, 2] <= 400 + 1e-9).all() and (boxes[:, 1] >= -1e-9).all()
    assert shown.loc[shown["label"] == "middle", "x"].item() == 50.0

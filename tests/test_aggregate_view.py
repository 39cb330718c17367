"""The aggregate view's data shaping (`viz.aggregate_view`) over rows of the head atlas."""

from __future__ import annotations

import math

import holoviews as hv
import numpy as np

from viz.aggregate_view import aggregate_element, offset_profile, patch_profile


def test_offset_profile_names_each_offset_and_drops_unseen_ones():
    max_length = 5  # offsets -4 .. 4; a causal head sees none after the query
    weights = [0.0, 0.1, 0.2, 0.7, 0.0] + [math.nan] * 4
    profile = offset_profile(weights)
    assert profile["offset"].tolist() == [-4, -3, -2, -1, 0]
    assert profile.set_index("offset")["weight"][-1] == 0.7
    assert len(offset_profile(weights, window=2)) == 3  # -2, -1, 0
    assert len(weights) == 2 * max_length - 1


def test_patch_profile_is_square_row_major_by_row_offset():
    side = 3  # a 2x2 grid: offsets -1 .. 1 both ways
    weights = np.arange(side * side, dtype=float)
    grid = patch_profile(weights.tolist())
    assert grid.shape == (side, side) and grid[0, 2] == 2.0 and grid[2, 0] == 6.0
    assert patch_profile(None) is None and patch_profile(math.nan) is None and patch_profile([1.0, 2.0]) is None


def test_aggregate_element_is_bars_for_text_a_heatmap_for_images_and_a_note_without_atlas():
    hv.extension("bokeh", logo=False)
    assert isinstance(aggregate_element({"offset_weights": [0.2, 0.8, math.nan], "patch_offset_weights": None}),
                      hv.Bars)
    image = aggregate_element({"offset_weights": [0.1] * 9, "patch_offset_weights": [0.1] * 9})
    assert isinstance(image, hv.Image) and image.data is not None
    assert isinstance(aggregate_element(None), hv.Text)


def test_runs_with_values_draw_value_weighted_bars_beside_attention():
    hv.extension("bokeh", logo=False)
    bars = aggregate_element({"offset_weights": [0.2, 0.8, math.nan], "patch_offset_weights": None,
                              "value_offset_weights": [0.6, 0.4, math.nan]})
    assert isinstance(bars, hv.Bars) and bars.kdims[1].name == "weighting"
    frame = bars.dframe()
    assert set(frame["weighting"]) == {"attention", "value-norm weighted"}
    assert frame.query("weighting == 'value-norm weighted' and offset == -1")["weight"].item() == 0.6
    assert len(aggregate_element({"offset_weights": [0.2, 0.8, math.nan], "patch_offset_weights": None,
                                  "value_offset_weights": math.nan}).dframe()) == 2

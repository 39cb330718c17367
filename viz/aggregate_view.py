"""The aggregate view (AttentionViz's): one head's attention by relative position, averaged over
every query of the corpus. Computed by the head atlas (`offset_weights`, for images
`patch_offset_weights`, and for runs with values `value_offset_weights`, in `pipeline/heads.py`),
never in the browser; drawn here."""

from __future__ import annotations

import math

import holoviews as hv
import numpy as np
import pandas as pd

from viz.palette import KEY_COLOUR

VALUE_COLOUR = "#4c72b0"

WINDOW = 24  # offsets shown either side of the query (the tails of a 512-token model are noise)


def offset_profile(offset_weights: list[float] | None, window: int = WINDOW) -> pd.DataFrame:
    """`offset`, `weight` of every offset some query sees, |offset| <= `window`. The stored list
    runs over offsets 1 - max_length .. max_length - 1."""
    if offset_weights is None or isinstance(offset_weights, float) or len(offset_weights) == 0:
        return pd.DataFrame({"offset": pd.Series(dtype=int), "weight": pd.Series(dtype=float)})
    weights = np.asarray(offset_weights, dtype=np.float64)
    max_offset = (len(weights) - 1) // 2
    offsets = np.arange(-max_offset, max_offset + 1)
    keep = np.isfinite(weights) & (np.abs(offsets) <= window)
    return pd.DataFrame({"offset": offsets[keep], "weight": weights[keep]})


def patch_profile(patch_offset_weights: list[float] | None) -> np.ndarray | None:
    """[d_row, d_col] mean weight by patch offset (row 0 = d_row -(grid - 1)), or None."""
    if patch_offset_weights is None or (isinstance(patch_offset_weights, float) and math.isnan(patch_offset_weights)):
        return None
    weights = np.asarray(patch_offset_weights, dtype=np.float64)
    side = math.isqrt(len(weights))
    if side * side != len(weights) or side == 0:
        return None
    return weights.reshape(side, side)


def aggregate_element(row: dict | None, width: int = 360, height: int = 200):
    """The head's aggregate view: bars by token offset, or a heatmap by patch offset for images;
    a note when the run has no head atlas yet."""
    if row is None or row.get("offset_weights") is None:
        return hv.Text(0, 0, "no head atlas: run `qkatlas heads RUN`").opts(width=width, height=height,
                                                                              xaxis=None, yaxis=None)
    patches = patch_profile(row.get("patch_offset_weights"))
    if patches is not None:
        reach = (len(patches) - 1) // 2
        return hv.Image(np.flipud(patches), bounds=(-reach - 0.5, -reach - 0.5, reach + 0.5, reach + 0.5),
                        kdims=["column offset", "row offset"], vdims=["weight"]).opts(
            cmap="viridis", colorbar=True, width=width, height=height, tools=["hover"],
            title="attention by patch offset, all images")
    profile = offset_profile(row["offset_weights"])
    value_weighted = offset_profile(row.get("value_offset_weights"))
    if len(value_weighted):
        both = pd.concat([profile.assign(weighting="attention"),
                          value_weighted.assign(weighting="value-norm weighted")])
        return hv.Bars(both, kdims=["offset", "weighting"], vdims=["weight"]).opts(
            color="weighting", cmap=[KEY_COLOUR, VALUE_COLOUR], width=width, height=height, tools=["hover"],
            xrotation=90, title="attention by offset, whole corpus", ylim=(0, None),
            xlabel="key position - query position", multi_level=False, legend_position="top_right")
    return hv.Bars(profile, kdims=["offset"], vdims=["weight"]).opts(
        color=KEY_COLOUR, width=width, height=height, tools=["hover"], xrotation=90,
        title="attention by offset, whole corpus", ylim=(0, None), xlabel="key position - query position")

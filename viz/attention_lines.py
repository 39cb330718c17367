"""Attention lines in the head view, as AttentionViz draws them: for the clicked point's
sentence, every query joined to its top keys (opacity = attention weight), the clicked point's
own strongest links drawn on top, and the sentence's queries and keys marked.

Lines are drawn between the points of the current projection; the weights are recomputed from
the stored Q/K (`run.attention`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from viz.data import KEY_COLOUR, QUERY_COLOUR, SELECTED_COLOUR

TOP_KEYS = 2  # per query of the sentence
MIN_WEIGHT = 0.05
TOP_SELECTED = 5  # links of the clicked point itself
RENDERER_NAME = "qk-attention-lines"
SELECTED_RENDERER_NAME = "qk-selected-lines"
VEIL_RENDERER_NAME = "qk-veil"
LINE_COLUMNS = ["query_pos", "key_pos", "weight"]


def sentence_lines(attention: np.ndarray, top: int = TOP_KEYS, min_weight: float = MIN_WEIGHT) -> pd.DataFrame:
    """One row per line: for every query of the sentence (rows of `attention`, [len, len]), its
    `top` keys with weight >= `min_weight`."""
    attention = np.asarray(attention, dtype=np.float64)
    if attention.size == 0:
        return pd.DataFrame({c: [] for c in LINE_COLUMNS})
    top = min(top, attention.shape[1])
    keys = np.argsort(-attention, axis=1, kind="stable")[:, :top]  # [len, top]
    queries = np.repeat(np.arange(len(attention)), top)
    keys = keys.ravel()
    weights = attention[queries, keys]
    keep = weights >= min_weight
    return pd.DataFrame({"query_pos": queries[keep], "key_pos": keys[keep], "weight": weights[keep]})


def point_lines(attention: np.ndarray, pos: int, kind: str, k: int = TOP_SELECTED) -> pd.DataFrame:
    """The clicked point's strongest links: a query's `k` top keys, or the `k` queries that
    attend most to a key; zero weights left out."""
    weights = np.asarray(attention[pos] if kind == "query" else attention[:, pos], dtype=np.float64)
    order = np.argsort(-weights, kind="stable")[:k]
    order = order[weights[order] > 0]
    ends = np.full(len(order), pos)
    queries, keys = (ends, order) if kind == "query" else (order, ends)
    return pd.DataFrame({"query_pos": queries, "key_pos": keys, "weight": weights[order]})


def line_segments(lines: pd.DataFrame, coords: np.ndarray, offset: int, n_tokens: int) -> pd.DataFrame:
    """x0, y0 (the query's point), x1, y1 (the key's point) and weight of each line; `offset` is
    the sentence's first token's row, queries are points 0..n_tokens-1 and keys the rest."""
    q = offset + lines["query_pos"].to_numpy(dtype=np.int64)
    k = n_tokens + offset + lines["key_pos"].to_numpy(dtype=np.int64)
    return pd.DataFrame({"x0": coords[q, 0], "y0": coords[q, 1], "x1": coords[k, 0], "y1": coords[k, 1],
                         "weight": lines["weight"].to_numpy(dtype=np.float64)})


def sentence_points(offset: int, length: int, n_tokens: int) -> np.ndarray:
    """Point indices of a sentence: its queries, then its keys."""
    members = np.arange(offset, offset + length)
    return np.concatenate([members, members + n_tokens])


def _named(name):
    def hook(plot, element):
        plot.handles["glyph_renderer"].name = name
    return hook


def marks_element(coords: np.ndarray, n_tokens: int, sentence: np.ndarray | None, lines: pd.DataFrame | None,
                  selected_lines: pd.DataFrame | None, selected: int | None, hover: tuple | None):
    """The overlay on the projection: the sentence's lines (opacity = weight), the clicked
    point's links, the sentence's queries and keys, the clicked and the hovered point (`hover`:
    (point, token))."""
    import holoviews as hv

    kdims = ["x0", "y0", "x1", "y1"]
    rows = lines if lines is not None else pd.DataFrame({c: [] for c in kdims + ["weight"]})
    faint = hv.Segments(rows, kdims, ["weight"]).opts(color="#303030", alpha=hv.dim("weight"), line_width=1.5,
                                                     hooks=[_named(RENDERER_NAME)])
    rows = selected_lines if selected_lines is not None else pd.DataFrame({c: [] for c in kdims + ["weight"]})
    strong = hv.Segments(rows, kdims, ["weight"]).opts(
        color=SELECTED_COLOUR, alpha=hv.dim("weight").norm() * 0.7 + 0.3 if len(rows) else 1, line_width=2.5,
        hooks=[_named(SELECTED_RENDERER_NAME)])
    points = []
    if sentence is not None:
        points += [(coords[i, 0], coords[i, 1], "query" if i < n_tokens else "key") for i in sentence]
    if selected is not None:
        points.append((coords[selected, 0], coords[selected, 1], "selected"))
    labels = []
    if hover is not None:
        h, token = hover
        points.append((coords[h, 0], coords[h, 1], "hover"))
        labels.append((coords[h, 0], coords[h, 1], token))
    pts = hv.Points(points, vdims=["role"]).opts(
        color=hv.dim("role").categorize({"query": QUERY_COLOUR, "key": KEY_COLOUR, "selected": SELECTED_COLOUR,
                                         "hover": "black"}),
        size=hv.dim("role").categorize({"query": 6, "key": 6, "selected": 11, "hover": 8}), line_color="white")
    text = hv.Labels(labels, ["x", "y"], "text").opts(text_font_size="11pt", text_baseline="bottom",
                                                      text_color="black")
    return hv.Overlay([faint, strong, pts, text])


def hover_element(coords: np.ndarray, hover: tuple | None):
    """The hovered point (`hover`: (point, token)) as a black dot with its token: its own layer,
    so a hover redraws two glyphs, not the sentence's lines."""
    import holoviews as hv

    points = [] if hover is None else [(coords[hover[0], 0], coords[hover[0], 1])]
    labels = [] if hover is None else [(coords[hover[0], 0], coords[hover[0], 1], hover[1])]
    return hv.Points(points).opts(color="black", size=8, line_color="white") * hv.Labels(
        labels, ["x", "y"], "text").opts(text_font_size="11pt", text_baseline="bottom", text_color="black")


def veil_element(bounds: tuple[float, float, float, float] | None, alpha: float = 0.65):
    """A translucent white box over the raster (`bounds`: x0, y0, x1, y1), under the clicked
    sentence: the rest of the points fade without the raster being drawn again."""
    import holoviews as hv

    return hv.Rectangles([bounds] if bounds is not None else []).opts(
        color="white", alpha=alpha, line_alpha=0, hooks=[_named(VEIL_RENDERER_NAME)])

"""Token labels on the head view: each point's token drawn as text once few enough points are in
view, and the selected sentence's points as "pos:token", culled so that no two labels overlap.

Labels are placed just above their point; a label whose estimated text box would overlap one
already placed is dropped, the selected sentence's first (in position order, query before key),
then the other points in view in store order."""

from __future__ import annotations

import numpy as np
import pandas as pd

from viz.labels import CHAR_WIDTH, KEY_TEXT, QUERY_TEXT, cull_overlaps

MAX_POINTS = 300  # token labels appear when at most this many points are in view
FONT_PX = 11
OFFSET_PX = 4  # gap between a point and the bottom of its label
PAD_PX = 2
RENDERER_NAME = "qk-token-labels"
COLUMNS = ["x", "y", "text", "kind", "role"]


def points_in_view(coords: np.ndarray, x_range, y_range) -> np.ndarray:
    """Indices of the points inside the view range."""
    x, y = coords[:, 0], coords[:, 1]
    return np.flatnonzero((x >= x_range[0]) & (x <= x_range[1]) & (y >= y_range[0]) & (y <= y_range[1]))


def label_boxes(x: np.ndarray, y: np.ndarray, texts: list[str], x_range, y_range, width: int, height: int,
                font_px: int = FONT_PX) -> np.ndarray:
    """[n, 4] pixel boxes (left, bottom, right, top) of texts centred above points (x, y)."""
    sx = width / max(x_range[1] - x_range[0], 1e-12)
    sy = height / max(y_range[1] - y_range[0], 1e-12)
    cx = (np.asarray(x, dtype=np.float64) - x_range[0]) * sx
    bottom = (np.asarray(y, dtype=np.float64) - y_range[0]) * sy + OFFSET_PX
    half_w = (np.array([len(t) for t in texts], dtype=np.float64) * CHAR_WIDTH * font_px + PAD_PX) / 2
    return np.stack([cx - half_w, bottom, cx + half_w, bottom + 1.2 * font_px + PAD_PX], axis=1)


def token_labels(coords: np.ndarray, tokens: pd.DataFrame, x_range, y_range, width: int, height: int,
                 sentence: np.ndarray | None = None, show_tokens: bool = True, max_points: int = MAX_POINTS,
                 font_px: int = FONT_PX, most_in_view: int | None = None) -> pd.DataFrame:
    """The labels to draw in this view (columns x, y: the text's anchor in data units, text,
    kind "query"/"key", role "sentence"/"token"). `coords` is [2 * n_tokens, >= 2] (queries
    first), `tokens` the run's token table; `sentence`: points of the selected sentence, always
    labelled "pos:token" where in view; with `show_tokens`, every other point in view is labelled
    by its token when at most `max_points` points are in view. `most_in_view`, a bound on the
    points in view (`viz.raster.HeadPoints.most_in`), spares the scan of every point where it
    says there are too many."""
    n = len(tokens)
    chosen, roles = [], []
    mine = np.zeros(0, dtype=np.int64)
    if sentence is not None and len(sentence):
        sentence = np.asarray(sentence, dtype=np.int64)
        mine = sentence[points_in_view(coords[sentence], x_range, y_range)]
        mine = mine[np.lexsort((mine >= n, mine % n))]  # by position, query before key
        chosen.append(mine)
        roles.append(np.full(len(mine), "sentence", dtype=object))
    if show_tokens and (most_in_view is None or most_in_view - len(mine) <= max_points):
        in_view = points_in_view(coords, x_range, y_range)
        if len(in_view) - len(mine) <= max_points:
            others = in_view[~np.isin(in_view, mine)]
            chosen.append(others)
            roles.append(np.full(len(others), "token", dtype=object))
    if not chosen:
        return pd.DataFrame({c: [] for c in COLUMNS})
    points, role = np.concatenate(chosen), np.concatenate(roles)
    rows = tokens.iloc[points % n]
    words = rows["token"].astype(str).to_numpy()
    texts = [f"{p}:{w}" if r == "sentence" else w for p, w, r in zip(rows["pos"].to_numpy(), words, role)]
    x, y = coords[points, 0].astype(np.float64), coords[points, 1].astype(np.float64)
    boxes = label_boxes(x, y, texts, x_range, y_range, width, height, font_px)
    shift_x, shift_y = inside_shift(boxes, width, height)
    boxes += np.stack([shift_x, shift_y, shift_x, shift_y], axis=1)
    kept = cull_overlaps(boxes)
    per_px_x, per_px_y = (x_range[1] - x_range[0]) / max(width, 1), (y_range[1] - y_range[0]) / max(height, 1)
    return pd.DataFrame({"x": x[kept] + shift_x[kept] * per_px_x,
                         "y": y[kept] + (OFFSET_PX + shift_y[kept]) * per_px_y, "text": [texts[i] for i in kept],
                         "kind": np.where(points[kept] < n, "query", "key"), "role": role[kept]})


def inside_shift(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel shifts (x, y) that move each box the least to lie wholly inside the plot; a label
    that would stick out above the plot goes below its point instead."""
    shift_x = np.clip(-boxes[:, 0], 0, None) - np.clip(boxes[:, 2] - width, 0, None)
    above = boxes[:, 3] > height
    shift_y = np.where(above, -(boxes[:, 3] - boxes[:, 1]) - 2 * OFFSET_PX, 0.0)
    return shift_x, shift_y


def _mark_renderer(plot, element):
    """Names the renderer, so tests and page scripts can find the labels drawn."""
    plot.handles["glyph_renderer"].name = RENDERER_NAME


def labels_element(labels: pd.DataFrame, font_px: int = FONT_PX):
    """hv.Labels of `token_labels`' rows: dark green for queries, dark pink for keys, on a
    translucent white box."""
    import holoviews as hv

    return hv.Labels(labels, ["x", "y"], ["text", "kind", "role"]).opts(
        text_font_size=f"{font_px}px", text_align="center", text_baseline="bottom",
        text_color=hv.dim("kind").categorize({"query": QUERY_TEXT, "key": KEY_TEXT}, default=QUERY_TEXT),
        background_fill_color="white", background_fill_alpha=0.6,
        hooks=[_mark_renderer])

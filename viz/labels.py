"""Region labels on the head view: the names of a head's regions (`pipeline.regions`) drawn
over its raster, coarse when zoomed out and finer as the user zooms in.

For each view range the finest scale with at most `MAX_LABELS` region anchors in view is
shown (the coarsest where every scale has more), largest regions first, and a label whose
estimated text box would overlap one already placed is dropped."""

from __future__ import annotations

import numpy as np
import pandas as pd

MAX_LABELS = 14
FONT_PX = 12
CHAR_WIDTH = 0.62  # of the font size: a mean glyph width of a sans-serif font
PAD_PX = 6
RENDERER_NAME = "qk-region-labels"
QUERY_TEXT, KEY_TEXT, MIXED_TEXT = "#1b6e2c", "#9c1457", "#202020"


def region_frame(data, method: str, dim: int, layer: int, head: int) -> pd.DataFrame | None:
    """The regions of a head: the run's stored ones (`run.regions`) where it has them, else
    computed from the projection here, once per server process, in RunData's LRU cache."""
    frame = data.run.regions(method, dim, layer, head)
    if frame is not None:
        return frame
    from pipeline.regions import head_regions

    def make():
        tokens = data.tokens["token"]
        return head_regions(data.coords(method, dim, layer, head)[:, :2], pd.concat([tokens, tokens],
                                                                                     ignore_index=True))
    return data.cached("regions", (method, dim, layer, head), make)


def pick_scale(regions: pd.DataFrame, x_range, y_range, max_labels: int = MAX_LABELS) -> int | None:
    """The finest scale with at most `max_labels` region anchors in the range (the coarsest
    where none qualifies); None without regions."""
    if regions is None or regions.empty:
        return None
    in_view = regions[in_range(regions, x_range, y_range)]
    counts = in_view.groupby("scale").size().reindex(sorted(regions["scale"].unique()), fill_value=0)
    fitting = counts.index[counts <= max_labels]
    return int(fitting.max()) if len(fitting) else int(counts.index.min())


def in_range(regions: pd.DataFrame, x_range, y_range) -> np.ndarray:
    x, y = regions["x"].to_numpy(), regions["y"].to_numpy()
    return (x >= x_range[0]) & (x <= x_range[1]) & (y >= y_range[0]) & (y <= y_range[1])


def text_boxes(regions: pd.DataFrame, x_range, y_range, width: int, height: int,
               font_px: int = FONT_PX) -> np.ndarray:
    """[n, 4] pixel boxes (left, bottom, right, top) of labels centred on their anchors."""
    sx = width / max(x_range[1] - x_range[0], 1e-12)
    sy = height / max(y_range[1] - y_range[0], 1e-12)
    cx = (regions["x"].to_numpy(np.float64) - x_range[0]) * sx
    cy = (regions["y"].to_numpy(np.float64) - y_range[0]) * sy
    half_w = (regions["label"].str.len().to_numpy(np.float64) * CHAR_WIDTH * font_px + PAD_PX) / 2
    half_h = (1.3 * font_px + PAD_PX) / 2
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def cull_overlaps(boxes: np.ndarray) -> np.ndarray:
    """Indices of the boxes kept, greedily in the given order: a box overlapping a kept one is dropped."""
    kept: list[int] = []
    for i, (left, bottom, right, top) in enumerate(boxes):
        placed = boxes[kept]
        if not ((placed[:, 0] < right) & (placed[:, 2] > left) & (placed[:, 1] < top) & (placed[:, 3] > bottom)).any():
            kept.append(i)
    return np.asarray(kept, dtype=np.int64)


def visible_labels(regions: pd.DataFrame | None, x_range, y_range, width: int, height: int,
                   max_labels: int = MAX_LABELS) -> pd.DataFrame:
    """The labels to draw in this view: one scale (see `pick_scale`), anchors in view, largest
    regions first, none overlapping another."""
    scale = pick_scale(regions, x_range, y_range, max_labels)
    if scale is None:
        return pd.DataFrame({"x": [], "y": [], "label": [], "scale": [], "share_queries": []})
    shown = regions[(regions["scale"] == scale) & in_range(regions, x_range, y_range) & (regions["label"] != "")]
    shown = shown.sort_values(["n_points", "region"], ascending=[False, True], kind="stable")
    shown = inside_plot(shown, x_range, y_range, width, height)
    kept = shown.iloc[cull_overlaps(text_boxes(shown, x_range, y_range, width, height))]
    return kept[["x", "y", "label", "scale", "share_queries"]].reset_index(drop=True)


def inside_plot(labels: pd.DataFrame, x_range, y_range, width: int, height: int) -> pd.DataFrame:
    """`labels` with each text moved the least that keeps its whole box in the plot."""
    boxes = text_boxes(labels, x_range, y_range, width, height)
    shift_x = np.clip(0 - boxes[:, 0], 0, None) - np.clip(boxes[:, 2] - width, 0, None)
    shift_y = np.clip(0 - boxes[:, 1], 0, None) - np.clip(boxes[:, 3] - height, 0, None)
    moved = labels.copy()
    moved["x"] = moved["x"].to_numpy(np.float64) + shift_x * (x_range[1] - x_range[0]) / width
    moved["y"] = moved["y"].to_numpy(np.float64) + shift_y * (y_range[1] - y_range[0]) / height
    return moved


def _mark_renderer(plot, element):
    """Names the labels' renderer and tags it with the scale shown, for tests and page scripts."""
    renderer = plot.handles["glyph_renderer"]
    renderer.name = RENDERER_NAME
    renderer.tags = sorted({int(scale) for scale in element.dimension_values("scale")})


def labels_element(labels: pd.DataFrame):
    """hv.Labels of `visible_labels`' rows: bold text on a translucent white box, dark green
    for a region of queries, dark pink for one of keys (the view's query/key colours, darker)."""
    import holoviews as hv

    colour = hv.dim("share_queries").bin([-0.01, 0.2, 0.8, 1.01], [KEY_TEXT, MIXED_TEXT, QUERY_TEXT])
    return hv.Labels(labels, ["x", "y"], ["label", "scale", "share_queries"]).opts(
        text_font_size=f"{FONT_PX}px", text_color=colour, text_font_style="bold", text_align="center",
        text_baseline="middle", background_fill_color="white", background_fill_alpha=0.65, hooks=[_mark_renderer])

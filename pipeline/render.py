"""Per-head thumbnails for the matrix view: a datashader raster of every point of a layout,
queries green and keys pink as in AttentionViz, saved as PNG in the run."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

QUERY_COLOUR = "#5fb96c"  # rgb(95, 185, 108)
KEY_COLOUR = "#e3378f"  # rgb(227, 55, 143)


def shade_layout(coords: np.ndarray, size: int = 160):
    """Rasterize [queries; keys] coordinates (first two axes) into a datashader image."""
    import datashader as ds
    import datashader.transfer_functions as tf

    n_tokens = len(coords) // 2
    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1],
                          "kind": pd.Categorical(np.repeat(["query", "key"], n_tokens), ["query", "key"])})
    canvas = ds.Canvas(plot_width=size, plot_height=size)
    counts = canvas.points(frame, "x", "y", agg=ds.count_cat("kind"))
    image = tf.shade(counts, color_key={"query": QUERY_COLOUR, "key": KEY_COLOUR}, how="eq_hist", min_alpha=60)
    return tf.set_background(image, "white")


def render_thumbnail(run, method: str, dim: int, layer: int, head: int, size: int = 160) -> str:
    """Write the thumbnail of one projected head into the run; returns its path in the run."""
    from pipeline.store import write_thumbnail

    record = run.projection_record(method, layer, head, dim)
    image = shade_layout(run.projection(method, layer, head, dim=dim), size)
    buffer = io.BytesIO()
    image.to_pil().save(buffer, format="PNG")
    return "/".join(write_thumbnail(run.dir, record, buffer.getvalue()))

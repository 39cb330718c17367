"""Dot size by norm and emphasis (search hits enlarged, the rest faded) for the head raster and
the matrix thumbnails.

`StyledRaster` is `viz.raster.HeadRaster` with two more things datashader draws server-side at
any zoom: each point's dot size (its norm tier, `viz.data.norm_tiers`: every tier is aggregated
and spread by its own radius, then the tiers are summed into one categorical aggregate, so the
colours blend by count as before), and a faded base under enlarged, outlined hits. The matrix
thumbnails get the same emphasis as pixels drawn onto each pre-rendered tile."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.arrays import backend_frame
from viz.data import SEARCH_COLOUR, Colouring
from viz.raster import HeadPoints, HeadRaster, aggregate, full_range

TIER_PX = (1, 2, 3)  # spread radius in pixels of the small, medium and large dots
HIT_PX = 3  # spread radius of a search hit
OUTLINE = "#202020"
FADED_ALPHA = 70  # of 255: the rest of the points while something is emphasised


def disc(px: int) -> np.ndarray:
    """bool [2 * px + 1, 2 * px + 1]: the pixels within `px` of the centre."""
    r = np.arange(-px, px + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= px * px + px // 2


def dilate(agg, px: int):
    """`agg` (a datashader aggregate, [y, x] or [y, x, category]) with each pixel the maximum
    over a disc of radius `px` around it: every point drawn as a disc, per category. The same as
    `tf.spread(how="max")`, in a fraction of its time on categorical aggregates."""
    from scipy.ndimage import maximum_filter

    if px <= 0:
        return agg
    footprint = disc(px) if agg.ndim == 2 else disc(px)[:, :, None]
    return agg.copy(data=maximum_filter(np.asarray(agg.data), footprint=footprint, mode="constant", cval=0))


def _subset_frame(coords: np.ndarray, colouring: Colouring, points: np.ndarray):
    categories = pd.Categorical.from_codes(colouring.codes[points].astype(np.int16), categories=colouring.categories,
                                           validate=False)
    return backend_frame(pd.DataFrame({"x": coords[points, 0], "y": coords[points, 1], "c": categories}))


def tier_frames(coords: np.ndarray, colouring: Colouring, tiers: np.ndarray) -> list[tuple[int, object]]:
    """(spread radius, frame of the tier's points) per norm tier; shared by sessions like the point frame."""
    return [(TIER_PX[min(t, len(TIER_PX) - 1)], _subset_frame(coords, colouring, np.flatnonzero(tiers == t)))
            for t in np.unique(tiers)]


class StyledRaster(HeadRaster):
    """A head's points, sized by norm tier (`tiers`, uint8 [2 * n_tokens], or None for one size;
    or the tiers' frames, `tier_frames`, shared), with `hits` (point indices) enlarged and outlined
    in their own colour over a faded rest; `fade` fades the rest without hits (a selected sentence
    is drawn on top by the view). `points` and `frame`: as `HeadRaster`'s."""

    def __init__(self, coords: np.ndarray, colouring: Colouring, hits: np.ndarray | None = None,
                 tiers: np.ndarray | list | None = None, fade: bool = False, points: HeadPoints | None = None,
                 frame=None):
        super().__init__(coords, colouring, None, points, frame)
        self.hits = np.asarray(hits, dtype=np.int64) if hits is not None and len(hits) else None
        self.fade = fade
        self.tier_frames = tier_frames(coords, colouring, tiers) if isinstance(tiers, np.ndarray) else tiers
        self.hit_frame = _subset_frame(coords, colouring, self.hits) if self.hits is not None else None

    def counts(self, canvas):
        """The categorical aggregate of every point; with tiers, each tier spread by its radius."""
        import datashader as ds

        if self.tier_frames is None:
            return aggregate(canvas, self.frame, ds.count_cat("c"))
        total = None
        for px, frame in self.tier_frames:
            counts = dilate(aggregate(canvas, frame, ds.count_cat("c")), px)
            total = counts if total is None else total + counts
        return total

    def shade(self, x_range=None, y_range=None, width: int = 700, height: int = 600):
        import datashader as ds
        import datashader.transfer_functions as tf

        canvas = self._canvas(x_range, y_range, width, height)
        key = self.colouring.colour_key
        faded = self.fade or self.hit_frame is not None
        if faded:
            image = tf.shade(self.counts(canvas), color_key=key, how="eq_hist", min_alpha=25, alpha=FADED_ALPHA)
        else:
            image = tf.shade(self.counts(canvas), color_key=key, how="eq_hist", min_alpha=80)
        if self.tier_frames is None:  # sized dots keep their size; others grow where the view is sparse
            image = tf.dynspread(image, threshold=0.8, max_px=1 if faded else 4)
        if self.hit_frame is None:
            return image
        hits = aggregate(canvas, self.hit_frame, ds.count_cat("c"))
        outline = tf.shade(dilate(hits.sum(dim="c"), HIT_PX + 1), cmap=[OUTLINE, OUTLINE], how="linear",
                           min_alpha=255)
        # the fill is shaded first, then spread as discs: dilating the categorical aggregate filtered
        # every pixel of every category (180 ms with 16 categories), the spread visits the hit pixels
        fill = tf.spread(tf.shade(hits, color_key=key, how="linear", min_alpha=255), mask=disc(HIT_PX))
        return tf.stack(image, outline, fill)


def warm_renderers(data, sample: int = 64) -> int:
    """Have numba compile every datashader pipeline the dashboard runs (each colour mode's number
    of categories, sized dots, search hits, the hover index, thumbnails) on `sample` points of a
    head, so that no user waits for a compile; returns the pipelines drawn. Run by the server
    at start, beside its other warm-up."""
    from viz.data import N_BINS, colour_modes
    from viz.raster import shade_thumbnail

    method = data.methods[0]
    dim = data.dims(method)[0]
    layer, head = min(data.available[(method, dim)])
    coords = np.ascontiguousarray(data.coords(method, dim, layer, head)[:sample, :2])
    sizes = {}
    for mode in colour_modes(data.run.modality):
        colours = data.colouring(mode, layer, head).colours if mode != "norm" else ["#000000"] * N_BINS
        sizes.setdefault(len(colours), colours)
    codes = np.arange(len(coords))
    for colours in sizes.values():
        colouring = Colouring((codes % len(colours)).astype(np.uint8), [str(c) for c in range(len(colours))],
                              colours)
        for raster in (StyledRaster(coords, colouring), StyledRaster(coords, colouring, hits=codes[:2], fade=True),
                       StyledRaster(coords, colouring, tiers=(codes % 3).astype(np.uint8))):
            raster.element(None, None, 32, 32)
        shade_thumbnail(coords, colouring, 16)
    StyledRaster(coords, colouring).index_raster(None, None, 32, 32)
    return 3 * len(sizes) + 1


# --- matrix thumbnails -------------------------------------------------------------------


def tile_pixels(coords: np.ndarray, points: np.ndarray, size: int) -> np.ndarray:
    """int [len(points), 2] (row, col) of `points` in a head's `size`-pixel thumbnail, drawn as
    `viz.raster.shade_thumbnail` draws it (the full range of the head, top row first)."""
    (x0, x1), (y0, y1) = full_range(coords)
    xy = coords[points, :2].astype(np.float64)
    col = np.floor((xy[:, 0] - x0) / max(x1 - x0, 1e-12) * size)
    row = size - 1 - np.floor((xy[:, 1] - y0) / max(y1 - y0, 1e-12) * size)
    return np.clip(np.stack([row, col], axis=1), 0, size - 1).astype(np.int64)


def emphasise_tile(tile: np.ndarray, pixels: np.ndarray, fade: float = 0.7, colour: str = SEARCH_COLOUR,
                   radius: int = 1) -> np.ndarray:
    """A copy of thumbnail `tile` ([size, size, 4] uint8) faded towards white by `fade`, with a
    (2 * radius + 1)-pixel square in `colour` on each hit pixel ((row, col) rows of `pixels`)."""
    out = tile.copy()
    out[..., :3] = (255 - (255 - tile[..., :3].astype(np.float32)) * (1 - fade)).astype(np.uint8)
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    size = tile.shape[0]
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            rows = np.clip(pixels[:, 0] + dr, 0, size - 1)
            cols = np.clip(pixels[:, 1] + dc, 0, tile.shape[1] - 1)
            out[rows, cols, :3] = rgb
            out[rows, cols, 3] = 255
    return out

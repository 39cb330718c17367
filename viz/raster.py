"""Every datashader rendering of qkatlas: one head's raster, one datashader `count_cat` pass per
view range (`HeadRaster`), and the thumbnails of the matrix view, on the fly in any colour mode
(`shade_thumbnail`) or pre-rendered in the run by `qkatlas run` (`render_thumbnail`), one path.

Datashader's stages split across the process's array backend (`pipeline.arrays`): the points'
frames live where it computes (cuDF on the GPU backend, pandas on the CPU), so aggregation, the
pass over every point, runs there (`aggregate`); the aggregate, a few MB whatever the number of
points, is then shaded, spread and stacked on the host, the same code for both.

The view calls `HeadRaster.element(...)` on every zoom or pan; `qkatlas bench serve` times that
call against plain datashader (`Canvas.points` + `shade`) on the same data."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.arrays import backend_frame, is_device_array, to_host
from pipeline.store import write_thumbnail
from viz.data import Colouring
from viz.palette import KEY_COLOUR, QUERY_COLOUR, SEARCH_COLOUR


@dataclass(frozen=True)
class HeadPoints:
    """What every session's raster of one head reads and none changes, built once per server:
    `host` holds x and y (contiguous float32) and i (each point's index, for the hover raster),
    and every colour mode's frame shares its x and y; `frame` is `host` where datashader
    aggregates it (`pipeline.arrays.backend_frame`: a cuDF copy on the GPU, `host` on the CPU)."""

    host: pd.DataFrame
    frame: object  # pandas or cuDF DataFrame
    x_full: tuple[float, float]
    y_full: tuple[float, float]
    grid: np.ndarray  # int64 [GRID, GRID]: points per cell of the full range, row 0 = lowest y

    def most_in(self, x_range, y_range) -> int:
        """At most how many points lie in the range (the cells it touches), without a scan."""
        rows, cols = self.grid.shape
        (x0, x1), (y0, y1) = self.x_full, self.y_full
        c0, c1 = (int(np.clip((v - x0) / max(x1 - x0, 1e-12) * cols, 0, cols - 1)) for v in x_range)
        r0, r1 = (int(np.clip((v - y0) / max(y1 - y0, 1e-12) * rows, 0, rows - 1)) for v in y_range)
        return int(self.grid[min(r0, r1):max(r0, r1) + 1, min(c0, c1):max(c0, c1) + 1].sum())


GRID = 256


@functools.lru_cache(maxsize=2)
def _point_index(n_points: int) -> np.ndarray:
    """float64 [n_points] 0 .. n - 1, read-only: datashader's max() takes floats; every head of a run
    has as many points, so one array serves them all."""
    index = np.arange(n_points, dtype=np.float64)
    index.flags.writeable = False
    return index


def aggregate(canvas, frame, reduction):
    """`canvas.points(frame, "x", "y", agg=reduction)`, on the host: datashader aggregates where
    `frame` lives (a cuDF frame: on the GPU), then the aggregate comes to the host."""
    counts = canvas.points(frame, "x", "y", agg=reduction)
    return counts.copy(data=to_host(counts.data)) if is_device_array(counts.data) else counts


def head_points(coords: np.ndarray, backend: str | None = None) -> HeadPoints:
    """`backend`: "cpu" | "gpu", where the frame lives (default: the process's array backend)."""
    import datashader as ds

    x_full, y_full = full_range(coords)
    host = pd.DataFrame({"x": np.ascontiguousarray(coords[:, 0], dtype=np.float32),
                         "y": np.ascontiguousarray(coords[:, 1], dtype=np.float32),
                         "i": _point_index(len(coords))}, copy=False)
    frame = backend_frame(host, backend)
    canvas = ds.Canvas(plot_width=GRID, plot_height=GRID, x_range=x_full, y_range=y_full)
    grid = np.asarray(aggregate(canvas, frame, ds.count()).data, dtype=np.int64)
    return HeadPoints(host, frame, x_full, y_full, grid)


def point_frame(coords: np.ndarray, colouring: Colouring, points: HeadPoints | None = None,
                backend: str | None = None):
    """x, y and the colour category of every point, where `backend` aggregates (see
    `head_points`); on the host, `points`' x and y where given (no copy)."""
    categories = pd.Categorical.from_codes(colouring.codes.astype(np.int16), categories=colouring.categories,
                                           validate=False)
    x = points.host["x"].to_numpy() if points is not None else np.ascontiguousarray(coords[:, 0])
    y = points.host["y"].to_numpy() if points is not None else np.ascontiguousarray(coords[:, 1])
    return backend_frame(pd.DataFrame({"x": x, "y": y, "c": categories}, copy=False), backend)


def full_range(coords: np.ndarray, pad: float = 0.03) -> tuple[tuple[float, float], tuple[float, float]]:
    if len(coords) == 0:
        return (0.0, 1.0), (0.0, 1.0)
    # column by column: NumPy's reduction along axis 0 of an [n, 2] array is 35x slower (0.2 s at 10 M)
    lo = np.array([coords[:, axis].min() for axis in (0, 1)], dtype=float)
    hi = np.array([coords[:, axis].max() for axis in (0, 1)], dtype=float)
    span = np.maximum(hi - lo, 1e-6) * pad
    return (lo[0] - span[0], hi[0] + span[0]), (lo[1] - span[1], hi[1] + span[1])


def to_rgba(image) -> np.ndarray:
    """A datashader image (packed uint32, row 0 = lowest y) as [height, width, 4] uint8, top row first."""
    packed = np.ascontiguousarray(np.asarray(image.data, dtype=np.uint32))
    return np.flipud(packed.view(np.uint8).reshape(packed.shape + (4,)))


class HeadRaster:
    """One head's points in one colour mode, ready to be rasterized at any range. `points` and
    `frame` (`head_points`, `point_frame`), where given, are the server's shared copies: a
    session's raster then holds only what is its own (the highlight, its last hover raster)."""

    def __init__(self, coords: np.ndarray, colouring: Colouring, highlight: np.ndarray | None = None,
                 points: HeadPoints | None = None, frame=None):
        self.coords = coords
        self.colouring = colouring
        self.points = points if points is not None else head_points(coords)
        self.frame = frame if frame is not None else point_frame(coords, colouring, self.points)
        self.x_full, self.y_full = self.points.x_full, self.points.y_full
        self.highlight = None
        if highlight is not None and len(highlight):
            self.highlight = backend_frame(pd.DataFrame({"x": coords[highlight, 0], "y": coords[highlight, 1]}))
        self._index_key, self._index = None, None

    def _canvas(self, x_range, y_range, width, height):
        import datashader as ds

        return ds.Canvas(plot_width=int(width), plot_height=int(height), x_range=tuple(x_range or self.x_full),
                         y_range=tuple(y_range or self.y_full))

    def shade(self, x_range=None, y_range=None, width: int = 700, height: int = 600):
        """The shaded datashader image of every point in the range (+ search matches on top)."""
        import datashader as ds
        import datashader.transfer_functions as tf

        canvas = self._canvas(x_range, y_range, width, height)
        counts = aggregate(canvas, self.frame, ds.count_cat("c"))
        image = tf.dynspread(tf.shade(counts, color_key=self.colouring.colour_key, how="eq_hist", min_alpha=80),
                             threshold=0.8, max_px=4)
        if self.highlight is not None:
            matches = aggregate(canvas, self.highlight, ds.count())
            image = tf.stack(image, tf.spread(tf.shade(matches, cmap=[SEARCH_COLOUR, SEARCH_COLOUR], min_alpha=255),
                                              px=2))
        return image

    def element(self, x_range=None, y_range=None, width: int = 700, height: int = 600):
        """The hv.RGB the single-head view shows for this range."""
        import holoviews as hv

        x_range, y_range = tuple(x_range or self.x_full), tuple(y_range or self.y_full)
        rgba = to_rgba(self.shade(x_range, y_range, width, height))
        return hv.RGB(rgba, bounds=(x_range[0], y_range[0], x_range[1], y_range[1]), kdims=["x", "y"])

    def index_raster(self, x_range, y_range, width: int, height: int) -> np.ndarray:
        """[height, width] int64, top row first: one point drawn in each pixel (the highest
        index, so keys win over queries), -1 where empty. Cached for the last range."""
        import datashader as ds

        key = (tuple(x_range or self.x_full), tuple(y_range or self.y_full), int(width), int(height))
        if key != self._index_key:
            agg = aggregate(self._canvas(*key), self.points.frame, ds.max("i"))
            values = np.nan_to_num(np.asarray(agg.data, dtype=np.float64), nan=-1).astype(np.int64)
            self._index_key, self._index = key, np.flipud(values)
        return self._index

    def pixel_of(self, x: float, y: float, x_range, y_range, width: int, height: int) -> tuple[int, int]:
        """(column, row) of data point (x, y) in the index raster of that range."""
        x_range, y_range = tuple(x_range or self.x_full), tuple(y_range or self.y_full)
        col = int((x - x_range[0]) / max(x_range[1] - x_range[0], 1e-12) * width)
        row = int((y_range[1] - y) / max(y_range[1] - y_range[0], 1e-12) * height)
        return col, row


def shade_thumbnail(coords: np.ndarray, colouring: Colouring, size: int) -> np.ndarray:
    """A square [size, size, 4] uint8 thumbnail of a head in a colour mode, white background."""
    import datashader as ds
    import datashader.transfer_functions as tf

    x_range, y_range = full_range(coords)
    canvas = ds.Canvas(plot_width=size, plot_height=size, x_range=x_range, y_range=y_range)
    counts = aggregate(canvas, point_frame(coords, colouring), ds.count_cat("c"))
    image = tf.set_background(tf.shade(counts, color_key=colouring.colour_key, how="eq_hist", min_alpha=60), "white")
    return to_rgba(image)


def render_thumbnail(run, method: str, dim: int, layer: int, head: int, size: int = 160) -> str:
    """Write the query/key thumbnail of one projected head into the run (a PNG, as the matrix
    view shows it); returns its path in the run."""
    record = run.projection_record(method, layer, head, dim)
    coords = run.projection(method, layer, head, dim=dim)
    kinds = np.repeat(np.array([0, 1], dtype=np.uint8), len(coords) // 2)
    rgba = shade_thumbnail(coords, Colouring(kinds, ["query", "key"], [QUERY_COLOUR, KEY_COLOUR]), size)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return "/".join(write_thumbnail(run.dir, record, buffer.getvalue()))

"""The Matrix tab, what every session opens on: every head's thumbnail (layers as rows, heads as
columns), the head atlas's measurement over it, the open head boxed; a click opens a head. The
mosaic depends only on the run and (method, dim, colour, search): one copy per server serves
every session. Plain Bokeh: a few milliseconds a session, where HoloViews took hundreds."""

from __future__ import annotations

import html
import io
from functools import partial

import numpy as np
import pandas as pd
import panel as pn
from bokeh.events import MouseWheel, Tap
from bokeh.models import (ColumnDataSource, CustomJS, FixedTicker, ImageRGBA, LinearAxis, PanTool, Plot, Quad, Range1d,
                          TapTool, Text, Title, WheelZoomTool)
from PIL import Image

from viz.data import SELECTED_COLOUR, RunData
from viz.emphasis import emphasise_tile, tile_pixels
from viz.raster import shade_thumbnail

THUMB, GAP = 96, 4
CELL = THUMB + GAP
BOX_COLUMNS = ["head", "layer", "head1", "layer1"]
ZOOM_OPENS = 1.6  # semantic zoom: a view narrower than this many cells opens the head under the cursor

# after each wheel step: once the view is narrower than `cells` cells both ways, the point under
# the cursor goes to the server (`zoom_to`), which opens that head
SEMANTIC_ZOOM_JS = """
if (Math.max(xr.end - xr.start, yr.end - yr.start) >= cells) return;
zoom_to.data = {x: [cb_obj.x], y: [cb_obj.y]};
"""


def thumbnail(data: RunData, method: str, dim: int, layer: int, head: int, mode: str, size: int = THUMB):
    """[size, size, 4] uint8. Query/key thumbnails pre-rendered in RUN/thumbnails are used when
    present; every other one is rendered here and kept in memory (the run is only read)."""
    def make():
        png = data.run.thumbnail_png(method, dim, layer, head) if mode == "query / key" else None
        if png is not None:
            return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA").resize((size, size)), dtype=np.uint8)
        return shade_thumbnail(data.coords(method, dim, layer, head), data.colouring(mode, layer, head), size)
    return data.cached("thumbnails", (method, dim, layer, head, mode, size), make)


def mosaic(data: RunData, method: str, dim: int, mode: str, size: int = THUMB, gap: int = GAP,
           hits: np.ndarray | None = None, hit_pixels: dict | None = None) -> np.ndarray:
    """Every head as a thumbnail: layers as rows (first layer on top), heads as columns. A
    head without this projection is a light grey tile. With `hits` (point indices), every
    tile is faded and the hits marked (`viz.emphasis`); `hit_pixels` keeps their pixels per head
    between calls, so a colour change does not read every projection again."""
    layers, n_heads = data.run.layers, data.run.n_heads
    cell = size + gap
    canvas = np.full((len(layers) * cell, n_heads * cell, 4), 255, dtype=np.uint8)
    for r, layer in enumerate(layers):
        for head in range(n_heads):
            y, x = r * cell + gap // 2, head * cell + gap // 2
            if data.has(method, dim, layer, head):
                tile = thumbnail(data, method, dim, layer, head, mode, size)
                if hits is not None and len(hits):
                    cache = hit_pixels if hit_pixels is not None else {}
                    key = (method, dim, layer, head, size)
                    if key not in cache:
                        cache[key] = tile_pixels(data.coords(method, dim, layer, head), hits, size)
                    tile = emphasise_tile(tile, cache[key])
                canvas[y:y + size, x:x + size] = tile
            else:
                canvas[y:y + size, x:x + size] = (235, 235, 235, 255)
    return canvas


def shared_mosaic(data: RunData, method: str, dim: int, mode: str, search: str, hits: np.ndarray | None):
    """`mosaic`, one copy per server for each (method, dim, mode, search); `hits` are the search's."""
    search = search if hits is not None else ""
    pixels = data.cached("hit_pixels", (method, dim, search), dict) if hits is not None else None
    return data.cached("mosaics", (method, dim, mode, search),
                       lambda: mosaic(data, method, dim, mode, hits=hits, hit_pixels=pixels))


def packed(image: np.ndarray) -> np.ndarray:
    """[height, width] uint32, bottom row first: an RGBA image ([height, width, 4] uint8, top row
    first) as Bokeh's image_rgba takes it."""
    return np.ascontiguousarray(np.flipud(image)).view(np.uint32)[..., 0]


def columns_of(frame: pd.DataFrame | None, names: list[str]) -> dict:
    return {name: ([] if frame is None or frame.empty else frame[name].to_numpy()) for name in names}


class MatrixView:
    """One session's Matrix tab over the state (`viz.state.DashboardState`) and the head atlas."""

    def __init__(self, state, atlas):
        self.state, self.atlas = state, atlas
        run = state.data.run
        self.layers, self.n_heads = list(run.layers), run.n_heads
        n_layers = len(self.layers)
        self.image = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []})
        self.borders = ColumnDataSource(columns_of(None, BOX_COLUMNS + ["colour"]))
        self.veil = ColumnDataSource(columns_of(None, BOX_COLUMNS))
        self.values = ColumnDataSource(columns_of(None, ["head", "layer", "text"]))
        self.box = ColumnDataSource(columns_of(None, BOX_COLUMNS))
        # a bare Plot, not bokeh.plotting.figure: half the models, half the time, on every page load
        self.zoom_to = ColumnDataSource({"x": [], "y": []}, name="qk-matrix-zoom")
        wheel = WheelZoomTool(zoom_on_axis=False)
        plot = Plot(frame_width=self.n_heads * CELL, frame_height=n_layers * CELL, x_range=Range1d(0, self.n_heads),
                    y_range=Range1d(0, n_layers), toolbar_location=None, title=Title(text=""),
                    tools=[TapTool(), PanTool(), wheel], name="qk-matrix-plot")
        plot.toolbar.active_scroll = wheel
        self.x_axis = LinearAxis(ticker=FixedTicker(ticks=[]))
        plot.add_layout(self.x_axis, "above")
        plot.add_layout(LinearAxis(ticker=FixedTicker(ticks=[n_layers - r - 0.5 for r in range(n_layers)]),
                                   major_label_overrides={n_layers - r - 0.5: f"L{layer}"
                                                          for r, layer in enumerate(self.layers)}), "left")
        cell = dict(left="head", bottom="layer", right="head1", top="layer1")
        plot.add_glyph(self.image, ImageRGBA(image="image", x="x", y="y", dw="dw", dh="dh"))
        plot.add_glyph(self.borders, Quad(**cell, fill_alpha=0, line_color="colour", line_width=4))
        plot.add_glyph(self.veil, Quad(**cell, fill_color="white", fill_alpha=0.75, line_alpha=0))
        plot.add_glyph(self.values, Text(x="head", y="layer", text="text", text_font_size="8pt", text_align="left",
                                         text_baseline="top", text_color="black"))
        plot.add_glyph(self.box, Quad(**cell, fill_alpha=0, line_color=SELECTED_COLOUR, line_width=3))
        # a click opens a head: on Panel's thread pool where the server has one, off the event loop
        plot.on_event(Tap, lambda event: pn.state.execute(partial(self._on_tap, event.x, event.y),
                                                          schedule="thread" if pn.config.nthreads else "auto"))
        plot.js_on_event(MouseWheel, CustomJS(args=dict(xr=plot.x_range, yr=plot.y_range, zoom_to=self.zoom_to,
                                                         cells=ZOOM_OPENS), code=SEMANTIC_ZOOM_JS))
        self.zoom_to.on_change("data", lambda _attr, _old, new: self._on_zoom(new))
        self.figure = plot
        self.caption = pn.pane.HTML("", css_classes=["qk-matrix-caption"])
        self.plot = pn.Column(pn.pane.Bokeh(plot), css_classes=["qk-matrix"])
        state.param.watch(self._redraw, ["method", "dim", "colour", "matches"])
        state.param.watch(self._draw_box, ["layer", "head"])
        atlas.param.watch(self._redraw, ["matrix_measure", "matrix_filter", "matrix_threshold", "matrix_sort",
                                         "table"], precedence=1)  # after the atlas's new cell order
        self._redraw()

    def panel(self):
        return pn.Column(self.caption, self.atlas.matrix_controls(), self.plot)

    def _redraw(self, *_):
        """The mosaic in the atlas's cell order, its title, column names, marks and caption."""
        state, data = self.state, self.state.data
        hits = state.hits()
        image = packed(self.atlas.arrange(shared_mosaic(data, state.method, state.dim, state.colour, state.search,
                                                        hits), CELL))
        found = f" · {len(state.matches):,} hits" if hits is not None else ""
        title = f"{state.method} {state.dim}-D · {state.colour}{found}"
        ticks = self.atlas.column_ticks(self.n_heads)
        marks = [element.data for element in self.atlas.matrix_marks()] if self.atlas.measured else [None] * 3
        cell = self.selected_cell()

        def apply():  # Bokeh models: changed on the event loop, which holds the document's lock

            self.image.data = {"image": [image], "x": [0], "y": [0], "dw": [self.n_heads], "dh": [len(self.layers)]}
            self.figure.title.text = title
            self.x_axis.ticker = FixedTicker(ticks=[x for x, _ in ticks])
            self.x_axis.major_label_overrides = dict(ticks)
            for source, frame in zip((self.borders, self.veil, self.values, self.box), marks + [cell]):
                source.data = columns_of(frame, list(source.data))
        pn.state.execute(apply)
        self.caption.object = self.caption_html()

    def selected_cell(self) -> pd.DataFrame:
        """The open head's cell (head, layer, head1, layer1 in plot units); no row if its layer is not stored."""
        state, rows = self.state, []
        if state.layer in self.layers:
            r = self.layers.index(state.layer)
            c = self.atlas.column_of(r, state.head)
            rows.append((c, len(self.layers) - r - 1, c + 1, len(self.layers) - r))
        return pd.DataFrame(rows, columns=BOX_COLUMNS)

    def _draw_box(self, *_):
        cell = self.selected_cell()
        pn.state.execute(lambda: setattr(self.box, "data", columns_of(cell, BOX_COLUMNS)))

    def caption_html(self) -> str:
        state, run = self.state, self.state.data.run
        total = run.n_layers * run.n_heads
        shown = len(state.data.available.get((state.method, state.dim), ()))
        missing = (f" Missing heads: qkatlas reduce {html.escape(run.dir.url)} --method {state.method} --dim "
                   f"{state.dim}" if shown < total else "")
        found = (f' <span class="qk-matrix-hits">Search: {len(state.matches):,} tokens, marked orange in every '
                 'head, the rest faded.</span>' if len(state.matches) else "")
        return (f"<b>Every head</b>: {shown} of {total} heads projected ({state.method} {state.dim}-D), layers as "
                f"rows, heads as columns; click one to open it.{found}{missing}")

    def reset_zoom(self) -> None:
        """Every head in view again."""
        def apply():
            self.figure.x_range.update(start=0, end=self.n_heads)
            self.figure.y_range.update(start=0, end=len(self.layers))
        pn.state.execute(apply, schedule=True)

    def _on_zoom(self, cursor: dict) -> None:
        """Zoomed in past ZOOM_OPENS cells: the head under the cursor opens, the matrix zooms back out."""
        if len(cursor.get("x", ())):
            self.reset_zoom()
            pn.state.execute(partial(self._on_tap, cursor["x"][0], cursor["y"][0]),
                             schedule="thread" if pn.config.nthreads else "auto")

    def _on_tap(self, x=None, y=None):
        if x is None or y is None:
            return
        col, row = int(np.floor(x)), len(self.layers) - 1 - int(np.floor(y))
        if 0 <= col < self.n_heads and 0 <= row < len(self.layers):
            self.state.open_head(self.layers[row], self.atlas.head_at(row, col))

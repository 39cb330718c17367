"""The Images tab of an image run: the run's images as a grid of thumbnails, a page at a time;
a click opens that image in the Head tab's sequence view (its first token's query clicked).
Plain Bokeh, one image per page, as the matrix is."""

from __future__ import annotations

from functools import partial

import numpy as np
import panel as pn
from bokeh.events import Tap
from bokeh.models import ColumnDataSource, ImageRGBA, Plot, Range1d, TapTool

from viz.matrix_view import packed
from viz.state import HEAD_TAB

COLUMNS, ROWS, SIDE, GAP = 8, 5, 88, 4
PER_PAGE = COLUMNS * ROWS


def grid_image(images: list, side: int = SIDE, gap: int = GAP, columns: int = COLUMNS) -> np.ndarray:
    """[rows * (side + gap), columns * (side + gap), 4] uint8: `images` (PIL) row by row, each
    squeezed to `side` pixels square, on white."""
    cell = side + gap
    rows = max(1, -(-len(images) // columns))
    canvas = np.full((rows * cell, columns * cell, 4), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        tile = np.asarray(image.convert("RGBA").resize((side, side)), dtype=np.uint8)
        canvas[r * cell + gap // 2:r * cell + gap // 2 + side, c * cell + gap // 2:c * cell + gap // 2 + side] = tile
    return canvas


class ImageGridView:
    """One session's Images tab over the state (`viz.state.DashboardState`)."""

    def __init__(self, state):
        self.state, data = state, state.data
        self.seq_ids = data.sequences["seq_id"].to_numpy()
        pages = max(1, -(-len(self.seq_ids) // PER_PAGE))
        self.page_w = pn.widgets.IntInput(name=f"Page (of {pages})", value=1, start=1, end=pages, width=120,
                                          css_classes=["qk-image-page"])
        self.image = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []}, name="qk-image-grid")
        self.y_range = Range1d(0, ROWS)
        plot = Plot(frame_width=COLUMNS * (SIDE + GAP), frame_height=ROWS * (SIDE + GAP), x_range=Range1d(0, COLUMNS),
                    y_range=self.y_range, toolbar_location=None, min_border=0, tools=[TapTool()],
                    outline_line_color=None, name="qk-image-grid-plot")
        plot.add_glyph(self.image, ImageRGBA(image="image", x="x", y="y", dw="dw", dh="dh"))
        plot.on_event(Tap, lambda event: pn.state.execute(partial(self._on_tap, event.x, event.y),
                                                          schedule="thread" if pn.config.nthreads else "auto"))
        self.figure = plot
        self.caption = pn.pane.HTML("", css_classes=["qk-image-grid-caption"])
        self.page_w.param.watch(lambda _: self._draw(), "value")
        self._draw()

    def panel(self):
        return pn.Column(pn.Row(self.caption, self.page_w), pn.Column(pn.pane.Bokeh(self.figure),
                                                                      css_classes=["qk-image-grid"]))

    def shown(self) -> np.ndarray:
        """The sequence ids of the page shown, in grid order."""
        start = (self.page_w.value - 1) * PER_PAGE
        return self.seq_ids[start:start + PER_PAGE]

    def _draw(self) -> None:
        ids = self.shown()
        rows = max(1, -(-len(ids) // COLUMNS))
        image = packed(grid_image([self.state.data.image(int(i)) for i in ids]))
        self.caption.object = (f"<b>{len(self.seq_ids):,} images</b>; images {ids[0] if len(ids) else 0}–"
                               f"{ids[-1] if len(ids) else 0} shown; click one to open it in the Head tab")

        def apply():
            self.image.data = {"image": [image], "x": [0], "y": [ROWS - rows], "dw": [COLUMNS], "dh": [rows]}
        pn.state.execute(apply, schedule=True)

    def _on_tap(self, x=None, y=None) -> None:
        if x is None or y is None:
            return
        index = (ROWS - 1 - int(np.floor(y))) * COLUMNS + int(np.floor(x))
        ids = self.shown()
        if 0 <= x < COLUMNS and 0 <= index < len(ids):
            self.open(int(ids[index]))

    def open(self, seq_id: int) -> None:
        """The Head tab, with the image's first token (its CLS or first patch) clicked."""
        self.state.tab = HEAD_TAB
        self.state.open_sequence(seq_id, 0)

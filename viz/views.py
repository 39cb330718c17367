"""The dashboard's views: matrix, single head, sequence and image. Thin: the data shaping is
in `viz.data`, the rasterization in `viz.raster`."""

from __future__ import annotations

import html
import io
import logging

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (registers the renderer; .opts needs it)
import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.core.validation import silence
from bokeh.core.validation.warnings import FIXED_SIZING_MODE

from viz import attention_lines, tokens_layer
from viz.data import (KEY_COLOUR, MODE_DESCRIPTIONS, QUERY_COLOUR, SELECTED_COLOUR, RunData, colour_modes,
                      export_bytes, pick_point, point_info, points_in_box, points_in_lasso, search_tokens,
                      selection_frame, url_state)
from viz.emphasis import StyledRaster, emphasise_tile, tile_pixels
from viz.heads_view import HeadAtlas
from viz.labels import labels_element, region_frame, visible_labels
from viz.raster import HeadRaster, shade_thumbnail

# The matrix mosaic is sized by its frame (frame_width/height, so that every thumbnail gets
# the same pixels whatever the axis labels take); bokeh warns about that on every session.
silence(FIXED_SIZING_MODE, True)

if hv.Store.current_backend not in hv.Store.renderers:
    hv.Store.set_current_backend("bokeh")
log = logging.getLogger("qkatlas.viz")
THUMB = 96
PLOT_W, PLOT_H = 640, 560
SAMPLE_3D = 20_000


# --- pure figure helpers (tested without a browser) -------------------------------------


def thumbnail(data: RunData, method: str, dim: int, layer: int, head: int, mode: str, size: int = THUMB):
    """[size, size, 4] uint8. Query/key thumbnails pre-rendered in RUN/thumbnails are used when
    present; every other one is rendered here and kept in memory (the run is only read)."""
    key = (method, dim, layer, head, mode, size)
    if key in data.thumbnails:
        return data.thumbnails[key]
    image = None
    png = data.run.thumbnail_png(method, dim, layer, head) if mode == "query / key" else None
    if png is not None:
        from PIL import Image

        picture = Image.open(io.BytesIO(png)).convert("RGBA").resize((size, size))
        image = np.asarray(picture, dtype=np.uint8)
    if image is None:
        image = shade_thumbnail(data.coords(method, dim, layer, head), data.colouring(mode, layer, head), size)
    data.thumbnails[key] = image
    return image


def mosaic(data: RunData, method: str, dim: int, mode: str, size: int = THUMB, gap: int = 4,
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


def sequence_element(tokens: list[str], attention: np.ndarray, selected: int | None, kind: str = "query",
                     threshold: float = 0.05):
    """bertviz-like: queries on the left, keys on the right, lines weighted by attention; the
    selected query's lines drawn strongly."""
    n = len(tokens)
    ys = -np.arange(n, dtype=float)
    rows = [(0.0, ys[i], 1.0, ys[j], float(attention[i, j])) for i in range(n) for j in range(n)
            if attention[i, j] >= threshold]
    faint = hv.Segments(rows or [(0, 0, 0, 0, 0.0)], kdims=["x0", "y0", "x1", "y1"], vdims=["weight"]).opts(
        color="#b0b0b0", alpha=hv.dim("weight") * 0.6, line_width=1)
    if selected is None:
        strong_rows = [(0, 0, 0, 0, 0.0)]
    elif kind == "query":  # where the selected query looks
        strong_rows = [(0.0, ys[selected], 1.0, ys[j], float(attention[selected, j])) for j in range(n)]
    else:  # which queries look at the selected key
        strong_rows = [(0.0, ys[i], 1.0, ys[selected], float(attention[i, selected])) for i in range(n)]
    active = selected is not None
    strong = hv.Segments(strong_rows, kdims=["x0", "y0", "x1", "y1"], vdims=["weight"]).opts(
        color=QUERY_COLOUR if kind == "query" else KEY_COLOUR,
        alpha=hv.dim("weight").norm() * 0.9 + 0.05 if active else 0,
        line_width=hv.dim("weight").norm() * 4 + 0.5 if active else 0)
    left = hv.Labels({"x": np.full(n, -0.02), "y": ys, "text": tokens}, ["x", "y"], "text").opts(
        text_align="right", text_font_size="9pt", text_color=QUERY_COLOUR)
    right = hv.Labels({"x": np.full(n, 1.02), "y": ys, "text": tokens}, ["x", "y"], "text").opts(
        text_align="left", text_font_size="9pt", text_color=KEY_COLOUR)
    if selected is not None:  # the selected point's own lines are the strong ones
        rows = [r for r in rows if (r[1] != ys[selected] if kind == "query" else r[3] != ys[selected])]
        faint = faint.clone(rows or [(0, 0, 0, 0, 0.0)])
    overlay = faint * strong * left * right
    if selected is not None:
        mark = hv.Points([(-0.01 if kind == "query" else 1.01, ys[selected])]).opts(color=SELECTED_COLOUR, size=7)
        overlay = overlay * mark
    return overlay.opts(xaxis=None, yaxis=None, width=340, height=max(260, 16 * n + 40), xlim=(-0.6, 1.6),
                        ylim=(-n + 0.3, 0.8), toolbar=None, title="queries → keys", show_frame=False)


def image_heatmap(image, attention_row: np.ndarray | None, grid: int, prefix: int, selected_patch: int | None,
                  size: int = 320) -> bytes:
    """PNG: the image as the model saw it, its patch grid, the attention of the selected query
    over the patches as a heatmap, and the selected patch outlined."""
    from PIL import Image, ImageDraw

    base = image.convert("RGB").resize((size, size))
    if attention_row is not None and grid > 0:
        patches = np.asarray(attention_row[prefix:prefix + grid * grid], dtype=np.float64)
        patches = patches / max(patches.max(), 1e-12)
        heat = heat_colours(patches.reshape(grid, grid))
        heat = Image.fromarray(heat).resize((size, size), Image.NEAREST)
        base = Image.blend(base, heat, 0.6)
    draw = ImageDraw.Draw(base)
    step = size / max(grid, 1)
    for i in range(1, grid):
        draw.line([(i * step, 0), (i * step, size)], fill=(255, 255, 255), width=1)
        draw.line([(0, i * step), (size, i * step)], fill=(255, 255, 255), width=1)
    if selected_patch is not None and selected_patch >= 0:
        r, c = divmod(selected_patch, grid)
        draw.rectangle([c * step, r * step, (c + 1) * step, (r + 1) * step], outline=(0, 160, 255), width=3)
    buffer = io.BytesIO()
    base.save(buffer, format="PNG")
    return buffer.getvalue()


HEAT_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=float)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 from values in [0, 1]: an inferno-like ramp (black, purple, red, orange, pale yellow)."""
    position = np.clip(values, 0, 1) * (len(HEAT_STOPS) - 1)
    stops = np.arange(len(HEAT_STOPS))
    return np.stack([np.interp(position, stops, HEAT_STOPS[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


def legend_html(colouring, description: str | None = None, notes: tuple[str, ...] = ()) -> str:
    """The legend of a colour mode, with its one-line description and any notes (dot size, emphasis)."""
    labels, colours = colouring.labels, colouring.colours
    if len(labels) > 10:  # ramps: first and last of each
        shown = [(labels[0], colours[0]), (labels[len(labels) // 2 - 1], colours[len(labels) // 2 - 1])]
        if len(labels) == 16:
            shown += [(labels[8], colours[8]), (labels[-1], colours[-1])]
        else:
            shown = [(labels[0], colours[0]), (labels[-1], colours[-1])]
    else:
        shown = list(zip(labels, colours))
    items = "".join(f'<span style="margin-right:10px"><span style="display:inline-block;width:10px;height:10px;'
                    f'background:{c};margin-right:3px"></span>{html.escape(t)}</span>' for t, c in shown)
    lines = [f'<span class="qk-mode-description">{html.escape(description)}</span>'] if description else []
    lines += [html.escape(note) for note in notes]
    about = f'<div style="font-size:11px;color:#555">{" · ".join(lines)}</div>' if lines else ""
    return f'<div style="font-size:11px">{items}</div>{about}'


# --- the app ----------------------------------------------------------------------------


class Dashboard(param.Parameterized):
    """One browser session's state and views over a shared RunData."""

    def __init__(self, data: RunData, args: dict | None = None):
        super().__init__()
        self.data = data
        run = data.run
        if not data.methods:
            raise ValueError(f"{run.dir.url} has no projections; run: qkatlas reduce {run.dir.url} --method umap,pca")
        self.image_run = run.modality == "image"
        if self.image_run:
            side = run.manifest.model.patch_grid
            tokens = data.tokens
            self.grid = int(side) if side else int(tokens["patch_row"].max()) + 1
            self.prefix = int((tokens["patch_row"] < 0).groupby(tokens["seq_id"]).sum().iloc[0])
        method = data.methods[0]
        dims = data.dims(method)
        first = sorted(data.available[(method, dims[0])])[0]
        state = url_state(args or {}, {"method": data.methods, "dim": [2, 3], "layer": list(run.layers),
                                       "head": list(range(run.n_heads)), "colour": colour_modes(run.modality)})
        self.method_w = pn.widgets.Select(name="Method", options=data.methods, value=state.get("method", method),
                                          width=110)
        self.dim_w = pn.widgets.RadioButtonGroup(name="Dimensions", options={"2-D": 2, "3-D": 3},
                                                 value=state.get("dim", dims[0]), width=110)
        self.layer_w = pn.widgets.Select(name="Layer", options=list(run.layers), value=state.get("layer", first[0]),
                                         width=80)
        self.head_w = pn.widgets.Select(name="Head", options=list(range(run.n_heads)),
                                        value=state.get("head", first[1]), width=80)
        self.colour_w = pn.widgets.Select(name="Colour", options=colour_modes(run.modality),
                                          value=state.get("colour", "query / key"), width=170)
        self.search_w = pn.widgets.TextInput(name="Search token", placeholder="a token, or re:regex", width=180)
        self.count_pane = pn.pane.HTML("", css_classes=["qk-search-count"], width=220)
        self.message = pn.pane.HTML("", css_classes=["qk-message"])

        # single-head view state
        self.raster: HeadRaster | None = None
        self.view_range = (None, None, PLOT_W, PLOT_H)
        self.matches = np.zeros(0, dtype=np.int64)
        self.selected_point: int | None = None
        self.hover_point: int | None = None
        self.selection = pd.DataFrame()
        self._reset_range = True

        self.head_state = hv.streams.Stream.define("HeadState", version=0)()
        self.mark_state = hv.streams.Stream.define("MarkState", version=0)()
        self.matrix_state = hv.streams.Stream.define("MatrixState", version=0)()
        self.range_stream = hv.streams.RangeXY()
        self.size_stream = hv.streams.PlotSize()
        self.raster_dmap = hv.DynamicMap(self._raster_element,
                                         streams=[self.head_state, self.range_stream, self.size_stream])
        self.raster_dmap = self.raster_dmap.opts(hv.opts.RGB(
            width=PLOT_W, height=PLOT_H, tools=["box_select", "lasso_select"],
            active_tools=["pan", "wheel_zoom"], framewise=True, shared_axes=False, xaxis=None, yaxis=None,
            toolbar="above"))
        self.marks_dmap = hv.DynamicMap(self._marks, streams=[self.mark_state])
        self.labels_w = pn.widgets.Checkbox(name="labels", value=True, width=80, css_classes=["qk-labels-toggle"])
        self.labels_dmap = hv.DynamicMap(self._region_labels, streams=[
            self.head_state, self.range_stream, self.size_stream, self.labels_w.param.value])
        self.tokens_w = pn.widgets.Checkbox(name="token labels", value=True, width=100,
                                            css_classes=["qk-token-labels-toggle"])
        self.size_w = pn.widgets.Checkbox(name="size by norm", value=False, width=100, css_classes=["qk-size-norm"])
        self.lines_w = pn.widgets.Checkbox(name="attention lines", value=True, width=110,
                                           css_classes=["qk-lines-toggle"])
        self.clear_w = pn.widgets.Button(name="clear selection", width=120, css_classes=["qk-clear"])
        self.tokens_dmap = hv.DynamicMap(self._token_labels, streams=[
            self.head_state, self.range_stream, self.size_stream, self.tokens_w.param.value])
        self.hit_pixels: dict = {}
        tap = hv.streams.Tap(source=self.raster_dmap)
        tap.add_subscriber(self._on_tap)
        pointer = hv.streams.PointerXY(source=self.raster_dmap)
        pointer.add_subscriber(self._on_pointer)
        box = hv.streams.BoundsXY(source=self.raster_dmap)
        box.add_subscriber(lambda bounds=None, **_: self._on_select(box=bounds))
        lasso = hv.streams.Lasso(source=self.raster_dmap)
        lasso.add_subscriber(lambda geometry=None, **_: self._on_select(polygon=geometry))
        self._streams = (tap, pointer, box, lasso)
        self.head_plot = pn.pane.HoloViews(self.raster_dmap * self.labels_dmap * self.marks_dmap * self.tokens_dmap,
                                           css_classes=["qk-head-plot"])
        self.plot3d = pn.pane.Plotly(None, visible=False, width=PLOT_W, height=PLOT_H, css_classes=["qk-plot3d"])
        self.legend = pn.pane.HTML("", css_classes=["qk-legend"])
        self.hover_pane = pn.pane.HTML('<i>hover a point</i>', css_classes=["qk-hover"], width=PLOT_W, height=48)
        self.title = pn.pane.HTML("", css_classes=["qk-head-title"])
        self.sequence_pane = pn.pane.HoloViews(None, css_classes=["qk-sequence"], visible=False)
        self.image_pane = pn.pane.PNG(None, css_classes=["qk-image-view"], visible=False, width=320)
        self.sequence_info = pn.pane.HTML("<i>click a point to open its sequence</i>", css_classes=["qk-sequence-info"],
                                          width=360)
        self.table = pn.widgets.Tabulator(pd.DataFrame(), pagination="remote", page_size=8, width=PLOT_W,
                                          disabled=True, show_index=False, css_classes=["qk-selection"])
        self.selection_info = pn.pane.HTML("<i>box or lasso select points to list them</i>",
                                           css_classes=["qk-selection-info"])
        self.csv_button = pn.widgets.FileDownload(callback=lambda: io.BytesIO(export_bytes(self.selection, "csv")),
                                                  filename="selection.csv", label="CSV", width=90, disabled=True)
        self.parquet_button = pn.widgets.FileDownload(
            callback=lambda: io.BytesIO(export_bytes(self.selection, "parquet")), filename="selection.parquet",
            label="Parquet", width=90, disabled=True)
        self.similar_pane = pn.Column(css_classes=["qk-similar"], width=260)

        # matrix view
        self.matrix_dmap = hv.DynamicMap(self._matrix_element, streams=[self.matrix_state])
        matrix_tap = hv.streams.Tap(source=self.matrix_dmap)
        matrix_tap.add_subscriber(self._on_matrix_tap)
        self._matrix_tap = matrix_tap
        self.matrix_boxes = hv.DynamicMap(self._matrix_boxes, streams=[self.matrix_state])
        self.atlas = HeadAtlas(self)
        self.matrix_marks = hv.DynamicMap(self.atlas.matrix_marks, streams=[self.matrix_state])
        self.matrix_pane = pn.pane.HoloViews(self.matrix_dmap * self.matrix_marks * self.matrix_boxes,
                                             css_classes=["qk-matrix"])
        self.matrix_caption = pn.pane.HTML("", css_classes=["qk-matrix-caption"])

        self.tabs = pn.Tabs(("Matrix", pn.Column(
            self.matrix_caption, self.atlas.matrix_controls(), self.matrix_pane)), ("Head", pn.Row(
                pn.Column(self.title, pn.Row(self.legend, self.labels_w, self.tokens_w, self.size_w, self.lines_w,
                                             self.clear_w), self.head_plot, self.plot3d, self.hover_pane,
                          self.selection_info, pn.Row(self.csv_button, self.parquet_button), self.table),
                pn.Column(pn.pane.HTML("<b>Sequence</b>"), self.sequence_info, self.image_pane, self.sequence_pane),
                pn.Column(self.atlas.head_panel(),
                          pn.pane.HTML("<b>Heads most like this one</b> (attention on shared sequences)"),
                          self.similar_pane))), ("Heads", self.atlas.heads_tab()), dynamic=False)
        self.controls = pn.Row(self.method_w, self.dim_w, self.layer_w, self.head_w, self.colour_w, self.search_w,
                               self.count_pane)
        for widget in (self.method_w, self.dim_w, self.layer_w, self.head_w, self.colour_w):
            widget.param.watch(self._on_change, "value")
        self.search_w.param.watch(self._on_search, "value")
        self.size_w.param.watch(lambda _: self._load_head(keep_range=True), "value")
        self.lines_w.param.watch(lambda _: self.mark_state.event(version=self.mark_state.version + 1), "value")
        self.clear_w.on_click(lambda _: self.clear_selection())
        self._update_dims()
        self._update_caption()
        self._load_head()
        if state.get("layer") is not None or state.get("head") is not None:
            self.tabs.active = 1

    # layout ----------------------------------------------------------------------------
    def panel(self):
        run = self.data.run
        header = pn.pane.HTML(
            f'<div style="font-size:15px"><b>qkatlas</b> — {html.escape(run.model_id)}, '
            f'{run.n_layers} layers × {run.n_heads} heads, {self.data.n:,} tokens '
            f'({2 * self.data.n:,} points per head)</div>', css_classes=["qk-header"])
        return pn.Column(header, self.controls, self.message, self.tabs, sizing_mode="stretch_width")

    # state changes ---------------------------------------------------------------------
    def _update_dims(self):
        dims = self.data.dims(self.method_w.value)
        if self.dim_w.value not in dims:
            self.dim_w.value = dims[0]

    def _on_change(self, event):
        if event.obj is self.method_w:
            self._update_dims()
        if event.obj in (self.method_w, self.dim_w, self.colour_w):
            self._update_caption()
            self.matrix_state.event(version=self.matrix_state.version + 1)
        if event.obj in (self.method_w, self.dim_w, self.layer_w, self.head_w):
            self.selected_point = None
            self._reset_range = True
            self.selection = pd.DataFrame()
            self._show_selection()
        self._load_head()

    def _on_search(self, event):
        """Linear-time (RE2) and time-limited; on a server it runs on Panel's thread pool, off the
        event loop. A pattern that cannot run is reported where the count goes."""
        from viz.data import SearchError

        try:
            self.matches = search_tokens(self.data.tokens, event.new, self.data.vocabulary)
        except SearchError as error:
            self.matches = np.zeros(0, dtype=np.int64)
            self.count_pane.object = (f'<span class="qk-search-error" style="color:#b00">'
                                      f'{html.escape(str(error))}</span>')
        else:
            self.count_pane.object = (f'<span class="qk-count">{len(self.matches):,} matches</span> '
                                      f'({2 * len(self.matches):,} points in every head)' if event.new.strip() else "")
        self._load_head(keep_range=True)
        self.hit_pixels = {}
        self._update_caption()
        self.matrix_pane.loading = True
        try:
            self.matrix_state.event(version=self.matrix_state.version + 1)
        finally:
            self.matrix_pane.loading = False

    def _load_head(self, keep_range: bool = False):
        """Shows the current head, with the head view's loading indicator on while it loads."""
        self.head_plot.loading = True
        try:
            self._show_head(keep_range)
        finally:
            self.head_plot.loading = False

    def _show_head(self, keep_range: bool):
        method, dim, layer, head = self.method_w.value, self.dim_w.value, self.layer_w.value, self.head_w.value
        data = self.data
        if not data.has(method, dim, layer, head):
            self.message.object = (f'<span style="color:#b00">no {dim}-D {method} projection of layer {layer} head '
                                   f'{head}; run: qkatlas reduce {html.escape(data.run.dir.url)} --method {method} '
                                   f'--dim {dim} --layers {layer} --heads {head}</span>')
            return
        self.message.object = ""
        colouring = data.colouring(self.colour_w.value, layer, head)
        notes = (("dot size: vector norm (smallest, middle and largest third of the queries, and of the keys)",)
                 if self.size_w.value else ()) + (("search hits enlarged and outlined, the rest faded",)
                                                  if len(self.matches) else ())
        self.legend.object = legend_html(colouring, MODE_DESCRIPTIONS.get(self.colour_w.value), notes)
        self.title.object = f"<b>Layer {layer}, head {head}</b> · {method} {dim}-D · {2 * data.n:,} points"
        coords = data.coords(method, dim, layer, head)
        highlight = np.concatenate([self.matches, self.matches + data.n]) if len(self.matches) else None
        if dim == 3:
            self.raster = HeadRaster(coords[:, :2], colouring, highlight)
            self.plot3d.object = self._figure_3d(coords, colouring, highlight)
            self.plot3d.visible, self.head_plot.visible = True, False
        else:
            tiers = data.norm_tiers(layer, head) if self.size_w.value else None
            self.raster = StyledRaster(coords, colouring, highlight, tiers, fade=self.selected_point is not None)
            self.plot3d.visible, self.head_plot.visible = False, True
            if not keep_range:
                self._reset_range = True
            self.head_state.event(version=self.head_state.version + 1)
            self.mark_state.event(version=self.mark_state.version + 1)
        self._show_similar(layer, head)
        self.atlas.show_head(layer, head)

    def _figure_3d(self, coords, colouring, highlight):
        import plotly.graph_objects as go

        n = len(coords)
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(n, min(n, SAMPLE_3D), replace=False))
        colours = colouring.point_colours(sample)
        traces = [go.Scatter3d(x=coords[sample, 0], y=coords[sample, 1], z=coords[sample, 2], mode="markers",
                               marker=dict(size=2, color=list(colours), opacity=0.7), hoverinfo="text",
                               text=[f"{self.data.tokens['token'].iat[i % self.data.n]} "
                                     f"({'query' if i < self.data.n else 'key'})" for i in sample])]
        if highlight is not None:
            traces.append(go.Scatter3d(x=coords[highlight, 0], y=coords[highlight, 1], z=coords[highlight, 2],
                                       mode="markers", marker=dict(size=4, color="#ff7f00"), name="matches"))
        figure = go.Figure(traces)
        figure.update_layout(margin=dict(l=0, r=0, t=30, b=0), showlegend=False,
                             title=f"3-D, {len(sample):,} of {n:,} points (a uniform sample)")
        return figure

    # single-head raster -----------------------------------------------------------------
    def _raster_element(self, version=0, x_range=None, y_range=None, width=None, height=None, **_):
        if self.raster is None:
            return hv.RGB(np.zeros((2, 2, 4), dtype=np.uint8))
        if self._reset_range:  # a new head: its full range, remembered as the stream's, which the
            x_range = y_range = None  # browser does not report back when the server sets it
            self._reset_range = False
            self.range_stream.update(x_range=self.raster.x_full, y_range=self.raster.y_full)
        width, height = int(width or PLOT_W), int(height or PLOT_H)
        self.view_range = (x_range, y_range, width, height)
        return self.raster.element(x_range, y_range, width, height)

    def _point_at(self, x, y):
        if self.raster is None or x is None or y is None:
            return None
        x_range, y_range, width, height = self.view_range
        index = self.raster.index_raster(x_range, y_range, width, height)
        col, row = self.raster.pixel_of(x, y, x_range, y_range, width, height)
        return pick_point(index, col, row, radius=6)

    def _on_pointer(self, x=None, y=None, **_):
        point = self._point_at(x, y)
        if point is None or point == self.hover_point:
            return
        self.hover_point = point
        info = point_info(self.data.tokens, self.data.sequences, point)
        colour = QUERY_COLOUR if info["kind"] == "query" else KEY_COLOUR
        self.hover_pane.object = (
            f'<div><b style="color:{colour}">{html.escape(info["token"])}</b> · {info["kind"]} · '
            f'{info["position"]} · sequence {info["seq_id"]}<br><span style="color:#555">'
            f'{html.escape(info["snippet"])}</span></div>')
        self.mark_state.event(version=self.mark_state.version + 1)

    def _on_tap(self, x=None, y=None, **_):
        point = self._point_at(x, y)
        if point is None:
            return
        self.selected_point = point
        self._show_sequence()
        self._selection_changed()

    def _selection_changed(self):
        """Redraws what shows the clicked point: the raster (faded under a selected sentence),
        the sentence's labels, lines and marks."""
        if isinstance(self.raster, StyledRaster):
            self.raster.fade = self.selected_point is not None
            self.head_state.event(version=self.head_state.version + 1)
        self.mark_state.event(version=self.mark_state.version + 1)

    def clear_selection(self):
        """Forgets the clicked point (its sentence, lines and sequence view) and the box or lasso
        selection; the search stays."""
        self.selected_point = None
        self.selection = pd.DataFrame()
        self._show_selection()
        self.sequence_pane.visible = self.image_pane.visible = False
        self.sequence_info.object = "<i>click a point to open its sequence</i>"
        self._selection_changed()

    def _selected_sentence(self):
        """(point info, first token's row, sentence points) of the clicked point, or None."""
        if self.selected_point is None or self.raster is None:
            return None
        info = point_info(self.data.tokens, None, self.selected_point)
        offset = self.selected_point % self.data.n - info["pos"]
        return info, offset, attention_lines.sentence_points(offset, info["seq_len"], self.data.n)

    def _token_labels(self, **_):
        """Token labels where few points are in view, and the clicked sentence's "pos:token"."""
        empty = tokens_layer.labels_element(pd.DataFrame({c: [] for c in tokens_layer.COLUMNS}))
        if self.raster is None or self.dim_w.value == 3:
            return empty
        x_range, y_range, width, height = self.view_range
        selected = self._selected_sentence()
        labels = tokens_layer.token_labels(self.raster.coords, self.data.tokens, x_range or self.raster.x_full,
                                           y_range or self.raster.y_full, width, height,
                                           sentence=selected[2] if selected else None,
                                           show_tokens=self.tokens_w.value)
        return tokens_layer.labels_element(labels)

    def _region_labels(self, **_):
        """The names of the head's regions in the raster's current range (`viz.labels`)."""
        method, dim, layer, head = self.method_w.value, self.dim_w.value, self.layer_w.value, self.head_w.value
        if self.raster is None or dim == 3 or not self.labels_w.value or not self.data.has(method, dim, layer, head):
            return labels_element(visible_labels(None, None, None, PLOT_W, PLOT_H))
        x_range, y_range, width, height = self.view_range
        regions = region_frame(self.data, method, dim, layer, head)
        return labels_element(visible_labels(regions, x_range or self.raster.x_full, y_range or self.raster.y_full,
                                             width, height))

    def _marks(self, version=0, **_):
        """Overlay on the projection (`viz.attention_lines`): the hovered point with its token;
        the clicked point, its sentence's queries and keys, with the "attention lines" box every
        query's top 2 keys (weight >= 0.05, opacity = weight), and the clicked point's own
        strongest links (a query's top keys, or the queries that attend most to a key)."""
        if self.raster is None or self.dim_w.value == 3:
            return attention_lines.marks_element(np.zeros((0, 2)), self.data.n, None, None, None, None, None)
        coords, n = self.raster.coords, self.data.n
        sentence = lines = own = None
        selected = self._selected_sentence()
        if selected is not None:
            info, offset, sentence = selected
            attention = self._sentence_attention(info["seq_id"])
            if self.lines_w.value:
                lines = attention_lines.line_segments(attention_lines.sentence_lines(attention), coords, offset, n)
            own = attention_lines.line_segments(attention_lines.point_lines(attention, info["pos"], info["kind"]),
                                                coords, offset, n)
        hover = None
        if self.hover_point is not None:
            hover = (self.hover_point, str(self.data.tokens["token"].iat[self.hover_point % n]))
        return attention_lines.marks_element(coords, n, sentence, lines, own, self.selected_point, hover)

    def _sentence_attention(self, seq_id: int) -> np.ndarray:
        """The open head's attention over sequence `seq_id`, kept while it stays selected (the
        marks are redrawn on every hover)."""
        key = (seq_id, self.layer_w.value, self.head_w.value)
        if getattr(self, "_attention_key", None) != key:
            self._attention = self.data.attention(*key)
            self._attention_key = key
        return self._attention

    def _show_sequence(self):
        info = point_info(self.data.tokens, self.data.sequences, self.selected_point)
        layer, head = self.layer_w.value, self.head_w.value
        attention = self.data.attention(info["seq_id"], layer, head)
        tokens = self.data.sequence_tokens(info["seq_id"])["token"].astype(str).tolist()
        self.sequence_info.object = (
            f'<div><b>{html.escape(info["token"])}</b> ({info["kind"]}, {info["position"]}) in sequence '
            f'{info["seq_id"]}<br><span style="color:#555">{html.escape(info["snippet"])}</span></div>')
        if self.image_run:
            image = self.data.image(info["seq_id"])
            patch = info["pos"] - self.prefix if info["pos"] >= self.prefix else None
            row = attention[info["pos"]] if info["kind"] == "query" else attention[:, info["pos"]]
            self.image_pane.object = image_heatmap(image, row, self.grid, self.prefix, patch)
            self.image_pane.visible = True
            self.sequence_pane.visible = False
        else:
            self.sequence_pane.object = sequence_element(tokens, attention, info["pos"], info["kind"])
            self.sequence_pane.visible = True
            self.image_pane.visible = False

    # selection -------------------------------------------------------------------------
    def _on_select(self, box=None, polygon=None):
        if self.raster is None:
            return
        coords = self.raster.coords
        if box is not None:
            points = points_in_box(coords[:, 0], coords[:, 1], box)
        elif polygon is not None and len(polygon):
            points = points_in_lasso(coords[:, 0], coords[:, 1], np.asarray(polygon))
        else:
            return
        self.selection = selection_frame(self.data.tokens, self.data.coords(
            self.method_w.value, self.dim_w.value, self.layer_w.value, self.head_w.value), points,
            self.layer_w.value, self.head_w.value, self.method_w.value)
        self._show_selection()

    def _show_selection(self):
        n = len(self.selection)
        self.table.value = self.selection.head(10_000) if n else pd.DataFrame()
        self.selection_info.object = (f'<span class="qk-selected-count">{n:,} points selected</span>'
                                      + (" (table shows the first 10,000; exports hold all)" if n > 10_000 else "")
                                      if n else "<i>box or lasso select points to list them</i>")
        self.csv_button.disabled = self.parquet_button.disabled = n == 0

    # similar heads ---------------------------------------------------------------------
    def _show_similar(self, layer, head):
        try:
            similar = self.data.similar_heads(layer, head, k=5)
        except Exception as error:  # similarity is a help, never a reason to fail the view
            log.warning("head similarity failed: %s", error)
            self.similar_pane.objects = [pn.pane.HTML(f"<i>unavailable: {html.escape(str(error))}</i>")]
            return
        buttons = []
        for row in similar.itertuples():
            button = pn.widgets.Button(name=f"L{row.layer} H{row.head} · {row.similarity:.2f}", width=240,
                                       button_type="light")
            button.on_click(lambda _, target=(int(row.layer), int(row.head)): self.open_head(*target))
            buttons.append(button)
        stats = self.data.head_similarity()[2]
        mine = stats[(stats["layer"] == layer) & (stats["head"] == head)].iloc[0]
        summary = pn.pane.HTML(
            f'<div style="font-size:11px">this head: entropy {mine["entropy"]:.2f}, self {mine["self"]:.2f}, '
            f'previous {mine["previous"]:.2f}, next {mine["next"]:.2f}, first token {mine["first"]:.2f}</div>')
        self.similar_pane.objects = [summary] + buttons

    def open_head(self, layer, head):
        with param.parameterized.batch_call_watchers(self):
            self.layer_w.value, self.head_w.value = layer, head
        self.tabs.active = 1

    def open_sequence(self, seq_id: int, pos: int):
        """Select query `pos` of sequence `seq_id` in the open head and show the sequence view."""
        self.selected_point = self.data.token_offset(seq_id) + pos
        self._show_sequence()
        self._selection_changed()

    # matrix view -----------------------------------------------------------------------
    def _matrix_element(self, version=0, **_):
        method, dim, mode = self.method_w.value, self.dim_w.value, self.colour_w.value
        hits = np.concatenate([self.matches, self.matches + self.data.n]) if len(self.matches) else None
        image = self.atlas.arrange(mosaic(self.data, method, dim, mode, hits=hits, hit_pixels=self.hit_pixels),
                                   THUMB + 4)
        found = f" · {len(self.matches):,} hits" if hits is not None else ""
        layers, n_heads = self.data.run.layers, self.data.run.n_heads
        n_layers = len(layers)
        rgb = hv.RGB(image, bounds=(0, 0, n_heads, n_layers), kdims=["head", "layer"]).opts(shared_axes=False,
            frame_width=n_heads * (THUMB + 4), frame_height=n_layers * (THUMB + 4),
            xticks=self.atlas.column_ticks(n_heads),
            yticks=[(n_layers - r - 0.5, f"L{layer}") for r, layer in enumerate(layers)],
            xlabel="", ylabel="", toolbar=None, default_tools=[], tools=["tap"], xaxis="top",
            title=f"{method} {dim}-D · {mode}{found}")
        return rgb.opts(xlim=(0, n_heads), ylim=(0, n_layers))

    def _matrix_boxes(self, version=0, **_):
        layers, n_layers = self.data.run.layers, self.data.run.n_layers
        current = (self.layer_w.value, self.head_w.value)
        rows = []
        if current[0] in layers:
            r = layers.index(current[0])
            c = self.atlas.column_of(r, current[1])
            rows.append((c, n_layers - r - 1, c + 1, n_layers - r, "selected"))
        boxes = hv.Rectangles(rows, kdims=["head", "layer", "head1", "layer1"], vdims=["role"]).opts(
            fill_alpha=0, line_color=SELECTED_COLOUR, line_width=3)
        return boxes

    def _update_caption(self):
        method, dim = self.method_w.value, self.dim_w.value
        total = self.data.run.n_layers * self.data.run.n_heads
        shown = len(self.data.available.get((method, dim), ()))
        missing = (f" Missing heads: qkatlas reduce {html.escape(self.data.run.dir.url)} --method {method} --dim {dim}"
                   if shown < total else "")
        found = (f' <span class="qk-matrix-hits">Search: {len(self.matches):,} tokens, marked orange in every '
                 'head, the rest faded.</span>' if len(self.matches) else "")
        self.matrix_caption.object = (f"<b>Every head</b>: {shown} of {total} heads projected ({method} {dim}-D), "
                                      f"layers as rows, heads as columns; click one to open it.{found}{missing}")

    def _on_matrix_tap(self, x=None, y=None, **_):
        if x is None or y is None:
            return
        layers = self.data.run.layers
        col, row = int(np.floor(x)), len(layers) - 1 - int(np.floor(y))
        if 0 <= col < self.data.run.n_heads and 0 <= row < len(layers):
            self.open_head(layers[row], self.atlas.head_at(row, col))
            self.matrix_state.event(version=self.matrix_state.version + 1)


_EXTENSIONS = False


def app(run, args: dict | None = None):
    """The dashboard over `run` (a path, URL or opened Run) as a Panel object, for a server or Jupyter."""
    from pipeline.store import open_run
    from viz.data import shared_run_data

    global _EXTENSIONS
    if not _EXTENSIONS:
        hv.extension("bokeh", logo=False)
        _EXTENSIONS = True
    pn.extension("tabulator", "plotly")
    if isinstance(run, str):
        run = open_run(run)
    if args is None and pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        args = pn.state.session_args
    return Dashboard(shared_run_data(run), args).panel()

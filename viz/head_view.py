"""The Head tab's projection of one head, rasterized by datashader at every zoom and pan, with
region and token labels, the clicked sentence's attention lines, hover, click, box and lasso
selection (3-D: a plotly sample). Its layers follow the session's state and its own parameters
(the raster, the hovered point, the check boxes) through shared `hv.streams.Params` streams."""

from __future__ import annotations

import html

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param

from viz import attention_lines, patches_layer, tokens_layer
from viz.data import (KEY_COLOUR, MODE_DESCRIPTIONS, QUERY_COLOUR, pick_point, point_info, points_in_box,
                      points_in_lasso, selection_frame)
from viz.emphasis import StyledRaster, tier_frames
from viz.labels import labels_element, region_frame, visible_labels
from viz.raster import HeadPoints, HeadRaster, head_points, point_frame
from viz.state import DashboardState

PLOT_W, PLOT_H = 640, 560
SAMPLE_3D = 20_000
MIN_ZOOM = 1e-6  # the narrowest view, as a share of the head's extent
LOD_TIMEOUT_MS = 100  # the browser asks for the redraw this long after a zoom or pan stops (Bokeh: 500)


def legend_html(colouring, description: str | None = None, notes: tuple[str, ...] = ()) -> str:
    """The legend of a colour mode, with its one-line description and any notes (dot size, emphasis)."""
    labels, colours, n = colouring.labels, colouring.colours, len(colouring.labels)
    ends = [0, 7, 8, 15] if n == 16 else [0, n - 1]  # ramps (a query and a key one, or one): their ends
    shown = [(labels[i], colours[i]) for i in ends] if n > 10 else list(zip(labels, colours))
    items = "".join(f'<span style="margin-right:10px"><span style="display:inline-block;width:10px;height:10px;'
                    f'background:{c};margin-right:3px"></span>{html.escape(t)}</span>' for t, c in shown)
    lines = [f'<span class="qk-mode-description">{html.escape(description)}</span>'] if description else []
    lines += [html.escape(note) for note in notes]
    about = f'<div style="font-size:11px;color:#555">{" · ".join(lines)}</div>' if lines else ""
    return f'<div style="font-size:11px">{items}</div>{about}'


def shared_points(data, method: str, dim: int, layer: int, head: int, mode: str, sized: bool = False):
    """(HeadPoints, point frame in `mode`, tier frames or None) of a head: built once per server
    and read by every session's raster (`viz.raster.HeadRaster`), which keeps only its own
    highlight and hover raster."""
    key = (method, dim, layer, head)
    coords = data.coords(*key)
    colouring = data.colouring(mode, layer, head)
    points: HeadPoints = data.cached("head_points", key, lambda: head_points(coords))
    frame = data.cached("frames", key + (mode,), lambda: point_frame(coords, colouring, points))
    tiers = data.cached("tier_frames", key + (mode,), lambda: tier_frames(
        coords, colouring, data.norm_tiers(layer, head))) if sized else None
    return points, frame, tiers


class HeadView(param.Parameterized):
    """One session's view of the open head."""

    state = param.ClassSelector(class_=DashboardState, constant=True)
    raster = param.ClassSelector(class_=HeadRaster, allow_None=True, doc="the open head's points as drawn")
    hover = param.Integer(None, allow_None=True, doc="the point under the pointer")
    show_regions = param.Boolean(True, doc="the regions' names over the points")
    show_tokens = param.Boolean(True, doc="each point's token where few are in view")
    size_by_norm = param.Boolean(False, doc="dot size by the vector's norm")
    lines = param.Boolean(True, doc="the clicked sentence's attention lines")

    def __init__(self, state: DashboardState):
        image = state.data.run.modality == "image"  # token labels off over image patches, as in AttentionViz
        super().__init__(state=state, show_tokens=not image)
        self.data = state.data
        self.image_layout = patches_layer.run_layout(self.data) if image else None
        self.view_range = (None, None, PLOT_W, PLOT_H)
        self._reset_range = True
        self._attention_key, self._attention = None, None
        self.range_stream, self.size_stream = hv.streams.RangeXY(), hv.streams.PlotSize()
        # One stream object per input, shared by every layer that reads it: a change (a new raster,
        # a click) then refreshes the plot once, not once per layer (~60 ms each at any size).
        zoom = [self.range_stream, self.size_stream]
        opened = hv.streams.Params(self, ["raster"])
        clicked = hv.streams.Params(state, ["selected_point"])
        hovered = hv.streams.Params(self, ["hover"])
        toggles = hv.streams.Params(self, ["show_regions", "show_tokens", "lines"])
        raster = hv.DynamicMap(self._raster_element, streams=[*zoom, opened]).opts(hv.opts.RGB(
            width=PLOT_W, height=PLOT_H, tools=["box_select", "lasso_select"], active_tools=["pan", "wheel_zoom"],
            framewise=True, shared_axes=False, xaxis=None, yaxis=None, toolbar="above",
            lod={"factor": 10, "interval": 300, "threshold": 2000, "timeout": LOD_TIMEOUT_MS},
            hooks=[self._limit_zoom]))
        under = raster * hv.DynamicMap(self._veil, streams=[opened, clicked])
        if self.image_layout is not None:  # each point as its image patch, zoomed in
            under = under * hv.DynamicMap(self._patches, streams=[*zoom, opened, clicked])
        layers = under * hv.DynamicMap(self._region_labels, streams=[*zoom, opened, toggles]) \
            * hv.DynamicMap(self._marks, streams=[opened, clicked, toggles]) \
            * hv.DynamicMap(self._hover_mark, streams=[opened, hovered]) \
            * hv.DynamicMap(self._token_labels, streams=[*zoom, opened, clicked, toggles])
        hv.streams.Tap(source=raster).add_subscriber(self._on_tap)
        hv.streams.PointerXY(source=raster).add_subscriber(self._on_pointer)
        hv.streams.BoundsXY(source=raster).add_subscriber(lambda bounds=None, **_: self._on_select(box=bounds))
        hv.streams.Lasso(source=raster).add_subscriber(lambda geometry=None, **_: self._on_select(polygon=geometry))
        self.head_plot = pn.pane.HoloViews(layers, css_classes=["qk-head-plot"])
        self.plot3d = pn.pane.Plotly(None, visible=False, width=PLOT_W, height=PLOT_H, css_classes=["qk-plot3d"])
        self.legend = pn.pane.HTML("", css_classes=["qk-legend"])
        self.hover_pane = pn.pane.HTML('<i>hover a point</i>', css_classes=["qk-hover"], width=PLOT_W, height=48)
        self.title = pn.pane.HTML("", css_classes=["qk-head-title"])
        box = pn.widgets.Checkbox.from_param
        self.labels_w = box(self.param.show_regions, name="labels", width=80, css_classes=["qk-labels-toggle"])
        self.tokens_w = box(self.param.show_tokens, name="token labels", width=100,
                            css_classes=["qk-token-labels-toggle"])
        self.size_w = box(self.param.size_by_norm, name="size by norm", width=100, css_classes=["qk-size-norm"])
        self.lines_w = box(self.param.lines, name="attention lines", width=110, css_classes=["qk-lines-toggle"])
        self.clear_w = pn.widgets.Button(label="clear selection", width=120, css_classes=["qk-clear"])
        self.clear_w.on_click(lambda _: state.clear_selection())
        state.param.watch(lambda *_: self.load(), ["method", "dim", "layer", "head"])
        state.param.watch(lambda _: self.load(keep_range=True), ["colour", "matches"])  # the zoom stays
        self.param.watch(lambda _: self.load(keep_range=True), "size_by_norm")
        self.load()

    def panel(self):
        return pn.Column(self.title, pn.Row(self.legend, self.labels_w, self.tokens_w, self.size_w, self.lines_w,
                                            self.clear_w), self.head_plot, self.plot3d, self.hover_pane)

    # the open head --------------------------------------------------------------------------
    def load(self, keep_range: bool = False):
        """Shows the open head, with the view's loading indicator on while it loads."""
        self.head_plot.loading = True
        try:
            self._show(keep_range)
        finally:
            self.head_plot.loading = False

    def _show(self, keep_range: bool):
        state, data = self.state, self.data
        method, dim, layer, head = state.method, state.dim, state.layer, state.head
        if not data.has(method, dim, layer, head):
            return
        colouring = data.colouring(state.colour, layer, head)
        notes = (("dot size: vector norm (smallest, middle and largest third of the queries, and of the keys)",)
                 if self.size_by_norm else ()) + (("search hits enlarged and outlined, the rest faded",)
                                                  if len(state.matches) else ())
        self.legend.object = legend_html(colouring, MODE_DESCRIPTIONS.get(state.colour), notes)
        self.title.object = f"<b>Layer {layer}, head {head}</b> · {method} {dim}-D · {2 * data.n:,} points"
        coords = data.coords(method, dim, layer, head)
        highlight = state.hits()
        if dim == 3:
            self.plot3d.object = self._figure_3d(coords, colouring, highlight)
            self.plot3d.visible, self.head_plot.visible = True, False
            self.raster = HeadRaster(coords[:, :2], colouring, highlight)
            return
        points, frame, tiers = shared_points(data, method, dim, layer, head, state.colour, self.size_by_norm)
        self.plot3d.visible, self.head_plot.visible = False, True
        self._reset_range = self._reset_range or not keep_range
        self.raster = StyledRaster(coords, colouring, highlight, tiers, points=points, frame=frame)

    def _veil(self, **_):
        """The rest of the points fade under a clicked sentence: a white veil over the raster
        (drawing it again would cost a click the raster's time)."""
        shown = self.raster is not None and self.state.dim != 3 and self.state.selected_point is not None
        return attention_lines.veil_element((self.raster.x_full[0], self.raster.y_full[0], self.raster.x_full[1],
                                             self.raster.y_full[1]) if shown else None)

    def _hover_mark(self, **_):
        if self.raster is None or self.state.dim == 3 or self.hover is None:
            return attention_lines.hover_element(np.zeros((0, 2)), None)
        return attention_lines.hover_element(self.raster.coords, (self.hover, str(
            self.data.tokens["token"].iat[self.hover % self.data.n])))

    def _figure_3d(self, coords, colouring, highlight):
        import plotly.graph_objects as go  # plotly: only 3-D needs it

        n = len(coords)
        sample = np.sort(np.random.default_rng(0).choice(n, min(n, SAMPLE_3D), replace=False))
        tokens = self.data.tokens["token"]
        traces = [go.Scatter3d(x=coords[sample, 0], y=coords[sample, 1], z=coords[sample, 2], mode="markers",
                               marker=dict(size=2, color=list(colouring.point_colours(sample)), opacity=0.7),
                               hoverinfo="text", text=[f"{tokens.iat[i % self.data.n]} "
                                                       f"({'query' if i < self.data.n else 'key'})" for i in sample])]
        if highlight is not None:
            traces.append(go.Scatter3d(x=coords[highlight, 0], y=coords[highlight, 1], z=coords[highlight, 2],
                                       mode="markers", marker=dict(size=4, color="#ff7f00"), name="matches"))
        figure = go.Figure(traces)
        figure.update_layout(margin=dict(l=0, r=0, t=30, b=0), showlegend=False,
                             title=f"3-D, {len(sample):,} of {n:,} points (a uniform sample)")
        return figure

    # the raster and what is drawn over it ---------------------------------------------------
    def _raster_element(self, x_range=None, y_range=None, width=None, height=None, **_):
        if self.raster is None or self.state.dim == 3:
            return hv.RGB(np.zeros((2, 2, 4), dtype=np.uint8))
        if self._reset_range:  # a new head: its full range, remembered as the stream's, which the
            x_range = y_range = None  # browser does not report back when the server sets it
            self._reset_range = False
            self.range_stream.update(x_range=self.raster.x_full, y_range=self.raster.y_full)
        width, height = int(width or PLOT_W), int(height or PLOT_H)
        self.view_range = (x_range, y_range, width, height)
        return self.raster.element(x_range, y_range, width, height)

    def _limit_zoom(self, plot, _element) -> None:
        """Zooming in stops at a millionth of the head's extent: a wheel held down would otherwise
        shrink the ranges to nothing, then NaN, and the view with them."""
        if self.raster is None:
            return
        for axis, (lo, hi) in ((plot.state.x_range, self.raster.x_full), (plot.state.y_range, self.raster.y_full)):
            if hasattr(axis, "min_interval"):
                axis.min_interval = (hi - lo) * MIN_ZOOM

    def _shown_range(self):
        x_range, y_range, width, height = self.view_range
        return x_range or self.raster.x_full, y_range or self.raster.y_full, width, height

    def _region_labels(self, **_):
        """The names of the head's regions in the raster's current range (`viz.labels`)."""
        state = self.state
        if self.raster is None or state.dim == 3 or not self.show_regions \
                or not self.data.has(state.method, state.dim, state.layer, state.head):
            return labels_element(visible_labels(None, None, None, PLOT_W, PLOT_H))
        regions = region_frame(self.data, state.method, state.dim, state.layer, state.head)
        return labels_element(visible_labels(regions, *self._shown_range()))

    def _patches(self, **_):
        """An image run's points as their image patches where few are in view (`viz.patches_layer`)."""
        if self.raster is None or self.state.dim == 3:
            return patches_layer.patches_element(None)
        selected, (x_range, y_range, width, height) = self._selected_sentence(), self._shown_range()
        drawn = patches_layer.patches_rgba(
            self.raster.coords, self.data.tokens, x_range, y_range, width, height,
            patches_layer.cached_patches(self.data, self.image_layout), self.image_layout, self.state.colour,
            self.raster.colouring, sentence=selected[2] if selected else None,
            most_in_view=self.raster.points.most_in(x_range, y_range))
        return patches_layer.patches_element(drawn, x_range, y_range, self.state.colour)

    def _token_labels(self, **_):
        """Token labels where few points are in view, and the clicked sentence's "pos:token"."""
        if self.raster is None or self.state.dim == 3:
            return tokens_layer.labels_element(pd.DataFrame({c: [] for c in tokens_layer.COLUMNS}))
        selected = self._selected_sentence()
        shown = self._shown_range()
        return tokens_layer.labels_element(tokens_layer.token_labels(
            self.raster.coords, self.data.tokens, *shown, sentence=selected[2] if selected else None,
            show_tokens=self.show_tokens, most_in_view=self.raster.points.most_in(*shown[:2])))

    def _marks(self, **_):
        """Overlay on the projection (`viz.attention_lines`): the clicked point, its sentence's
        queries and keys, with the "attention lines" box every query's top 2 keys (weight >= 0.05,
        opacity = weight), and the clicked point's own strongest links (a query's top keys, or
        the queries that attend most to a key). The hovered point has its own layer."""
        if self.raster is None or self.state.dim == 3:
            return attention_lines.marks_element(np.zeros((0, 2)), self.data.n, None, None, None, None, None)
        coords, n = self.raster.coords, self.data.n
        sentence = lines = own = None
        selected = self._selected_sentence()
        if selected is not None:
            info, offset, sentence = selected
            attention = self._sentence_attention(info["seq_id"])
            if self.lines:
                lines = attention_lines.line_segments(attention_lines.sentence_lines(attention), coords, offset, n)
            own = attention_lines.line_segments(attention_lines.point_lines(attention, info["pos"], info["kind"]),
                                                coords, offset, n)
        return attention_lines.marks_element(coords, n, sentence, lines, own, self.state.selected_point, None)

    def _selected_sentence(self):
        """(point info, first token's row, sentence points) of the clicked point, or None."""
        point = self.state.selected_point
        if point is None or self.raster is None:
            return None
        info = point_info(self.data.tokens, None, point)
        offset = point % self.data.n - info["pos"]
        return info, offset, attention_lines.sentence_points(offset, info["seq_len"], self.data.n)

    def _sentence_attention(self, seq_id: int) -> np.ndarray:
        """The open head's attention over sequence `seq_id`, kept while it stays selected (the
        marks are redrawn on every hover)."""
        key = (seq_id, self.state.layer, self.state.head)
        if self._attention_key != key:
            self._attention, self._attention_key = self.data.attention(*key), key
        return self._attention

    # pointer, click, box and lasso -----------------------------------------------------------
    def _point_at(self, x, y):
        if self.raster is None or x is None or y is None:
            return None
        x_range, y_range, width, height = self.view_range
        index = self.raster.index_raster(x_range, y_range, width, height)
        return pick_point(index, *self.raster.pixel_of(x, y, x_range, y_range, width, height), radius=6)

    def _on_pointer(self, x=None, y=None, **_):
        point = self._point_at(x, y)
        if point is None or point == self.hover:
            return
        info = point_info(self.data.tokens, self.data.sequences, point,
                          norm=self.data.point_norm(self.state.layer, self.state.head, point))
        colour = QUERY_COLOUR if info["kind"] == "query" else KEY_COLOUR
        self.hover_pane.object = (
            f'<div><b style="color:{colour}">{html.escape(info["token"])}</b> · {info["kind"]} · '
            f'{info["position"]} · norm {info["norm"]:.3g} · sequence {info["seq_id"]}<br><span style="color:#555">'
            f'{html.escape(info["snippet"])}</span></div>')
        self.hover = point

    def _on_tap(self, x=None, y=None, **_):
        point = self._point_at(x, y)
        if point is not None:
            self.state.selected_point = point

    def _on_select(self, box=None, polygon=None):
        if self.raster is None:
            return
        x, y = self.raster.coords[:, 0], self.raster.coords[:, 1]
        if box is not None:
            points = points_in_box(x, y, box)
        elif polygon is not None and len(polygon):
            points = points_in_lasso(x, y, np.asarray(polygon))
        else:
            return
        state = self.state
        self.state.selection = selection_frame(self.data.tokens, self.data.coords(
            state.method, state.dim, state.layer, state.head), points, state.layer, state.head, state.method)

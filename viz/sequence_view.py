"""The Head tab's sequence view: the clicked point's sequence, BertViz-like for text (queries
on the left, keys on the right, lines weighted by attention; hover, click-to-toggle with
renormalization, hide special tokens and reset run in the browser; a long sequence shows the
window around the clicked token) or, for an image run, the image with the attention of the
clicked patch's query as a heatmap over its patch grid."""

from __future__ import annotations

import html
import io

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (registers the renderer; .opts needs it)
import numpy as np
import pandas as pd
import panel as pn
from bokeh.layouts import row as bokeh_row
from bokeh.models import (Button, CheckboxGroup, ColumnDataSource, CustomJS, HoverTool, Plot, Range1d, Rect,
                          Segment, TapTool, Text)
from PIL import Image, ImageDraw

from viz import image_arrows
from viz.data import KEY_COLOUR, QUERY_COLOUR, SELECTED_COLOUR, point_info

if hv.Store.current_backend not in hv.Store.renderers:
    hv.Store.set_current_backend("bokeh")


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
                  size: int = 320, kind: str = "query") -> bytes:
    """PNG, `size` square: the image as the model saw it, its patch grid, the attention of the
    selected query (`kind` "key": to the selected key) over the patches as a heatmap, the selected
    patch outlined, arrows for its strongest links and, below the image, the [CLS] indicator
    (`viz.image_arrows`)."""
    strip = image_arrows.strip_height(size) if attention_row is not None and grid > 0 else 0
    side = size - strip
    base = image.convert("RGB").resize((side, side))
    if attention_row is not None and grid > 0:
        patches = np.asarray(attention_row[prefix:prefix + grid * grid], dtype=np.float64)
        patches = patches / max(patches.max(), 1e-12)
        heat = heat_colours(patches.reshape(grid, grid))
        heat = Image.fromarray(heat).resize((side, side), Image.NEAREST)
        base = Image.blend(base, heat, 0.6)
    draw = ImageDraw.Draw(base)
    step = side / max(grid, 1)
    for i in range(1, grid):
        draw.line([(i * step, 0), (i * step, side)], fill=(255, 255, 255), width=1)
        draw.line([(0, i * step), (side, i * step)], fill=(255, 255, 255), width=1)
    if selected_patch is not None and selected_patch >= 0:
        r, c = divmod(selected_patch, grid)
        draw.rectangle([c * step, r * step, (c + 1) * step, (r + 1) * step], outline=(0, 160, 255), width=3)
    picture = Image.new("RGB", (size, size), "white")
    picture.paste(base, (strip // 2, 0))
    if strip:
        picture = image_arrows.draw_image_marks(picture, attention_row, grid, prefix, selected_patch, kind,
                                                (strip // 2, 0, side))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


WINDOW = 64  # longer sequences show the WINDOW tokens around the selected one, never every pair
LINE_THRESHOLD = 0.05
ROW_PX = 15
SEQ_WIDTH = 340


def sequence_window(n_tokens: int, pos: int, size: int = WINDOW) -> tuple[int, int]:
    """[start, stop) of the `size` positions around `pos` (the whole sequence when it is short)."""
    if n_tokens <= size:
        return 0, n_tokens
    start = min(max(pos - size // 2, 0), n_tokens - size)
    return start, start + size


def sentence_lines(attention: np.ndarray, active: np.ndarray, focus: int | None, side: str,
                   threshold: float = LINE_THRESHOLD) -> pd.DataFrame:
    """The sentence view's lines (query i on the left -> key j on the right): each query's
    attention renormalized over the active (not toggled off, not hidden) keys; every pair of
    active tokens of weight >= `threshold`, and every line of the `focus` token (its keys for
    side "query", the queries that look at it for "key") drawn strongly. The browser
    (`REDRAW_JS`) computes the same after each hover, click or reset."""
    on = np.asarray(active, dtype=bool)
    both_on = on[:, None] & on[None, :]
    kept = np.where(both_on, np.asarray(attention, dtype=np.float64), 0.0)
    sums = kept.sum(axis=1, keepdims=True)
    weights = np.divide(kept, sums, out=np.zeros_like(kept), where=sums > 0)
    focused = np.zeros_like(both_on)
    if focus is not None and focus >= 0 and on[focus]:
        if side == "query":
            focused[focus, :] = on
        else:
            focused[:, focus] = on
    query, key = np.nonzero(both_on & (sums > 0) & ((weights >= threshold) | focused))
    weight = weights[query, key]
    strong = focused[query, key]
    top = max(float(weight[strong].max()) if strong.any() else 0.0, 1e-12)
    alpha = np.where(strong, 0.1 + 0.9 * weight / top, 0.6 * weight)
    width = np.where(strong, 0.5 + 4 * weight / top, 1.0)
    colour = np.where(strong, QUERY_COLOUR if side == "query" else KEY_COLOUR, "#b0b0b0")
    return pd.DataFrame({"x0": 0.0, "y0": -query.astype(float), "x1": 1.0, "y1": -key.astype(float),
                         "query": query, "key": key, "weight": weight, "alpha": alpha, "width": width,
                         "colour": colour})


# the browser's copy of `sentence_lines`, over the sources of `SentenceFigure`
REDRAW_JS = """
const d = tok.data, n = d.text.length, w = att.data.w, v = view.data;
const hide = v.hide[0] > 0;
const on = Array.from(d.active, (a, i) => a > 0 && !(hide && d.special[i] > 0));
const hovering = v.hover[0] >= 0;
const focus = hovering ? v.hover[0] : v.selected[0];
const side = hovering ? v.side[0] : v.kind[0];
const sums = new Float64Array(n);
for (let i = 0; i < n; i++) if (on[i]) for (let j = 0; j < n; j++) if (on[j]) sums[i] += w[i * n + j];
const out = {x0: [], y0: [], x1: [], y1: [], query: [], key: [], weight: [], alpha: [], width: [], colour: []};
const strong = [];
let top = 1e-12;
for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
  if (!on[i] || !on[j] || sums[i] <= 0) continue;
  const p = w[i * n + j] / sums[i];
  const s = focus >= 0 && on[focus] && (side == 0 ? i == focus : j == focus);
  if (!s && p < threshold) continue;
  out.x0.push(0); out.y0.push(-i); out.x1.push(1); out.y1.push(-j);
  out.query.push(i); out.key.push(j); out.weight.push(p); strong.push(s);
  if (s) top = Math.max(top, p);
}
for (let k = 0; k < strong.length; k++) {
  const p = out.weight[k];
  out.alpha.push(strong[k] ? 0.1 + 0.9 * p / top : 0.6 * p);
  out.width.push(strong[k] ? 0.5 + 4 * p / top : 1);
  out.colour.push(strong[k] ? (side == 0 ? query_colour : key_colour) : '#b0b0b0');
}
lines.data = out;
tok.data = Object.assign({}, d, {alpha: on.map((o) => o ? 1.0 : 0.2)});
"""


class SentenceFigure:
    """The BertViz-like sentence view as plain Bokeh, interactive in the browser without a
    server round trip: hover a token for its lines (left: where the query looks; right: which
    queries look at the key), click one to toggle it off or on (the rest renormalized), hide
    the special tokens ([CLS], [SEP], the first token), reset. The server sends a window of at
    most WINDOW tokens and their attention."""

    def __init__(self):
        self.tok = ColumnDataSource({name: [] for name in ("text", "xl", "xr", "y", "active", "special", "alpha")},
                                    name="qk-sentence-tokens")
        self.att = ColumnDataSource({"w": []}, name="qk-sentence-attention")
        self.view = ColumnDataSource({"hover": [-1], "side": [0], "selected": [-1], "kind": [0], "hide": [0]},
                                     name="qk-sentence-state")
        self.lines = ColumnDataSource({name: [] for name in sentence_lines(np.zeros((0, 0)), np.zeros(0), None,
                                                                           "query").columns},
                                      name="qk-sentence-lines")
        self.y_range = Range1d(-0.5, 0.5)
        plot = Plot(frame_width=SEQ_WIDTH, frame_height=ROW_PX, x_range=Range1d(-0.8, 1.8), y_range=self.y_range,
                    min_border=0, toolbar_location=None, outline_line_color=None, name="qk-sentence-plot")
        plot.add_glyph(self.lines, Segment(x0="x0", y0="y0", x1="x1", y1="y1", line_color="colour",
                                           line_alpha="alpha", line_width="width"), name="qk-sentence-lines")
        targets = []
        for x, align, colour in (("xl", "right", QUERY_COLOUR), ("xr", "left", KEY_COLOUR)):
            text = Text(x=x, y="y", text="text", text_align=align, text_baseline="middle", text_font_size="9pt",
                        text_color=colour, text_alpha="alpha")
            plot.add_glyph(self.tok, text, selection_glyph=text, nonselection_glyph=text)
            centre = -0.4 if x == "xl" else 1.4
            rect = Rect(x=centre, y="y", width=0.75, height=1, fill_alpha=0, line_alpha=0)
            targets.append(plot.add_glyph(self.tok, rect, selection_glyph=rect, nonselection_glyph=rect))
        args = dict(tok=self.tok, att=self.att, view=self.view, lines=self.lines, threshold=LINE_THRESHOLD,
                    query_colour=QUERY_COLOUR, key_colour=KEY_COLOUR)
        for side, target in enumerate(targets):
            hover = CustomJS(args=dict(args, me=side), code="""
const hit = cb_data.index.indices;
const now = view.data;
if (hit.length) { if (now.hover[0] == hit[0] && now.side[0] == me) return; now.hover[0] = hit[0]; now.side[0] = me; }
else if (now.hover[0] >= 0 && now.side[0] == me) now.hover[0] = -1;
else return;
""" + REDRAW_JS)
            plot.add_tools(HoverTool(renderers=[target], tooltips=None, callback=hover))
        plot.add_tools(TapTool(renderers=targets))
        self.tok.selected.js_on_change("indices", CustomJS(args=args, code="""
const hit = tok.selected.indices;
if (!hit.length) return;
const flags = tok.data.active;
flags[hit[0]] = flags[hit[0]] > 0 ? 0 : 1;
tok.selected.indices = [];
""" + REDRAW_JS))
        self.hide = CheckboxGroup(labels=["hide [CLS] / [SEP] / first token"], active=[], name="qk-sentence-hide")
        self.hide.js_on_change("active", CustomJS(args=args, code="view.data.hide[0] = cb_obj.active.length;"
                                                                  + REDRAW_JS))
        self.reset = Button(label="reset", width=70, name="qk-sentence-reset")
        self.reset.js_on_event("button_click", CustomJS(args=dict(args, box=self.hide), code="""
tok.data.active = tok.data.active.map(() => 1);
view.data.hide[0] = 0; view.data.hover[0] = -1;
box.active = [];
""" + REDRAW_JS))
        self.plot = plot

    def show(self, tokens: list[str], special: np.ndarray, attention: np.ndarray, pos: int, kind: str) -> None:
        """The sequence `tokens` (already windowed) with all tokens on, `pos` selected."""
        n = len(tokens)
        ys = -np.arange(n, dtype=float)
        active = np.ones(n, dtype=np.int8)
        side = 0 if kind == "query" else 1
        lines = sentence_lines(attention, active, pos, kind)
        self.hide.active = []
        self.att.data = {"w": np.asarray(attention, dtype=np.float64).ravel()}
        self.view.data = {"hover": [-1], "side": [side], "selected": [pos], "kind": [side], "hide": [0]}
        self.tok.data = {"text": tokens, "xl": np.full(n, -0.03), "xr": np.full(n, 1.03), "y": ys, "active": active,
                         "special": np.asarray(special, dtype=np.int8), "alpha": np.ones(n)}
        self.lines.data = {name: lines[name].to_numpy() for name in lines.columns}
        self.plot.frame_height = ROW_PX * n
        self.y_range.start, self.y_range.end = -n + 0.5, 0.5


HEAT_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=float)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 from values in [0, 1]: an inferno-like ramp (black, purple, red, orange, pale yellow)."""
    position = np.clip(values, 0, 1) * (len(HEAT_STOPS) - 1)
    stops = np.arange(len(HEAT_STOPS))
    return np.stack([np.interp(position, stops, HEAT_STOPS[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


class SequenceView:
    """The sequence of the session's clicked point (`state.selected_point`) in the open head."""

    def __init__(self, state):
        self.state, data = state, state.data
        self.image_run = data.run.modality == "image"
        if self.image_run:
            side, tokens = data.run.manifest.model.patch_grid, data.tokens
            self.grid = int(side) if side else int(tokens["patch_row"].max()) + 1
            self.prefix = int((tokens["patch_row"] < 0).groupby(tokens["seq_id"]).sum().iloc[0])
        self.sentence = SentenceFigure()
        self.window_info = pn.pane.HTML("", css_classes=["qk-sequence-window"], width=SEQ_WIDTH)
        self.sequence_pane = pn.Column(
            pn.Column(pn.pane.Bokeh(bokeh_row(self.sentence.hide, self.sentence.reset)),
                      css_classes=["qk-sentence-controls"]),
            self.window_info, pn.Column(pn.pane.Bokeh(self.sentence.plot), css_classes=["qk-sentence-plot"]),
            css_classes=["qk-sequence"], visible=False)
        self.image_pane = pn.pane.PNG(None, css_classes=["qk-image-view"], visible=False, width=320)
        self.sequence_info = pn.pane.HTML("", css_classes=["qk-sequence-info"], width=360)
        # each key's weight times the norm of its value vector, renormalized per query (Kobayashi et
        # al. 2020): how much of the query's output comes from each key, not how much attention
        self.value_weighted = pn.widgets.Checkbox(
            label="weight by value norm", value=False, visible=data.run.has_values, css_classes=["qk-value-weighted"])
        self.value_weighted.param.watch(self.show, "value")
        state.param.watch(self.show, "selected_point")
        self.show()

    def panel(self):
        return pn.Column(pn.pane.HTML("<b>Sequence</b>"), self.sequence_info, self.value_weighted, self.image_pane,
                         self.sequence_pane)

    def show(self, *_):
        state, data = self.state, self.state.data
        if state.selected_point is None:
            self.sequence_pane.visible = self.image_pane.visible = False
            self.sequence_info.object = "<i>click a point to open its sequence</i>"
            return
        info = point_info(data.tokens, data.sequences, state.selected_point)
        weighting = "value_norm" if self.value_weighted.value else "attention"
        attention = data.attention(info["seq_id"], state.layer, state.head, weighting)
        self.sequence_info.object = (
            f'<div><b>{html.escape(info["token"])}</b> ({info["kind"]}, {info["position"]}) in sequence '
            f'{info["seq_id"]}<br><span style="color:#555">{html.escape(info["snippet"])}</span></div>')
        if self.image_run:
            patch = info["pos"] - self.prefix if info["pos"] >= self.prefix else None
            row = attention[info["pos"]] if info["kind"] == "query" else attention[:, info["pos"]]
            self.image_pane.object = image_heatmap(data.image(info["seq_id"]), row, self.grid, self.prefix, patch,
                                                   kind=info["kind"])
        else:
            self._show_sentence(info, attention)
        self.image_pane.visible, self.sequence_pane.visible = self.image_run, not self.image_run

    def _show_sentence(self, info: dict, attention: np.ndarray) -> None:
        """The clicked token's sequence, or the WINDOW tokens around it in a long one."""
        rows = self.state.data.sequence_tokens(info["seq_id"])
        start, stop = sequence_window(len(rows), info["pos"], WINDOW)
        rows = rows.iloc[start:stop]
        special = rows["is_special"].to_numpy(dtype=bool) | (rows["pos"].to_numpy() == 0)
        tokens = [f"{pos}:{token}" if stop - start < len(attention) else str(token)
                  for pos, token in zip(rows["pos"], rows["token"])]
        self.window_info.object = (
            f'<span style="color:#555">tokens {start}–{stop - 1} of {len(attention)} (the window around the '
            f'clicked token; each query renormalized over it)</span>' if stop - start < len(attention) else "")
        window = attention[start:stop, start:stop]
        pn.state.execute(lambda: self.sentence.show(tokens, special, window, info["pos"] - start, info["kind"]),
                         schedule=True)  # on the event loop, which holds the document's lock

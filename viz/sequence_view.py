"""The Head tab's sequence view: the clicked point's sequence, bertviz-like for text (queries
on the left, keys on the right, lines weighted by attention) or, for an image run, the image with
the attention of the clicked patch's query as a heatmap over its patch grid."""

from __future__ import annotations

import html
import io

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (registers the renderer; .opts needs it)
import numpy as np
import panel as pn
from PIL import Image, ImageDraw

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
                  size: int = 320) -> bytes:
    """PNG: the image as the model saw it, its patch grid, the attention of the selected query
    over the patches as a heatmap, and the selected patch outlined."""
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


class SequenceView:
    """The sequence of the session's clicked point (`state.selected_point`) in the open head."""

    def __init__(self, state):
        self.state, data = state, state.data
        self.image_run = data.run.modality == "image"
        if self.image_run:
            side, tokens = data.run.manifest.model.patch_grid, data.tokens
            self.grid = int(side) if side else int(tokens["patch_row"].max()) + 1
            self.prefix = int((tokens["patch_row"] < 0).groupby(tokens["seq_id"]).sum().iloc[0])
        self.sequence_pane = pn.pane.HoloViews(None, css_classes=["qk-sequence"], visible=False)
        self.image_pane = pn.pane.PNG(None, css_classes=["qk-image-view"], visible=False, width=320)
        self.sequence_info = pn.pane.HTML("", css_classes=["qk-sequence-info"], width=360)
        state.param.watch(self.show, "selected_point")
        self.show()

    def panel(self):
        return pn.Column(pn.pane.HTML("<b>Sequence</b>"), self.sequence_info, self.image_pane, self.sequence_pane)

    def show(self, *_):
        state, data = self.state, self.state.data
        if state.selected_point is None:
            self.sequence_pane.visible = self.image_pane.visible = False
            self.sequence_info.object = "<i>click a point to open its sequence</i>"
            return
        info = point_info(data.tokens, data.sequences, state.selected_point)
        attention = data.attention(info["seq_id"], state.layer, state.head)
        self.sequence_info.object = (
            f'<div><b>{html.escape(info["token"])}</b> ({info["kind"]}, {info["position"]}) in sequence '
            f'{info["seq_id"]}<br><span style="color:#555">{html.escape(info["snippet"])}</span></div>')
        if self.image_run:
            patch = info["pos"] - self.prefix if info["pos"] >= self.prefix else None
            row = attention[info["pos"]] if info["kind"] == "query" else attention[:, info["pos"]]
            self.image_pane.object = image_heatmap(data.image(info["seq_id"]), row, self.grid, self.prefix, patch)
        else:
            tokens = data.sequence_tokens(info["seq_id"])["token"].astype(str).tolist()
            self.sequence_pane.object = sequence_element(tokens, attention, info["pos"], info["kind"])
        self.image_pane.visible, self.sequence_pane.visible = self.image_run, not self.image_run

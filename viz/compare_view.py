"""The compare view over a group of runs (`qkatlas serve-compare GROUP`).

- Side by side: two members on one head, each drawn by datashader. A search highlights the
  matching tokens in both; clicking a point selects its token and marks, in the other member,
  the same token (identical token tables) or the tokens covering the same characters (different
  tokenizers, `pipeline.align`).
- Over the members: a slider (and a player) over the group's members that animates one head's
  layout, with the aligned layouts of `qkatlas compare-run` where they exist (so motion is change
  in the head), on fixed axes; the caption gives the alignment's displacement vs chance.
- Trajectories: a head measurement (`run.head_measurements()` of each member, e.g. the induction
  score) against the training step for every head of the layer, the step of each head's largest
  change marked.

Data shaping is in plain functions (`member_layout`, `token_links`, `trajectories`,
`largest_change`), tested without a browser; the class only wires widgets to them.
"""

from __future__ import annotations

import html
import threading

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (registers the renderer)
import numpy as np
import pandas as pd
import panel as pn
import param

from viz.data import SELECTED_COLOUR, pick_point, point_info, search_tokens, shared_run_data, token_vocabulary
from viz.raster import HeadRaster, full_range

if hv.Store.current_backend not in hv.Store.renderers:
    hv.Store.set_current_backend("bokeh")

SIDE_W, SIDE_H = 520, 460
FRAME_W, FRAME_H = 560, 480
COLOURS = ["query / key", "position", "punctuation / special"]
METHOD_ORDER = ("umap", "tsne", "pca")
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939"]


# --- data shaping -----------------------------------------------------------------------------


def member_layout(group, name: str, layer: int, head: int) -> tuple[np.ndarray, str] | None:
    """([2 * n_tokens, 2] coordinates, what they are) of a member's head: the group's aligned
    layout where committed, else the member's own 2-D projection (UMAP first); None if neither."""
    for (method, dim, a_layer, a_head) in sorted(group.aligned_heads(), key=lambda k: METHOD_ORDER.index(k[0])):
        if (dim, a_layer, a_head) == (2, layer, head):
            layouts = group.aligned(method, dim, layer, head)
            if layouts and name in layouts:
                return layouts[name], f"aligned {method}"
    run = group.run(name)
    if layer not in run.layers or not 0 <= head < run.n_heads:
        return None
    projections = run.projections()
    for method in METHOD_ORDER:
        rows = projections[(projections["method"] == method) & (projections["dim"] == 2)
                           & (projections["layer"] == layer) & (projections["head"] == head)]
        if len(rows):
            return run.projection(method, layer, head, 2), f"own {method}"
    return None


def token_links(group, a: str, b: str) -> pd.DataFrame:
    """Pairs (row_a, row_b) of tokens of members a and b that are the same token (identical token
    tables) or cover the same characters (the group's spans)."""
    from pipeline.align import match_by_spans

    if a == b or group.same_tokens(a, b):
        rows = np.arange(group.run(a).n_tokens)
        return pd.DataFrame({"row_a": rows, "row_b": rows})
    spans_a, spans_b = group.spans(a), group.spans(b)
    if spans_a is None or spans_b is None:
        return pd.DataFrame({"row_a": [], "row_b": []}, dtype=np.int64)
    return match_by_spans(group.run(a).tokens(), spans_a, group.run(b).tokens(), spans_b)[["row_a", "row_b"]]


def trajectories(group) -> pd.DataFrame:
    """Every member's head measurements, one row per (member, layer, head), with its step."""
    frames = []
    for name, step in zip(group.members, group.steps()):
        table = group.run(name).head_measurements()
        if table is not None:
            frames.append(table.assign(member=name, step=step))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["member", "step", "layer", "head"])


def measures(table: pd.DataFrame) -> list[str]:
    """The numeric measurements that vary across the table, the induction score first."""
    skip = {"layer", "head", "step", "n_queries", "positional_offset"}
    columns = [c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])
               and table[c].notna().any()]
    return sorted(columns, key=lambda c: (c != "induction_score", c != "previous_token_score", c))


def largest_change(table: pd.DataFrame, measure: str) -> pd.DataFrame:
    """Per (layer, head): the step at which `measure` changed most from the previous member, and by
    how much (signed)."""
    rows = []
    for (layer, head), series in table.sort_values("step").groupby(["layer", "head"]):
        values, steps = series[measure].to_numpy(dtype=float), series["step"].to_numpy()
        if len(values) < 2 or np.isnan(values).all():
            continue
        changes = np.diff(values)
        at = int(np.nanargmax(np.abs(changes)))
        rows.append({"layer": int(layer), "head": int(head), "step": int(steps[at + 1]), "change": float(changes[at]),
                     "value": float(values[at + 1])})
    return pd.DataFrame(rows, columns=["layer", "head", "step", "change", "value"])


class GroupData:
    """What every session of one server shares: the group, its members' run data, layouts and links."""

    def __init__(self, group):
        self.group = group
        self._lock = threading.RLock()
        self._layouts: dict = {}
        self._links: dict = {}
        self._vocabularies: dict = {}
        self.table = trajectories(group)

    def run_data(self, name: str):
        return shared_run_data(self.group.run(name))

    def layout(self, name: str, layer: int, head: int):
        key = (name, layer, head)
        with self._lock:
            if key not in self._layouts:
                self._layouts[key] = member_layout(self.group, name, layer, head)
            return self._layouts[key]

    def search(self, name: str, query: str) -> np.ndarray:
        """Token rows of member `name` matching `query` (`viz.data.search_tokens`), white space around
        a token ignored: a character-level BPE keeps spaces inside its tokens."""
        if not query.strip():
            return np.zeros(0, dtype=np.int64)
        with self._lock:
            if name not in self._vocabularies:
                tokens = self.run_data(name).tokens
                stripped = tokens.assign(token=tokens["token"].astype(str).str.strip())
                self._vocabularies[name] = (stripped, token_vocabulary(stripped))
            stripped, vocabulary = self._vocabularies[name]
        return search_tokens(stripped, query, vocabulary)

    def links(self, a: str, b: str) -> pd.DataFrame:
        with self._lock:
            if (a, b) not in self._links:
                self._links[(a, b)] = token_links(self.group, a, b)
            return self._links[(a, b)]

    def frame_range(self, layer: int, head: int):
        """Axes that hold the head's layout of every member (the animation does not rescale)."""
        coords = [found[0] for name in self.group.members if (found := self.layout(name, layer, head)) is not None]
        return full_range(np.concatenate(coords)) if coords else ((0.0, 1.0), (0.0, 1.0))


_SHARED: dict[str, GroupData] = {}
_SHARED_LOCK = threading.Lock()


def shared_group_data(group) -> GroupData:
    with _SHARED_LOCK:
        if group.url not in _SHARED:
            _SHARED[group.url] = GroupData(group)
        return _SHARED[group.url]


# --- the view ---------------------------------------------------------------------------------


class Side(param.Parameterized):
    """One of the two side-by-side plots: a member, its raster, search matches and linked marks."""

    raster = param.ClassSelector(class_=HeadRaster, allow_None=True, doc="the member's head as drawn")
    marked = param.Array(np.zeros(0, dtype=np.int64), doc="token rows marked by a selection (here or linked)")

    def __init__(self, view: "CompareView", label: str, member: str):
        super().__init__()
        self.view, self.label = view, label
        self.member_w = pn.widgets.Select(label=f"{label} run", options=view.members, value=member, width=160)
        self.range = hv.streams.RangeXY()
        self.view_range, self._full_range = (None, None, SIDE_W, SIDE_H), True
        self.caption = pn.pane.HTML("", css_classes=[f"qk-compare-{label}-caption"], width=SIDE_W)
        raster = hv.DynamicMap(self._element, streams=[self.range]).opts(hv.opts.RGB(
            width=SIDE_W, height=SIDE_H, xaxis=None, yaxis=None, framewise=True, shared_axes=False,
            active_tools=["wheel_zoom"]))
        hv.streams.Tap(source=raster).add_subscriber(self._on_tap)
        self.plot = pn.pane.HoloViews(raster * hv.DynamicMap(self._marks), linked_axes=False,
                                      css_classes=[f"qk-compare-{label}"])

    @property
    def member(self) -> str:
        return self.member_w.value

    def load(self, layer: int, head: int, query: str) -> None:
        data = self.view.data.run_data(self.member)
        found = self.view.data.layout(self.member, layer, head)
        self._full_range = True
        if found is None:
            self.raster = None
            self.caption.object = (f"<i>{html.escape(self.member)} has no 2-D layout of layer {layer} head {head}</i>")
        else:
            coords, what = found
            matches = self.view.data.search(self.member, query)
            highlight = np.concatenate([matches, matches + data.n]) if len(matches) else None
            self.raster = HeadRaster(coords, data.colouring(self.view.colour_w.value, layer, head), highlight)
            count = f' · <span class="qk-compare-count">{len(matches):,} matches</span>' if query.strip() else ""
            self.caption.object = (f"<b>{html.escape(self.member)}</b> · {html.escape(data.run.model_id)} · {what} · "
                                   f"{2 * data.n:,} points{count}")

    @param.depends("raster")
    def _element(self, x_range=None, y_range=None, **_):
        if self.raster is None:
            return hv.RGB(np.full((2, 2, 4), 255, dtype=np.uint8))
        if self._full_range:  # a new head or member
            self._full_range, x_range, y_range = False, None, None
        self.view_range = (x_range, y_range, SIDE_W, SIDE_H)
        return self.raster.element(x_range, y_range, SIDE_W, SIDE_H)

    @param.depends("raster", "marked")
    def _marks(self):
        if self.raster is None or not len(self.marked):
            return hv.Points([]).opts(color=SELECTED_COLOUR)
        n = len(self.raster.coords) // 2
        points = np.concatenate([self.marked, self.marked + n])
        return hv.Points(self.raster.coords[points]).opts(color=SELECTED_COLOUR, size=9, line_color="white",
                                                          marker="circle")

    def _on_tap(self, x=None, y=None, **_):
        if self.raster is None or x is None or y is None:
            return
        x_range, y_range, width, height = self.view_range
        index = self.raster.index_raster(x_range, y_range, width, height)
        col, row = self.raster.pixel_of(x, y, x_range, y_range, width, height)
        point = pick_point(index, col, row, radius=6)
        if point is not None:
            self.view.select(self, point)


class CompareView:
    """One browser session over a shared GroupData."""

    def __init__(self, data: GroupData):
        _extension()
        self.data = data
        group = data.group
        self.members = group.members
        first = group.run(self.members[0])
        self.layer_w = pn.widgets.Select(label="Layer", options=list(first.layers), value=first.layers[-1], width=80)
        self.head_w = pn.widgets.Select(label="Head", options=list(range(first.n_heads)), value=self._start_head(),
                                        width=80)
        self.colour_w = pn.widgets.Select(label="Colour", options=COLOURS, value=COLOURS[0], width=170)
        self.search_w = pn.widgets.TextInput(label="Search token (both runs)", placeholder="a token, or re:regex",
                                             width=200)
        self.left = Side(self, "left", self.members[0])
        self.right = Side(self, "right", self.members[-1])
        self.selection_pane = pn.pane.HTML("<i>click a point to select its token in both runs</i>",
                                           css_classes=["qk-compare-selection"], width=2 * SIDE_W)

        # the head over the members
        self.frame_w = pn.widgets.IntSlider(label="Member", start=0, end=len(self.members) - 1, value=0,
                                            width=FRAME_W, css_classes=["qk-compare-slider"])
        self.player = pn.widgets.Player(label="Play", start=0, end=len(self.members) - 1, value=0, interval=900,
                                        loop_policy="loop", width=FRAME_W, show_value=False, visible_buttons=[
                                            "previous", "play", "pause", "next"], css_classes=["qk-compare-player"])
        self.player.param.watch(lambda event: setattr(self.frame_w, "value", event.new), "value")
        self.frame_caption = pn.pane.HTML("", css_classes=["qk-compare-frame-caption"], width=FRAME_W)
        frame = hv.DynamicMap(pn.bind(lambda *_: self._frame_element(), self.layer_w, self.head_w, self.colour_w,
                                      self.frame_w)).opts(hv.opts.RGB(
            width=FRAME_W, height=FRAME_H, xaxis=None, yaxis=None, framewise=True, shared_axes=False, toolbar=None))
        self.frame_plot = pn.pane.HoloViews(frame, linked_axes=False, css_classes=["qk-compare-frame"])

        # trajectories
        names = measures(data.table)
        self.measure_w = pn.widgets.Select(label="Measurement", options=names or ["(none)"],
                                           value=names[0] if names else "(none)", width=200)
        self.trajectory_pane = pn.pane.HoloViews(None, linked_axes=False, css_classes=["qk-compare-trajectories"])
        self.change_pane = pn.pane.HTML("", css_classes=["qk-compare-changes"], width=360)

        for widget in (self.layer_w, self.head_w, self.colour_w, self.left.member_w, self.right.member_w):
            widget.param.watch(lambda _: self.load(), "value")
        self.search_w.param.watch(lambda _: self.load(), "value")
        self.frame_w.param.watch(lambda _: self._show_frame(), "value")
        self.measure_w.param.watch(lambda _: self._show_trajectories(), "value")
        self.load()

    def _start_head(self) -> int:
        """The head whose induction score changes most over the group, else head 0."""
        table = self.data.table
        if "induction_score" not in table or table["induction_score"].isna().all():
            return 0
        changes = largest_change(table, "induction_score")
        if changes.empty:
            return 0
        last_layer = self.data.group.run(self.members[0]).layers[-1]
        mine = changes[changes["layer"] == last_layer]
        return int(mine.loc[mine["change"].abs().idxmax(), "head"]) if len(mine) else 0

    # --- state changes -------------------------------------------------------------------
    def load(self) -> None:
        layer, head, query = self.layer_w.value, self.head_w.value, self.search_w.value or ""
        for side in (self.left, self.right):
            side.marked = np.zeros(0, dtype=np.int64)
            side.load(layer, head, query)
        self.selection_pane.object = "<i>click a point to select its token in both runs</i>"
        self._show_frame()

    def select(self, side: Side, point: int) -> None:
        """A click on `side`: mark its token there and the linked tokens in the other run."""
        other = self.right if side is self.left else self.left
        data = self.data.run_data(side.member)
        row = point % data.n
        links = self.data.links(side.member, other.member)
        linked = links.loc[links["row_a"] == row, "row_b"].to_numpy(np.int64)
        side.marked, other.marked = np.array([row]), linked
        info = point_info(data.tokens, data.sequences, point)
        other_tokens = self.data.run_data(other.member).tokens["token"].to_numpy()
        same = ", ".join(html.escape(str(token)) for token in other_tokens[linked]) or "<i>no token</i>"
        self.selection_pane.object = (
            f'<div><b>{html.escape(info["token"])}</b> ({info["kind"]}, {info["position"]}, sequence {info["seq_id"]}) '
            f'in {html.escape(side.member)} ↔ <span class="qk-compare-linked">{same}</span> in '
            f'{html.escape(other.member)}<br><span style="color:#555">{html.escape(info["snippet"])}</span></div>')

    # --- the head over the members -------------------------------------------------------
    def _frame_element(self):
        layer, head = self.layer_w.value, self.head_w.value
        name = self.members[self.frame_w.value]
        found = self.data.layout(name, layer, head)
        if found is None:
            return hv.RGB(np.full((2, 2, 4), 255, dtype=np.uint8))
        data = self.data.run_data(name)
        raster = HeadRaster(found[0], data.colouring(self.colour_w.value, layer, head))
        x_range, y_range = self.data.frame_range(layer, head)
        return raster.element(x_range, y_range, FRAME_W, FRAME_H)

    def _show_frame(self) -> None:
        layer, head = self.layer_w.value, self.head_w.value
        index = self.frame_w.value
        name, step = self.members[index], self.data.group.steps()[index]
        found = self.data.layout(name, layer, head)
        what = found[1] if found else "no layout"
        detail = ""
        for (method, dim, a_layer, a_head), record in self.data.group.aligned_heads().items():
            if (dim, a_layer, a_head) == (2, layer, head) and found and found[1] == f"aligned {method}":
                quality = {item["member"]: item for item in record["quality"]}.get(name, {})
                if "displacement" in quality:
                    detail = (f" · moved {quality['displacement']:.3f} from the previous member "
                              f"(chance {quality['chance']:.3f}, in layout radii)")
        self.frame_caption.object = (f'<b class="qk-compare-frame-member">{html.escape(name)}</b> · step {step} · '
                                     f"layer {layer} head {head} · {what}{detail}")
        self._show_trajectories()

    # --- trajectories ----------------------------------------------------------------------
    def _show_trajectories(self) -> None:
        table, measure = self.data.table, self.measure_w.value
        layer, head = self.layer_w.value, self.head_w.value
        if table.empty or measure not in table:
            self.trajectory_pane.object = None
            self.change_pane.object = "<i>no head measurements in these runs (qkatlas heads RUN)</i>"
            return
        rows = table[table["layer"] == layer].sort_values("step")
        changes = largest_change(rows, measure)
        curves, marks = [], []
        for index, (h, series) in enumerate(rows.groupby("head")):
            mine = h == head
            curves.append(hv.Curve((series["step"], series[measure]), "step", measure, label=f"H{h}").opts(
                color=PALETTE[index % len(PALETTE)], line_width=4 if mine else 1.5, alpha=1 if mine else 0.6))
        for row in changes.itertuples():
            marks.append((row.step, row.value, f"H{row.head}"))
        step = self.data.group.steps()[self.frame_w.value]
        overlay = hv.Overlay(curves) * hv.Scatter(marks, "step", [measure, "head"]).opts(
            size=10, marker="diamond", color="black", tools=["hover"]) * hv.VLine(step).opts(color="#999",
                                                                                             line_dash="dashed")
        self.trajectory_pane.object = overlay.opts(
            width=620, height=320, legend_position="right", show_grid=True, toolbar=None,
            title=f"{measure} over training, layer {layer} (◆ largest change)")
        items = "".join(f"<li>H{r.head}: step {r.step} ({r.change:+.3f} → {r.value:.3f})</li>"
                        for r in changes.itertuples())
        self.change_pane.object = f"<b>Largest change of {html.escape(measure)}</b><ul>{items}</ul>"

    def panel(self):
        group = self.data.group
        header = pn.pane.HTML(
            f'<div style="font-size:15px"><b>qkatlas compare</b> — {html.escape(group.url)}: '
            f'{len(self.members)} {"checkpoints" if group.ordered else "runs"}</div>', css_classes=["qk-header"])
        controls = pn.Row(self.layer_w, self.head_w, self.colour_w, self.search_w)
        side_by_side = pn.Column(pn.Row(self.left.member_w, self.right.member_w),
                                 pn.Row(pn.Column(self.left.caption, self.left.plot),
                                        pn.Column(self.right.caption, self.right.plot)), self.selection_pane)
        over = pn.Row(pn.Column(self.frame_caption, self.frame_plot, self.frame_w, self.player),
                      pn.Column(self.measure_w, self.trajectory_pane, self.change_pane))
        return pn.Column(header, controls, pn.Tabs(("Side by side", side_by_side), ("Over members", over),
                                                   dynamic=False), sizing_mode="stretch_width")


_EXTENSIONS = False


def _extension() -> None:
    """HoloViews' bokeh options, loaded once per process (the views' `.opts` need them)."""
    global _EXTENSIONS
    if not _EXTENSIONS:
        hv.extension("bokeh", logo=False)
        _EXTENSIONS = True


def compare_app(group):
    """The compare view over `group` (a path, URL or opened Group) as a Panel object."""
    from pipeline.store.group import open_group

    if isinstance(group, str):
        group = open_group(group)
    return CompareView(shared_group_data(group)).panel()


def make_compare_server(group_url: str, port: int = 5007, address: str = "127.0.0.1"):
    """A Panel server (not started) for the compare view of a group."""
    from pipeline.store import StoreError
    from pipeline.store.group import open_group
    from viz.server import ServeError, _bind_error

    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port} is not a port number; give one from 1 to 65535")
    try:
        group = open_group(group_url)
    except StoreError as error:
        raise ServeError(str(error)) from None
    origins = [f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]
    try:
        return pn.serve({"/": lambda: compare_app(group)}, port=port, address=address, websocket_origin=origins,
                        show=False, start=False, title="qkatlas compare")
    except OSError as error:
        raise _bind_error(error, address, port) from None

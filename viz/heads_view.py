"""The head atlas in the dashboard: the Heads tab (every head as one point, any two per-head
measurements on the axes), the matrix view coloured, filtered and sorted by a measurement,
and the head view's numbers with their ranks and its top sequences.

The measurements are `run.head_measurements()` (see `pipeline.heads`) with the projection
quality of the current method and dimension joined in. Data shaping is in plain functions;
`HeadAtlas` holds the widgets over the session's state (`viz.state.DashboardState`)."""

from __future__ import annotations

import html

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import FixedTicker
from bokeh.palettes import Viridis256

from viz.aggregate_view import aggregate_element
from viz.data import SELECTED_COLOUR
from viz.state import DashboardState

# column -> what it measures, in one line (the Heads tab's legend and the head view)
MEASURES = {
    "entropy": "mean attention entropy (nats)",
    "entropy_norm": "entropy / log(number of visible keys)",
    "sink_weight": "mean weight on position 0",
    "sink_argmax_share": "share of queries whose largest weight is on position 0",
    "prev_weight": "mean weight on the previous token",
    "self_weight": "mean weight on the token itself",
    "next_weight": "mean weight on the next token",
    "positional_offset": "most frequent offset of a query's largest weight",
    "positional_share": "share of queries whose largest weight is at that offset",
    "special_weight": "mean weight on special tokens",
    "punct_weight": "mean weight on punctuation",
    "duplicate_weight": "mean weight on earlier copies of the same token",
    "confidence": "mean of each query's largest weight",
    "induction_score": "induction score on repeated random tokens (TransformerLens, mul)",
    "duplicate_score": "duplicate-token score on repeated random tokens (TransformerLens, mul)",
    "previous_token_score": "previous-token score on repeated random tokens (TransformerLens, mul)",
    "knn_preservation": "projection quality: kNN preservation",
    "attention_agreement": "projection quality: attention agreement",
}
QUALITY = {"quality.knn_preservation": "knn_preservation", "quality.attention_agreement": "attention_agreement"}
UNRANKED = {"positional_offset"}  # an offset, not a strength: no rank
NOT_MEASURES = {"layer", "head", "n_queries"}
MISSING_COLOUR = "#bbbbbb"
FILTERS = ["all heads", ">", "<"]
SCATTER_W, SCATTER_H = 720, 540


# --- data shaping (tested without a browser) ---------------------------------------------


def head_table(measurements: pd.DataFrame, projections: pd.DataFrame, method: str, dim: int) -> pd.DataFrame:
    """One row per measured head: its measurements plus the quality of its `method` `dim`-D
    projection (`knn_preservation`, `attention_agreement`; NaN where not projected)."""
    table = measurements.copy()
    table["layer"], table["head"] = table["layer"].astype(int), table["head"].astype(int)
    mine = projections[(projections["method"] == method) & (projections["dim"].astype(int) == int(dim))]
    quality = pd.DataFrame({"layer": mine["layer"].astype(int), "head": mine["head"].astype(int)})
    for source, name in QUALITY.items():
        quality[name] = mine[source].astype(float) if source in mine else np.nan
    table = table.drop(columns=[c for c in QUALITY.values() if c in table])
    return table.merge(quality, on=["layer", "head"], how="left").sort_values(["layer", "head"], ignore_index=True)


def measure_columns(table: pd.DataFrame) -> list[str]:
    """The numeric columns worth a choice: the known measurements first, in `MEASURES` order,
    then any other; a column without one finite value (next weight in a causal model,
    induction in an encoder) is left out."""
    numeric = [c for c in table.columns if c not in NOT_MEASURES and pd.api.types.is_numeric_dtype(table[c])
               and np.isfinite(table[c].to_numpy(dtype=float)).any()]
    return [c for c in MEASURES if c in numeric] + [c for c in numeric if c not in MEASURES]


def ranks(table: pd.DataFrame, column: str) -> pd.Series:
    """Rank of every head by `column`, 1 for the largest; NaN where the head has no value."""
    return table[column].astype(float).rank(ascending=False, method="min")


def head_numbers(table: pd.DataFrame, layer: int, head: int) -> pd.DataFrame:
    """One row per measurement of one head: value, rank among the heads with a value (None for
    an offset, which has no order) and how many heads have one."""
    match = table[(table["layer"] == layer) & (table["head"] == head)]
    rows = []
    for column in measure_columns(table):
        value = float(match[column].iloc[0]) if len(match) else np.nan
        rank = ranks(table, column)[match.index].iloc[0] if len(match) and column not in UNRANKED else np.nan
        rows.append({"measure": column, "value": value, "rank": None if np.isnan(rank) else int(rank),
                     "of": int(np.isfinite(table[column].to_numpy(dtype=float)).sum())})
    frame = pd.DataFrame(rows, columns=["measure", "value", "rank", "of"])
    frame["rank"] = pd.Series([r["rank"] for r in rows], dtype=object)
    return frame


def passes(table: pd.DataFrame, column: str | None, op: str, threshold: float | None) -> np.ndarray:
    """[n_rows] bool: the heads that pass "`column` `op` `threshold`" (op ">" or "<"); every
    head when there is no condition; a head without a value never passes one."""
    if not column or op not in (">", "<") or threshold is None:
        return np.ones(len(table), dtype=bool)
    values = table[column].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        return values > threshold if op == ">" else values < threshold


def matrix_order(table: pd.DataFrame | None, layers: list[int], n_heads: int, column: str | None,
                 sort: bool) -> np.ndarray:
    """[n_layers, n_heads] int: the head drawn in each matrix cell. Head order, or with `sort`
    each layer's heads by `column`, largest first (heads without a value last)."""
    order = np.tile(np.arange(n_heads), (len(layers), 1))
    if not sort or not column or table is None:
        return order
    for r, layer in enumerate(layers):
        values = np.full(n_heads, -np.inf)
        rows = table[table["layer"] == layer]
        values[rows["head"].to_numpy(dtype=int)] = np.nan_to_num(rows[column].to_numpy(dtype=float), nan=-np.inf)
        order[r] = np.argsort(-values, kind="stable")
    return order


def arrange_mosaic(image: np.ndarray, order: np.ndarray, cell: int) -> np.ndarray:
    """The matrix mosaic ([n_layers * cell, n_heads * cell, 4]) with each row's tiles moved so
    that cell (r, c) shows head `order[r, c]`."""
    n_layers, n_heads = order.shape
    tiles = image.reshape(n_layers, cell, n_heads, cell, image.shape[-1])
    moved = tiles[np.arange(n_layers)[:, None], :, order]  # [n_layers, n_heads, cell, cell, 4]
    return np.ascontiguousarray(moved.transpose(0, 2, 1, 3, 4)).reshape(image.shape)


def value_colours(values: np.ndarray) -> list[str]:
    """A viridis colour per value, scaled over the finite values; grey where there is none."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return [MISSING_COLOUR] * len(values)
    lo, hi = float(finite.min()), float(finite.max())
    index = np.clip(np.nan_to_num((values - lo) / max(hi - lo, 1e-12) * 255), 0, 255).astype(int)
    return [Viridis256[i] if np.isfinite(v) else MISSING_COLOUR for i, v in zip(index, values)]


def matrix_cells(table: pd.DataFrame, layers: list[int], order: np.ndarray, column: str,
                 keep: np.ndarray) -> pd.DataFrame:
    """One row per matrix cell of a measured head, in the matrix's coordinates (cell (r, c) is
    the unit square at x = c, y = n_layers - 1 - r): its head, value, border colour and
    whether it passes the filter (`keep`, aligned with `table`'s rows)."""
    by_head = {(int(layer), int(head)): i for i, (layer, head) in enumerate(zip(table["layer"], table["head"]))}
    rows = []
    for r, layer in enumerate(layers):
        for c, head in enumerate(order[r]):
            i = by_head.get((layer, int(head)))
            if i is None:
                continue
            rows.append({"x0": c, "y0": len(layers) - 1 - r, "layer": layer, "head": int(head),
                         "value": float(table[column].iat[i]), "passes": bool(keep[i])})
    cells = pd.DataFrame(rows, columns=["x0", "y0", "layer", "head", "value", "passes"])
    cells["colour"] = value_colours(cells["value"].to_numpy())
    return cells


def nearest_head(table: pd.DataFrame, x: str, y: str, at_x: float, at_y: float,
                 tolerance: float = 0.04) -> tuple[int, int] | None:
    """The (layer, head) plotted nearest to (at_x, at_y) in the scatter of `y` against `x`,
    if within `tolerance` of the data's extent on both axes; None otherwise."""
    xs, ys = table[x].to_numpy(dtype=float), table[y].to_numpy(dtype=float)
    shown = np.isfinite(xs) & np.isfinite(ys)
    if not shown.any():
        return None
    def span(values):
        return max(float(values[shown].max() - values[shown].min()), 1e-9)

    distance = np.hypot((xs - at_x) / span(xs), (ys - at_y) / span(ys))
    distance[~shown] = np.inf
    best = int(np.argmin(distance))
    if distance[best] > tolerance:
        return None
    return int(table["layer"].iat[best]), int(table["head"].iat[best])


def head_top_sequences(top: pd.DataFrame | None, layer: int, head: int) -> pd.DataFrame:
    """The head's top sequences (rank, seq_id, score), best first."""
    if top is None:
        return pd.DataFrame(columns=["rank", "seq_id", "score"])
    mine = top[(top["layer"] == layer) & (top["head"] == head)].sort_values("rank")
    return mine[["rank", "seq_id", "score"]].reset_index(drop=True)


def telling_query(attention: np.ndarray) -> int:
    """The query position of one sequence that shows the head at work: the one that puts the
    largest weight on a key other than the first (position 0 sinks most heads' attention)."""
    if len(attention) < 2:
        return 0
    return int(np.argmax(attention[:, 1:].max(axis=1)))


def format_value(value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.3g}"


def numbers_html(numbers: pd.DataFrame, n_queries: int | None = None) -> str:
    """The head view's table: "sink_weight 0.82, rank 3 of 72" per measurement."""
    rows = "".join(
        f'<tr title="{html.escape(MEASURES.get(r.measure, r.measure))}"><td>{html.escape(r.measure)}</td>'
        f'<td style="text-align:right;padding:0 8px"><b>{format_value(r.value)}</b></td>'
        f'<td style="color:#555">{"" if r.rank is None else f"rank {r.rank} of {r.of}"}</td></tr>'
        for r in numbers.itertuples())
    over = f" over {n_queries:,} queries" if n_queries else ""
    return (f'<div style="font-size:11px"><b>This head\'s measurements</b>{over} (rank 1 = largest)'
            f'<table class="qk-numbers">{rows}</table></div>')


# --- the views ----------------------------------------------------------------------------


class HeadAtlas(param.Parameterized):
    """The head-atlas parts of one dashboard session: the Heads tab, the matrix's measurement
    controls and overlay, and the head view's numbers and top sequences."""

    x = param.Selector(objects=[None])
    y = param.Selector(objects=[None])
    colour = param.Selector(objects=["layer"])
    table = param.DataFrame(None, doc="one row per measured head (`head_table`)")
    state = param.ClassSelector(class_=DashboardState, constant=True)
    matrix_measure = param.Selector(objects=["none"], doc="colours each head's border; see the Heads tab")
    matrix_filter = param.Selector(objects=FILTERS, doc="veils the heads that fail the condition")
    matrix_threshold = param.Number(0.5)
    matrix_sort = param.Boolean(False)

    def __init__(self, state: DashboardState):
        super().__init__(state=state)
        data = state.data
        self.run_url = data.run.dir.url
        self.measurements, self.top = data.head_measurements, data.head_top_sequences
        self.order = matrix_order(None, list(data.run.layers), data.run.n_heads, None, False)
        if self.measurements is not None and len(self.measurements):
            self._update_table()
            columns = measure_columns(self.table)
            self.param.x.objects, self.param.y.objects = columns, columns
            self.param.colour.objects = ["layer"] + columns
            self.x = next((c for c in ("prev_weight", "entropy_norm") if c in columns), columns[0])
            self.y = next((c for c in ("sink_weight", "confidence") if c in columns), columns[-1])
            self.param.matrix_measure.objects = ["none"] + columns
        state.param.watch(lambda *_: self._update_table(), ["method", "dim"])
        self.param.watch(self._on_matrix_change, ["matrix_measure", "matrix_filter", "matrix_threshold",
                                                  "matrix_sort", "table"])
        missing = "" if self.measured else f'<div style="font-size:11px">{self._missing()}</div>'
        self.numbers_pane = pn.pane.HTML(missing, css_classes=["qk-head-numbers"], width=300)
        self.top_pane = pn.Column(css_classes=["qk-top-sequences"], width=300)
        self.aggregate_pane = pn.pane.HoloViews(None, css_classes=["qk-aggregate"], width=310)
        self.matrix_legend = pn.pane.HTML("", css_classes=["qk-matrix-legend"])

    @property
    def measured(self) -> bool:
        return self.table is not None

    @property
    def current(self) -> tuple[int, int]:
        """The (layer, head) open in the head view."""
        return self.state.layer, self.state.head

    def _missing(self) -> str:
        return (f"No head measurements in this run yet; run <code>qkatlas heads "
                f"{html.escape(self.run_url)}</code>")

    def _update_table(self):
        if self.measurements is not None and len(self.measurements):
            data, method, dim = self.state.data, self.state.method, self.state.dim
            self.table = data.cached("head_tables", (method, dim),
                                     lambda: head_table(self.measurements, data.projections, method, dim))

    # Heads tab ---------------------------------------------------------------------------
    def heads_tab(self):
        if not self.measured:
            return pn.Column(pn.pane.HTML(f'<div class="qk-heads-missing">{self._missing()}</div>'))
        scatter = hv.DynamicMap(self._scatter)
        hv.streams.Tap(source=scatter).add_subscriber(self._on_scatter_tap)
        plot = pn.pane.HoloViews(scatter * hv.DynamicMap(self._current_mark), css_classes=["qk-heads-scatter"])
        controls = pn.Row(pn.widgets.Select.from_param(self.param.x, label="X axis", width=190),
                          pn.widgets.Select.from_param(self.param.y, label="Y axis", width=190),
                          pn.widgets.Select.from_param(self.param.colour, label="Colour", width=190))
        n = len(self.table)
        caption = pn.pane.HTML(f"<b>Every head</b>: {n} heads measured over the whole corpus, one point each; "
                               "hover for its numbers, click to open it.", css_classes=["qk-heads-caption"])
        legend = pn.pane.HTML('<div style="font-size:11px;columns:2;max-width:900px">' + "".join(
            f"<div><b>{html.escape(c)}</b>: {html.escape(MEASURES.get(c, ''))}</div>"
            for c in measure_columns(self.table)) + "</div>", css_classes=["qk-heads-legend"])
        return pn.Column(caption, controls, plot, legend)

    @param.depends("x", "y", "colour", "table")
    def _scatter(self):
        table, columns = self.table, measure_columns(self.table)
        frame = table.assign(x_value=table[self.x], y_value=table[self.y])
        kdims = [hv.Dimension("x_value", label=self.x), hv.Dimension("y_value", label=self.y)]
        tooltips = [("head", "L@layer H@head")] + [(c, f"@{{{c}}}{{{'0' if c in UNRANKED else '0.000'}}}")
                                                   for c in dict.fromkeys([self.x, self.y] + columns)]
        shown = int((np.isfinite(frame["x_value"].astype(float)) & np.isfinite(frame["y_value"].astype(float))).sum())
        title = f"{self.y} against {self.x} · {shown} of {len(frame)} heads" + (
            " (the others have no value)" if shown < len(frame) else "")
        bar = {"ticker": FixedTicker(ticks=sorted(set(table["layer"])))} if self.colour == "layer" else {}
        return hv.Points(frame, kdims, ["layer", "head"] + columns).opts(
            color=hv.dim(self.colour), cmap="viridis", colorbar=True, clabel=self.colour, colorbar_opts=bar, size=11,
            line_color="white", alpha=0.9, tools=["hover", "tap"], hover_tooltips=tooltips,
            nonselection_alpha=0.9, selection_alpha=0.9, width=SCATTER_W, height=SCATTER_H, title=title,
            framewise=True, shared_axes=False, show_grid=True, default_tools=["pan", "wheel_zoom", "reset"])

    @param.depends("x", "y", "state.layer", "state.head", "table")
    def _current_mark(self):
        layer, head = self.current
        mine = self.table[(self.table["layer"] == layer) & (self.table["head"] == head)]
        points = list(zip(mine[self.x].astype(float), mine[self.y].astype(float)))
        return hv.Points(points, ["x_value", "y_value"]).opts(size=20, fill_alpha=0, line_color=SELECTED_COLOUR,
                                                              line_width=3)

    def _on_scatter_tap(self, x=None, y=None, **_):
        if x is None or y is None:
            return
        found = nearest_head(self.table, self.x, self.y, x, y)
        if found is not None:
            self.state.open_head(*found)

    # matrix -------------------------------------------------------------------------------
    def matrix_controls(self):
        if not self.measured:
            return pn.pane.HTML(f'<div style="font-size:11px">{self._missing()} to colour, sort or filter the '
                                "heads by a measurement.</div>")
        return pn.Row(
            pn.widgets.Select.from_param(self.param.matrix_measure, label="Measurement", width=190),
            pn.widgets.Select.from_param(self.param.matrix_filter, label="Show", width=100),
            pn.widgets.FloatInput.from_param(self.param.matrix_threshold, label="Threshold", width=100, step=0.05),
            pn.widgets.Checkbox.from_param(self.param.matrix_sort, label="sort each layer by it",
                                           margin=(28, 10, 0, 10), css_classes=["qk-matrix-sort"]),
            self.matrix_legend, css_classes=["qk-matrix-controls"])

    @property
    def _column(self) -> str | None:
        return None if self.matrix_measure == "none" or not self.measured else self.matrix_measure

    def _on_matrix_change(self, *_):
        run = self.state.data.run
        self.order = matrix_order(self.table, list(run.layers), run.n_heads, self._column, self.matrix_sort)
        self.matrix_legend.object = self._legend()

    def _legend(self) -> str:
        column = self._column
        if column is None:
            return ""
        values = self.table[column].to_numpy(dtype=float)
        keep = passes(self.table, column, self.matrix_filter, self.matrix_threshold)
        lo, hi = np.nanmin(values), np.nanmax(values)
        ramp = ",".join(Viridis256[::32] + (Viridis256[-1],))
        shown = (f" · <b>{int(keep.sum())} of {len(keep)}</b> heads with {html.escape(column)} "
                 f"{html.escape(self.matrix_filter)} {self.matrix_threshold:g}"
                 if self.matrix_filter != "all heads" else "")
        return (f'<div class="qk-matrix-legend-text" style="font-size:11px;margin-top:26px">border: '
                f'{html.escape(column)} {format_value(lo)} <span style="display:inline-block;width:90px;height:10px;'
                f'background:linear-gradient(to right,{ramp})"></span> {format_value(hi)}{shown}</div>')

    def arrange(self, image: np.ndarray, cell: int) -> np.ndarray:
        """The matrix mosaic in the current cell order."""
        return arrange_mosaic(image, self.order, cell) if self.matrix_sort and self._column else image

    def column_ticks(self, n_heads: int) -> list[tuple[float, str]]:
        if self.matrix_sort and self._column is not None:
            return [(c + 0.5, f"#{c + 1}") for c in range(n_heads)]
        return [(h + 0.5, f"H{h}") for h in range(n_heads)]

    def head_at(self, row: int, col: int) -> int:
        return int(self.order[row, col])

    def column_of(self, row: int, head: int) -> int:
        return int(np.flatnonzero(self.order[row] == head)[0])

    def matrix_marks(self):
        """Overlay on the matrix: each cell's border coloured by the measurement, a veil over
        the heads the filter leaves out, and each head's value (with its name when sorted)."""
        column = self._column
        kdims, empty = ["head", "layer", "head1", "layer1"], []
        if column is None:
            return hv.Overlay([hv.Rectangles(empty, kdims), hv.Rectangles(empty, kdims), hv.Labels([])])
        run = self.state.data.run
        keep = passes(self.table, column, self.matrix_filter, self.matrix_threshold)
        cells = matrix_cells(self.table, list(run.layers), self.order, column, keep)
        x0, y0 = cells["x0"].to_numpy(dtype=float), cells["y0"].to_numpy(dtype=float)
        borders = hv.Rectangles((x0 + 0.03, y0 + 0.03, x0 + 0.97, y0 + 0.97, cells["colour"]), kdims,
                                ["colour"]).opts(fill_alpha=0, line_color="colour", line_width=4)
        veiled = cells[~cells["passes"]]
        vx, vy = veiled["x0"].to_numpy(dtype=float), veiled["y0"].to_numpy(dtype=float)
        veil = hv.Rectangles((vx, vy, vx + 1, vy + 1), kdims).opts(fill_color="white", fill_alpha=0.75,
                                                                   line_alpha=0)
        sort = self.matrix_sort
        text = [(f"H{h} " if sort else "") + format_value(v) for h, v in zip(cells["head"], cells["value"])]
        labels = hv.Labels((x0 + 0.08, y0 + 0.9, text), ["head", "layer"], "text").opts(
            text_font_size="8pt", text_align="left", text_baseline="top", text_color="black")
        return hv.Overlay([borders, veil, labels])

    # head view ----------------------------------------------------------------------------
    def head_panel(self):
        """The head view's numbers and top sequences, following the open head from now on."""
        self.state.param.watch(lambda *_: self.show_head(), ["layer", "head"])
        self.show_head()
        return pn.Column(self.numbers_pane, pn.pane.HTML("<b>Top sequences</b> (where this head is most itself)"),
                         self.top_pane, self.aggregate_pane, width=310)

    def show_head(self):
        if not self.measured:
            return
        layer, head = self.current
        numbers = head_numbers(self.table, layer, head)
        mine = self.table[(self.table["layer"] == layer) & (self.table["head"] == head)]
        n_queries = int(mine["n_queries"].iloc[0]) if "n_queries" in mine and len(mine) else None
        self.numbers_pane.object = numbers_html(numbers, n_queries)
        self.aggregate_pane.object = aggregate_element(mine.iloc[0].to_dict() if len(mine) else None, width=300)
        sequences = self.state.data.sequences.set_index("seq_id")
        buttons = []
        for row in head_top_sequences(self.top, layer, head).itertuples():
            seq_id = int(row.seq_id)
            text = str(sequences["text"].get(seq_id, "")) if "text" in sequences else ""
            label = f"#{int(row.rank)} · seq {seq_id} · {row.score:.2f} · {text[:38]}"
            button = pn.widgets.Button(label=label, width=290, color="light", css_classes=["qk-top-sequence"])
            button.on_click(lambda _, target=seq_id: self.open_sequence(target))
            buttons.append(button)
        self.top_pane.objects = buttons or [pn.pane.HTML("<i>none stored for this head</i>")]

    def open_sequence(self, seq_id: int):
        layer, head = self.current
        self.state.open_sequence(seq_id, telling_query(self.state.data.attention(seq_id, layer, head)))

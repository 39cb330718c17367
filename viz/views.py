"""The dashboard: one session's state (`viz.state`), the controls over it, and its views, a module
each (`viz.matrix_view`, `head_view`, `sequence_view`, `selection_view`, `similar_view`, `heads_view`).
A session builds only what its first tab shows; another tab is built, and its Bokeh models made
(`pn.Tabs(dynamic=True)`), the first time it is shown."""

from __future__ import annotations

import functools
import html

import holoviews as hv
import panel as pn

from viz.data import RunData, shared_run_data
from viz.head_view import HeadView
from viz.heads_view import HeadAtlas
from viz.matrix_view import MatrixView
from viz.selection_view import SelectionView
from viz.sequence_view import SequenceView
from viz.similar_view import SimilarView
from viz.state import HEAD_TAB, HEADS_TAB, MATRIX_TAB, DashboardState


def count_html(state: DashboardState) -> str:
    if state.search_error:
        return f'<span class="qk-search-error" style="color:#b00">{html.escape(state.search_error)}</span>'
    if not state.search.strip():
        return ""
    n = len(state.matches)
    return f'<span class="qk-count">{n:,} matches</span> ({2 * n:,} points in every head)'


def missing_html(state: DashboardState) -> str:
    """What to run when the chosen head has no projection of the chosen kind."""
    method, dim, layer, head = state.method, state.dim, state.layer, state.head
    if state.data.has(method, dim, layer, head):
        return ""
    return (f'<span style="color:#b00">no {dim}-D {method} projection of layer {layer} head {head}; run: qkatlas '
            f'reduce {html.escape(state.data.run.dir.url)} --method {method} --dim {dim} --layers {layer} --heads '
            f'{head}</span>')


class Dashboard:
    """One browser session: its state, controls and tabs over a shared RunData. The views' parts
    are reachable by name from here (`dash.raster`, `dash.sequence_info`, `dash.selected_point`)."""

    def __init__(self, data: RunData, args: dict | None = None):
        self.data = data
        self.state = state = DashboardState(data, args)
        self.atlas = HeadAtlas(state)
        select = pn.widgets.Select.from_param
        self.method_w = select(state.param.method, name="Method", width=110)
        self.dim_w = pn.widgets.RadioButtonGroup.from_param(state.param.dim, name="Dimensions", width=110)
        self.layer_w = select(state.param.layer, name="Layer", width=80)
        self.head_w = select(state.param.head, name="Head", width=80)
        self.colour_w = select(state.param.colour, name="Colour", width=170)
        self.search_w = pn.widgets.TextInput.from_param(state.param.search, name="Search token", width=180,
                                                        placeholder="a token, or re:regex")
        self.count_pane = pn.pane.HTML(pn.bind(lambda *_: count_html(state), state.param.matches,
                                               state.param.search_error), css_classes=["qk-search-count"], width=220)
        self.message = pn.pane.HTML(pn.bind(lambda *_: missing_html(state), state.param.method, state.param.dim,
                                            state.param.layer, state.param.head), css_classes=["qk-message"])
        builders = {MATRIX_TAB: lambda: self.matrix.panel(), HEAD_TAB: self._head_tab, HEADS_TAB: self.atlas.heads_tab}
        self.tabs = pn.Tabs(*((name, pn.Column()) for name in ("Matrix", "Head", "Heads")), dynamic=True)
        self.tabs.link(state, active="tab", bidirectional=True)

        def fill(tab: int):
            column = self.tabs[tab]
            if not column.objects:
                column.objects = [builders[tab]()]
        state.param.watch(lambda event: fill(event.new), "tab")
        fill(state.tab)
        self.tabs.active = state.tab

    def _head_tab(self):
        self.sequence, self.selection, self.similar = (View(self.state) for View in (SequenceView, SelectionView,
                                                                                      SimilarView))
        return pn.Row(pn.Column(self.head.panel(), self.selection.panel()), self.sequence.panel(),
                      pn.Column(self.atlas.head_panel(), self.similar.panel()))

    @functools.cached_property
    def matrix(self) -> MatrixView:
        return MatrixView(self.state, self.atlas)

    @functools.cached_property
    def head(self) -> HeadView:
        """Built with the Head tab, or on first use (in tests and notebooks)."""
        return HeadView(self.state)

    def __getattr__(self, name: str):
        """A part of the state or of a view, by its name there (`dash.raster`, `dash.matches`)."""
        if name.startswith("__") or name in ("state", "head", "sequence", "matrix"):
            raise AttributeError(name)
        for part in (getattr(self, view, None) for view in ("state", "head", "sequence", "matrix")):
            if name in dir(part):
                return getattr(part, name)
        raise AttributeError(f"no {name!r} in the dashboard's state or views")

    @property
    def selected_point(self) -> int | None:
        return self.state.selected_point

    @selected_point.setter
    def selected_point(self, point: int | None) -> None:
        self.state.selected_point = point

    def panel(self):
        run, n = self.data.run, self.data.n
        header = pn.pane.HTML(
            f'<div style="font-size:15px"><b>qkatlas</b> — {html.escape(run.model_id)}, {run.n_layers} layers × '
            f'{run.n_heads} heads, {n:,} tokens ({2 * n:,} points per head)</div>', css_classes=["qk-header"])
        controls = pn.Row(self.method_w, self.dim_w, self.layer_w, self.head_w, self.colour_w, self.search_w,
                          self.count_pane)
        return pn.Column(header, controls, self.message, self.tabs, sizing_mode="stretch_width")


_EXTENSIONS = False


def app(run, args: dict | None = None):
    """The dashboard over `run` (a path, URL or opened Run) as a Panel object, for a server or Jupyter."""
    from pipeline.store import open_run

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

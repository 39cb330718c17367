"""The dashboard: one session's state (`viz.state`), the controls over it, and its views, a module
each (`viz.matrix_view`, `head_view`, `sequence_view`, `selection_view`, `similar_view`, `heads_view`).
A session builds only what its first tab shows; another tab is built, and its Bokeh models made
(`pn.Tabs(dynamic=True)`), the first time it is shown."""

from __future__ import annotations

import functools
import html
from urllib.parse import quote, urlencode

import holoviews as hv
import panel as pn
import param
from panel.custom import JSComponent

from viz.data import RunData, shared_run_data
from viz.head_view import HeadView
from viz.heads_view import HeadAtlas
from viz.image_grid_view import ImageGridView
from viz.matrix_view import MatrixView
from viz.selection_view import SelectionView
from viz.sequence_view import SequenceView
from viz.similar_view import SimilarView
from viz.state import HEAD_TAB, HEADS_TAB, IMAGES_TAB, MATRIX_TAB, DashboardState

ZOOM_RETURNS = 1.5  # semantic zoom: a head zoomed out past this many times its extent returns to the matrix
# keyboard shortcut -> css class of the navigation button it clicks (`Dashboard._navigation`)
SHORTCUTS = {"ArrowLeft": "qk-prev-head", "ArrowRight": "qk-next-head", "ArrowUp": "qk-prev-layer",
             "ArrowDown": "qk-next-layer", "r": "qk-reset-zoom", "Escape": "qk-all-heads", "m": "qk-all-heads"}
KEY_LABELS = {"ArrowLeft": "←", "ArrowRight": "→", "ArrowUp": "↑", "ArrowDown": "↓", "Escape": "Esc"}
KEYS_HINT = "keys: ← → head · ↑ ↓ layer · r reset zoom · Esc or m all heads"


class KeyShortcuts(JSComponent):
    """The keys hint; in the browser, one document-level keydown listener that clicks the
    navigation button of the key pressed (`SHORTCUTS`), found by css class through Panel's shadow
    roots, unless the key is typed into an input, a select or a text area."""

    keys = param.Dict(default=SHORTCUTS)
    hint = param.String(default=KEYS_HINT)

    _esm = """
    function find(root, css) {
      const hit = root.querySelector("." + css);
      if (hit) return hit;
      for (const element of root.querySelectorAll("*")) {
        const inner = element.shadowRoot && find(element.shadowRoot, css);
        if (inner) return inner;
      }
      return null;
    }
    function typing(event) {
      const target = event.composedPath()[0];
      return !!target && (target.isContentEditable || ["INPUT", "SELECT", "TEXTAREA"].includes(target.tagName));
    }
    export function render({ model }) {
      if (!window.qkKeys) {
        window.qkKeys = true;
        document.addEventListener("keydown", (event) => {
          const css = model.keys[event.key];
          if (!css || event.repeat || event.ctrlKey || event.metaKey || event.altKey || typing(event)) return;
          const host = find(document, css);
          const button = host && ((host.shadowRoot || host).querySelector("button") || host);
          if (!button) return;
          event.preventDefault();
          button.click();
        });
      }
      const hint = document.createElement("span");
      hint.textContent = model.hint;
      hint.style.cssText = "font-size:12px;opacity:0.7;white-space:nowrap";
      return hint;
    }
    """


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
        self.data, self.args = data, args or {}
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
        self.nav = self._navigation()
        builders = {MATRIX_TAB: lambda: self.matrix.panel(), HEAD_TAB: self._head_tab, HEADS_TAB: self.atlas.heads_tab}
        names = ["Matrix", "Head", "Heads"]
        if data.run.modality == "image":
            builders[IMAGES_TAB] = lambda: self.images.panel()
            names.append("Images")
        self.tabs = pn.Tabs(*((name, pn.Column()) for name in names), dynamic=True, stylesheets=[
            ".bk-header .bk-tab.bk-active { color: var(--panel-on-background-color); }"])  # readable in dark too
        self.tabs.link(state, active="tab", bidirectional=True)

        def fill(tab: int):
            column = self.tabs[tab]
            if not column.objects:
                column.objects = [builders[tab]()]
        state.param.watch(lambda event: fill(event.new), "tab")
        fill(state.tab)
        self.tabs.active = state.tab

    def _navigation(self) -> pn.Row:
        """Adjacent-head arrows, reset zoom and view all heads (the semantic zoom's buttons, each
        also a key: `SHORTCUTS`), and the light / dark theme switch."""
        state = self.state

        def button(label: str, css: str, action, width: int = 64):
            keys = " or ".join(KEY_LABELS.get(key, key) for key, target in SHORTCUTS.items() if target == css)
            widget = pn.widgets.Button(label=label, width=width, css_classes=[css], margin=(22, 2, 0, 2),
                                       description=f"key: {keys}" if keys else None)
            widget.on_click(lambda _: action())
            return widget
        dark = pn.config.theme == "dark"
        return pn.Row(button("◀ head", "qk-prev-head", lambda: state.step_head(-1)),
                      button("head ▶", "qk-next-head", lambda: state.step_head(1)),
                      button("▲ layer", "qk-prev-layer", lambda: state.step_layer(-1)),
                      button("layer ▼", "qk-next-layer", lambda: state.step_layer(1)),
                      button("reset zoom", "qk-reset-zoom", self.reset_zoom, 90),
                      button("view all heads", "qk-all-heads", lambda: setattr(state, "tab", MATRIX_TAB), 110),
                      button("☀ light" if dark else "☾ dark", "qk-theme",
                             lambda: self.reload(page_query(self.args, state, "default" if dark else "dark")), 80),
                      KeyShortcuts(margin=(30, 8, 0, 8), css_classes=["qk-keys"]))

    @staticmethod
    def reload(query: str) -> None:
        """The browser loads this page again with `query` (the theme is chosen as the page loads)."""
        location = pn.state.location
        if location is not None:
            location.search = query
            location.reload = True

    def reset_zoom(self) -> None:
        """The matrix and the open head back to their full extent (whichever are built)."""
        if "matrix" in self.__dict__:
            self.matrix.reset_zoom()
        if "head" in self.__dict__:
            self.head.load()

    def _zoomed_out(self, x_range=None, y_range=None, **_) -> None:
        """Semantic zoom back: the head zoomed out past ZOOM_RETURNS times its full extent shows every head."""
        raster = self.head.raster
        if self.state.tab != HEAD_TAB or raster is None or x_range is None or y_range is None:
            return
        (x0, x1), (y0, y1) = raster.x_full, raster.y_full
        if x_range[1] - x_range[0] > ZOOM_RETURNS * (x1 - x0) and y_range[1] - y_range[0] > ZOOM_RETURNS * (y1 - y0):
            self.state.tab = MATRIX_TAB

    def _head_tab(self):
        self.sequence, self.selection, self.similar = (View(self.state) for View in (SequenceView, SelectionView,
                                                                                      SimilarView))
        return pn.Row(pn.Column(self.head.panel(), self.selection.panel()), self.sequence.panel(),
                      pn.Column(self.atlas.head_panel(), self.similar.panel()))

    @functools.cached_property
    def matrix(self) -> MatrixView:
        return MatrixView(self.state, self.atlas)

    @functools.cached_property
    def images(self) -> ImageGridView:
        return ImageGridView(self.state)

    @functools.cached_property
    def head(self) -> HeadView:
        """Built with the Head tab, or on first use (in tests and notebooks)."""
        view = HeadView(self.state)
        view.range_stream.add_subscriber(self._zoomed_out)
        return view

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
        return pn.Column(header, controls, self.nav, self.message, self.tabs, sizing_mode="stretch_width")


_EXTENSIONS = False


def app(run, args: dict | None = None):
    """The dashboard over `run` (a path, URL or opened Run) as a Panel object, for a server or
    Jupyter; or, for several runs, over `run` = {name: run}, with a run picker: `?run=NAME`
    chooses among the names (any other is refused), the first by default."""
    from pipeline.store import open_run

    global _EXTENSIONS
    if not _EXTENSIONS:
        hv.extension("bokeh", logo=False)
        _EXTENSIONS = True
    pn.extension("tabulator", "plotly")
    if args is None and pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        args = pn.state.session_args
    if not isinstance(run, dict):
        return Dashboard(shared_run_data(open_run(run) if isinstance(run, str) else run), args).panel()
    names = list(run)
    asked = url_text((args or {}).get("run"))
    if asked is not None and asked not in run:
        links = ", ".join(f'<a href="?run={quote(name)}">{html.escape(name)}</a>' for name in names)
        return pn.pane.HTML(f'<div class="qk-run-refused">No run named <b>{html.escape(asked[:100])}</b> here; choose '
                            f'one of: {links}</div>')
    name = asked or names[0]
    picker = pn.widgets.Select(label="Run", options=names, value=name, width=240, css_classes=["qk-run-picker"])
    picker.jscallback(value="const query = new URLSearchParams({run: cb_obj.value}); const theme = new URLSearchParams("
                            "window.location.search).get('theme'); if (theme) query.set('theme', theme); "
                            "window.location.search = '?' + query;")  # the theme stays
    return pn.Column(picker, Dashboard(shared_run_data(run[name]), args).panel(), sizing_mode="stretch_width")


def page_query(args: dict, state: DashboardState, theme: str) -> str:
    """The URL query that reopens this view in `theme` ("dark" or "default"): the page's own
    arguments (`?run=`) with the state's method, dimensions and colour, its layer and head when a
    head is open, and `theme=dark` for the dark theme."""
    query = {name: url_text(value) for name, value in args.items() if name not in ("layer", "head", "theme")}
    query.update(method=state.method, dim=state.dim, colour=state.colour)
    if state.tab == HEAD_TAB:
        query.update(layer=state.layer, head=state.head)
    if theme == "dark":
        query["theme"] = "dark"
    return "?" + urlencode({name: value for name, value in query.items() if value is not None})


def url_text(raw) -> str | None:
    """A URL argument as text (Panel gives a list of bytes), or None."""
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw

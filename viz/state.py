"""One dashboard session's state, declared once: what the user chose over the run's shared data.
The views read, set and watch these parameters (`param.depends`, `pn.bind`); none keeps a copy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import param

from viz.data import RunData, SearchError, colour_modes, search_tokens, url_state

MATRIX_TAB, HEAD_TAB, HEADS_TAB, IMAGES_TAB = 0, 1, 2, 3  # the Images tab: image runs only


class DashboardState(param.Parameterized):
    data = param.ClassSelector(class_=RunData, constant=True, doc="the run's data, shared by every session")
    method = param.Selector(objects=[])
    dim = param.Selector(objects={"2-D": 2, "3-D": 3})
    layer = param.Selector(objects=[])
    head = param.Selector(objects=[])
    colour = param.Selector(objects=[])
    search = param.String("", doc="a token, or re:PATTERN (RE2)")
    matches = param.Array(np.zeros(0, dtype=np.int64), doc="token rows (store order) the search found")
    search_error = param.String("", doc="why the search could not run")
    selected_point = param.Integer(None, allow_None=True, doc="the clicked point (queries first, then keys)")
    selection = param.DataFrame(pd.DataFrame(), doc="the box or lasso selection (`viz.data.selection_frame`)")
    tab = param.Integer(MATRIX_TAB, doc="the tab shown: matrix, head, heads or images")

    def __init__(self, data: RunData, args: dict | None = None):
        run = data.run
        if not data.methods:
            raise ValueError(f"{run.dir.url} has no projections; run: qkatlas reduce {run.dir.url} --method umap,pca")
        super().__init__(data=data)
        modes, layers, heads = colour_modes(run.modality), list(run.layers), list(range(run.n_heads))
        self.param.method.objects, self.param.layer.objects, self.param.head.objects = data.methods, layers, heads
        self.param.colour.objects = modes
        chosen = url_state(args or {}, {"method": data.methods, "dim": [2, 3], "layer": layers, "head": heads,
                                        "colour": modes})
        method = chosen.get("method", data.methods[0])
        dims = data.dims(method)
        first = sorted(data.available[(data.methods[0], data.dims(data.methods[0])[0])])[0]
        opens_head = "layer" in chosen or "head" in chosen
        self.param.update(method=method, dim=chosen["dim"] if chosen.get("dim") in dims else dims[0],
                          layer=chosen.get("layer", first[0]), head=chosen.get("head", first[1]),
                          colour=chosen.get("colour", modes[0]), tab=HEAD_TAB if opens_head else MATRIX_TAB)

    @param.depends("method", watch=True)
    def _keep_dim_available(self):
        dims = self.data.dims(self.method)
        if self.dim not in dims:
            self.dim = dims[0]

    @param.depends("method", "dim", "layer", "head", watch=True)
    def _forget_clicks(self):
        """A new head: the clicked point and the selection were points of the old one."""
        self.clear_selection()

    @param.depends("search", watch=True)
    def _find(self):
        """Linear-time (RE2) and time-limited; on a server it runs on Panel's thread pool, off the
        event loop. A pattern that cannot run leaves no matches and says why."""
        try:
            found, error = search_tokens(self.data.tokens, self.search, self.data.vocabulary), ""
        except SearchError as problem:
            found, error = np.zeros(0, dtype=np.int64), str(problem)
        self.param.update(matches=found, search_error=error)

    def open_head(self, layer: int, head: int) -> None:
        self.param.update(layer=layer, head=head)
        self.tab = HEAD_TAB

    def step_head(self, step: int) -> None:
        """The adjacent head (`step` -1 or 1) of the open layer, staying within the layer."""
        heads = self.param.head.objects
        self.head = heads[min(max(heads.index(self.head) + step, 0), len(heads) - 1)]

    def step_layer(self, step: int) -> None:
        """The same head of the adjacent stored layer (`step` -1 or 1)."""
        layers = self.param.layer.objects
        self.layer = layers[min(max(layers.index(self.layer) + step, 0), len(layers) - 1)]

    def open_sequence(self, seq_id: int, pos: int) -> None:
        """Clicks query `pos` of sequence `seq_id` in the open head."""
        self.selected_point = self.data.token_offset(seq_id) + pos

    def clear_selection(self) -> None:
        """Forgets the clicked point and the box or lasso selection; the search stays."""
        self.param.update(selected_point=None, selection=pd.DataFrame())

    def hits(self) -> np.ndarray | None:
        """The search's points in every head (its tokens' queries and keys), or None."""
        n = self.data.n
        return np.concatenate([self.matches, self.matches + n]) if len(self.matches) else None

"""The Head tab's selection view: the points of the session's box or lasso selection
(`state.selection`, `viz.data.selection_frame`) as a table, exported whole as CSV or Parquet."""

from __future__ import annotations

import io

import pandas as pd
import panel as pn

from viz.data import export_bytes

SHOWN_ROWS = 10_000
TABLE_W = 640


def selection_html(n: int) -> str:
    if not n:
        return "<i>box or lasso select points to list them</i>"
    more = f" (table shows the first {SHOWN_ROWS:,}; exports hold all)" if n > SHOWN_ROWS else ""
    return f'<span class="qk-selected-count">{n:,} points selected</span>{more}'


class SelectionView:
    def __init__(self, state):
        self.state = state
        self.table = pn.widgets.Tabulator(pd.DataFrame(), pagination="remote", page_size=8, width=TABLE_W,
                                          disabled=True, show_index=False, css_classes=["qk-selection"])
        self.info = pn.pane.HTML("", css_classes=["qk-selection-info"])
        self.csv_button = pn.widgets.FileDownload(callback=lambda: self._export("csv"), filename="selection.csv",
                                                  label="CSV", width=90)
        self.parquet_button = pn.widgets.FileDownload(callback=lambda: self._export("parquet"), label="Parquet",
                                                      filename="selection.parquet", width=90)
        state.param.watch(self.show, "selection")
        self.show()

    def _export(self, fmt: str) -> io.BytesIO:
        return io.BytesIO(export_bytes(self.state.selection, fmt))

    def panel(self):
        return pn.Column(self.info, pn.Row(self.csv_button, self.parquet_button), self.table)

    def show(self, *_):
        selection = self.state.selection
        n = len(selection)
        self.table.value = selection.head(SHOWN_ROWS) if n else pd.DataFrame()
        self.info.object = selection_html(n)
        self.csv_button.disabled = self.parquet_button.disabled = n == 0

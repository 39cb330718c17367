"""The Head tab's similar heads: the open head's attention statistics and the heads that attend
most alike on the same sequences (`RunData.similar_heads`), each a button that opens it."""

from __future__ import annotations

import html
import logging

import panel as pn

log = logging.getLogger("qkatlas.viz")


class SimilarView:
    def __init__(self, state):
        self.state = state
        self.pane = pn.Column(css_classes=["qk-similar"], width=260)
        state.param.watch(self.show, ["layer", "head"])
        self.show()

    def panel(self):
        return pn.Column(pn.pane.HTML("<b>Heads most like this one</b> (attention on shared sequences)"), self.pane)

    def show(self, *_):
        data, layer, head = self.state.data, self.state.layer, self.state.head
        try:
            similar = data.similar_heads(layer, head, k=5)
        except Exception as error:  # similarity is a help, never a reason to fail the view
            log.warning("head similarity failed: %s", error)
            self.pane.objects = [pn.pane.HTML(f"<i>unavailable: {html.escape(str(error))}</i>")]
            return
        buttons = []
        for row in similar.itertuples():
            button = pn.widgets.Button(label=f"L{row.layer} H{row.head} · {row.similarity:.2f}", width=240,
                                       color="light")
            button.on_click(lambda _, target=(int(row.layer), int(row.head)): self.state.open_head(*target))
            buttons.append(button)
        stats = data.head_similarity()[2]
        mine = stats[(stats["layer"] == layer) & (stats["head"] == head)].iloc[0]
        summary = pn.pane.HTML(
            f'<div style="font-size:11px">this head: entropy {mine["entropy"]:.2f}, self {mine["self"]:.2f}, '
            f'previous {mine["previous"]:.2f}, next {mine["next"]:.2f}, first token {mine["first"]:.2f}</div>')
        self.pane.objects = [summary] + buttons

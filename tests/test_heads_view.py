"""The head atlas's data shaping for the dashboard (viz.heads_view), without a browser, on a
tiny BERT run whose head tables are measured from its own attention."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest

from pipeline.store import open_run, write_head_tables
from viz import heads_view as hv_

os.environ.setdefault("OMP_NUM_THREADS", "1")


def fixture_tables(run, n_top: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measurements, top sequences) of every head: `pipeline.heads.measure_run`, or where it is
    missing or fails (it is written beside this view), simple means over every sequence's
    attention recomputed by the store."""
    try:
        from pipeline.heads import measure_run

        return measure_run(run)
    except Exception as error:  # noqa: BLE001  (the view's tests need tables, not that module)
        warnings.warn(f"pipeline.heads.measure_run unusable ({error!r}); the tests measure with simple means",
                      stacklevel=2)
    tokens, causal = run.tokens(), run.mask_rule == "causal"
    special, punct, token_id = (tokens[c].to_numpy() for c in ("is_special", "is_punct", "token_id"))
    rows, top = [], []
    for layer in run.layers:
        for head in range(run.n_heads):
            sums, offsets, scores = {}, [], []
            for seq in run.sequences().itertuples():
                a = run.attention(seq.seq_id, layer, head).astype(np.float64)  # [query, key]
                n, span = len(a), slice(seq.token_offset, seq.token_offset + len(a))
                visible = np.arange(1, n + 1) if causal else np.full(n, n)
                entropy = -(a * np.log(np.clip(a, 1e-12, None))).sum(axis=1)
                same = (token_id[span][:, None] == token_id[span][None, :]) & np.tri(n, k=-1, dtype=bool)
                values = {"entropy": entropy, "entropy_norm": np.where(visible > 1, entropy / np.log(
                              np.maximum(visible, 2)), np.nan),
                          "sink_weight": a[:, 0], "sink_argmax_share": a.argmax(axis=1) == 0,
                          "prev_weight": np.r_[np.nan, np.diagonal(a, -1)], "self_weight": np.diagonal(a),
                          "next_weight": np.full(n, np.nan) if causal else np.r_[np.diagonal(a, 1), np.nan],
                          "special_weight": a[:, special[span]].sum(axis=1),
                          "punct_weight": a[:, punct[span]].sum(axis=1),
                          "duplicate_weight": (a * same).sum(axis=1), "confidence": a.max(axis=1)}
                for name, v in values.items():
                    sums.setdefault(name, []).append(np.asarray(v, dtype=np.float64))
                offsets.append(a.argmax(axis=1) - np.arange(n))
                scores.append(float(a[:, 1:].max(axis=1).mean()) if n > 1 else 0.0)
            offset = np.concatenate(offsets)
            mode = int(pd.Series(offset).mode().iloc[0])
            row = {name: float(np.nanmean(np.concatenate(v))) if np.isfinite(np.concatenate(v)).any() else np.nan
                   for name, v in sums.items()}
            rows.append({"layer": layer, "head": head, **row, "positional_offset": mode,
                         "positional_share": float((offset == mode).mean()), "n_queries": len(offset),
                         "induction_score": np.nan, "duplicate_score": np.nan, "previous_token_score": np.nan})
            ids = run.sequences()["seq_id"].to_numpy()
            for rank, i in enumerate(np.argsort(scores)[::-1][:n_top], start=1):
                top.append({"layer": layer, "head": head, "rank": rank, "seq_id": int(ids[i]), "score": scores[i]})
    return pd.DataFrame(rows), pd.DataFrame(top)


@pytest.fixture(scope="session")
def measured_run(tmp_path_factory) -> str:
    """A tiny BERT (3 layers x 6 heads, initialized wide enough that heads differ) over 80 short
    sentences, PCA 2-D and 3-D of every head, and head tables written by the store's own writer."""
    import torch
    from conftest import minilm_tokenizer
    from transformers import BertConfig, BertModel

    from pipeline.config import ExtractConfig, ReduceConfig
    from pipeline.extract import extract
    from pipeline.reduce.project import reduce_run

    root = tmp_path_factory.mktemp("heads-run")
    tokenizer = minilm_tokenizer()
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=3,
                                 num_attention_heads=6, intermediate_size=96, max_position_embeddings=64,
                                 initializer_range=0.25))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = np.random.default_rng(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "queries", "met", "keys", "and", "heads", "attended",
             "to", "tokens", "in", "order", ",", "."]
    (root / "d.txt").write_text("\n".join(" ".join(rng.choice(words, rng.integers(4, 14))) for _ in range(80)))
    out = str(root / "run")
    extract(ExtractConfig(model=str(root / "model"), data=str(root / "d.txt"), out=out, batch_size=16))
    reduce_run(out, ReduceConfig(methods=["pca"], dims=[2, 3]))
    run = open_run(out)
    measurements, top = fixture_tables(run)
    write_head_tables(run.dir, measurements, top, {"source": "tests"})
    return out


def test_table_joins_the_projection_quality_of_the_chosen_method(measured_run):
    run = open_run(measured_run)
    projections = run.projections()
    table = hv_.head_table(run.head_measurements(), projections, "pca", 2)
    assert len(table) == len(run.layers) * run.n_heads
    mine = projections[(projections["method"] == "pca") & (projections["dim"] == 2)
                       & (projections["layer"] == 1) & (projections["head"] == 2)]
    row = table[(table["layer"] == 1) & (table["head"] == 2)].iloc[0]
    assert row["knn_preservation"] == pytest.approx(float(mine["quality.knn_preservation"].iloc[0]))
    assert row["attention_agreement"] == pytest.approx(float(mine["quality.attention_agreement"].iloc[0]))
    assert table["knn_preservation"].nunique() > 1
    three = hv_.head_table(run.head_measurements(), projections, "pca", 3)
    assert not np.allclose(three["knn_preservation"], table["knn_preservation"])
    missing = hv_.head_table(run.head_measurements(), projections, "umap", 2)
    assert missing["knn_preservation"].isna().all()


def test_columns_leave_out_measurements_without_any_value(measured_run):
    run = open_run(measured_run)
    table = hv_.head_table(run.head_measurements(), run.projections(), "pca", 2)
    columns = hv_.measure_columns(table)
    assert "induction_score" not in columns  # NaN everywhere in a bidirectional model
    assert {"sink_weight", "prev_weight", "next_weight", "knn_preservation"} <= set(columns)
    assert "layer" not in columns and "n_queries" not in columns
    assert columns.index("entropy") < columns.index("sink_weight") < columns.index("knn_preservation")


def test_numbers_rank_each_head_among_all():
    table = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "sink_weight": [0.1, 0.9, 0.5, np.nan],
                          "positional_offset": [-1, 0, 0, 1]})
    numbers = hv_.head_numbers(table, 1, 0).set_index("measure")
    assert numbers.loc["sink_weight", "value"] == 0.5
    assert numbers.loc["sink_weight", "rank"] == 2 and numbers.loc["sink_weight", "of"] == 3
    assert numbers.loc["positional_offset", "rank"] is None
    assert hv_.head_numbers(table, 1, 1).set_index("measure").loc["sink_weight", "rank"] is None
    text = hv_.numbers_html(hv_.head_numbers(table, 0, 1), 1000)
    assert "rank 1 of 3" in text and "0.9" in text and "1,000 queries" in text


def test_filter_keeps_only_heads_past_the_threshold():
    table = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "sink_weight": [0.2, 0.7, np.nan]})
    assert hv_.passes(table, "sink_weight", ">", 0.5).tolist() == [False, True, False]
    assert hv_.passes(table, "sink_weight", "<", 0.5).tolist() == [True, False, False]
    assert hv_.passes(table, "sink_weight", "all heads", 0.5).all()
    assert hv_.passes(table, None, ">", 0.5).all()


def test_sorted_matrix_moves_tiles_with_their_heads():
    layers, n_heads, cell = [0, 3], 3, 2
    table = pd.DataFrame({"layer": [0, 0, 0, 3, 3], "head": [0, 1, 2, 0, 2],
                          "sink_weight": [0.1, 0.9, 0.5, 0.3, 0.8]})  # layer 3 head 1 not measured
    order = hv_.matrix_order(table, layers, n_heads, "sink_weight", sort=True)
    assert order.tolist() == [[1, 2, 0], [2, 0, 1]]
    assert (hv_.matrix_order(table, layers, n_heads, "sink_weight", sort=False) == np.arange(3)).all()
    image = np.zeros((len(layers) * cell, n_heads * cell, 4), dtype=np.uint8)
    for r in range(len(layers)):
        for h in range(n_heads):
            image[r * cell:(r + 1) * cell, h * cell:(h + 1) * cell] = (r, h, 7, 255)
    moved = hv_.arrange_mosaic(image, order, cell)
    for r in range(len(layers)):
        for c in range(n_heads):
            tile = moved[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
            assert (tile == (r, order[r, c], 7, 255)).all()
    cells = hv_.matrix_cells(table, layers, order, "sink_weight", hv_.passes(table, "sink_weight", ">", 0.4))
    first = cells[(cells["x0"] == 0) & (cells["y0"] == 1)].iloc[0]  # top row, first column: L0 H1
    assert (first["layer"], first["head"], first["value"], first["passes"]) == (0, 1, 0.9, True)
    assert len(cells) == 5 and cells["passes"].sum() == 3
    assert cells.loc[cells["value"].idxmax(), "colour"] != cells.loc[cells["value"].idxmin(), "colour"]


def test_value_colours_scale_and_mark_missing():
    colours = hv_.value_colours(np.array([0.0, 1.0, np.nan, 0.5]))
    assert colours[0] == hv_.Viridis256[0] and colours[1] == hv_.Viridis256[-1]
    assert colours[2] == hv_.MISSING_COLOUR and colours[3] not in (colours[0], colours[1])


def test_nearest_head_finds_the_clicked_point_and_ignores_empty_space():
    table = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 3], "a": [0.0, 1.0, 0.5], "b": [0.0, 10.0, np.nan]})
    assert hv_.nearest_head(table, "a", "b", 0.98, 9.9) == (0, 1)
    assert hv_.nearest_head(table, "a", "b", 0.5, 5.0) is None  # head (1, 3) has no b: not drawn
    assert hv_.nearest_head(table, "a", "a", 0.51, 0.5) == (1, 3)


def test_top_sequences_and_the_query_that_opens_them(measured_run):
    run = open_run(measured_run)
    top = hv_.head_top_sequences(run.head_top_sequences(), 1, 2)
    assert list(top["rank"]) == sorted(top["rank"]) and len(top) >= 1
    assert set(top["seq_id"]) <= set(run.sequences()["seq_id"])
    assert hv_.head_top_sequences(None, 0, 0).empty
    attention = np.array([[1.0, 0, 0], [0.6, 0.4, 0], [0.1, 0.85, 0.05]])
    assert hv_.telling_query(attention) == 2
    assert hv_.telling_query(np.ones((1, 1))) == 0



def test_dashboard_wiring_without_a_browser(measured_run):
    """Matrix sort and tap, scatter tap, head numbers and top sequences, on the Dashboard object."""
    import holoviews as hv

    from viz.data import RunData
    from viz.views import Dashboard

    hv.extension("bokeh", logo=False)
    run = open_run(measured_run)
    table = run.head_measurements()
    dash = Dashboard(RunData(run))
    atlas = dash.atlas
    assert len(atlas.table) == len(table) and "knn_preservation" in atlas.table

    atlas.matrix_measure, atlas.matrix_sort = "sink_weight", True
    last = run.layers[-1]
    best = table[table["layer"] == last].sort_values("sink_weight", ascending=False)["head"].iloc[0]
    assert atlas.column_ticks(run.n_heads)[0][1] == "#1"
    dash.matrix._on_tap(x=0.5, y=0.5)  # bottom row, first cell: the last layer's strongest sink
    assert (dash.layer_w.value, dash.head_w.value) == (last, best)
    assert len(dash.matrix.selected_cell()) == 1 and dash.matrix.selected_cell().iloc[0, 0] == 0
    atlas.matrix_filter, atlas.matrix_threshold = ">", float(table["sink_weight"].median())
    borders, veil, labels = atlas.matrix_marks()
    assert len(borders.data) == len(table) and len(veil.data) == (table["sink_weight"] <= atlas.matrix_threshold).sum()
    assert f"H{best} " in labels.dimension_values("text")[len(run.layers) * run.n_heads - run.n_heads]

    target = table.iloc[table["confidence"].idxmin()]
    atlas.x = "confidence"
    dash.tabs.active = 2
    atlas._on_scatter_tap(x=float(target["confidence"]), y=float(target["sink_weight"]))
    assert (dash.layer_w.value, dash.head_w.value) == (int(target["layer"]), int(target["head"]))
    assert dash.tabs.active == 1 and atlas.current == (int(target["layer"]), int(target["head"]))
    assert f"rank {len(table)} of {len(table)}" in atlas.numbers_pane.object  # least confident

    button = atlas.top_pane.objects[0]
    seq_id = int(hv_.head_top_sequences(run.head_top_sequences(), *atlas.current)["seq_id"].iloc[0])
    button.clicks += 1
    assert f"in sequence {seq_id}" in dash.sequence_info.object


def test_dashboard_without_measurements_says_what_to_run(measured_run):
    import holoviews as hv

    from viz.data import RunData
    from viz.views import Dashboard

    hv.extension("bokeh", logo=False)
    run = open_run(measured_run)
    run.head_measurements = lambda: None
    run.head_top_sequences = lambda: None
    dash = Dashboard(RunData(run))
    assert f"qkatlas heads {run.dir.url}" in dash.atlas.numbers_pane.object
    assert f"qkatlas heads {run.dir.url}" in dash.atlas.heads_tab()[0].object
    assert len(dash.atlas.matrix_marks()) == 3 and not dash.atlas.matrix_marks().get(0).data.size

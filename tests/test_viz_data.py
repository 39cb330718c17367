"""The dashboard's data shaping, without a browser: colour columns, search, hover picking,
selection and export, similarity ranking, URL state, image/sequence figures, serve errors."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from viz_fixtures import image_run, text_run  # noqa: F401  (fixtures)

from viz.data import (N_BINS, RunData, attention_signature, colour_modes, colouring, export_bytes, head_statistics,
                      pick_point, point_info, points_in_box, points_in_lasso, rank_similar, search_tokens,
                      selection_frame, token_table, top_keys, url_state)


def toy_tokens() -> pd.DataFrame:
    tokens = ["[CLS]", "the", "cat", ",", "##s", "[SEP]", "[CLS]", "Cat", "sat", "[SEP]"]
    seq = [0] * 6 + [1] * 4
    pos = list(range(6)) + list(range(4))
    lens = [6] * 6 + [4] * 4
    frame = pd.DataFrame({"seq_id": seq, "pos": pos, "token_id": range(10), "token": tokens, "seq_len": lens,
                          "pos_norm": [p / (n - 1) for p, n in zip(pos, lens)],
                          "is_special": [t.startswith("[") for t in tokens], "is_punct": [t == "," for t in tokens]})
    return token_table(frame)


def test_query_key_and_position_colours_use_separate_ramps():
    tokens = toy_tokens()
    qk = colouring("query / key", tokens)
    assert qk.codes.tolist() == [0] * 10 + [1] * 10 and qk.colours == ["#5fb96c", "#e3378f"]
    position = colouring("position", tokens)
    assert len(position.labels) == 2 * N_BINS
    queries, keys = position.codes[:10], position.codes[10:]
    assert queries.max() < N_BINS <= keys.min()  # keys on their own ramp
    assert queries[0] == 0 and queries[5] == N_BINS - 1 and keys[5] == 2 * N_BINS - 1  # first and last position
    assert np.array_equal(keys - N_BINS, queries)


def test_category_and_numeric_colours():
    tokens = toy_tokens()
    punct = colouring("punctuation / special", tokens)
    assert [punct.labels[c] for c in punct.codes[:6]] == ["special", "word", "word", "punctuation", "word", "special"]
    length = colouring("token length", tokens)
    assert tokens["token_len"].tolist()[:5] == [5, 3, 3, 1, 1]  # "##s" counts as "s"
    assert length.codes[0] == N_BINS - 1 and length.codes[3] == 1 < length.codes[1]  # ramp from 0 characters
    seq = colouring("sequence length", tokens)
    assert seq.codes[0] > seq.codes[7]
    norms = np.concatenate([np.linspace(1, 2, 10), np.linspace(5, 6, 10)])
    norm = colouring("norm", tokens, norms)
    assert norm.codes[:10].max() <= norm.codes[10:].min()
    with pytest.raises(ValueError, match="norms"):
        colouring("norm", tokens)
    with pytest.raises(ValueError, match="unknown colour mode"):
        colouring("rainbow", tokens)
    assert "patch row" in colour_modes("image") and "patch row" not in colour_modes("text")


def test_image_colours():
    tokens = token_table(pd.DataFrame({
        "seq_id": [0] * 5, "pos": range(5), "token_id": range(5), "token": ["[CLS]"] + ["patch"] * 4,
        "seq_len": 5, "pos_norm": np.linspace(0, 1, 5), "is_special": [True] + [False] * 4, "is_punct": False,
        "patch_row": [-1, 0, 0, 1, 1], "patch_col": [-1, 0, 1, 0, 1], "mean_r": [0, 255, 0, 0, 10],
        "mean_g": [0, 0, 255, 0, 10], "mean_b": [0, 0, 0, 255, 10]}))
    rows = colouring("patch row", tokens)
    assert rows.codes[1] == rows.codes[2] < rows.codes[3] == rows.codes[4]
    cols = colouring("patch column", tokens)
    assert cols.codes[1] < cols.codes[2]
    colour = colouring("patch colour", tokens)
    assert colour.colours[colour.codes[1]] == "#ff0000" and colour.colours[colour.codes[3]] == "#0000ff"


def test_search_counts_every_occurrence():
    tokens = toy_tokens()
    assert search_tokens(tokens, "cat").tolist() == [2, 7]  # case-insensitive
    assert search_tokens(tokens, "s").tolist() == [4]  # sub-word marker ignored
    assert search_tokens(tokens, "re:c.t|sat").tolist() == [2, 7, 8]
    assert len(search_tokens(tokens, "  ")) == 0 and len(search_tokens(tokens, "dog")) == 0


def test_hover_info_and_picking():
    tokens = toy_tokens()
    info = point_info(tokens, None, 12)  # point 12 = key of token 2
    assert info["kind"] == "key" and info["token"] == "cat" and info["position"] == "position 2 of 6"
    assert "[cat]" in info["snippet"] and info["seq_id"] == 0
    raster = np.full((10, 10), -1)
    raster[2, 3], raster[8, 8] = 5, 9
    assert pick_point(raster, 3, 2) == 5 and pick_point(raster, 4, 3) == 5 and pick_point(raster, 7, 7) == 9
    assert pick_point(raster, 0, 9, radius=1) is None and pick_point(raster, 50, 50) is None


def test_box_and_lasso_selection_and_export():
    tokens = toy_tokens()
    coords = np.array([[i, i % 5] for i in range(20)], dtype=np.float32)
    box = points_in_box(coords[:, 0], coords[:, 1], (9.5, -1, 2.5, 2.5))  # corners in any order
    assert box.tolist() == [5, 6, 7]
    triangle = np.array([[-0.5, -0.5], [10.2, -0.5], [-0.5, 10.2]])  # x + y < 9.7
    assert points_in_lasso(coords[:, 0], coords[:, 1], triangle).tolist() == list(range(8))
    assert len(points_in_lasso(coords[:, 0], coords[:, 1], triangle[:2])) == 0
    frame = selection_frame(tokens, coords, np.array([2, 12]), layer=1, head=3, method="umap")
    assert frame["kind"].tolist() == ["query", "key"] and frame["token"].tolist() == ["cat", "cat"]
    assert frame[["layer", "head", "method"]].iloc[0].tolist() == [1, 3, "umap"]
    assert pd.read_csv(io.BytesIO(export_bytes(frame, "csv")))["token"].tolist() == ["cat", "cat"]
    back = pd.read_parquet(io.BytesIO(export_bytes(frame, "parquet")))
    pd.testing.assert_frame_equal(back, frame)
    with pytest.raises(ValueError):
        export_bytes(frame, "xlsx")


def test_similarity_ranking_and_statistics():
    rng = np.random.default_rng(0)
    base = [np.eye(6), rng.dirichlet(np.ones(6), 6)]
    previous = [np.eye(6, k=-1) + np.eye(6, k=0) * 1e-3 for _ in range(2)]
    heads = [base, [m * 0.98 + 0.02 / 6 for m in base], previous]
    signatures = np.stack([attention_signature(maps) for maps in heads])
    ranked = rank_similar(signatures, 0, k=2)
    assert ranked[0][0] == 1 and ranked[0][1] > 0.95 and ranked[1][0] == 2
    assert all(index != 0 for index, _ in ranked)
    stats = head_statistics(previous)
    assert stats["previous"] > 0.8 and stats["self"] < 0.01
    assert top_keys(np.array([[0.1, 0.7, 0.2]]), 0, 2) == [(1, 0.7), (2, 0.2)]


def test_url_state_only_chooses_among_the_runs_own_values():
    choices = {"layer": [0, 1], "head": [0, 1, 2], "method": ["pca"], "colour": ["query / key", "norm"]}
    state = url_state({"layer": [b"1"], "head": [b"7"], "method": [b"../../etc/passwd"], "colour": "norm",
                       "file": [b"/etc/passwd"]}, choices)
    assert state == {"layer": 1, "colour": "norm"}


def test_run_data_on_a_real_run(text_run):  # noqa: F811
    from pipeline.store import open_run
    from viz.matrix_view import mosaic
    from viz.sequence_view import sequence_element

    data = RunData(open_run(text_run))
    assert data.methods == ["pca"] and data.dims("pca") == [2, 3]
    heads, signatures, stats = data.head_similarity()
    assert len(heads) == 8 and len(signatures) == 8 and set(stats.columns) >= {"entropy", "previous", "first"}
    similar = data.similar_heads(1, 2, k=3)
    assert len(similar) == 3 and not ((similar["layer"] == 1) & (similar["head"] == 2)).any()
    assert similar["similarity"].is_monotonic_decreasing
    norm = data.colouring("norm", 0, 1)
    assert len(norm.codes) == 2 * data.n
    image = mosaic(data, "pca", 2, "query / key", size=32)
    assert image.shape == (2 * 36, 4 * 36, 4)
    seq_id = int(data.sequences["seq_id"].iloc[0])
    tokens = data.sequence_tokens(seq_id)["token"].tolist()
    element = sequence_element(tokens, data.attention(seq_id, 0, 0), 1)
    assert element is not None and tokens[0] == "[CLS]"


def test_image_run_reads_its_own_images_only(image_run, tmp_path):  # noqa: F811
    from pipeline.store import open_run
    from viz.sequence_view import image_heatmap

    data = RunData(open_run(image_run))
    seq_id = int(data.sequences["seq_id"].iloc[0])
    image = data.image(seq_id)
    png = image_heatmap(image, np.linspace(0, 1, 17), grid=4, prefix=1, selected_patch=5, size=64)
    from PIL import Image

    assert Image.open(io.BytesIO(png)).size == (64, 64)
    data.sequences.loc[data.sequences["seq_id"] == seq_id + 1, "path"] = "../../../etc/passwd"
    data._images.clear()
    with pytest.raises(PermissionError, match="outside"):
        data.image(seq_id + 1)


def test_serve_refuses_a_run_without_projections(tiny_models, text_file, tmp_path):
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract
    from viz.server import ServeError, check_run, is_loopback

    out = str(tmp_path / "run")
    extract(ExtractConfig(model=tiny_models["bert"], data=text_file, out=out))
    with pytest.raises(ServeError, match="qkatlas reduce"):
        check_run(out)
    with pytest.raises(ServeError, match="not a qkatlas run"):
        check_run(str(tmp_path))
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_datashader_categories_do_not_depend_on_a_heads_labels(text_run):  # noqa: F811
    """The norm mode's legend differs by head, its datashader categories do not (datashader
    compiles once per category list); the warm-up draws every pipeline the views run."""
    from viz.data import shared_run_data
    from viz.emphasis import warm_renderers
    from viz.raster import point_frame

    tokens = pd.DataFrame({"token": ["a", "b", "c"], "pos_norm": [0.0, 0.5, 1.0]})
    small, large = colouring("norm", tokens, np.arange(6.0)), colouring("norm", tokens, 100 + 10 * np.arange(6.0))
    assert small.labels != large.labels and small.categories == large.categories
    coords = np.zeros((6, 2), np.float32)
    assert list(point_frame(coords, small)["c"].cat.categories) == list(point_frame(coords, large)["c"].cat.categories)
    assert set(small.colour_key) == set(small.categories)
    from pipeline.store import open_run

    assert warm_renderers(shared_run_data(open_run(text_run))) >= 3 * 4

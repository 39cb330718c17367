"""AttentionViz parity in the dashboard, without a browser (issue 12, items 2, 3, 4, 10): colour
modes position mod 5 and token frequency, dot size by norm, token labels with overlap culling,
attention lines of a clicked sentence, search emphasis in head and matrix, clear selection and
the loading indicator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from viz_fixtures import text_run  # noqa: F401  (fixture)

from viz.attention_lines import line_segments, point_lines, sentence_lines, sentence_points
from viz.data import (MODE_DESCRIPTIONS, N_BINS, SEARCH_COLOUR, colour_modes, colouring, norm_tiers, token_counts,
                      token_table)
from viz.emphasis import StyledRaster, dilate, disc, emphasise_tile, tile_pixels
from viz.raster import shade_thumbnail, to_rgba
from viz.tokens_layer import label_boxes, token_labels


def tokens_of(words: list[str], lengths: list[int]) -> pd.DataFrame:
    seq = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths])
    seq_len = np.repeat(lengths, lengths)
    ids = pd.factorize(pd.Series(words))[0]
    return token_table(pd.DataFrame({
        "seq_id": seq, "pos": pos, "token_id": ids, "token": words, "seq_len": seq_len,
        "pos_norm": pos / np.maximum(seq_len - 1, 1), "is_special": False, "is_punct": False}))


def test_position_mod_5_colours_queries_and_keys_by_position():
    tokens = tokens_of([f"w{i}" for i in range(13)], [8, 5])
    mod5 = colouring("position mod 5", tokens)
    expected = tokens["pos"].to_numpy() % 5
    assert mod5.codes.tolist() == np.concatenate([expected, expected]).tolist()
    assert len(set(mod5.colours)) == 5 and len(mod5.labels) == 5


def test_token_frequency_is_counted_over_the_whole_corpus_and_log_binned():
    words = ["the"] * 64 + ["cat"] * 8 + ["sat"] * 2 + ["mat"]
    tokens = tokens_of(words, [25, 25, 25])
    counts = token_counts(tokens)
    assert counts[0] == 64 and counts[64] == 8 and counts[72] == 2 and counts[-1] == 1
    frequency = colouring("token frequency", tokens)
    n = len(tokens)
    codes = frequency.codes[:n]
    assert np.array_equal(frequency.codes[n:], codes)  # keys as their queries
    assert codes[-1] == 0 and codes[0] == N_BINS - 1  # once: first bin, most frequent: last
    assert codes[72] < codes[64] < codes[0]  # more frequent, higher bin
    # log bins: 8 = 64 ** 0.5 sits in the middle of the ramp, not an eighth of the way up
    assert codes[64] == N_BINS // 2
    assert len(set(frequency.labels)) == len(frequency.labels) == N_BINS
    unique = colouring("token frequency", tokens_of([f"w{i}" for i in range(6)], [6]))
    assert set(unique.codes) == {0} and len(set(unique.labels)) == N_BINS


def test_every_colour_mode_has_a_description():
    for modality in ("text", "image"):
        for mode in colour_modes(modality):
            assert MODE_DESCRIPTIONS.get(mode), mode
    assert {"position mod 5", "token frequency"} <= set(colour_modes("text"))


def test_norm_tiers_rank_queries_and_keys_separately():
    rng = np.random.default_rng(0)
    queries, keys = rng.uniform(1, 2, 300), rng.uniform(10, 20, 300)  # keys far longer than queries
    tiers = norm_tiers(np.concatenate([queries, keys]))
    for half, norms in ((tiers[:300], queries), (tiers[300:], keys)):
        assert np.bincount(half, minlength=3).min() >= 90  # every size in both
        order = np.argsort(norms)
        assert np.all(np.diff(half[order].astype(int)) >= 0)  # longer vector, never a smaller dot


def sparse_points(n: int = 40):
    rng = np.random.default_rng(3)
    coords = rng.uniform(0, 1, (2 * n, 2)).astype(np.float32)
    tokens = tokens_of([f"w{i}" for i in range(n)], [n])
    return coords, colouring("query / key", tokens)


def drawn(image) -> np.ndarray:
    return to_rgba(image)[..., 3] > 0


def test_size_by_norm_draws_larger_dots_for_longer_vectors():
    coords, qk = sparse_points()
    plain = StyledRaster(coords, qk).shade(width=300, height=300)
    small = StyledRaster(coords, qk, tiers=np.zeros(len(coords), dtype=np.uint8)).shade(width=300, height=300)
    large = StyledRaster(coords, qk, tiers=np.full(len(coords), 2, dtype=np.uint8)).shade(width=300, height=300)
    assert drawn(small).sum() < drawn(large).sum()
    assert drawn(large).sum() >= 10 * len(coords)  # a radius-2 disc per point
    assert drawn(plain).sum() >= len(coords) // 2
    # the colours are the mode's: queries green and keys pink, whatever the size
    rgba = to_rgba(large)
    colours = {tuple(c) for c in rgba[rgba[..., 3] > 200][:, :3]}
    assert (95, 185, 108) in colours and (227, 55, 143) in colours


def test_dilate_draws_each_point_as_a_disc_per_category():
    import datashader as ds

    frame = pd.DataFrame({"x": [2.5, 7.5], "y": [2.5, 7.5], "c": pd.Categorical(["a", "b"])})
    agg = ds.Canvas(10, 10, x_range=(0, 10), y_range=(0, 10)).points(frame, "x", "y", ds.count_cat("c"))
    grown = dilate(agg, 2)
    a, b = np.asarray(grown.data)[..., 0], np.asarray(grown.data)[..., 1]
    assert a.sum() == b.sum() == disc(2).sum() and 9 <= disc(2).sum() <= 25
    assert a[2, 2] == 1 and a[7, 7] == 0 and b[7, 7] == 1  # each category grows on its own
    assert np.array_equal(a, a.T) and grown.dims == agg.dims


def test_search_hits_are_enlarged_and_the_rest_faded():
    coords, qk = sparse_points()
    hits = np.array([0, 40])  # token 0 as query and as key
    plain = to_rgba(StyledRaster(coords, qk).shade(width=300, height=300))
    emphasised = to_rgba(StyledRaster(coords, qk, hits=hits).shade(width=300, height=300))
    faded = to_rgba(StyledRaster(coords, qk, fade=True).shade(width=300, height=300))
    assert plain[..., 3].max() == 255 and faded[..., 3].max() < 128  # the rest faded
    opaque = emphasised[..., 3] == 255
    assert 2 * 40 <= opaque.sum() <= 2 * 90  # two hits, each a filled disc with an outline
    rows, cols = np.nonzero(opaque)
    for point in hits:  # each hit's disc is centred on it
        col = int(coords[point, 0] / 1.0 * 300)
        assert (np.abs(cols - col) <= 5).any()
    assert (emphasised[opaque][:, :3] == (32, 32, 32)).all(axis=1).any()  # the outline


def test_matrix_tiles_mark_hits_where_the_thumbnail_draws_them():
    coords, qk = sparse_points(60)
    tile = shade_thumbnail(coords, qk, 48)
    hits = np.array([5, 70])
    pixels = tile_pixels(coords, hits, 48)
    background = (tile[..., :3] == 255).all(axis=-1)
    assert not background[pixels[:, 0], pixels[:, 1]].any()  # the thumbnail drew a point at each
    marked = emphasise_tile(tile, pixels)
    orange = tuple(int(SEARCH_COLOUR[i:i + 2], 16) for i in (1, 3, 5))
    assert (marked[pixels[:, 0], pixels[:, 1], :3] == orange).all()
    rest = ~background & ~(marked[..., :3] == orange).all(axis=-1)
    assert (marked[rest][:, :3].astype(int).sum(axis=1) > tile[rest][:, :3].astype(int).sum(axis=1)).all()


def test_token_labels_appear_when_few_points_are_in_view_and_never_overlap():
    rng = np.random.default_rng(5)
    n = 2000
    coords = rng.uniform(0, 100, (2 * n, 2))
    tokens = tokens_of([f"tok{i % 97}" for i in range(n)], [50] * 40)
    full = token_labels(coords, tokens, (0, 100), (0, 100), 600, 500)
    assert full.empty  # 4,000 points in view: no token labels
    x_range, y_range = (40, 48), (40, 48)  # about 25 points
    zoomed = token_labels(coords, tokens, x_range, y_range, 600, 500)
    in_view = ((coords[:, 0] >= 40) & (coords[:, 0] <= 48) & (coords[:, 1] >= 40) & (coords[:, 1] <= 48)).sum()
    assert 0 < len(zoomed) <= in_view and set(zoomed["role"]) == {"token"}
    assert set(zoomed["text"]) <= set(tokens["token"])
    crowded = token_labels(coords, tokens, (0, 30), (0, 30), 600, 500, max_points=1000)  # ~360 points
    boxes = label_boxes(crowded["x"], crowded["y"] - 4 * 30 / 500, crowded["text"].tolist(), (0, 30), (0, 30), 600,
                        500)
    for i in range(len(boxes)):
        others = np.delete(boxes, i, axis=0)
        left, bottom, right, top = boxes[i]
        assert not ((others[:, 0] < right) & (others[:, 2] > left) & (others[:, 1] < top)
                    & (others[:, 3] > bottom)).any()
    assert len(crowded) < 360  # culled
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 600).all() and (boxes[:, 3] <= 500).all()  # inside the plot
    hidden = token_labels(coords, tokens, x_range, y_range, 600, 500, show_tokens=False)
    assert hidden.empty


def test_sentence_labels_show_pos_and_token_at_any_zoom():
    rng = np.random.default_rng(6)
    n = 2000
    coords = rng.uniform(0, 100, (2 * n, 2))
    tokens = tokens_of([f"t{i}" for i in range(n)], [50] * 40)
    sentence = sentence_points(100, 50, n)  # the third sentence
    labels = token_labels(coords, tokens, (0, 100), (0, 100), 1200, 1000, sentence=sentence)
    assert len(labels) > 20 and set(labels["role"]) == {"sentence"}  # whole view: only the sentence
    assert all(text == f"{int(text.split(':')[1][1:]) - 100}:{text.split(':')[1]}" for text in labels["text"])
    assert set(labels["kind"]) == {"query", "key"}


def brute_force_lines(attention, top=2, min_weight=0.05):
    rows = []
    for q, weights in enumerate(attention):
        for k in sorted(range(len(weights)), key=lambda j: -weights[j])[:top]:
            if weights[k] >= min_weight:
                rows.append((q, k, weights[k]))
    return rows


def test_sentence_lines_are_each_querys_top_two_keys_above_five_percent():
    rng = np.random.default_rng(2)
    attention = rng.dirichlet(np.full(9, 0.3), 9)
    attention[4] = np.full(9, 1 / 9)  # a flat query: ties, all above 0.05
    attention[5] = np.r_[0.96, np.full(8, 0.005)]  # one line only
    lines = sentence_lines(attention)
    assert list(zip(lines["query_pos"], lines["key_pos"], lines["weight"])) == brute_force_lines(attention)
    assert (lines["weight"] >= 0.05).all() and lines.groupby("query_pos").size().max() == 2
    assert (lines["query_pos"] == 5).sum() == 1
    causal = np.tril(rng.dirichlet(np.ones(6), 6))
    causal /= causal.sum(axis=1, keepdims=True)
    assert (sentence_lines(causal)["key_pos"] <= sentence_lines(causal)["query_pos"]).all()
    assert sentence_lines(np.zeros((0, 0))).empty


def test_a_clicked_key_gets_lines_from_the_queries_that_attend_to_it():
    attention = np.array([[1.0, 0, 0], [0.3, 0.7, 0], [0.2, 0.5, 0.3]])
    assert point_lines(attention, 2, "query", 2).values.tolist() == [[2, 1, 0.5], [2, 2, 0.3]]
    key = point_lines(attention, 1, "key", 5)
    assert key["query_pos"].tolist() == [1, 2] and (key["key_pos"] == 1).all()  # query 0 gives it nothing
    coords = np.arange(20, dtype=float).reshape(10, 2)  # 5 tokens, one sentence at offset 2
    segments = line_segments(key, coords, offset=2, n_tokens=5)
    assert segments[["x0", "y0", "x1", "y1"]].values[0].tolist() == [6, 7, 16, 17]  # query 3 -> key 3 (point 8)


@pytest.fixture(scope="module")
def dashboard(text_run):  # noqa: F811
    import holoviews as hv

    from pipeline.store import open_run
    from viz.data import RunData
    from viz.views import Dashboard

    hv.extension("bokeh", logo=False)
    return Dashboard(RunData(open_run(text_run)), {"layer": "1", "head": "0"})


def overlay_parts(overlay):
    return list(overlay)


def test_dashboard_lines_labels_and_clear_selection(dashboard):
    d = dashboard
    n = d.data.n
    d.clear_selection()
    segments = overlay_parts(d._marks())[0]
    assert len(segments) == 0
    seq_id = int(d.data.sequences["seq_id"].iloc[3])
    offset = d.data.token_offset(seq_id)
    d.selected_point = n + offset + 2  # a key: lines all the same
    attention = d.data.attention(seq_id, 1, 0)
    faint, strong, points, _ = overlay_parts(d._marks())
    assert len(faint) == len(sentence_lines(attention)) > 0
    assert len(strong) == len(point_lines(attention, 2, "key"))
    assert len(points) == 2 * len(attention) + 1  # the sentence's queries and keys, and the clicked point
    labels = d._token_labels()
    texts = set(labels.dimension_values("text"))
    assert f"2:{d.data.tokens['token'].iat[offset + 2]}" in texts
    d.lines_w.value = False
    assert len(overlay_parts(d._marks())[0]) == 0 and len(overlay_parts(d._marks())[1]) > 0
    d.lines_w.value = True
    d.clear_selection()
    assert d.selected_point is None and not d.sequence_pane.visible
    assert len(overlay_parts(d._marks())[0]) == 0 and not d.raster.fade


def test_dashboard_modes_size_search_and_loading(dashboard):
    d = dashboard
    seen = []
    watcher = d.head_plot.param.watch(lambda event: seen.append(event.new), "loading")
    d.colour_w.value = "token frequency"
    assert seen == [True, False]  # the loading indicator, on while the head loads
    d.head_plot.param.unwatch(watcher)
    assert MODE_DESCRIPTIONS["token frequency"] in d.legend.object
    d.size_w.value = True
    assert d.raster.tier_frames is not None and "dot size" in d.legend.object
    d.size_w.value = False
    d.colour_w.value = "query / key"
    matrix_rgb = lambda: d.matrix.image.data["image"][0].view(np.uint8).reshape(  # noqa: E731
        *d.matrix.image.data["image"][0].shape, 4)[..., :3]
    matrix_before = matrix_rgb().copy()
    d.search_w.value = "cat"
    assert len(d.matches) > 0 and d.raster.hits is not None and "search hits" in d.legend.object
    orange = np.array([int(SEARCH_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    rgb = matrix_rgb()
    assert (np.abs(rgb.astype(int) - orange).sum(axis=-1) < 10).sum() >= len(d.data.run.layers) * d.data.run.n_heads
    assert f"{len(d.matches)} hits" in d.matrix.figure.title.text and "marked orange" in d.matrix.caption.object
    assert not np.array_equal(matrix_before, rgb)
    d.search_w.value = ""
    assert d.raster.hits is None

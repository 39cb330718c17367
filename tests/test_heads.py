"""Head measurements (`pipeline.heads`): equal to the same measures computed straight from the
model's own eager attentions, to TransformerLens's head detector, and to attention known by
construction (Q/K written by hand through the store's writer)."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import heads
from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.store import (
    AttentionRules,
    Manifest,
    ModelInfo,
    PartWriter,
    RunDir,
    VectorSpec,
    commit_part,
    create_run,
    mark_extraction_complete,
    open_run,
)

TOLERANCE = 1e-4
BIG = 40.0  # a query whose product with its target key is BIG gives it weight 1 - ~1e-16


# --- a straight reference: per-query loops over one head's [len, len] attention per sequence --------


def visible_keys(length: int, mask_rule: str, window: int | None) -> np.ndarray:
    query, key = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = key <= query if mask_rule == "causal" else np.ones((length, length), dtype=bool)
    if window is not None:
        allowed = allowed & (query - key < window) & ((key - query < window) if mask_rule == "bidirectional" else True)
    return allowed


def reference_measures(tokens, attention_of, mask_rule: str, window: int | None, top_k: int = 5,
                       min_top_length: int = 8) -> tuple[dict, list[tuple[int, float]]]:
    """`attention_of(seq_id)` -> [len, len] weights of one head. Returns (row, [(seq_id, score)])."""
    max_length = int(tokens.groupby("seq_id").size().max())
    image = "patch_row" in tokens and tokens["patch_row"].notna().any()
    grid = int(tokens["patch_row"].max()) + 1 if image else 0
    by_patch = {(dr, dc): [] for dr in range(1 - grid, grid) for dc in range(1 - grid, grid)}
    values = {name: [] for name in ("entropy", "entropy_norm", "sink_weight", "sink_argmax_share", "prev_weight",
                                    "self_weight", "next_weight", "special_weight", "punct_weight",
                                    "duplicate_weight", "confidence")}
    offsets, scores, by_offset = [], {}, {d: [] for d in range(1 - max_length, max_length)}
    for seq_id, rows in tokens.groupby("seq_id", sort=False):
        weights = np.asarray(attention_of(seq_id), dtype=np.float64)
        length = len(rows)
        ids, special, punct = (rows[column].to_numpy() for column in ("token_id", "is_special", "is_punct"))
        patch = rows[["patch_row", "patch_col"]].to_numpy() if image else None
        visible = visible_keys(length, mask_rule, window)
        best_other = []
        for i in range(length):
            n_visible = visible[i].sum()
            if n_visible < 2:
                continue
            w = weights[i]
            positive = w[w > 0]
            entropy = float(-(positive * np.log(positive)).sum())
            values["entropy"].append(entropy)
            values["entropy_norm"].append(entropy / math.log(n_visible))
            values["sink_weight"].append(w[0])
            values["sink_argmax_share"].append(float(np.argmax(w) == 0))
            values["self_weight"].append(w[i])
            if i >= 1 and visible[i, i - 1]:
                values["prev_weight"].append(w[i - 1])
            if i + 1 < length and visible[i, i + 1]:
                values["next_weight"].append(w[i + 1])
            values["special_weight"].append(w[special].sum())
            values["punct_weight"].append(w[punct].sum())
            earlier = [j for j in range(i) if visible[i, j] and ids[j] == ids[i]]
            if earlier:
                values["duplicate_weight"].append(w[earlier].sum())
            values["confidence"].append(w.max())
            offsets.append(int(np.argmax(w)) - i)
            for j in np.flatnonzero(visible[i]):
                by_offset[j - i].append(w[j])
                if image and min(patch[i].min(), patch[j].min()) >= 0:  # [CLS] has patch row and column -1
                    by_patch[tuple(int(v) for v in patch[j] - patch[i])].append(w[j])
            best_other.append(w[1:].max())
        if best_other:
            scores[int(seq_id)] = (float(np.mean(best_other)), length)
    row = {name: float(np.mean(v)) if v else math.nan for name, v in values.items()}
    if mask_rule == "causal":
        row["next_weight"] = math.nan
    found, counts = np.unique(offsets, return_counts=True)
    row["positional_offset"] = int(found[np.argmax(counts)])  # np.unique sorts: ties go to the most negative
    row["positional_share"] = counts.max() / len(offsets)
    row["n_queries"] = len(offsets)
    row["offset_weights"] = [float(np.mean(by_offset[d])) if by_offset[d] else math.nan for d in sorted(by_offset)]
    row["patch_offset_weights"] = [float(np.mean(v)) if v else math.nan for _, v in sorted(by_patch.items())] \
        if image else None
    eligible = {seq: score for seq, (score, length) in scores.items() if length >= min_top_length} or \
        {seq: score for seq, (score, _) in scores.items()}
    top = sorted(eligible.items(), key=lambda item: (-item[1], item[0]))[:top_k]
    return row, top


def assert_same(got: dict, expected: dict, where: str) -> None:
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, f"{where} {name}"
        elif isinstance(value, list):
            np.testing.assert_allclose(got[name], value, atol=TOLERANCE, err_msg=f"{where} {name}")
        elif isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[name]), f"{where} {name}: {got[name]} where NaN was expected"
        else:
            assert got[name] == pytest.approx(value, abs=TOLERANCE), f"{where} {name}"


def assert_run_matches(run, attention_of, expected_rule: str) -> None:
    """Every head of `run` measured by `pipeline.heads` equals the reference over `attention_of`."""
    assert run.mask_rule == expected_rule
    measurements, top = heads.measure_run(run, top_k=3)
    assert len(measurements) == len(run.layers) * run.n_heads
    assert list(measurements.columns[:16]) == ["layer", "head", *heads.MEASURES]
    tokens = run.tokens()
    for row in measurements.to_dict("records"):
        layer, head = row["layer"], row["head"]
        expected, expected_top = reference_measures(
            tokens, partial(attention_of, layer=layer, head=head), run.mask_rule, run.sliding_window(layer), top_k=3)
        assert_same(row, expected, f"layer {layer} head {head}")
        rows = top[(top["layer"] == layer) & (top["head"] == head)].sort_values("rank")
        assert rows["rank"].tolist() == list(range(1, len(expected_top) + 1))
        assert rows["seq_id"].tolist() == [seq for seq, _ in expected_top]
        np.testing.assert_allclose(rows["score"], [score for _, score in expected_top], atol=TOLERANCE)


# --- tiny models with sharp attention -------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_models(tiny_models, tmp_path_factory) -> dict[str, str]:
    """The conftest's tiny models with larger random weights: attention far from uniform, so
    argmax-based measures are well defined (no near-ties) and every measure is exercised."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    root = tmp_path_factory.mktemp("sharp")
    paths = {}
    for name in ("bert", "gpt2", "llama", "vit"):
        model = AutoModel.from_pretrained(tiny_models[name])
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() >= 2:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
        helper = AutoImageProcessor if name == "vit" else AutoTokenizer
        helper.from_pretrained(tiny_models[name]).save_pretrained(paths[name])
    return paths


def eager_model(path: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("name,rule", [("bert", "bidirectional"), ("gpt2", "causal"), ("llama", "causal")])
def test_text_measures_match_eager_attention(sharp_models, text_file, tmp_path, name, rule):
    out = str(tmp_path / "run")
    extract(ExtractConfig(model=sharp_models[name], data=text_file, out=out, dtype="float32", batch_size=3))
    run = open_run(out)
    model = eager_model(sharp_models[name])
    tokens = run.tokens()
    eager = {}
    for seq_id, rows in tokens.groupby("seq_id"):
        input_ids = torch.tensor([rows["token_id"].tolist()])
        with torch.no_grad():
            eager[seq_id] = model(input_ids=input_ids, output_attentions=True).attentions
    if name == "llama":
        assert (run.n_heads, run.n_kv_heads) == (4, 2)
    assert_run_matches(run, lambda seq_id, layer, head: eager[seq_id][layer][0, head].numpy(), rule)


def test_image_measures_match_eager_attention(sharp_models, image_folder, tmp_path):
    from transformers import AutoImageProcessor

    out = str(tmp_path / "run")
    extract(ExtractConfig(model=sharp_models["vit"], data=image_folder, out=out, dtype="float32", batch_size=4))
    run = open_run(out)
    model = eager_model(sharp_models["vit"])
    processor = AutoImageProcessor.from_pretrained(sharp_models["vit"])
    eager = {}
    for _, row in run.sequences().iterrows():
        image = Image.open(f"{image_folder}/{row['path']}").convert("RGB")
        with torch.no_grad():
            eager[row["seq_id"]] = model(**processor(images=[image], return_tensors="pt"),
                                         output_attentions=True).attentions
    assert_run_matches(run, lambda seq_id, layer, head: eager[seq_id][layer][0, head].numpy(), "bidirectional")


# --- hand-built runs ------------------------------------------------------------------------------


def write_run(out: str, queries: np.ndarray, keys: np.ndarray, lengths: list[int], token_ids: np.ndarray,
              mask_rule: str, windows: list[int | None] | None = None, special: np.ndarray | None = None,
              punct: np.ndarray | None = None, values: np.ndarray | None = None) -> str:
    """A run holding exactly these vectors, written through the store's writer:
    `queries` [layer, head, token, d_head], `keys` (and `values`) [layer, kv_head, token, d_head]."""
    n_layers, n_heads, n_tokens, d_head = queries.shape
    n_kv_heads = keys.shape[1]
    run = RunDir(out)
    create_run(run, Manifest(
        model=ModelInfo(id="hand-built", architecture="HandBuilt", modality="text"),
        config=ExtractConfig(model="hand-built", data="hand-built", out=out, dtype="float32"),
        layers=list(range(n_layers)), dtype="float32", chunk_tokens=256,
        attention=AttentionRules(n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head,
                                 scale=[1.0] * n_layers, mask_rule=mask_rule,
                                 sliding_window=windows or [None] * n_layers,
                                 kv_head_of_q=[head * n_kv_heads // n_heads for head in range(n_heads)])))
    seq_of_token = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.concatenate([np.arange(length) for length in lengths])
    tokens = {"seq_id": seq_of_token.tolist(), "pos": pos.tolist(), "token_id": token_ids.tolist(),
              "token": [f"t{i}" for i in token_ids], "seq_len": np.repeat(lengths, lengths).tolist(),
              "pos_norm": (pos / np.maximum(np.repeat(lengths, lengths) - 1, 1)).tolist(),
              "is_special": (pos == 0 if special is None else special).tolist(),
              "is_punct": (np.zeros(n_tokens, bool) if punct is None else punct).tolist()}
    tokens.update({column: [None] * n_tokens for column in ("patch_row", "patch_col", "mean_r", "mean_g", "mean_b")})
    n = len(lengths)
    sequences = {"seq_id": list(range(n)), "token_start": np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist(),
                 "n_tokens": list(lengths), "truncated": [False] * n, "text": [f"sequence {i}" for i in range(n)],
                 "path": [None] * n, "meta": [None] * n}
    writer = PartWriter(run, 0, VectorSpec(n_layers, n_heads, n_kv_heads, d_head, "float32", chunk_tokens=256,
                                           values=values is not None))
    vectors = {"q": queries, "k": keys} | ({"v": values} if values is not None else {})
    writer.append({name: rows.astype(np.float32) for name, rows in vectors.items()}, tokens, sequences)
    commit_part(run, 0, writer.close())
    mark_extraction_complete(run, 1)
    return out


def one_hot_keys(lengths: list[int], d_head: int) -> np.ndarray:
    """[1, 1, token, d_head]: key j of every sequence is the unit vector of its position j."""
    pos = np.concatenate([np.arange(length) for length in lengths])
    return np.eye(d_head)[pos][None, None]


def targeted_queries(lengths: list[int], d_head: int, target) -> np.ndarray:
    """[token, d_head]: query i looks at position `target(i, length)` (None: at nothing in particular)."""
    rows = []
    for length in lengths:
        for i in range(length):
            goal = target(i, length)
            rows.append(np.zeros(d_head) if goal is None else BIG * np.eye(d_head)[goal])
    return np.stack(rows)


LENGTHS = [9, 12, 3, 16, 10]


def test_known_causal_heads(tmp_path):
    """Head 0 reads the previous token, head 1 the first token, head 2 the token three back,
    which holds the same id (ids repeat with period 3); all three share one key/value head."""
    d_head = max(LENGTHS)
    queries = np.stack([
        targeted_queries(LENGTHS, d_head, lambda i, n: i - 1 if i >= 1 else None),
        targeted_queries(LENGTHS, d_head, lambda i, n: 0),
        targeted_queries(LENGTHS, d_head, lambda i, n: i - 3 if i >= 3 else i),
    ])[None]
    pos = np.concatenate([np.arange(length) for length in LENGTHS])
    last = np.concatenate([np.arange(length) == length - 1 for length in LENGTHS])
    run = open_run(write_run(str(tmp_path / "run"), queries, one_hot_keys(LENGTHS, d_head), LENGTHS, 100 + pos % 3,
                             "causal", punct=last))
    measurements, top = heads.measure_run(run, top_k=3)
    previous, sink, duplicate = measurements.to_dict("records")
    n_queries = sum(LENGTHS) - len(LENGTHS)  # every position but the first
    for row in (previous, sink, duplicate):
        assert row["n_queries"] == n_queries
        assert math.isnan(row["next_weight"])
        assert row["confidence"] > 0.99 and row["entropy"] < 0.01 and row["entropy_norm"] < 0.01
        assert math.isnan(row["induction_score"])  # no probe run
    assert previous["prev_weight"] > 0.99 and previous["self_weight"] < 0.01
    assert (previous["positional_offset"], previous["positional_share"]) == (-1, 1.0)
    assert previous["sink_argmax_share"] == pytest.approx(len(LENGTHS) / n_queries)  # only position 1's previous is 0
    assert previous["sink_weight"] == pytest.approx(len(LENGTHS) / n_queries, abs=1e-6)
    assert previous["special_weight"] == pytest.approx(previous["sink_weight"])  # position 0 is the special token
    assert previous["duplicate_weight"] < 0.01 and previous["punct_weight"] < 0.01
    assert sink["sink_weight"] > 0.99 and sink["sink_argmax_share"] == 1.0 and sink["special_weight"] > 0.99
    assert sink["prev_weight"] < 0.5 and sink["self_weight"] < 0.01
    assert duplicate["duplicate_weight"] > 0.99 and duplicate["prev_weight"] < 0.01
    assert duplicate["positional_offset"] == -3
    # the aggregate view: by relative offset d = k - (max_length - 1); keys after the query are never seen
    longest = max(LENGTHS)
    by_offset = dict(zip(range(1 - longest, longest), previous["offset_weights"]))
    assert by_offset[-1] > 0.99 and by_offset[0] < 0.01 and by_offset[-2] < 0.01
    assert all(math.isnan(by_offset[d]) for d in range(1, longest))
    assert dict(zip(range(1 - longest, longest), duplicate["offset_weights"]))[-3] > 0.99
    # most itself: largest weight off position 0, averaged over queries, is (len - 2) / (len - 1) for the
    # previous-token head, so the longest sequences come first; the 3-token one is too short to rank.
    ranked = top[top["head"] == 0].sort_values("rank")
    assert ranked["seq_id"].tolist() == [3, 1, 4]
    np.testing.assert_allclose(ranked["score"], [14 / 15, 10 / 11, 8 / 9], atol=1e-6)
    assert top[top["head"] == 1]["score"].max() < 0.01


def test_known_bidirectional_heads(tmp_path):
    """Head 0 reads the next token (the last one reads itself), head 1 itself."""
    d_head = max(LENGTHS)
    queries = np.stack([
        targeted_queries(LENGTHS, d_head, lambda i, n: i + 1 if i + 1 < n else i),
        targeted_queries(LENGTHS, d_head, lambda i, n: i),
    ])[None]
    pos = np.concatenate([np.arange(length) for length in LENGTHS])
    run = open_run(write_run(str(tmp_path / "run"), queries, one_hot_keys(LENGTHS, d_head), LENGTHS, pos,
                             "bidirectional"))
    following, itself = heads.measure_run(run)[0].to_dict("records")
    assert following["n_queries"] == sum(LENGTHS)
    assert following["next_weight"] > 0.99 and following["prev_weight"] < 0.01
    assert (following["positional_offset"], following["positional_share"]) == \
        (1, pytest.approx(1 - len(LENGTHS) / sum(LENGTHS)))
    assert itself["self_weight"] > 0.99 and itself["next_weight"] < 0.01 and itself["positional_offset"] == 0
    assert math.isnan(itself["duplicate_weight"])  # no token id repeats


@pytest.mark.parametrize("mask_rule", ["causal", "bidirectional"])
def test_batched_measures_equal_the_store_attention(tmp_path, mask_rule):
    """Random Q/K, lengths 1 to 40 (batches padded), a sliding window on layer 1, grouped-query
    heads: every measure equals the reference over `run.attention` (pipeline.attention's rule)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 41, size=70).tolist() + [1, 2]
    n_tokens = sum(lengths)
    queries = rng.normal(size=(2, 4, n_tokens, 8)) * 1.5
    keys = rng.normal(size=(2, 2, n_tokens, 8)) * 1.5
    special = rng.random(n_tokens) < 0.1
    punct = rng.random(n_tokens) < 0.2
    run = open_run(write_run(str(tmp_path / "run"), queries, keys, lengths, rng.integers(0, 6, n_tokens),
                             mask_rule, windows=[None, 5], special=special, punct=punct))
    plan = heads.plan_sequences(run)
    assert any((bucket.lengths < bucket.length).any() for bucket in plan.buckets), "padding must be exercised"
    assert_run_matches(run, run.attention, mask_rule)


@pytest.mark.parametrize("mask_rule", ["causal", "bidirectional"])
def test_value_weighted_offsets_equal_a_per_query_reference(tmp_path, mask_rule):
    """`value_offset_weights` of a run with values equals `offset_weights` of the reference over
    value-norm-weighted attention; a run without values has none."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 30, size=40).tolist()
    n_tokens = sum(lengths)
    values = rng.normal(size=(1, 2, n_tokens, 8)) * rng.uniform(0.1, 3.0, size=(1, 2, n_tokens, 1))
    run = open_run(write_run(str(tmp_path / "run"), rng.normal(size=(1, 4, n_tokens, 8)),
                             rng.normal(size=(1, 2, n_tokens, 8)), lengths, rng.integers(0, 6, n_tokens), mask_rule,
                             values=values))
    measurements, _ = heads.measure_run(run)
    tokens = run.tokens()
    for row in measurements.to_dict("records"):
        expected, _ = reference_measures(tokens, partial(run.attention, layer=0, head=row["head"],
                                                         weighting="value_norm"), mask_rule, None)
        plain, _ = reference_measures(tokens, partial(run.attention, layer=0, head=row["head"]), mask_rule, None)
        np.testing.assert_allclose(row["value_offset_weights"], expected["offset_weights"], atol=TOLERANCE)
        assert not np.allclose(row["value_offset_weights"], plain["offset_weights"], equal_nan=True)
    without = open_run(write_run(str(tmp_path / "qk"), rng.normal(size=(1, 2, 30, 4)), rng.normal(size=(1, 1, 30, 4)),
                                 [10, 20], rng.integers(0, 3, 30), mask_rule))
    assert heads.measure_run(without)[0]["value_offset_weights"].isna().all()


def test_measure_head_alone_equals_measure_run(tmp_path):
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 20, size=12).tolist()
    n_tokens = sum(lengths)
    run = open_run(write_run(str(tmp_path / "run"), rng.normal(size=(1, 2, n_tokens, 4)),
                             rng.normal(size=(1, 1, n_tokens, 4)), lengths, rng.integers(0, 3, n_tokens), "causal"))
    measurements, top = heads.measure_run(run, heads=[1])
    row, rows = heads.measure_head(run, 0, 1)
    stored = measurements.iloc[0].to_dict()
    np.testing.assert_allclose(row.pop("offset_weights"), stored["offset_weights"])
    assert row == pytest.approx({k: v for k, v in stored.items() if k in row}, nan_ok=True)
    assert [r["seq_id"] for r in rows] == top["seq_id"].tolist()


# --- the induction probe --------------------------------------------------------------------------


def test_repeated_random_tokens():
    probe = heads.repeated_random_tokens(50, 6, 7, seed=3, bos_id=0, exclude_ids=[1, 2])
    assert probe.shape == (6, 15) and probe.dtype == np.int64
    assert (probe[:, 0] == 0).all()
    np.testing.assert_array_equal(probe[:, 1:8], probe[:, 8:])
    assert not np.isin(probe[:, 1:], [0, 1, 2]).any() and probe.max() < 50
    np.testing.assert_array_equal(probe, heads.repeated_random_tokens(50, 6, 7, seed=3, bos_id=0, exclude_ids=[1, 2]))
    assert heads.repeated_random_tokens(50, 2, 4, seed=0).shape == (2, 8)
    with pytest.raises(heads.HeadsError, match="vocabulary"):
        heads.repeated_random_tokens(3, 2, 4, seed=0, bos_id=0, exclude_ids=[1, 2])


def test_known_induction_head(tmp_path):
    """Probe [BOS] + R + R with R of distinct ids: head 0 is a perfect induction head (a query in
    the second copy reads the token after its first occurrence; the first copy reads itself),
    head 1 a perfect previous-token head. TransformerLens's "mul" scores are then known."""
    half, n_sequences = 5, 3
    length = 1 + 2 * half
    lengths = [length] * n_sequences
    probe = np.stack([np.concatenate([[0], r, r]) for r in (np.arange(1, half + 1) + 10 * s for s in range(3))])
    queries = np.stack([
        targeted_queries(lengths, length, lambda i, n: i - half + 1 if i > half else i),
        targeted_queries(lengths, length, lambda i, n: i - 1 if i >= 1 else 0),
    ])[None]
    run = open_run(write_run(str(tmp_path / "probe"), queries, one_hot_keys(lengths, length), lengths,
                             probe.reshape(-1), "causal"))
    induction = heads.probe_scores(run, 0, 0)
    assert induction["induction_score"] == pytest.approx(half / length, abs=1e-6)
    assert induction["duplicate_score"] < 1e-6 and induction["previous_token_score"] < 1e-6
    previous = heads.probe_scores(run, 0, 1)
    assert previous["previous_token_score"] == pytest.approx((length - 1) / length, abs=1e-6)
    assert previous["induction_score"] < 1e-6
    # TL's options: without the BOS column and the diagonal, only the second copy's attention is left
    assert heads.probe_scores(run, 0, 0, exclude_bos=True, exclude_current_token=True)["induction_score"] == \
        pytest.approx(1.0, abs=1e-6)
    measurements, _ = heads.measure_run(run, probe_run=run)
    assert measurements.loc[0, "induction_score"] == pytest.approx(half / length, abs=1e-6)


def test_probe_scores_are_nan_for_bidirectional_runs(tmp_path):
    lengths = [6, 6]
    run = open_run(write_run(str(tmp_path / "run"), np.ones((1, 1, 12, 2)), np.ones((1, 1, 12, 2)), lengths,
                             np.tile(np.arange(3), 4), "bidirectional"))
    assert all(math.isnan(value) for value in heads.probe_scores(run, 0, 0).values())


def test_probe_lacking_layers_is_refused(tmp_path):
    lengths = [4]
    probe = open_run(write_run(str(tmp_path / "probe"), np.ones((1, 1, 4, 2)), np.ones((1, 1, 4, 2)), lengths,
                               np.arange(4), "causal"))
    run = open_run(write_run(str(tmp_path / "run"), np.ones((2, 1, 4, 2)), np.ones((2, 1, 4, 2)), lengths,
                             np.arange(4), "causal"))
    with pytest.raises(heads.HeadsError, match=r"lacks layers \[1\]"):
        heads.measure_run(run, probe_run=probe)


def write_probe_run(model_path: str, probe: np.ndarray, out: str):
    """Extract the probe token ids through the extraction's own batch writer (the corpus path
    tokenizes text, which random ids do not survive)."""
    from pipeline.extract import Batch, run_manifest, write_batches
    from pipeline.models import load_model
    from pipeline.sources import Sequence

    loaded = load_model(model_path, "cpu")
    config = ExtractConfig(model=model_path, data="probe", out=out, dtype="float32")
    run = RunDir(out)
    create_run(run, run_manifest(config, loaded))
    layout = loaded.layout
    writer = PartWriter(run, 0, VectorSpec(layout.n_layers, layout.n_heads, layout.n_kv_heads, layout.d_head,
                                           "float32"))
    batch = Batch([Sequence(row=i, text="probe") for i in range(len(probe))],
                  {"input_ids": torch.from_numpy(probe), "attention_mask": torch.ones_like(torch.from_numpy(probe))},
                  [probe.shape[1]] * len(probe), [False] * len(probe), probe.tolist())
    write_batches(loaded, [batch], list(range(layout.n_layers)), np.dtype("float32"), writer)
    commit_part(run, 0, writer.close())
    mark_extraction_complete(run, 1)
    return open_run(out)


def test_probe_scores_match_transformer_lens(sharp_models, tmp_path):
    """TransformerLens's own `detect_head` on the same tiny GPT-2 (booted through its
    TransformerBridge from the local weights) gives the same induction, duplicate and
    previous-token scores, with its defaults and with both exclusions."""
    pytest.importorskip("transformer_lens")
    from transformer_lens.head_detector import detect_head
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, GPT2LMHeadModel

    path = sharp_models["gpt2"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    probe = heads.repeated_random_tokens(tokenizer.vocab_size, 4, 8, seed=0, bos_id=tokenizer.cls_token_id,
                                         exclude_ids=tokenizer.all_special_ids)
    run = write_probe_run(path, probe, str(tmp_path / "probe"))
    bridge = TransformerBridge.boot_transformers(
        path, hf_model=GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager"), device="cpu")

    class ProbeTokens:
        """`detect_head` tokenizes its prompts with `to_tokens`; here each prompt names a probe row."""
        cfg = bridge.cfg

        def to_tokens(self, prompt):
            rows = probe if isinstance(prompt, list) else probe[int(prompt)][None]
            return torch.from_numpy(rows)

        def run_with_cache(self, *args, **kwargs):
            return bridge.run_with_cache(*args, **kwargs)

    prompts = [str(i) for i in range(len(probe))]
    plan = heads.plan_sequences(run)
    for options in ({}, {"exclude_bos": True, "exclude_current_token": True}):
        expected = {name: detect_head(ProbeTokens(), prompts, pattern, **options).numpy() for name, pattern in
                    (("induction_score", "induction_head"), ("duplicate_score", "duplicate_token_head"),
                     ("previous_token_score", "previous_token_head"))}
        for layer in run.layers:
            for head in range(run.n_heads):
                got = heads.probe_scores(run, layer, head, plan=plan, **options)
                for name, scores in expected.items():
                    assert got[name] == pytest.approx(float(scores[layer, head]), abs=TOLERANCE), \
                        f"{name} layer {layer} head {head} {options}"
    assert max(expected["previous_token_score"].max(), expected["induction_score"].max()) > 0.05, \
        "the scores compared must not all be ~0"

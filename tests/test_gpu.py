"""GPU paths against the CPU path on the same data (`make gpu-check` runs the same comparisons).

Tests marked `gpu` need a CUDA device (and, through tests/conftest.py, the GPU backend); the
others check the comparisons themselves on the CPU, so that a difference would be caught."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.store import open_run
from workflows import gpu_check

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


def extract_on(device: str, model: str, data: str, out: str):
    extract(ExtractConfig(model=model, data=data, out=out, dtype="float32", batch_size=3, device=device, threads=1))
    return open_run(out)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_cuda_extraction_matches_cpu_and_eager_attention(tiny_models, text_file, tmp_path, name):
    cpu = extract_on("cpu", tiny_models[name], text_file, str(tmp_path / "cpu"))
    cuda = extract_on("cuda", tiny_models[name], text_file, str(tmp_path / "cuda"))
    assert cuda.manifest["config"]["device"] == "cuda"
    comparison = gpu_check.compare_runs(cpu, cuda)
    assert comparison["n_tokens"] == cpu.n_tokens > 0
    assert comparison["qk_max_rel_err"] < gpu_check.QK_RELATIVE_TOLERANCE
    assert gpu_check.eager_attention_error(cuda, tiny_models[name]) < gpu_check.ATTENTION_TOLERANCE


@pytest.mark.gpu
@needs_cuda
def test_gpu_check_passes_on_cuda(tmp_path):
    code = gpu_check.main(["--device", "cuda", "--out", str(tmp_path), "--models", "tiny", "--sentences", "40"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    extraction = next(step for step in report["steps"] if step["name"] == "extraction")
    assert extraction["status"] == "passed", extraction
    assert code == 0, [(s["name"], s["status"], s.get("reason")) for s in report["steps"]]


class Shifted:
    """A run whose stored queries are off by `delta`: what a wrong GPU path would store."""

    def __init__(self, run, delta: float):
        self._run, self._delta = run, delta

    def __getattr__(self, name):
        return getattr(self._run, name)

    def queries(self, layer, head):
        return self._run.queries(layer, head) + self._delta


def test_comparisons_catch_a_run_that_differs(tiny_models, text_file, tmp_path):
    run = extract_on("cpu", tiny_models["llama"], text_file, str(tmp_path / "run"))
    assert gpu_check.compare_runs(run, run)["qk_max_abs_err"] == 0.0
    assert gpu_check.compare_runs(run, Shifted(run, 1e-2))["qk_max_rel_err"] > gpu_check.QK_RELATIVE_TOLERANCE
    assert gpu_check.eager_attention_error(run, tiny_models["llama"]) < gpu_check.ATTENTION_TOLERANCE
    assert gpu_check.eager_attention_error(Shifted(run, 1.0), tiny_models["llama"]) > gpu_check.ATTENTION_TOLERANCE


def test_dry_run_on_cpu_writes_a_passing_report(tmp_path, capsys):
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--models", "tiny", "--sentences", "30",
                           "--threads", "1"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert code == 0 and report["passed"], capsys.readouterr().out
    assert list(steps) == [name for name, _ in gpu_check.STEPS]
    tiny = steps["extraction"]["details"]["tiny"]
    assert tiny["n_tokens"] > 30 and tiny["qk_max_abs_err"] == 0.0
    assert tiny["attention_vs_cpu_eager_max_abs_err"] < gpu_check.ATTENTION_TOLERANCE
    assert tiny["cpu_extract_tokens_per_s"] > 0 and tiny["device_store_bytes"] > 0
    assert steps["projections"]["status"] in ("skipped", "passed")
    assert "summary" in capsys.readouterr().out


def test_built_in_sentences_mix_lengths():
    texts = gpu_check.sentences(200)
    assert len(set(texts)) == 200
    lengths = [len(text.split()) for text in texts]
    assert min(lengths) <= 2 and max(lengths) >= 30
    assert np.std(lengths) > 5

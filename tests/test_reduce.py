"""Per-head projections on tiny-model runs (CPU backend), sampling and interpolation,
backend selection, and the GPU path (marked, skipped without CUDA)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import ExtractConfig, ReduceConfig
from pipeline.extract import extract
from pipeline.reduce import BackendError, load_backend, pick_backend
from pipeline.reduce.project import (GRAPH_CELLS, head_points, knn_preservation, project_points, reduce_run,
                                     sample_points, sample_tokens)
from pipeline.store import RunDir, committed_projections, open_run


@pytest.fixture(scope="module")
def small_run(tiny_models, tmp_path_factory):
    """A tiny Llama (GQA, causal) run over a few hundred sequences."""
    data = tmp_path_factory.mktemp("reduce-data") / "d.txt"
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while queries met keys and heads attended to tokens in order".split()
    data.write_text("\n".join(" ".join(rng.choice(words, rng.integers(4, 14))) for _ in range(120)) + "\n")
    out = str(tmp_path_factory.mktemp("reduce-run") / "run")
    extract(ExtractConfig(model=tiny_models["llama"], data=str(data), out=out, batch_size=16))
    return out


def copy_run(source: str, target) -> str:
    import shutil

    shutil.copytree(source, target)
    return str(target)


@pytest.mark.parametrize("method", ["pca", "umap", "tsne"])
@pytest.mark.parametrize("dim", [2, 3])
def test_every_method_and_dim_writes_a_projection(small_run, tmp_path, method, dim):
    run_url = copy_run(small_run, tmp_path / "run")
    config = ReduceConfig(methods=[method], dims=[dim], layers=[1], heads=[0, 3], seed=0,
                          tsne={"perplexity": 10, "n_iter": 100})
    summary = reduce_run(run_url, config)
    assert summary == {**summary, "backend": "cpu", "tasks": 2, "projected": 2, "done_before": 0}
    run = open_run(run_url)
    coords = run.projection(method, 1, 3, dim=dim)
    assert coords.shape == (2 * run.n_tokens, dim) and coords.dtype == np.float32
    assert np.isfinite(coords).all() and coords.std(axis=0).min() > 0
    records = run.projections()
    assert len(records) == 2 and set(records["head"]) == {0, 3}
    row = records.iloc[0]
    assert row["backend"] == "cpu" and row["sampled"] == False  # noqa: E712
    assert 0 <= row["quality.knn_preservation"] <= 1
    assert 0 <= row["quality.attention_agreement"] <= 1
    assert row["normalization.translate_keys"] and row["normalization.metric"] == "cosine"


def test_rerun_skips_committed_heads_and_a_missing_marker_is_redone(small_run, tmp_path):
    run_url = copy_run(small_run, tmp_path / "run")
    config = ReduceConfig(methods=["pca"], heads=[0, 1])
    assert reduce_run(run_url, config)["projected"] == 2 * 2
    again = reduce_run(run_url, config)
    assert again["projected"] == 0 and again["done_before"] == 4
    marker = tmp_path / "run" / "projections" / "pca2d" / "L001H001.json"
    marker.unlink()  # as if the process died after writing the layout but before committing it
    with pytest.raises(KeyError, match="no 2-D pca projection of layer 1 head 1"):
        open_run(run_url).projection("pca", 1, 1)
    assert reduce_run(run_url, config)["projected"] == 1
    assert json.loads(marker.read_text())["complete"] is True


def test_large_heads_are_fitted_on_a_sample_and_interpolated(small_run, tmp_path):
    run_url = copy_run(small_run, tmp_path / "run")
    run = open_run(run_url)
    n_points = 2 * run.n_tokens
    config = ReduceConfig(methods=["umap"], layers=[0], heads=[2], sample_threshold=n_points // 2,
                          sample_size=n_points // 4, refine_epochs=20)
    reduce_run(run_url, config)
    record = committed_projections(RunDir(run_url))[("umap", 2, 0, 2)]
    assert record["sampled"] is True and record["sample_size"] <= n_points // 4
    assert "interpolation" in record["placement"] and "20 UMAP epochs" in record["placement"]
    coords = open_run(run_url).projection("umap", 0, 2)
    assert coords.shape == (n_points, 2) and np.isfinite(coords).all()
    assert len(np.unique(coords.round(5), axis=0)) > 0.9 * n_points  # interpolated points are not stacked


def test_interpolation_places_points_near_their_sample_neighbours():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 10
    labels = rng.integers(0, 5, 4000)
    points = (centres[labels] + rng.normal(size=(4000, 16))).astype(np.float32)
    points = np.vstack([points, points + 0.01])  # queries then keys of the same tokens
    config = ReduceConfig(methods=["pca"], sample_threshold=1000, sample_size=500, refine_epochs=0)
    coords, record = project_points(points, "umap", 2, config, load_backend("cpu"))
    assert record["placement"] == "nearest-neighbour interpolation"
    labels = np.concatenate([labels, labels])
    centroids = np.array([coords[labels == c].mean(0) for c in range(5)])
    nearest = np.argmin(((coords[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.95


def sheet_head(n_tokens: int, seed: int = 0) -> np.ndarray:
    """[2 * n_tokens, 32] unit points of a synthetic head whose queries and keys lie near one 2-D
    sheet (a random smooth map of the plane), so a 2-D layout can keep most neighbours."""
    rng = np.random.default_rng(seed)
    plane = rng.uniform(0, 4, size=(n_tokens, 2))
    queries = np.tanh(plane @ rng.normal(size=(2, 64))) @ (rng.normal(size=(64, 32)) / 8)
    keys = queries + rng.normal(scale=0.02, size=queries.shape)
    points = np.vstack([queries, keys]) + rng.normal(scale=0.01, size=(2 * n_tokens, 32))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def exact_neighbours(points: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatL2(points.shape[1])
    index.add(points)
    return index.search(points, k)[1]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact)]))


def test_cell_graph_finds_the_exact_neighbours_it_reports():
    from pipeline.reduce import cpu

    points = sheet_head(3000)
    sample = sample_points(len(points) // 2, 600, seed=0)
    near_sample = cpu.knn(points[sample], points, GRAPH_CELLS)
    distances, indices = cpu.knn_graph(points, 10, near_sample[1])
    assert recall(indices, exact_neighbours(points, 10)) > 0.9
    assert (indices[:, 0] == np.arange(len(points))).all() and (np.diff(distances, axis=1) >= 0).all()
    np.testing.assert_allclose(distances, np.linalg.norm(points[indices] - points[:, None], axis=2), atol=1e-5)


def test_ivf_search_recall_against_exact(monkeypatch):
    from pipeline.reduce import cpu

    points = sheet_head(3000)
    monkeypatch.setattr(cpu, "EXACT_PAIRS", 0)  # as for a million-point head: faiss IVF
    _, indices = cpu.knn(points, points, 10)
    assert recall(indices, exact_neighbours(points, 10)) > 0.9


def test_sampled_umap_keeps_most_of_an_exact_fits_local_structure():
    cpu = load_backend("cpu")
    points = sheet_head(2000)
    config = ReduceConfig(sample_threshold=2000, sample_size=800, seed=0)
    refined, record = project_points(points, "umap", 2, config, cpu)
    interpolated, _ = project_points(points, "umap", 2, config.model_copy(update={"refine_epochs": 0}), cpu)
    exact, _ = project_points(points, "umap", 2, ReduceConfig(seed=0), cpu)
    scores = {name: knn_preservation(points, coords, cpu)
              for name, coords in (("refined", refined), ("interpolated", interpolated), ("exact", exact))}
    assert "scaled x2.24 to the sample fit's density" in record["placement"]
    assert scores["refined"] >= 0.8 * scores["exact"] and scores["refined"] > scores["interpolated"] + 0.05, scores


def test_seeded_sampled_projection_is_reproducible():
    cpu = load_backend("cpu")
    points = sheet_head(1500, seed=1)
    config = ReduceConfig(sample_threshold=1000, sample_size=500, seed=3)
    first, _ = project_points(points, "umap", 2, config, cpu)
    again, _ = project_points(points, "umap", 2, config, cpu)
    np.testing.assert_array_equal(first, again)


def test_one_neighbour_graph_serves_every_dim_of_a_head(small_run, tmp_path, monkeypatch):
    from pipeline.reduce import cpu

    calls = []
    search = cpu.knn_graph
    monkeypatch.setattr(cpu, "knn_graph", lambda *args: calls.append(len(args[0])) or search(*args))
    run_url = copy_run(small_run, tmp_path / "run")
    n_points = 2 * open_run(run_url).n_tokens
    config = ReduceConfig(dims=[2, 3], layers=[0], heads=[1], sample_threshold=n_points // 2,
                          sample_size=n_points // 4, refine_epochs=5, seed=0)
    assert reduce_run(run_url, config)["projected"] == 2
    assert calls == [n_points]  # one graph for both dims
    records = committed_projections(RunDir(run_url))
    assert all("5 UMAP epochs" in records[("umap", dim, 0, 1)]["placement"] for dim in (2, 3))


def test_sample_is_balanced_and_spread():
    tokens = sample_tokens(100_000, 1000, seed=1)
    assert len(np.unique(tokens)) == 1000
    assert tokens.min() < 100 and tokens.max() > 99_800
    assert np.diff(tokens).max() <= 101


def test_knn_preservation_scores_identity_high_and_noise_low():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(3000, 8)).astype(np.float32)
    backend = load_backend("cpu")
    assert knn_preservation(points, points[:, :8], backend) == pytest.approx(1.0)
    assert knn_preservation(points, rng.normal(size=(3000, 2)), backend) < 0.05


def test_normalization_switches_are_applied(small_run):
    run = open_run(small_run)
    queries, keys = run.queries(1, 0), run.keys(1, 0)
    translated, _ = head_points(queries, keys, ReduceConfig(metric="euclidean", scale_norms=False))
    raw, _ = head_points(queries, keys, ReduceConfig(metric="euclidean", scale_norms=False, translate_keys=False))
    n = len(queries)
    np.testing.assert_allclose(translated[:n].mean(0), translated[n:].mean(0), atol=1e-4)
    assert not np.allclose(raw[:n].mean(0), raw[n:].mean(0), atol=1e-2)
    unit, _ = head_points(queries, keys, ReduceConfig())
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)


def test_backend_selection_without_cuml(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_rapids(name, *args, **kwargs):
        if name.split(".")[0] in ("cuml", "cupy"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rapids)
    load_backend.cache_clear()
    try:
        assert pick_backend("auto").name == "cpu"
        with pytest.raises(BackendError, match="backend 'gpu' cannot run here: cuML/CuPy are not installed"):
            pick_backend("gpu")
        with pytest.raises(BackendError, match="unknown backend 'tpu'"):
            pick_backend("tpu")
    finally:
        load_backend.cache_clear()


def test_forced_gpu_backend_without_a_gpu_fails_clearly(small_run):
    from pipeline.reduce import gpu

    if gpu.available() is None:
        pytest.skip("a GPU is present")
    with pytest.raises(BackendError, match="backend 'gpu' cannot run here"):
        reduce_run(small_run, ReduceConfig(methods=["pca"], backend="gpu"))


def test_unknown_layers_and_heads_are_refused(small_run):
    with pytest.raises(ValueError, match=r"layers \[7\] are not stored"):
        reduce_run(small_run, ReduceConfig(layers=[7]))
    with pytest.raises(ValueError, match=r"heads \[4\] out of range"):
        reduce_run(small_run, ReduceConfig(heads=[4]))


def test_reduce_cli(small_run, tmp_path):
    from typer.testing import CliRunner

    from workflows.cli import app

    run_url = copy_run(small_run, tmp_path / "run")
    runner = CliRunner()
    result = runner.invoke(app, ["reduce", run_url, "--method", "pca,umap", "--dim", "2", "--layers", "1",
                                 "--heads", "0", "--backend", "cpu"])
    assert result.exit_code == 0, result.output
    assert "projected 2 heads on the cpu backend" in result.output
    assert open_run(run_url).projection("umap", 1, 0).shape[1] == 2
    result = runner.invoke(app, ["reduce", run_url, "--method", "isomap"])
    assert result.exit_code == 2 and "methods" in result.output


@pytest.mark.gpu
@pytest.mark.parametrize("method,dim", [("pca", 2), ("umap", 2), ("umap", 3), ("tsne", 2), ("tsne", 3)])
def test_gpu_backend_projects_with_cuml(small_run, tmp_path, method, dim):
    from pipeline.reduce import gpu as gpu_module

    if gpu_module.available() is not None:
        pytest.skip(f"GPU backend unavailable: {gpu_module.available()}")
    gpu = load_backend("gpu")
    run = open_run(small_run)
    points, _ = head_points(run.queries(1, 0), run.keys(1, 0), ReduceConfig())
    coords, record = project_points(points, method, dim, ReduceConfig(tsne={"perplexity": 10, "n_iter": 300}), gpu)
    assert coords.shape == (len(points), dim) and np.isfinite(coords).all()
    if method == "tsne" and dim == 3:
        assert record["backend"] == "cpu" and "2-D only" in record["fallback"]
    else:
        assert record["backend"] == "gpu"


@pytest.mark.gpu
def test_gpu_backend_refines_a_sampled_head_or_says_why_not(small_run):
    from pipeline.reduce import gpu as gpu_module

    if gpu_module.available() is not None:
        pytest.skip(f"GPU backend unavailable: {gpu_module.available()}")
    run = open_run(small_run)
    points, _ = head_points(run.queries(1, 0), run.keys(1, 0), ReduceConfig())
    config = ReduceConfig(sample_threshold=len(points) // 2, sample_size=len(points) // 4, refine_epochs=10)
    coords, record = project_points(points, "umap", 2, config, load_backend("gpu"))
    assert coords.shape == (len(points), 2) and np.isfinite(coords).all() and record["backend"] == "gpu"
    assert "10 UMAP epochs" in record["placement"] or "initial layout" in record["refine_skipped"]

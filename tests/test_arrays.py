"""The array backend (`pipeline.arrays`): choosing it, and its GPU code run with NumPy standing in
for CuPy, against the CPU path. Tests marked `gpu` compare CuPy / CUDA results with the CPU's
and skip without CUDA (and, for CuPy, without CuPy)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import arrays
from pipeline.arrays import ArraysError, choose, cupy_backend, numpy_backend
from pipeline.attention import attention_weights
from pipeline.config import ReduceConfig
from pipeline.errors import QkatlasError
from pipeline.normalize import normalize_head
from pipeline.reduce import load_backend
from pipeline.reduce.project import attention_agreement, head_points, knn_preservation

FP32_RELATIVE = 1e-5


@pytest.fixture
def fresh_backend(monkeypatch):
    """`arrays.backend()` decided anew inside the test, and forgotten after it."""
    monkeypatch.delenv(arrays.ENVIRONMENT, raising=False)
    arrays.backend.cache_clear()
    yield monkeypatch
    arrays.backend.cache_clear()


def head_like(seed: int = 0, n_sequences: int = 60, d_head: int = 16):
    """Queries and keys with offset means and unequal norms, and their sequence table."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 40, n_sequences)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    n = int(lengths.sum())
    queries = rng.normal(1.0, 2.0, (n, d_head)).astype(np.float32)
    keys = (rng.normal(-2.0, 0.5, (n, d_head)) + queries[:, :1] * 0.3).astype(np.float32)
    return queries, keys, np.stack([starts, lengths], axis=1)


# --- choosing the backend --------------------------------------------------------------------


def test_forcing_cpu_never_probes_the_gpu():
    def probe():
        raise AssertionError("the GPU was probed")

    assert choose("cpu", probe) == ("cpu", "QKATLAS_ARRAYS=cpu")


def test_auto_takes_the_gpu_only_where_it_can_run():
    assert choose("auto", lambda: None) == ("gpu", None)
    assert choose("auto", lambda: "no CUDA device is visible") == ("cpu", "no CUDA device is visible")


def test_forcing_an_unavailable_gpu_or_an_unknown_name_is_a_user_error():
    with pytest.raises(ArraysError, match="QKATLAS_ARRAYS=gpu.*no CUDA device is visible") as raised:
        choose("gpu", lambda: "no CUDA device is visible")
    assert isinstance(raised.value, QkatlasError)
    with pytest.raises(ArraysError, match="'tpu' is not a backend"):
        choose("tpu", lambda: None)


def test_backend_is_chosen_once_per_process_from_the_environment(fresh_backend):
    fresh_backend.setenv(arrays.ENVIRONMENT, "cpu")
    chosen = arrays.backend()
    assert (chosen.name, chosen.xp, chosen.frames, chosen.torch_device) == ("cpu", np, pd, "cpu")
    assert chosen.why_not_gpu == "QKATLAS_ARRAYS=cpu"
    fresh_backend.setenv(arrays.ENVIRONMENT, "gpu")
    assert arrays.backend() is chosen
    from pipeline.heads import torch_device

    assert torch_device(None) == torch.device("cpu")


def test_without_cupy_auto_is_the_cpu_and_forcing_the_gpu_fails(fresh_backend):
    reason = cupy_backend.available()
    if reason is None:
        pytest.skip("CuPy sees a CUDA device here")
    assert arrays.backend().name == "cpu" and arrays.backend().why_not_gpu == reason
    arrays.backend.cache_clear()
    fresh_backend.setenv(arrays.ENVIRONMENT, "gpu")
    with pytest.raises(ArraysError, match="cannot run here"):
        arrays.backend()


def test_host_arrays_stay_numpy():
    values = np.arange(6.0).reshape(3, 2)
    assert arrays.array_module(values, [1, 2]) is np
    assert arrays.to_host(values) is values and not arrays.is_device_array(values)


# --- the GPU code, run with NumPy ------------------------------------------------------------


@pytest.mark.parametrize("dim", [16, 2])
def test_brute_force_nearest_finds_what_faiss_finds(dim):
    rng = np.random.default_rng(dim)
    reference = rng.normal(size=(3000, dim)).astype(np.float32) * 10
    probes = reference[rng.choice(3000, 400, replace=False)]
    expected = numpy_backend.nearest(reference, probes, 16)
    np.testing.assert_array_equal(cupy_backend.nearest(reference, probes, 16, xp=np), expected)
    blocked = cupy_backend.nearest(reference, probes, 16, xp=np, block_elements=50_000)  # 16 probes a block
    np.testing.assert_array_equal(blocked, expected)


def test_brute_force_nearest_pads_a_short_reference_as_faiss_does():
    reference = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(cupy_backend.nearest(reference, reference, 8, xp=np),
                                  numpy_backend.nearest(reference, reference, 8))


def test_knn_preservation_is_the_same_through_the_brute_force_search(monkeypatch):
    queries, keys, _ = head_like()
    points, _ = head_points(queries, keys, ReduceConfig())
    cpu = load_backend("cpu")
    coords = cpu.pca(points, 2, 0)
    with_faiss = knn_preservation(points, coords, cpu)
    monkeypatch.setattr(numpy_backend, "nearest", functools.partial(cupy_backend.nearest, xp=np, block_elements=10**5))
    assert knn_preservation(points, coords, cpu) == with_faiss
    assert 0.02 < with_faiss < 0.98


@pytest.mark.parametrize("mask_rule", ["causal", "bidirectional"])
def test_attention_agreement_ranks_keys_as_full_attention_does(mask_rule):
    """Against the definition: rows of `attention_weights` over whole sequences."""
    queries, keys, sequences = head_like(seed=4)
    coords = np.random.default_rng(5).normal(size=(2 * len(queries), 2)).astype(np.float32)
    top, rng = 5, np.random.default_rng(0)
    eligible = np.flatnonzero(sequences[:, 1] > 2 * top)
    hits, chance = [], []
    for seq in rng.choice(eligible, min(300, len(eligible)), replace=True):
        start, length = map(int, sequences[seq])
        pos = int(rng.integers(2 * top if mask_rule == "causal" else 0, length))
        weights = attention_weights(queries[start:start + length], keys[start:start + length], 0.25, mask_rule)[pos]
        allowed = np.arange(pos + 1 if mask_rule == "causal" else length)
        attended = set(allowed[np.argsort(-weights[allowed])[:top]])
        distance = np.linalg.norm(coords[len(queries) + start + allowed] - coords[start + pos], axis=1)
        hits.append(len(attended & set(allowed[np.argsort(distance)[:top]])) / top)
        chance.append(top / len(allowed))
    got = attention_agreement(queries, keys, coords, sequences, 0.25, mask_rule)
    assert got["attention_agreement"] == pytest.approx(np.mean(hits), abs=1e-12)
    assert got["attention_chance"] == pytest.approx(np.mean(chance), abs=1e-12)
    assert 0 < got["attention_agreement"] < 1


def test_key_shift_is_exact_to_float32_when_the_means_nearly_cancel():
    """float64 accumulation: a float32 mean of 1000 + noise is off by ~1e-4, here 30% of the shift."""
    rng = np.random.default_rng(3)
    queries = (1000 + rng.normal(0, 1, (20000, 8))).astype(np.float32)
    keys = (1000.01 + rng.normal(0, 1, (20000, 8))).astype(np.float32)
    _, _, applied = normalize_head(queries, keys, scale=False)
    exact = queries.astype(np.float64).mean(0) - keys.astype(np.float64).mean(0)
    assert applied.key_shift.dtype == np.float32
    assert np.abs(applied.key_shift - exact).max() <= 2 * np.spacing(np.float32(np.abs(exact).max()))


def test_masks_move_every_tensor_to_another_device():
    from pipeline.heads import Bucket

    bucket = Bucket(length=4, seq_index=np.arange(2), lengths=torch.tensor([4, 3]), start=0,
                    special=torch.zeros(2, 4, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True),
                    punct=torch.zeros(2, 4, dtype=torch.bool),
                    duplicates=torch.tensor([[0, 2, 1]]), max_length=4)
    on_cpu = bucket.masks("causal", None)
    moved = bucket.masks("causal", None, torch.device("meta"))
    assert bucket.masks("causal", None, torch.device("meta")) is moved and bucket.masks("causal", None) is on_cpu
    tensors = [value for name in vars(moved) for value in
               (getattr(moved, name) if isinstance(getattr(moved, name), tuple) else (getattr(moved, name),))
               if isinstance(value, torch.Tensor)]
    assert len(tensors) >= 14 and all(t.device.type == "meta" for t in tensors)
    assert moved.counts == on_cpu.counts


def test_frames_stay_pandas_on_the_cpu_and_where_cudf_does_not_import(monkeypatch):
    import sys

    frame = pd.DataFrame({"x": np.arange(3, dtype=np.float32)})
    assert arrays.backend_frame(frame, "cpu") is frame
    monkeypatch.setitem(sys.modules, "cudf", None)  # import fails as if not installed
    assert arrays.backend_frame(frame, "gpu") is frame


# --- on a GPU --------------------------------------------------------------------------------


@pytest.fixture
def cupy():
    reason = cupy_backend.available()
    if reason is not None:
        pytest.skip(reason)
    import cupy

    return cupy


@pytest.mark.gpu
def test_auto_picks_cupy_where_it_sees_a_device(cupy, fresh_backend):
    chosen = arrays.backend()
    assert (chosen.name, chosen.xp, chosen.torch_device, chosen.why_not_gpu) == ("gpu", cupy, "cuda", None)


@pytest.mark.gpu
def test_normalization_on_cupy_is_numpy_to_float32_rounding(cupy):
    queries, keys, _ = head_like(d_head=64)
    expected = normalize_head(queries, keys)
    got = normalize_head(cupy.asarray(queries), cupy.asarray(keys))
    assert all(isinstance(array, cupy.ndarray) for array in (got[0], got[1], got[2].key_shift))
    for reference, value in zip((expected[0], expected[1], expected[2].key_shift), (got[0], got[1], got[2].key_shift)):
        assert np.abs(value.get() - reference).max() <= FP32_RELATIVE * np.abs(reference).max()
    assert got[2].scale == pytest.approx(expected[2].scale, rel=1e-6)
    points, record = head_points(cupy.asarray(queries), cupy.asarray(keys), ReduceConfig())
    reference, expected_record = head_points(queries, keys, ReduceConfig())
    assert isinstance(points, cupy.ndarray) and points.dtype == cupy.float32
    assert np.abs(points.get() - reference).max() <= FP32_RELATIVE
    assert record["scale_factor"] == pytest.approx(expected_record["scale_factor"], rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 2])
def test_nearest_on_cupy_finds_what_faiss_finds(cupy, dim):
    rng = np.random.default_rng(dim)
    reference = rng.normal(size=(20000, dim)).astype(np.float32)
    probes = reference[rng.choice(20000, 1000, replace=False)]
    got = arrays.nearest(cupy.asarray(reference), cupy.asarray(probes), 16)
    assert isinstance(got, cupy.ndarray)
    assert (got.get() == numpy_backend.nearest(reference, probes, 16)).mean() >= 0.999


@pytest.mark.gpu
def test_quality_metrics_on_cupy_equal_the_cpus(cupy):
    queries, keys, sequences = head_like(n_sequences=200, d_head=64)
    points, _ = head_points(queries, keys, ReduceConfig())
    cpu = load_backend("cpu")
    coords = cpu.pca(points, 2, 0)
    on_cpu = knn_preservation(points, coords, cpu)
    assert knn_preservation(cupy.asarray(points), cupy.asarray(coords), cpu) == pytest.approx(on_cpu, abs=1e-3)
    for mask_rule in ("causal", "bidirectional"):
        expected = attention_agreement(queries, keys, coords, sequences, 0.125, mask_rule)
        got = attention_agreement(cupy.asarray(queries), cupy.asarray(keys), cupy.asarray(coords), sequences, 0.125,
                                  mask_rule)
        assert got == expected


@pytest.mark.gpu
def test_head_measurements_on_cuda_equal_the_cpus(tiny_models, text_file, tmp_path):
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract
    from pipeline.heads import measure_run
    from pipeline.store import open_run

    extract(ExtractConfig(model=tiny_models["llama"], data=text_file, out=str(tmp_path / "run"), dtype="float32",
                          batch_size=3, device="cpu", threads=1))
    run = open_run(str(tmp_path / "run"))
    (on_cuda, top_cuda), (on_cpu, top_cpu) = (measure_run(run, run, device=device) for device in ("cuda", "cpu"))
    assert list(on_cuda.columns) == list(on_cpu.columns)
    assert len(on_cuda) == len(on_cpu) == len(run.layers) * run.n_heads
    for column in on_cpu.columns:
        for a, b in zip(on_cuda[column], on_cpu[column]):
            assert (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-4, (column, a, b)
    np.testing.assert_allclose(top_cuda["score"], top_cpu["score"], atol=1e-4)


@pytest.mark.gpu
def test_rasters_aggregated_from_cudf_frames_equal_the_cpus(cupy):
    """The head view's frames in cuDF: datashader aggregates on the GPU; every aggregate (the
    grid, each colour category's counts, the hover index) and the drawn image equal the CPU's."""
    import datashader as ds

    cudf = pytest.importorskip("cudf")
    from viz.data import colouring
    from viz.raster import HeadRaster, aggregate, head_points, point_frame
    from workflows.bench.serve import _ranges, synthetic_coords

    coords = synthetic_coords(400_000)
    tokens = pd.DataFrame({"pos_norm": np.linspace(0, 1, 200_000, dtype=np.float32)})
    mode = colouring("position", tokens)
    rasters = {}
    for name in ("cpu", "gpu"):
        points = head_points(coords, name)
        rasters[name] = HeadRaster(coords, mode, points=points, frame=point_frame(coords, mode, points, name))
    assert isinstance(rasters["gpu"].frame, cudf.DataFrame) and isinstance(rasters["cpu"].frame, pd.DataFrame)
    np.testing.assert_array_equal(rasters["cpu"].points.grid, rasters["gpu"].points.grid)
    for x_range, y_range in _ranges(coords, 4):
        canvas = ds.Canvas(plot_width=320, plot_height=240, x_range=x_range, y_range=y_range)
        cpu, gpu = (aggregate(canvas, rasters[name].frame, ds.count_cat("c")) for name in ("cpu", "gpu"))
        assert isinstance(gpu.data, np.ndarray)
        np.testing.assert_array_equal(cpu.data, gpu.data)
        np.testing.assert_array_equal(*(rasters[name].index_raster(x_range, y_range, 320, 240) for name in rasters))
        images = [np.asarray(rasters[name].element(x_range, y_range, 320, 240).data) for name in rasters]
        np.testing.assert_array_equal(*images)

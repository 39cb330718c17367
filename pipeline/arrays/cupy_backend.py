"""GPU array backend: CuPy, and cuDF where it imports (`pip install 'qkatlas[gpu]'`).

Written against an array module `xp` (CuPy by default), so that the same code runs, and is
tested, with NumPy on a machine without a GPU."""

from __future__ import annotations

from types import ModuleType

from pipeline.arrays import stable_argsort

name = "gpu"
torch_device = "cuda"
BLOCK_ELEMENTS = 1 << 27  # distances per block of probes: 512 MB of float32
CANDIDATES = 4  # k * this nearest by the float32 expansion, then re-ranked exactly


def available() -> str | None:
    try:
        import cupy
    except ImportError as error:
        return f"CuPy is not installed ({error.name}); pip install 'qkatlas[gpu]'"
    except Exception as error:  # noqa: BLE001 - a broken CUDA install raises anything on import
        return f"CuPy does not import ({type(error).__name__}: {error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - CUDARuntimeError, or a missing driver library
        return f"no CUDA device is visible ({type(error).__name__}: {error})"
    return None if count > 0 else "no CUDA device is visible"


def array_module() -> ModuleType:
    import cupy

    return cupy


def frame_module() -> ModuleType:
    try:
        import cudf

        return cudf
    except Exception:  # noqa: BLE001 - cuDF missing or broken: tables stay in pandas
        import pandas

        return pandas


def from_pandas(frame):
    """A cuDF copy of pandas `frame` (categoricals stay categorical), or `frame` where cuDF does
    not import."""
    frames = frame_module()
    return frames.from_pandas(frame) if frames.__name__ == "cudf" else frame


def nearest(reference, probes, k: int, xp: ModuleType | None = None, block_elements: int = BLOCK_ELEMENTS):
    """[m, k] indices of each probe's k nearest reference rows, by brute force in blocks of
    probes: the `CANDIDATES * k` nearest by |r|^2 - 2 p.r in float32, re-ranked by direct float64
    differences (exact to float64 rounding, unlike the float32 expansion alone), ties to the
    lower index; -1 where the reference has fewer than k rows, as faiss does."""
    if xp is None:
        xp = array_module()
    reference = xp.asarray(reference, dtype=xp.float32)
    probes = xp.asarray(probes, dtype=xp.float32)
    n = len(reference)
    kept = min(k, n)
    n_candidates = min(n, CANDIDATES * k)
    squared_norms = (reference * reference).sum(axis=1)
    rows = max(1, block_elements // max(n, 1))
    found = []
    for start in range(0, len(probes), rows):
        block = probes[start:start + rows]
        coarse = squared_norms[None, :] - 2 * (block @ reference.T)  # |p - r|^2 - |p|^2
        if n_candidates < n:
            candidates = xp.argpartition(coarse, n_candidates - 1, axis=1)[:, :n_candidates]
        else:
            candidates = xp.broadcast_to(xp.arange(n), coarse.shape)
        difference = reference[candidates].astype(xp.float64) - block[:, None, :].astype(xp.float64)
        distances = (difference * difference).sum(axis=2)
        by_index = stable_argsort(candidates, axis=1)
        candidates = xp.take_along_axis(candidates, by_index, axis=1)
        by_distance = stable_argsort(xp.take_along_axis(distances, by_index, axis=1), axis=1)
        found.append(xp.take_along_axis(candidates, by_distance[:, :kept], axis=1))
    indices = xp.concatenate(found) if found else xp.zeros((0, kept), dtype=xp.int64)
    if kept < k:
        indices = xp.concatenate([indices, xp.full((len(indices), k - kept), -1, dtype=indices.dtype)], axis=1)
    return indices

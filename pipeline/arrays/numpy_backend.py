"""CPU array backend: NumPy and pandas; exact nearest neighbours with faiss."""

from __future__ import annotations

from types import ModuleType

import numpy as np

name = "cpu"
torch_device = "cpu"


def available() -> str | None:
    return None


def array_module() -> ModuleType:
    return np


def frame_module() -> ModuleType:
    import pandas

    return pandas


def from_pandas(frame):
    return frame


def nearest(reference: np.ndarray, probes: np.ndarray, k: int) -> np.ndarray:
    """[m, k] indices of each probe's k nearest reference rows (faiss exact L2 search; -1 where
    the reference has fewer than k rows)."""
    import faiss

    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(np.ascontiguousarray(reference, np.float32))
    _, indices = index.search(np.ascontiguousarray(probes, np.float32), k)
    return indices

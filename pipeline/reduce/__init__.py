"""Per-head joint projections of queries and keys, one module per array backend.

Like datashader's `data_libraries`, each backend module (`cpu`, `gpu`) offers the same small
set of functions on plain arrays:

    available() -> str | None            why it cannot run here, or None
    pca(points, dim, seed)               -> coords [n, dim]
    umap(points, dim, params, seed, init=None, neighbours=None, n_epochs=None, learning_rate=1.0,
         negative_sample_rate=None)      -> coords        (init: refine that layout as it is)
    tsne(points, dim, params, seed)      -> coords        (raises Unsupported for a combination)
    knn(reference, queries, k)           -> (distances [m, k], indices [m, k])
    knn_graph(points, k, cells)          -> (distances [n, k], indices [n, k]): each point's k
                                            nearest points; cells [n, P]: its nearest sample points

`pick_backend` chooses once per process: the GPU where cuML imports and a device is visible,
the CPU otherwise. `pipeline.reduce.project` builds the per-head stage on top.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType

from pipeline.errors import QkatlasError

BACKENDS = {"cpu": "pipeline.reduce.cpu", "gpu": "pipeline.reduce.gpu"}
METHODS = ("pca", "umap", "tsne")


class BackendError(QkatlasError, RuntimeError):
    """A backend that was asked for cannot run on this machine."""


class Unsupported(NotImplementedError):
    """This backend cannot do this (method, dim); the caller falls back and records it."""


@lru_cache(maxsize=None)
def load_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from: auto, {', '.join(BACKENDS)}")
    module = importlib.import_module(BACKENDS[name])
    reason = module.available()
    if reason is not None:
        raise BackendError(f"backend {name!r} cannot run here: {reason}")
    return module


def pick_backend(requested: str = "auto") -> ModuleType:
    """`auto`: the GPU backend where it can run, else the CPU one."""
    if requested != "auto":
        return load_backend(requested)
    try:
        return load_backend("gpu")
    except BackendError:
        return load_backend("cpu")

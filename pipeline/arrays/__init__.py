"""The process's array backend, chosen once: NumPy/pandas on the CPU, CuPy (and cuDF where it
imports) on a GPU. One module per backend, as `pipeline.reduce` and datashader's
`data_libraries` do; each offers:

    name                      "cpu" | "gpu"
    available() -> str | None why it cannot run here, or None
    array_module()            numpy | cupy
    frame_module()            pandas | cudf (pandas where cuDF does not import)
    from_pandas(frame)        the frame in that library: a cuDF copy on the GPU, itself on the CPU
    torch_device              "cpu" | "cuda": where torch math (head measurements) runs
    nearest(reference, probes, k) -> [m, k] indices of each probe's k nearest reference rows

`backend()` picks once per process: the GPU where CuPy imports and a CUDA device is visible,
the CPU otherwise; `QKATLAS_ARRAYS=cpu|gpu` forces one. Library functions take arrays of
either kind and return the same kind: they find their array module with `array_module(...)`
from their inputs, so the caller decides where data lives (`backend().xp.asarray(...)`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import numpy as np

from pipeline.errors import QkatlasError

BACKENDS = {"cpu": "pipeline.arrays.numpy_backend", "gpu": "pipeline.arrays.cupy_backend"}
ENVIRONMENT = "QKATLAS_ARRAYS"


class ArraysError(QkatlasError, RuntimeError):
    """The array backend that was asked for cannot run here."""


@dataclass(frozen=True)
class Backend:
    name: str  # "cpu" | "gpu"
    xp: ModuleType  # numpy | cupy
    frames: ModuleType  # pandas | cudf
    torch_device: str  # "cpu" | "cuda"
    why_not_gpu: str | None  # why the CPU was chosen; None on the GPU


def choose(requested: str, gpu_unavailable: Callable[[], str | None]) -> tuple[str, str | None]:
    """(backend name, why not the GPU) for a requested `auto|cpu|gpu`; `gpu_unavailable()` says
    why the GPU backend cannot run here, or None. Forcing `cpu` never probes the GPU."""
    if requested not in ("auto", "cpu", "gpu"):
        raise ArraysError(f"{ENVIRONMENT}={requested!r} is not a backend: set it to auto, cpu or gpu")
    if requested == "cpu":
        return "cpu", f"{ENVIRONMENT}=cpu"
    reason = gpu_unavailable()
    if reason is None:
        return "gpu", None
    if requested == "gpu":
        raise ArraysError(f"{ENVIRONMENT}=gpu, but the GPU array backend cannot run here: {reason}; "
                          f"unset {ENVIRONMENT} or set it to cpu")
    return "cpu", reason


@lru_cache(maxsize=1)
def backend() -> Backend:
    """This process's backend, from `QKATLAS_ARRAYS` (default auto), decided on the first call."""
    from pipeline.arrays import cupy_backend

    requested = os.environ.get(ENVIRONMENT, "auto").strip().lower() or "auto"
    name, why_not_gpu = choose(requested, cupy_backend.available)
    module = importlib.import_module(BACKENDS[name])
    return Backend(name, module.array_module(), module.frame_module(), module.torch_device, why_not_gpu)


def is_device_array(array) -> bool:
    """A CuPy array (checked without importing CuPy)."""
    return type(array).__module__.split(".")[0] == "cupy"


def array_module(*arrays) -> ModuleType:
    """cupy where any of `arrays` is a CuPy array, else numpy (`cupy.get_array_module`, without
    importing CuPy on the CPU path)."""
    if any(is_device_array(array) for array in arrays):
        import cupy

        return cupy.get_array_module(*arrays)
    return np


def stable_argsort(values, axis: int = -1):
    """Indices that sort `values`, ties in their original order, on NumPy or CuPy (whose
    argsort is always stable and, in older versions, takes no `kind`)."""
    if is_device_array(values):
        return values.argsort(axis=axis)
    return np.argsort(values, axis=axis, kind="stable")


def to_host(array) -> np.ndarray:
    return array.get() if is_device_array(array) else np.asarray(array)


def backend_frame(frame, name: str | None = None):
    """A pandas `frame` where backend `name` ("cpu" | "gpu"; default: the process's) computes on
    frames: a cuDF copy on the GPU backend where cuDF imports (datashader then aggregates it on
    the device), `frame` itself otherwise."""
    return importlib.import_module(BACKENDS[name or backend().name]).from_pandas(frame)


def nearest(reference, probes, k: int):
    """[m, k] indices of the k nearest (Euclidean) `reference` rows of each `probes` row, exact,
    in the module of the inputs: faiss on NumPy arrays, brute force on CuPy ones."""
    if is_device_array(reference) or is_device_array(probes):
        from pipeline.arrays import cupy_backend

        return cupy_backend.nearest(reference, probes, k)
    from pipeline.arrays import numpy_backend

    return numpy_backend.nearest(reference, probes, k)

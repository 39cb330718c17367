"""GPU backend: CuPy + cuML (`pip install 'qkatlas[gpu]'`). Arrays go to the device once per
call and come back as NumPy; everything else is shared with the CPU path."""

from __future__ import annotations

import numpy as np

from pipeline.reduce import Unsupported

name = "gpu"


def available() -> str | None:
    try:
        import cupy
        import cuml  # noqa: F401
    except ImportError as error:
        return f"cuML/CuPy are not installed ({error.name}); pip install 'qkatlas[gpu]'"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except cupy.cuda.runtime.CUDARuntimeError as error:
        return f"no CUDA device is visible ({error})"
    return None


def _host(array) -> np.ndarray:
    import cupy

    return cupy.asnumpy(array).astype(np.float32)


def pca(points: np.ndarray, dim: int, seed: int) -> np.ndarray:
    import cupy
    from cuml.decomposition import PCA

    return _host(PCA(n_components=dim, random_state=seed).fit_transform(cupy.asarray(points, dtype=cupy.float32)))


def umap(points: np.ndarray, dim: int, params: dict, seed: int | None, init: np.ndarray | None = None,
         neighbours: tuple[np.ndarray, np.ndarray] | None = None, n_epochs: int | None = None,
         learning_rate: float = 1.0, negative_sample_rate: int | None = None) -> np.ndarray:
    """As the CPU backend's: `init` is refined from where it is (cuML takes an array `init`;
    releases that take only 'spectral' or 'random' raise Unsupported, and the caller keeps the
    unrefined layout); `neighbours` (distances, indices) goes to cuML as `precomputed_knn`."""
    import cupy
    from cuml.manifold import UMAP

    options = dict(n_components=dim, n_neighbors=params["n_neighbors"], min_dist=params["min_dist"],
                   metric="euclidean", negative_sample_rate=negative_sample_rate or params["negative_sample_rate"],
                   n_epochs=n_epochs or params.get("n_epochs"), learning_rate=learning_rate, random_state=seed,
                   build_algo="auto")
    if neighbours is not None:
        distances, indices = neighbours
        options["precomputed_knn"] = (cupy.asarray(indices[:, : params["n_neighbors"]]),
                                      cupy.asarray(distances[:, : params["n_neighbors"]], dtype=cupy.float32))
    if init is None:
        options["init"] = "spectral" if params["init"] == "spectral" else "random"
        return _host(UMAP(**options).fit_transform(cupy.asarray(points, dtype=cupy.float32)))
    try:
        model = UMAP(init=cupy.asarray(init, dtype=cupy.float32), **options)
        return _host(model.fit_transform(cupy.asarray(points, dtype=cupy.float32)))
    except (TypeError, ValueError) as why:
        raise Unsupported(f"this cuML UMAP takes no initial layout ({why})") from why


def tsne(points: np.ndarray, dim: int, params: dict, seed: int | None) -> np.ndarray:
    import cupy
    from cuml.manifold import TSNE

    if dim != 2:
        raise Unsupported("cuML t-SNE is 2-D only")
    model = TSNE(n_components=2, perplexity=params["perplexity"], max_iter=max(params["n_iter"], 300),
                 method="fft", metric="euclidean", random_state=seed)
    return _host(model.fit_transform(cupy.asarray(points, dtype=cupy.float32)))


def knn(reference: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import cupy
    from cuml.neighbors import NearestNeighbors

    model = NearestNeighbors(n_neighbors=k, metric="euclidean").fit(cupy.asarray(reference, dtype=cupy.float32))
    distances, indices = model.kneighbors(cupy.asarray(queries, dtype=cupy.float32))
    return cupy.asnumpy(distances).astype(np.float32), cupy.asnumpy(indices)


def knn_graph(points: np.ndarray, k: int, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each point's k nearest points, exact on the device (`cells`, the CPU backend's search
    partition, is not needed here)."""
    return knn(points, points, k)

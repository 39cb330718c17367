"""CPU backend: NumPy, scikit-learn, umap-learn, openTSNE, faiss."""

from __future__ import annotations

import os

import numpy as np

from pipeline.reduce import Unsupported

name = "cpu"


def available() -> str | None:
    return None


def _threads() -> int:
    return len(os.sched_getaffinity(0))


def pca(points: np.ndarray, dim: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=dim, random_state=seed).fit_transform(points).astype(np.float32)


def umap(points: np.ndarray, dim: int, params: dict, seed: int | None, init: np.ndarray | None = None,
         neighbours: tuple[np.ndarray, np.ndarray] | None = None, n_epochs: int | None = None) -> np.ndarray:
    """`neighbours` (distances, indices) [n, k]: the kNN graph, computed here with faiss when
    not given (umap-learn's own search is NN-descent, or below 4,096 points a pairwise matrix
    through a Python callable: both far slower); `init` starts the optimization from a given
    layout (used to refine an interpolated one)."""
    import warnings

    import umap as umap_learn

    options = dict(n_components=dim, n_neighbors=params["n_neighbors"], min_dist=params["min_dist"],
                   metric="euclidean", init=init if init is not None else params["init"],
                   n_epochs=n_epochs or params.get("n_epochs"),
                   negative_sample_rate=params["negative_sample_rate"], n_jobs=1 if seed is not None else _threads(),
                   random_state=seed, low_memory=True)
    distances, indices = neighbours if neighbours is not None else knn(points, points, params["n_neighbors"])
    options["precomputed_knn"] = (indices[:, : params["n_neighbors"]], distances[:, : params["n_neighbors"]], None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # we never call transform()
        return umap_learn.UMAP(**options).fit_transform(points).astype(np.float32)


def tsne(points: np.ndarray, dim: int, params: dict, seed: int | None) -> np.ndarray:
    if dim == 2:
        from openTSNE import TSNE

        embedding = TSNE(n_components=2, perplexity=min(params["perplexity"], (len(points) - 1) / 3),
                         n_iter=params["n_iter"], metric="euclidean", n_jobs=_threads(), random_state=seed)
        return np.asarray(embedding.fit(points), dtype=np.float32)
    if dim == 3:  # openTSNE's acceleration is 2-D only; scikit-learn's Barnes-Hut does 3-D
        from sklearn.manifold import TSNE

        perplexity = min(params["perplexity"], (len(points) - 1) / 3)
        return TSNE(n_components=3, perplexity=perplexity, max_iter=max(params["n_iter"], 250), init="pca",
                    random_state=seed, n_jobs=_threads()).fit_transform(points).astype(np.float32)
    raise Unsupported(f"t-SNE in {dim}-D")


def knn(reference: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean k nearest neighbours: exact for small references, faiss IVF (recall ~0.95) above."""
    import faiss

    reference = np.ascontiguousarray(reference, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    faiss.omp_set_num_threads(_threads())
    d = reference.shape[1]
    if len(reference) <= 50_000:
        index: faiss.Index = faiss.IndexFlatL2(d)
    else:
        n_lists = int(4 * np.sqrt(len(reference)))
        inverted = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, n_lists)
        rng = np.random.default_rng(0)
        inverted.train(reference[rng.choice(len(reference), min(len(reference), 40 * n_lists), replace=False)])
        inverted.nprobe = 8
        index = inverted
    index.add(reference)
    distances, indices = index.search(queries, k)
    return np.sqrt(np.maximum(distances, 0)), indices

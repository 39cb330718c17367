"""CPU backend: NumPy, scikit-learn, umap-learn, openTSNE, faiss, numba."""

from __future__ import annotations


import numba
import numpy as np
from dask.system import cpu_count

from pipeline.reduce import Unsupported

name = "cpu"

# Reference x query pairs up to which `knn` searches exhaustively; above it, faiss IVF.
EXACT_PAIRS = 1_000_000_000
IVF_PROBES = 4


def available() -> str | None:
    return None


def _threads() -> int:
    return cpu_count()


def pca(points: np.ndarray, dim: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=dim, random_state=seed).fit_transform(points).astype(np.float32)


def umap(points: np.ndarray, dim: int, params: dict, seed: int | None, init: np.ndarray | None = None,
         neighbours: tuple[np.ndarray, np.ndarray] | None = None, n_epochs: int | None = None,
         learning_rate: float = 1.0, negative_sample_rate: int | None = None) -> np.ndarray:
    """`neighbours` (distances, indices) [n, k]: the kNN graph, computed here with faiss when
    not given (umap-learn's own search is NN-descent, or below 4,096 points a pairwise matrix
    through a Python callable: both far slower). `init` [n, dim]: refine this layout as it is
    (umap-learn's UMAP would rescale it to a 10-unit box, which undoes the density the caller
    chose), starting at `learning_rate`."""
    distances, indices = neighbours if neighbours is not None else knn(points, points, params["n_neighbors"])
    distances, indices = distances[:, : params["n_neighbors"]], indices[:, : params["n_neighbors"]]
    negative_rate = negative_sample_rate or params["negative_sample_rate"]
    if init is not None:
        return _optimize(points, init, (distances, indices), params["min_dist"], seed, n_epochs or 30,
                         learning_rate, negative_rate)
    import warnings

    import umap as umap_learn

    options = dict(n_components=dim, n_neighbors=params["n_neighbors"], min_dist=params["min_dist"],
                   metric="euclidean", init=params["init"], n_epochs=n_epochs or params.get("n_epochs"),
                   learning_rate=learning_rate, negative_sample_rate=negative_rate,
                   n_jobs=1 if seed is not None else _threads(), random_state=seed, low_memory=True,
                   precomputed_knn=(indices, distances, None))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # we never call transform()
        return umap_learn.UMAP(**options).fit_transform(points).astype(np.float32)


def _optimize(points: np.ndarray, init: np.ndarray, neighbours: tuple[np.ndarray, np.ndarray], min_dist: float,
              seed: int | None, n_epochs: int, learning_rate: float, negative_sample_rate: int) -> np.ndarray:
    """umap-learn's fuzzy graph and SGD (the functions its UMAP class calls), from `init` as it is;
    serial and reproducible when `seed` is set, on every core otherwise."""
    from umap.layouts import optimize_layout_euclidean
    from umap.umap_ import find_ab_params, fuzzy_simplicial_set, make_epochs_per_sample

    distances, indices = neighbours
    random_state = np.random.RandomState(seed)
    graph, _, _ = fuzzy_simplicial_set(points, indices.shape[1], random_state, "euclidean",
                                       knn_indices=indices, knn_dists=distances)
    graph = graph.tocoo()
    graph.sum_duplicates()
    graph.data[graph.data < graph.data.max() / n_epochs] = 0.0  # as umap-learn: edges sampled < once per run
    graph.eliminate_zeros()
    a, b = find_ab_params(1.0, min_dist)
    embedding = np.array(init, dtype=np.float32, order="C")
    rng_state = random_state.randint(np.iinfo(np.int32).min + 1, np.iinfo(np.int32).max - 1, 3).astype(np.int64)
    return optimize_layout_euclidean(embedding, embedding, graph.row, graph.col, n_epochs, len(embedding),
                                     make_epochs_per_sample(graph.data, n_epochs), a, b, rng_state,
                                     initial_alpha=learning_rate, negative_sample_rate=negative_sample_rate,
                                     parallel=seed is None, move_other=True).astype(np.float32)


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
    """Euclidean k nearest neighbours: exhaustive up to EXACT_PAIRS reference x query pairs, else
    faiss IVF with sqrt(n) lists, IVF_PROBES of them searched (the 1.16 M points of MiniLM L2H3
    against a 20k sample: recall@10 0.93 in 5.7 CPU s, vs 0.98 in 8.7 s with 8 probed; the
    layouts built on either score alike)."""
    import faiss

    reference = np.ascontiguousarray(reference, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    faiss.omp_set_num_threads(_threads())
    d = reference.shape[1]
    if len(reference) * len(queries) <= EXACT_PAIRS:
        index: faiss.Index = faiss.IndexFlatL2(d)
    else:
        n_lists = max(1, int(np.sqrt(len(reference))))
        inverted = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, n_lists)
        inverted.cp.niter = 10
        rng = np.random.default_rng(0)
        inverted.train(reference[rng.choice(len(reference), min(len(reference), 50 * n_lists), replace=False)])
        inverted.nprobe = min(IVF_PROBES, n_lists)
        index = inverted
    index.add(reference)
    distances, indices = index.search(queries, k)
    return np.sqrt(np.maximum(distances, 0)), indices


def knn_graph(points: np.ndarray, k: int, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) [n, k]: each point's k nearest points (itself among them), searched
    in cells: `cells` [n, P] are each point's P nearest sample points, nearest first, and a point
    is compared with every point whose nearest sample point is one of its P. An IVF whose lists
    are the sample's Voronoi cells, so the interpolation's search is also the coarse quantizer.
    MiniLM L2H3 (1.16 M points, 20k sample): recall@10 0.79 at P = 8, 0.82 at P = 10 (~7 CPU s),
    where faiss IVF over all points takes 23 CPU s for 0.85 and 38 s for 0.92; layouts refined on
    graphs of recall 0.8 to 0.92 score alike. Missing neighbours (fewer than k candidates): -1."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    cells = np.ascontiguousarray(cells, dtype=np.int64)
    nearest_cell = cells[:, 0]
    by_cell = np.argsort(nearest_cell, kind="stable")
    starts = np.searchsorted(nearest_cell[by_cell], np.arange(int(cells.max()) + 2))
    previous = numba.get_num_threads()
    numba.set_num_threads(min(previous, _threads()))
    try:
        squared, indices = _search_cells(points[by_cell], by_cell, starts, cells, k)
    finally:
        numba.set_num_threads(previous)
    return np.sqrt(squared), indices


@numba.njit(parallel=True, fastmath=True, cache=True)  # compiled on the first call
def _search_cells(sorted_points, sorted_index, starts, cells, k):
    n, d = sorted_points.shape
    out_squared = np.full((n, k), np.inf, dtype=np.float32)
    out_indices = np.full((n, k), -1, dtype=np.int64)
    for rank in numba.prange(n):  # in cell order, so consecutive points scan the same cells
        point = sorted_index[rank]
        squared = np.full(k, np.inf, dtype=np.float32)
        found = np.full(k, -1, dtype=np.int64)
        for probe in range(cells.shape[1]):
            cell = cells[point, probe]
            if cell < 0:  # faiss's filler where it found fewer than P sample points
                continue
            for other in range(starts[cell], starts[cell + 1]):
                total = np.float32(0.0)
                for axis in range(d):
                    difference = sorted_points[rank, axis] - sorted_points[other, axis]
                    total += difference * difference
                if total < squared[k - 1]:
                    slot = k - 1
                    while slot > 0 and squared[slot - 1] > total:
                        squared[slot] = squared[slot - 1]
                        found[slot] = found[slot - 1]
                        slot -= 1
                    squared[slot] = total
                    found[slot] = sorted_index[other]
        out_squared[point] = squared
        out_indices[point] = found
    return out_squared, out_indices

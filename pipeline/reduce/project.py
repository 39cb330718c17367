"""The reduce stage: one head's normalized queries and keys -> a joint 2-D/3-D layout.

Per head: normalize (attention-preserving), stack [queries; keys] (2N points), L2-normalize
rows for the cosine metric, then project. A head above the backend's sample threshold is
fitted on a sample (queries and keys of the same tokens, spread evenly over the store, so
over sequences and positions); every other point is placed at the distance-weighted mean
of its nearest sample points, and on the CPU a UMAP layout is then refined by a short
optimization over the full kNN graph, which restores the local structure that plain
interpolation loses. Quality is measured on a sample and stored with the layout.
"""

from __future__ import annotations

import time
from types import ModuleType

import numpy as np

from pipeline.arrays import array_module, nearest, stable_argsort, to_host
from pipeline.config import ReduceConfig
from pipeline.normalize import normalize_head
from pipeline.reduce import Unsupported, load_backend

# Points above which a head is fitted on a sample, and the sample's size, per backend.
SAMPLE_DEFAULTS = {"cpu": {"umap": (50_000, 20_000), "tsne": (20_000, 10_000), "pca": (500_000, 200_000)},
                   "gpu": {"umap": (5_000_000, 2_000_000), "tsne": (2_000_000, 1_000_000),
                           "pca": (20_000_000, 2_000_000)}}
INTERPOLATION_NEIGHBOURS = 10


def head_points(queries, keys, config: ReduceConfig) -> tuple:
    """[2 * n_tokens, d_head] float32: normalized queries then keys, unit rows for the cosine
    metric; NumPy or CuPy in, the same kind out."""
    queries, keys, applied = normalize_head(queries, keys, config.translate_keys, config.scale_norms)
    xp = array_module(queries, keys)
    points = xp.concatenate([queries, keys]).astype(xp.float32)
    if config.metric == "cosine":
        points /= xp.maximum(xp.linalg.norm(points, axis=1, keepdims=True), xp.float32(1e-12))
    return points, {"translate_keys": config.translate_keys, "scale_norms": config.scale_norms,
                    "scale_factor": applied.scale, "metric": config.metric}


def sample_tokens(n_tokens: int, size: int, seed: int | None) -> np.ndarray:
    """`size` token indices spread evenly over the store (systematic sampling, random start)."""
    step = n_tokens / size
    start = np.random.default_rng(seed).uniform(0, step)
    return np.minimum((start + step * np.arange(size)).astype(np.int64), n_tokens - 1)


def _fit(backend: ModuleType, method: str, points: np.ndarray, dim: int, config: ReduceConfig) -> np.ndarray:
    if method == "pca":
        return backend.pca(points, dim, config.seed or 0)
    if method == "umap":
        return backend.umap(points, dim, config.umap.model_dump(), config.seed)
    return backend.tsne(points, dim, config.tsne.model_dump(), config.seed)


def _interpolate(backend: ModuleType, sample_points, sample_coords, points) -> np.ndarray:
    distances, indices = backend.knn(sample_points, points, INTERPOLATION_NEIGHBOURS)
    weights = 1.0 / (distances + 1e-3)
    weights /= weights.sum(axis=1, keepdims=True)
    return (sample_coords[indices] * weights[..., None]).sum(axis=1).astype(np.float32)


def project_points(points: np.ndarray, method: str, dim: int, config: ReduceConfig,
                   backend: ModuleType) -> tuple[np.ndarray, dict]:
    """Project [queries; keys] points; fall back to the CPU where the backend cannot."""
    record: dict = {"backend": backend.name}
    threshold, size = SAMPLE_DEFAULTS[backend.name][method]
    threshold = config.sample_threshold or threshold
    size = min(config.sample_size or size, threshold)
    n_points = len(points)
    try:
        if n_points <= threshold or method == "pca":
            if method == "pca" and n_points > threshold:  # PCA is linear: fit on a sample, apply exactly
                record["placement"] = "exact"
            coords = _fit(backend, method, points, dim, config)
            record["sampled"] = False
            return coords, record
        n_tokens = n_points // 2
        tokens = sample_tokens(n_tokens, size // 2, config.seed)
        sample = np.concatenate([tokens, tokens + n_tokens])  # queries and keys of the same tokens
        sample_coords = _fit(backend, method, points[sample], dim, config)
        coords = _interpolate(backend, points[sample], sample_coords, points)
        coords[sample] = sample_coords
        record.update(sampled=True, sample_size=int(len(sample)), placement="nearest-neighbour interpolation")
        if method == "umap" and config.refine_epochs > 0:
            try:
                graph = backend.knn(points, points, config.umap.n_neighbors)
                coords = backend.umap(points, dim, config.umap.model_dump(), config.seed, init=coords, neighbours=graph,
                                      n_epochs=config.refine_epochs)
                record["placement"] += f" + {config.refine_epochs} UMAP epochs over the full kNN graph"
            except Unsupported as why:
                record["refine_skipped"] = str(why)
        return coords, record
    except Unsupported as why:
        if backend.name == "cpu":
            raise
        coords, fallback = project_points(points, method, dim, config, load_backend("cpu"))
        return coords, dict(fallback, fallback=f"{why}; ran on the CPU backend")


# --- quality -------------------------------------------------------------------------------


def knn_preservation(points, coords, backend: ModuleType, k: int = 15, n_probe: int = 1000,
                     seed: int = 0) -> float:
    """Mean fraction of a point's k nearest neighbours in the normalized space that are also
    among its k nearest in the projection (exact search, sampled probes). NumPy arrays are
    searched with faiss, CuPy arrays by brute force on the device (`pipeline.arrays.nearest`);
    the probes are drawn on the host, so both search the same points. `backend` (the reduce
    backend) is not used: the arrays' kind decides."""
    xp = array_module(points, coords)
    points, coords = xp.asarray(points, dtype=xp.float32), xp.asarray(coords, dtype=xp.float32)
    probe = np.random.default_rng(seed).choice(len(points), min(n_probe, len(points)), replace=False)
    high = _neighbours_excluding_self(points, probe, k)
    low = _neighbours_excluding_self(coords, probe, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(high, low)]))


def _neighbours_excluding_self(reference, probe: np.ndarray, k: int) -> list[list[int]]:
    xp = array_module(reference)
    indices = to_host(nearest(reference, reference[xp.asarray(probe)], k + 1)).tolist()
    return [[i for i in row if i != p][:k] for row, p in zip(indices, probe.tolist())]


def attention_agreement(queries, keys, coords, sequences: np.ndarray, scale: float, mask_rule: str,
                        top: int = 5, n_probe: int = 300, seed: int = 0) -> dict:
    """For sampled queries: the share of the `top` keys they attend to most (in their own
    sequence) that are among their `top` nearest keys in the projection; with chance level.

    `queries`, `keys` [n_tokens, d_head] and `coords` [2 * n_tokens, dim], NumPy or CuPy;
    `sequences` [n_sequences, 2] (token_offset, n_tokens) on the host, where the probes are
    drawn. Keys are ranked by their float64 score (softmax is monotone) and by their float64
    squared distance, summed in a fixed order, ties to the earlier position, so that NumPy and
    CuPy rank alike."""
    xp = array_module(queries, keys, coords)
    queries, keys, coords = xp.asarray(queries), xp.asarray(keys), xp.asarray(coords)
    n_tokens = len(queries)
    starts, lengths = sequences[:, 0], sequences[:, 1]
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(lengths > 2 * top)
    if len(eligible) == 0:
        return {"attention_agreement": None, "attention_chance": None}
    hits, chance = [], []
    for seq in rng.choice(eligible, min(n_probe, len(eligible)), replace=True):
        start, length = int(starts[seq]), int(lengths[seq])
        low = 2 * top if mask_rule == "causal" else 0
        pos = int(rng.integers(low, length))
        n_visible = pos + 1 if mask_rule == "causal" else length
        visible_keys = keys[start:start + n_visible].astype(xp.float64)
        scores = (visible_keys @ queries[start + pos].astype(xp.float64)) * scale
        attended = stable_argsort(-scores)[:top]
        offsets = coords[n_tokens + start:n_tokens + start + n_visible].astype(xp.float64) - \
            coords[start + pos].astype(xp.float64)
        squared = sum(offsets[:, axis] * offsets[:, axis] for axis in range(offsets.shape[1]))  # fixed order
        nearest_keys = stable_argsort(squared)[:top]
        hits.append((attended[:, None] == nearest_keys[None, :]).any(axis=1).sum())
        chance.append(top / n_visible)
    return {"attention_agreement": float(to_host(xp.stack(hits)).mean() / top),
            "attention_chance": float(np.mean(chance))}


# --- the stage -----------------------------------------------------------------------------


def head_tasks(run, config: ReduceConfig) -> list[tuple[str, int, int, int]]:
    """Every (method, dim, layer, head) the config asks for, validated against the run."""
    layers = config.layers if config.layers is not None else run.layers
    heads = config.heads if config.heads is not None else list(range(run.n_heads))
    bad_layers = [layer for layer in layers if layer not in run.layers]
    if bad_layers:
        raise ValueError(f"layers {bad_layers} are not stored in {run.dir.url} (stored: {run.layers})")
    bad_heads = [head for head in heads if not 0 <= head < run.n_heads]
    if bad_heads:
        raise ValueError(f"heads {bad_heads} out of range: the run has {run.n_heads} query heads")
    return [(method, dim, layer, head) for method in config.methods for dim in config.dims
            for layer in layers for head in heads]


def reduce_head(run, method: str, dim: int, layer: int, head: int, config: ReduceConfig,
                backend: ModuleType) -> dict:
    """Project one head and write it into the run; returns its record. Shares no state with
    other heads, so heads can run in parallel."""
    from pipeline.store import write_projection

    began = time.perf_counter()
    queries, keys = run.queries(layer, head), run.keys(layer, head)
    points, normalization = head_points(queries, keys, config)
    coords, record = project_points(points, method, dim, config, backend)
    seconds = time.perf_counter() - began
    sequences = run.sequences()[["token_offset", "n_tokens"]].to_numpy()
    quality = {"knn_preservation": knn_preservation(points, coords, backend),
               **attention_agreement(queries, keys, coords, sequences, run.scale(layer), run.mask_rule)}
    params = {"umap": config.umap.model_dump(), "tsne": config.tsne.model_dump(), "pca": {}}[method]
    record.update(n_points=len(points), seconds=round(seconds, 3), quality=quality, normalization=normalization,
                  params=params, seed=config.seed)
    write_projection(run.dir, method, dim, layer, head, coords, record)
    return record


def reduce_run(run_url: str, config: ReduceConfig, overwrite: bool = False, on_head=None) -> dict:
    """Project every selected head not already committed (or whose projection is damaged);
    returns counts and timings. Holds the run's write lock."""
    from pipeline.reduce import pick_backend
    from pipeline.regions import commit_regions
    from pipeline.store import open_run, projection_damage, writing

    with writing(run_url, "qkatlas reduce"):
        run = open_run(run_url)
        backend = pick_backend(config.backend)
        tasks = head_tasks(run, config)
        done = {} if overwrite else {task: record for task, record in run.projection_records().items()
                                     if projection_damage(run.dir, record) is None}
        todo = [task for task in tasks if task not in done]
        began = time.perf_counter()
        for task in todo:
            record = reduce_head(run, *task, config, backend)
            if task[1] == 2:
                commit_regions(run, task[0], task[2], task[3])
            if on_head is not None:
                on_head(task, record)
    return {"backend": backend.name, "tasks": len(tasks), "done_before": len(tasks) - len(todo),
            "projected": len(todo), "seconds": round(time.perf_counter() - began, 3)}

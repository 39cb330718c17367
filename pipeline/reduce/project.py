"""The reduce stage: one head's normalized queries and keys -> a joint 2-D/3-D layout.

Per head: normalize (attention-preserving), stack [queries; keys] (2N points), L2-normalize
rows for the cosine metric, then project. A head above the backend's sample threshold is
fitted on a sample (queries and keys of the same tokens, spread evenly over the store, so
over sequences and positions); every other point is placed at the distance-weighted mean
of its nearest sample points. A UMAP layout is then scaled so that its points are as dense
as the sample fit's (UMAP's own equilibrium, so the refinement need not expand the layout)
and refined by a few gentle UMAP epochs over the full kNN graph, which restores the local
structure that plain interpolation loses. The search for each point's nearest sample points
serves twice: for the interpolation and as the coarse partition of the full kNN graph's
search. Quality is measured on a sample and stored with the layout.
"""

from __future__ import annotations

import time
from types import ModuleType

import numpy as np

from pipeline.arrays import array_module, nearest, stable_argsort, to_host
from pipeline.config import ConfigError, ReduceConfig
from pipeline.normalize import normalize_head
from pipeline.reduce import Unsupported, load_backend

# Points above which a head is fitted on a sample, and the sample's size, per backend.
SAMPLE_DEFAULTS = {"cpu": {"umap": (50_000, 20_000), "tsne": (20_000, 10_000), "pca": (500_000, 200_000)},
                   "gpu": {"umap": (5_000_000, 2_000_000), "tsne": (2_000_000, 1_000_000),
                           "pca": (20_000_000, 2_000_000)}}
INTERPOLATION_NEIGHBOURS = 10
GRAPH_CELLS = 8  # nearest sample points whose cells the kNN graph's search scans (recall@10 ~0.79)


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


def interpolate(sample_coords: np.ndarray, near_sample: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[n, dim]: each point at the distance-weighted mean of its nearest sample points' coords;
    `near_sample` (distances, indices) [n, >= INTERPOLATION_NEIGHBOURS], nearest first."""
    distances, indices = (part[:, :INTERPOLATION_NEIGHBOURS] for part in near_sample)
    weights = 1.0 / (distances + 1e-3)
    weights /= weights.sum(axis=1, keepdims=True)
    return (sample_coords[indices] * weights[..., None]).sum(axis=1).astype(np.float32)


def _memo(shared: dict | None, key: tuple, compute):
    """`compute()`, kept in `shared` under `key` when a caller shares one head's work between
    methods and dims."""
    if shared is None:
        return compute()
    if key not in shared:
        shared[key] = compute()
    return shared[key]


def project_points(points: np.ndarray, method: str, dim: int, config: ReduceConfig,
                   backend: ModuleType, shared: dict | None = None) -> tuple[np.ndarray, dict]:
    """Project [queries; keys] points; fall back to the CPU where the backend cannot. `shared`
    (a dict per head, optional): the sample, its neighbour search and the kNN graph are kept
    there and reused by the head's other methods and dims."""
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
        sample = _memo(shared, ("sample", backend.name, size), lambda: sample_points(n_points // 2, size, config.seed))
        sample_coords = _fit(backend, method, points[sample], dim, config)
        near_sample = _memo(shared, ("near sample", backend.name, size),
                            lambda: backend.knn(points[sample], points, max(INTERPOLATION_NEIGHBOURS, GRAPH_CELLS)))
        coords = interpolate(sample_coords, near_sample)
        coords[sample] = sample_coords
        record.update(sampled=True, sample_size=int(len(sample)), placement="nearest-neighbour interpolation")
        if method == "umap" and config.refine_epochs > 0:
            try:
                graph = _memo(shared, ("graph", backend.name, size, config.umap.n_neighbors),
                              lambda: backend.knn_graph(points, config.umap.n_neighbors,
                                                        near_sample[1][:, :GRAPH_CELLS]))
                coords, how = _refine(backend, points, coords, len(sample), graph, config)
                record["placement"] += how
            except Unsupported as why:
                record["refine_skipped"] = str(why)
        return coords, record
    except Unsupported as why:
        if backend.name == "cpu":
            raise
        coords, fallback = project_points(points, method, dim, config, load_backend("cpu"), shared)
        return coords, dict(fallback, fallback=f"{why}; ran on the CPU backend")


def _refine(backend: ModuleType, points: np.ndarray, coords: np.ndarray, n_sample: int, graph: tuple,
            config: ReduceConfig) -> tuple[np.ndarray, str]:
    """A few UMAP epochs over the full kNN graph from the interpolated layout, first scaled by
    (n / n_sample)^(1/dim) so that it is as dense as the sample fit, whose density UMAP's own
    optimization set: the epochs then only arrange each neighbourhood, at a low learning rate
    that keeps the sample's global layout (MiniLM L2H3, 1.16 M points: kNN preservation 0.13-0.14
    after 15 epochs at rate 0.2, vs 0.08 after 70 epochs at rate 1 on the unscaled layout)."""
    dim = coords.shape[1]
    density_scale = (len(points) / n_sample) ** (1 / dim)
    refined = backend.umap(points, dim, config.umap.model_dump(), config.seed, init=coords * density_scale,
                           neighbours=graph, n_epochs=config.refine_epochs, learning_rate=config.refine_learning_rate,
                           negative_sample_rate=config.refine_negative_sample_rate)
    return refined, (f" + {config.refine_epochs} UMAP epochs over the full kNN graph (layout scaled "
                     f"x{density_scale:.2f} to the sample fit's density, learning rate {config.refine_learning_rate})")


def sample_points(n_tokens: int, size: int, seed: int | None) -> np.ndarray:
    """Point indices of `size // 2` sampled tokens: their queries, then their keys."""
    tokens = sample_tokens(n_tokens, size // 2, seed)
    return np.concatenate([tokens, tokens + n_tokens])


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


def chosen_heads(layers: list[int] | None, heads: list[int] | None, stored_layers: list[int], n_heads: int,
                 section: str, where: str) -> tuple[list[int], list[int]]:
    """The layers and query heads a config `section` asks for (None: all), checked against what
    is stored `where`; a ConfigError names the section's key otherwise."""
    layers = list(stored_layers) if layers is None else layers
    heads = list(range(n_heads)) if heads is None else heads
    bad_layers = [layer for layer in layers if layer not in stored_layers]
    if bad_layers:
        raise ConfigError(f"{section}.layers {bad_layers} are not stored in {where} (stored: {list(stored_layers)})")
    bad_heads = [head for head in heads if not 0 <= head < n_heads]
    if bad_heads:
        raise ConfigError(f"{section}.heads {bad_heads} out of range: {where} has {n_heads} query heads")
    return layers, heads


def head_tasks(run, config: ReduceConfig) -> list[tuple[str, int, int, int]]:
    """Every (method, dim, layer, head) the config asks for, validated against the run."""
    layers, heads = chosen_heads(config.layers, config.heads, run.layers, run.n_heads, "reduce", run.dir.url)
    return [(method, dim, layer, head) for method in config.methods for dim in config.dims
            for layer in layers for head in heads]


def reduce_head(run, method: str, dim: int, layer: int, head: int, config: ReduceConfig,
                backend: ModuleType, shared: dict | None = None) -> dict:
    """Project one head and write it into the run; returns its record. `shared` (optional, one
    dict per head): the head's points and neighbour searches, reused by its other methods and
    dims; without it, shares no state with other heads, so heads can run in parallel."""
    from pipeline.store import write_projection

    began = time.perf_counter()
    queries, keys, points, normalization = _memo(shared, ("points",), lambda: _load_head(run, layer, head, config))
    coords, record = project_points(points, method, dim, config, backend, shared)
    seconds = time.perf_counter() - began
    sequences = run.sequences()[["token_offset", "n_tokens"]].to_numpy()
    quality = {"knn_preservation": knn_preservation(points, coords, backend),
               **attention_agreement(queries, keys, coords, sequences, run.scale(layer), run.mask_rule)}
    params = {"umap": config.umap.model_dump(), "tsne": config.tsne.model_dump(), "pca": {}}[method]
    record.update(n_points=len(points), seconds=round(seconds, 3), quality=quality, normalization=normalization,
                  params=params, seed=config.seed)
    write_projection(run.dir, method, dim, layer, head, coords, record)
    return record


def _load_head(run, layer: int, head: int, config: ReduceConfig) -> tuple:
    queries, keys = run.queries(layer, head), run.keys(layer, head)
    return (queries, keys, *head_points(queries, keys, config))


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
        todo = sorted((task for task in tasks if task not in done), key=lambda task: (task[2], task[3]))
        began = time.perf_counter()
        shared: dict = {}
        for index, task in enumerate(todo):
            if index and task[2:] != todo[index - 1][2:]:
                shared = {}  # a new head: drop the last one's points and graphs
            record = reduce_head(run, *task, config, backend, shared)
            if task[1] == 2:
                commit_regions(run, task[0], task[2], task[3])
            if on_head is not None:
                on_head(task, record)
    return {"backend": backend.name, "tasks": len(tasks), "done_before": len(tasks) - len(todo),
            "projected": len(todo), "seconds": round(time.perf_counter() - began, 3)}

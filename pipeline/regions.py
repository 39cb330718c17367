"""Labelled regions of one head's 2-D layout, at a few scales, for the head view's labels.

At corpus scale a head's layout shows clusters: tokens its queries and keys treat alike. This
module finds them and names each by the tokens that set it apart, so the head view can draw
names on the map, coarse when zoomed out and finer as the user zooms in (the labels that
embedding-atlas draws from a density estimate of its map, and that its users ask to refine
with zoom, their issue #14).

- Regions: HDBSCAN (`fast-hdbscan`) on the 2-D layout. Its cluster tree depends only on
  `min_samples`, so it is built once (see `spanning_tree`) and cut at each scale, with
  clusters of at least `scales[s]` of the points: scale 0 (coarse) keeps the most persistent
  ones (HDBSCAN's excess-of-mass selection, which does not split a plain blob), finer scales
  take the leaves of the cluster tree, which split what the coarse scale keeps whole (the
  excess of mass at finer settings is not monotone: on a real UMAP head it merged 96% of the
  points into one region). Points in no region are HDBSCAN's noise: the sparse ground
  between clusters, about 40% of a UMAP head.
- Large heads: the clustering is fitted on `max_points` points sampled uniformly (seeded);
  regions, labels, anchors, sizes and query shares are those of the sample, with `n_points`
  scaled up to the whole head. A uniform sample of 50k keeps every region of at least a few
  hundred points of a million, which is all a label can name.
- Label: c-TF-IDF (Grootendorst, BERTopic 2022) of the region's tokens against the head's
  whole token set: for term t and region c, `tf(t, c) / |c| * log(1 + A / f(t))`, where `f(t)`
  is t's count over every point of the head (of the sample, for a large head) and A the mean
  region size. Terms are tokens with
  word-piece marks removed (`##`, `Ġ`, `▁`) and lower-cased; the label is the best term and up
  to two more that score at least `LABEL_SHARE` of it, joined by " · ".
- Anchor: the region's medoid, approximated as its point nearest the coordinate-wise median
  (a point of the region even where the region is not convex).

Deterministic given `seed`: the sample is seeded, and the spanning tree comes from Kruskal's
algorithm over exact nearest neighbours and a Delaunay triangulation, with no threads racing.
Time on 2 cores: about 1.3 s for a million points (50k-point sample), plus about 2 s for the
first call in a process (numba loads fast-hdbscan's cached compiled code).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ["scale", "region", "x", "y", "n_points", "label", "share_queries"]
DEFAULT_SCALES = (0.02, 0.006, 0.002)
MAX_POINTS = 50_000
MIN_SAMPLES = 10
KNN_K = 15
MIN_REGION = 10
LABEL_WORDS = 3
LABEL_SHARE = 0.5
WORD_PIECE = r"^(##|Ġ|▁)+"


def empty_regions() -> pd.DataFrame:
    return pd.DataFrame({"scale": pd.Series(dtype=np.int8), "region": pd.Series(dtype=np.int32),
                         "x": pd.Series(dtype=np.float32), "y": pd.Series(dtype=np.float32),
                         "n_points": pd.Series(dtype=np.int64), "label": pd.Series(dtype=object),
                         "share_queries": pd.Series(dtype=np.float32)})


def token_terms(tokens: pd.Series) -> pd.Series:
    """Each token as a label term: word-piece marks removed, lower-cased; a token that is only
    whitespace or a mark reads "␣"."""
    cleaned = tokens.astype(str).str.replace(WORD_PIECE, "", regex=True).str.strip().str.lower()
    return cleaned.mask(cleaned == "", "␣")


def head_regions(coords: np.ndarray, tokens: pd.Series, scales: tuple[float, ...] = DEFAULT_SCALES,
                 max_points: int = MAX_POINTS, min_samples: int = MIN_SAMPLES, seed: int = 0) -> pd.DataFrame:
    """Regions of a head's layout: one row per (scale, region) with columns `COLUMNS`.

    `coords` [n_points, >=2] (the first two columns are used), `tokens` the token string of
    every point (queries then keys, so the run's tokens twice); `scales` the smallest region of
    each scale as a fraction of the points, coarse first. Non-finite points are left out. Too
    few points for a region of `MIN_REGION`: an empty frame."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or (len(coords) and coords.shape[1] < 2):
        raise ValueError(f"coords must be [n_points, 2], got shape {coords.shape}")
    if len(tokens) != len(coords):
        raise ValueError(f"{len(tokens)} tokens for {len(coords)} points; pass one token per point")
    n = len(coords)
    finite = np.flatnonzero(np.isfinite(coords[:, :2]).all(axis=1))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(finite, max_points, replace=False)) if len(finite) > max_points else finite
    if len(sample) < max(MIN_REGION, min_samples + 1):
        return empty_regions()
    points = np.ascontiguousarray(coords[sample, :2], dtype=np.float64)
    origin = points.mean(axis=0)
    points -= origin  # float32 layouts far from 0 would lose their neighbour distances

    terms = token_terms(pd.Series(np.asarray(tokens, dtype=object)[sample]))
    term_codes, term_names = pd.factorize(terms, sort=True)
    is_query = sample < n // 2
    scale_up = len(finite) / len(sample)

    from fast_hdbscan.hdbscan import clusters_from_spanning_tree

    tree = spanning_tree(points, min(min_samples, len(points) - 1))
    frames = []
    for scale, fraction in enumerate(scales):
        size = int(max(MIN_REGION, round(fraction * len(points))))
        labels = clusters_from_spanning_tree(tree, min_cluster_size=size,
                                             cluster_selection_method="eom" if scale == 0 else "leaf")[0]
        frame = describe_regions(points, labels, term_codes, term_names, is_query)
        frame["x"] += origin[0]
        frame["y"] += origin[1]
        frame["n_points"] = np.round(frame["n_points"] * scale_up).astype(np.int64)
        frame.insert(0, "scale", scale)
        frames.append(frame)
    regions = pd.concat(frames, ignore_index=True)
    return regions.astype({"scale": np.int8, "region": np.int32, "x": np.float32, "y": np.float32,
                           "share_queries": np.float32})[COLUMNS]


def spanning_tree(points: np.ndarray, min_samples: int) -> np.ndarray:
    """[n - 1, 3] (i, j, mutual reachability distance): a minimum spanning tree of the points'
    mutual reachability graph, restricted to their `KNN_K` nearest neighbours and their Delaunay
    triangulation. fast-hdbscan's Kruskal over the neighbour graph is fast and deterministic
    (its exact Boruvka is ~10x slower when asked to be reproducible), but leaves separate groups
    joined by infinite edges, which hide the coarse regions; the Delaunay edges join them at
    their real distance (they hold the Euclidean MST)."""
    from fast_hdbscan.hdbscan import compute_minimum_spanning_tree

    tree, _, core = compute_minimum_spanning_tree(points, min_samples=min_samples, algorithm="kruskal",
                                                  knn_k=min(KNN_K, len(points) - 1))
    joins = ~np.isfinite(tree[:, 2])
    if not joins.any():
        return tree
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree
    from scipy.spatial import Delaunay, QhullError

    try:
        triangulation = Delaunay(points)
    except (QhullError, ValueError):  # every point on one line or one spot: join groups at their distance
        ends = tree[joins, :2].astype(np.int64)
        tree[joins, 2] = np.linalg.norm(points[ends[:, 0]] - points[ends[:, 1]], axis=1)
        tree[joins, 2] = np.maximum(tree[joins, 2], tree[~joins, 2].max(initial=0.0)) + 1e-9
        return tree
    triangles = triangulation.simplices
    pairs = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [0, 2]],
                            triangulation.coplanar[:, [0, 2]]])  # points left out (duplicates) to their vertex
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)
    distance = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)
    mutual = np.maximum(distance, np.maximum(core[pairs[:, 0]], core[pairs[:, 1]]))
    kept = tree[~joins]
    rows = np.concatenate([kept[:, 0].astype(np.int64), pairs[:, 0]])
    cols = np.concatenate([kept[:, 1].astype(np.int64), pairs[:, 1]])
    offset = 1.0 + mutual.max()  # csgraph reads a zero weight as no edge; an offset keeps the order
    weights = np.concatenate([kept[:, 2], mutual]) + offset
    lo, hi = np.minimum(rows, cols), np.maximum(rows, cols)
    order = np.lexsort((weights, hi, lo))  # duplicates would be summed: keep each pair's lightest
    first = np.ones(len(order), dtype=bool)
    first[1:] = (np.diff(lo[order]) != 0) | (np.diff(hi[order]) != 0)
    keep = order[first]
    graph = coo_matrix((weights[keep], (lo[keep], hi[keep])), shape=(len(points),) * 2).tocsr()
    mst = minimum_spanning_tree(graph).tocoo()
    return np.column_stack([mst.row, mst.col, mst.data - offset]).astype(np.float64)


def describe_regions(points: np.ndarray, labels: np.ndarray, term_codes: np.ndarray, term_names,
                     is_query: np.ndarray) -> pd.DataFrame:
    """One row per region id >= 0 in `labels` ([n] ints, -1 = none): its anchor, size, label
    and share of queries."""
    ids = np.unique(labels[labels >= 0])
    if not len(ids):
        return empty_regions().drop(columns="scale")
    members = np.flatnonzero(labels >= 0)
    region_of = np.searchsorted(ids, labels[members])
    sizes = np.bincount(region_of, minlength=len(ids))
    head_counts = np.bincount(term_codes, minlength=len(term_names))
    texts = region_labels(region_of, term_codes[members], sizes, head_counts, term_names)
    order = members[np.argsort(region_of, kind="stable")]
    anchors = np.stack([medoid(points[group]) for group in np.split(order, np.cumsum(sizes)[:-1])])
    queries = np.bincount(region_of, weights=is_query[members], minlength=len(ids))
    return pd.DataFrame({"region": np.arange(len(ids)), "x": anchors[:, 0], "y": anchors[:, 1],
                         "n_points": sizes, "label": texts, "share_queries": queries / sizes})


def region_labels(region_of: np.ndarray, term_of: np.ndarray, sizes: np.ndarray, head_counts: np.ndarray,
                  term_names) -> list[str]:
    """Each region's label from its points' regions and terms ([m] each), region sizes [r] and
    every term's count over the whole head [t]: c-TF-IDF, best term first, at most
    `LABEL_WORDS` terms scoring at least `LABEL_SHARE` of the best."""
    n_terms = len(head_counts)
    pairs, counts = np.unique(region_of.astype(np.int64) * n_terms + term_of, return_counts=True)
    region, term = np.divmod(pairs, n_terms)
    idf = np.log1p(sizes.mean() / np.maximum(head_counts[term], 1))
    scores = counts / sizes[region] * idf
    order = np.lexsort((term, -scores, region))
    texts = []
    for group in np.split(order, np.searchsorted(region[order], np.arange(1, len(sizes)))):
        best = group[:LABEL_WORDS]
        keep = best[scores[best] >= LABEL_SHARE * scores[best[0]]] if len(best) else best
        texts.append(" · ".join(str(term_names[t]) for t in term[keep]))
    return texts


def medoid(points: np.ndarray) -> np.ndarray:
    """The point of `points` [n, 2] nearest their coordinate-wise median."""
    centre = np.median(points, axis=0)
    return points[np.argmin(((points - centre) ** 2).sum(axis=1))]


def commit_regions(run, method: str, layer: int, head: int) -> pd.DataFrame:
    """Label the regions of one committed 2-D projection and store them with it (a new
    projection version makes them stale; `run.regions` then returns None until redone)."""
    from pipeline.store import write_regions

    record = run.projection_record(method, layer, head, 2)
    tokens = run.tokens()["token"]
    regions = head_regions(run.projection(method, layer, head, 2), pd.concat([tokens, tokens], ignore_index=True))
    write_regions(run.dir, record, regions)
    return regions

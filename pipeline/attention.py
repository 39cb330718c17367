"""Attention weights recomputed from stored queries and keys: softmax(q @ k.T * scale + mask),
and the same weights scaled by the norm of the value each key contributes."""

from __future__ import annotations

import numpy as np


def attention_weights(queries: np.ndarray, keys: np.ndarray, scale: float, mask_rule: str = "bidirectional",
                      sliding_window: int | None = None) -> np.ndarray:
    """`queries`, `keys` [pos, d_head] of one sequence and head -> weights [query_pos, key_pos]."""
    scores = (queries.astype(np.float64) @ keys.astype(np.float64).T) * scale
    n_queries, n_keys = scores.shape
    query_pos = np.arange(n_queries)[:, None] + (n_keys - n_queries)
    key_pos = np.arange(n_keys)[None, :]
    allowed = np.ones_like(scores, dtype=bool)
    if mask_rule == "causal":
        allowed &= key_pos <= query_pos
    elif mask_rule != "bidirectional":
        raise ValueError(f"unknown mask rule {mask_rule!r}")
    if sliding_window is not None:
        allowed &= query_pos - key_pos < sliding_window
        if mask_rule == "bidirectional":
            allowed &= key_pos - query_pos < sliding_window
    scores = np.where(allowed, scores, -np.inf)
    scores -= scores.max(axis=1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def value_norm_weighted(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`weights` [query_pos, key_pos], `values` [key_pos, d_head] -> how much of each query's
    output each key makes, a_ij * ||v_j|| renormalized per query (Kobayashi et al. 2020 take
    the norm after the output projection; AttentionViz, and this, take the value's own norm).
    A key with large attention but a near-zero value then counts for little: the "attend to
    [SEP] / the first token" pattern of many heads is largely a no-op."""
    norms = np.linalg.norm(values.astype(np.float64), axis=1)
    weighted = weights.astype(np.float64) * norms[None, :]
    totals = weighted.sum(axis=1, keepdims=True)
    return np.divide(weighted, totals, out=np.zeros_like(weighted), where=totals > 0).astype(np.float32)

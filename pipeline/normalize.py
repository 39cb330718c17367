"""Attention-preserving normalization of one head's queries and keys (AttentionViz, sec. 4.1).

key translation: k' = k - mean(k) + mean(q). Each query's scores within a sequence all move
by the same constant q . (mean(q) - mean(k)), which softmax ignores, causal mask included.
scaling: c = sqrt(mean|q| / mean|k'|); q'' = q / c, k'' = c * k'. Every product q.k is
unchanged, and queries and keys get equal mean norms, so near in the projection means a
large dot product: |q - k|^2 = |q|^2 + |k|^2 - 2 q.k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Normalization:
    """What was applied to one head, recorded with its projection."""

    key_shift: np.ndarray  # [d_head], added to every key
    scale: float  # c: queries divided by it, keys multiplied by it


def normalize_head(queries: np.ndarray, keys: np.ndarray, translate: bool = True,
                   scale: bool = True) -> tuple[np.ndarray, np.ndarray, Normalization]:
    """`queries`, `keys` [n_tokens, d_head] -> normalized copies and what was done."""
    queries = np.asarray(queries, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.float32)
    shift = (queries.mean(axis=0) - keys.mean(axis=0)) if translate else np.zeros(keys.shape[1], np.float32)
    keys = keys + shift
    factor = 1.0
    if scale:
        key_norm = float(np.linalg.norm(keys, axis=1).mean())
        query_norm = float(np.linalg.norm(queries, axis=1).mean())
        if key_norm > 0 and query_norm > 0:
            factor = float(np.sqrt(query_norm / key_norm))
    return queries / factor, keys * factor, Normalization(key_shift=shift.astype(np.float32), scale=factor)

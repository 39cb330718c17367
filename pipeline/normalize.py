"""Attention-preserving normalization of one head's queries and keys (AttentionViz, sec. 4.1).

key translation: k' = k - mean(k) + mean(q). Each query's scores within a sequence all move
by the same constant q . (mean(q) - mean(k)), which softmax ignores, causal mask included.
scaling: c = sqrt(mean|q| / mean|k'|); q'' = q / c, k'' = c * k'. Every product q.k is
unchanged, and queries and keys get equal mean norms, so near in the projection means a
large dot product: |q - k|^2 = |q|^2 + |k|^2 - 2 q.k.

NumPy or CuPy arrays in, the same kind out. Means are accumulated in float64, so that NumPy's
pairwise and CuPy's tree summation agree to float32 rounding even where mean(q) - mean(k)
cancels; every elementwise step is then the same float32 operation on both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.arrays import array_module


@dataclass
class Normalization:
    """What was applied to one head, recorded with its projection."""

    key_shift: np.ndarray  # [d_head] float32 (a CuPy array for CuPy input), added to every key
    scale: float  # c: queries divided by it, keys multiplied by it


def normalize_head(queries, keys, translate: bool = True, scale: bool = True) -> tuple:
    """`queries`, `keys` [n_tokens, d_head] (NumPy or CuPy) -> (normalized queries, normalized
    keys, `Normalization`), float32 arrays of the input's kind."""
    xp = array_module(queries, keys)
    queries = xp.asarray(queries, dtype=xp.float32)
    keys = xp.asarray(keys, dtype=xp.float32)
    if translate:
        shift = (queries.mean(axis=0, dtype=xp.float64) - keys.mean(axis=0, dtype=xp.float64)).astype(xp.float32)
    else:
        shift = xp.zeros(keys.shape[1], dtype=xp.float32)
    keys = keys + shift
    factor = 1.0
    if scale:
        key_norm = float(xp.linalg.norm(keys, axis=1).mean(dtype=xp.float64))
        query_norm = float(xp.linalg.norm(queries, axis=1).mean(dtype=xp.float64))
        if key_norm > 0 and query_norm > 0:
            factor = float(np.sqrt(query_norm / key_norm))
    factor32 = xp.float32(factor)
    return queries / factor32, keys * factor32, Normalization(key_shift=shift, scale=factor)

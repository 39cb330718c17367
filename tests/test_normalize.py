import numpy as np
import pytest

from pipeline.attention import attention_weights
from pipeline.normalize import normalize_head


@pytest.mark.parametrize("mask_rule", ["bidirectional", "causal"])
@pytest.mark.parametrize("translate,scale", [(True, True), (True, False), (False, True)])
def test_normalization_leaves_every_attention_weight_unchanged(mask_rule, translate, scale):
    rng = np.random.default_rng(1)
    lengths = [5, 9, 3, 12]
    queries = rng.normal(2.0, 1.5, (sum(lengths), 16)).astype(np.float32)
    keys = rng.normal(-3.0, 0.5, (sum(lengths), 16)).astype(np.float32)
    new_q, new_k, applied = normalize_head(queries, keys, translate=translate, scale=scale)
    start = 0
    for length in lengths:
        window = slice(start, start + length)
        before = attention_weights(queries[window], keys[window], 0.25, mask_rule)
        after = attention_weights(new_q[window], new_k[window], 0.25, mask_rule)
        np.testing.assert_allclose(after, before, atol=1e-5)
        start += length
    if translate:
        np.testing.assert_allclose(new_k.mean(0) / applied.scale, new_q.mean(0) * applied.scale, atol=1e-4)
    if scale:
        assert np.linalg.norm(new_q, axis=1).mean() == pytest.approx(np.linalg.norm(new_k, axis=1).mean(), rel=1e-4)


def test_key_translation_moves_keys_onto_queries():
    rng = np.random.default_rng(2)
    queries = rng.normal(5, 1, (200, 8))
    keys = rng.normal(-5, 1, (200, 8))
    new_q, new_k, _ = normalize_head(queries, keys, scale=False)
    assert np.linalg.norm(new_q.mean(0) - new_k.mean(0)) < 1e-4
    assert np.linalg.norm(queries.mean(0) - keys.mean(0)) > 10

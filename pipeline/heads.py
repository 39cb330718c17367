"""Head atlas: what each attention head does, measured over every sequence of a run.

Attention is recomputed from the stored Q/K by the rule of `pipeline.attention.attention_weights`
(`softmax(q @ k.T * scale + mask)`, the run's mask rule and sliding window; float32 here,
within ~1e-6 of it). Sequences of similar length are padded into batches (`plan_sequences`,
built once per run), so one head of a 580k-token corpus is about a hundred batched matmuls,
and every statistic comes from that one attention tensor per batch. Only one head's Q/K is in
memory at a time, plus the plan (~100 bytes per token).

Which queries count. A query that sees one key only (the first token of a causal model) has
its attention forced to that key and says nothing about the head, so every measure is a mean
over the queries that see at least two keys ("counted queries"; `n_queries` says how many).
In bidirectional models every query of a sequence of two or more tokens counts.

Per-head measures (`measure_head`), `a[i, j]` the weight of query i on key j of one sequence:
- `entropy`: mean of -sum_j a[i,j] ln a[i,j], in nats (Clark et al. 2019, "What does BERT look
  at?", sec. 3.3). `entropy_norm`: mean of that entropy divided by ln(number of keys query i
  sees), 0 = one key, 1 = uniform.
- `sink_weight`: mean a[i, 0], the weight on the first position (attention sinks: Xiao et al.
  2023, StreamingLLM; Gu et al. 2024, "When attention sink emerges", who call a head a sink
  head when this exceeds a threshold, 0.3 in their figures). `sink_argmax_share`: share of
  queries whose largest weight is on position 0.
- `prev_weight`, `self_weight`, `next_weight`: mean a[i, i-1], a[i, i], a[i, i+1], each over the
  queries that see that key (Clark et al. 2019, sec. 3.1); `next_weight` is NaN for causal runs.
- `positional_offset`: the most frequent offset `argmax_j a[i, j] - i` over queries (ties: the
  most negative offset), `positional_share`: the share of queries whose largest weight lies at that
  offset (Voita et al. 2019, "Analyzing multi-head self-attention", sec. 4.2: a head is
  "positional" when this share is at least 0.9 for offset -1 or +1).
- `special_weight`, `punct_weight`: mean total weight on tokens flagged `is_special` ([CLS],
  [SEP], BOS, ViT's CLS) or `is_punct` (Clark et al. 2019, sec. 3.2).
- `duplicate_weight`: mean total weight on earlier positions holding the query's own token id,
  over the queries that see at least one such position (the corpus version of
  TransformerLens's duplicate-token pattern).
- `confidence`: mean of each query's largest weight (Voita et al. 2019, sec. 4.1).
- `n_queries`: the number of counted queries.
- `offset_weights`: the head's attention by relative position, averaged over the corpus
  (AttentionViz's aggregate view, computed here rather than in the browser): a list whose entry
  k is the mean of a[i, i + d], d = k - (max_length - 1), over the counted queries that see
  key i + d; NaN where none does (d > 0 in a causal run).
- `patch_offset_weights` (image runs; None for text): the same by patch offset between query and
  key patches, row-major over (d_row, d_col), each from -(grid - 1) to grid - 1, [CLS] left out.
- `value_offset_weights` (runs extracted with `--values`; None otherwise): `offset_weights` of
  the value-norm-weighted attention a[i, j] * |v_j| / sum_j' a[i, j'] * |v_j'|
  (`pipeline.attention.value_norm_weighted`): how much of each query's output comes from each
  offset, rather than how much attention goes there.
Argmax ties (weights equal to float32 rounding) go to the first key, as `np.argmax` does.

Top sequences (`measure_head`'s second return): the sequences where the head is most itself,
scored by the mean over the sequence's counted queries of the largest weight on a key other
than position 0 (a sink says nothing about a head; the query's own key counts, so a
self-attending head ranks its most self-attending sequences first). Only sequences of at least
`min_top_length` tokens (default 8) are ranked, since in a three-token sequence every head looks
sharp; shorter ones are ranked only when the run has no sequence that long. Ties: lower seq_id
first. Ranks start at 1.

Probe scores (`probe_scores`), TransformerLens `transformer_lens/head_detector.py`,
`detect_head(..., error_measure="mul")`: for each probe sequence, the share of the head's
attention that falls on a 0/1 pattern, `sum(a * pattern) / sum(a)`, averaged over sequences as
`detect_head` does for a list of prompts; patterns as TL's `get_*_detection_pattern`:
previous-token (a[i, i-1]), duplicate-token (a[i, j], j < i, token j == token i) and induction
(the duplicate pattern shifted one key to the right: a[i, j+1] where token j == token i, j < i).
Measured on repeated random tokens, [BOS] + R + R (`repeated_random_tokens`; Olsson et al.
2022, "In-context learning and induction heads"). TL's defaults are kept: `exclude_bos=False`,
`exclude_current_token=False` (both options are offered; when set, column 0 / the diagonal is
zeroed before the ratio, as in TL). All queries count here, as in TL. So a perfect induction
head scores about half_length / (1 + 2 * half_length), just under 0.5, since the first copy of R
has nothing to match; a perfect previous-token head scores (L - 1) / L. Defined for causal runs
only (NaN otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import torch

from pipeline.errors import QkatlasError

MEASURES = ["entropy", "entropy_norm", "sink_weight", "sink_argmax_share", "prev_weight", "self_weight",
            "next_weight", "positional_offset", "positional_share", "special_weight", "punct_weight",
            "duplicate_weight", "confidence", "n_queries"]
PROBE_SCORES = ["induction_score", "duplicate_score", "previous_token_score"]
# list-valued columns: attention by relative position
PROFILES = ["offset_weights", "patch_offset_weights", "value_offset_weights"]
TOP_COLUMNS = ["layer", "head", "rank", "seq_id", "score"]
BATCH_ELEMENTS = 1 << 18  # attention weights per batch ([query, key, batch]): about L2-cache sized
MIN_BATCH = 32  # sequences per batch, so that reductions run along vectors of at least this length
MAX_BATCH_ELEMENTS = 1 << 22  # ... unless that many weights (16 MB) would be exceeded: then fewer
PAD_TOLERANCE = 0.1  # a batch mixes lengths within 10% (padding), or more when too few sequences share one
PADDING = -1e30  # finite: a padding query whose window holds only padding keys stays NaN-free
CLAMP = -80.0  # exp(-80) ~ 2e-35: masked keys stay negligible without exp's slow underflow path
CPU = torch.device("cpu")


class HeadsError(QkatlasError, ValueError):
    """Head measurements asked of runs that cannot give them."""


SUMMED = ["sink_weight", "self_weight", "prev_weight", "next_weight", "entropy", "entropy_norm", "confidence",
          "sink_argmax_share", "special_weight", "punct_weight", "duplicate_weight"]  # `HeadAccumulator.sums`


@dataclass
class Masks:
    """One bucket under one (mask rule, window): its masks, and which queries count in which sum."""
    additive: torch.Tensor | None  # [query, key, 1] 0 / -inf from the rule; None when it hides nothing
    key_padding: torch.Tensor | None  # [1, key, batch] 0 / PADDING on padding; None without padding
    counted: torch.Tensor  # [query * batch] float 0/1: real queries that see at least two keys
    diagonal_index: torch.Tensor  # [4 * query * batch] int32 flat [query, key, batch] index of keys 0, i, i-1, i+1
    diagonal_coefficients: torch.Tensor  # [4, query * batch]: counted, counted, has key i-1, has key i+1
    entropy_coefficients: torch.Tensor  # [2, query * batch]: counted, counted / ln(visible keys)
    feature_columns: torch.Tensor  # columns (key * batch + b) of special and punctuation keys
    feature_batch: torch.Tensor  # b of each column
    feature_groups: torch.Tensor  # [n_columns, 2] one-hot: special, punctuation
    duplicate_index: tuple[torch.Tensor, torch.Tensor]  # flat (i, j, b) and (i, b) of visible same-id pairs
    offset_base: torch.Tensor  # [query, 1] max_length - i
    pair_offsets: torch.Tensor  # [query * key] int64 j - i + max_length
    offset_queries: torch.Tensor  # [2 * max_length + 1] float: counted queries that see each offset j - i
    patch_queries: torch.Tensor | None  # image runs: [n_bins + 1] float, counted queries per patch-offset bin
    reversed_keys: torch.Tensor  # [1, key - 1, 1] length - k for keys k >= 1
    n_counted: torch.Tensor  # [batch] float
    counts: dict  # queries, prev, next, duplicate: how many queries each mean is over

    def to(self, device: torch.device) -> Masks:
        """A copy with every tensor on `device`."""
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            return tuple(move(item) for item in value) if isinstance(value, tuple) else value

        return Masks(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


@dataclass
class Bucket:
    """Sequences of similar length, padded to the longest, batched as one [query, key, batch]
    tensor (batch innermost: reductions over keys then run along contiguous batch vectors,
    several times faster than reducing rows of 10 to 60 keys)."""
    length: int  # padded length
    seq_index: np.ndarray  # [batch] rows of `SequencePlan.seq_ids`
    lengths: torch.Tensor  # [batch] real lengths
    start: int  # first row of this bucket in `SequencePlan.order`
    special: torch.Tensor  # [batch, pos] bool
    punct: torch.Tensor  # [batch, pos] bool
    duplicates: torch.Tensor  # [n_pairs, 3] int64 (b, i, j): j < i, same token id, both real
    max_length: int
    patch_bins: torch.Tensor | None = None  # image runs: [query * key] int64 patch-offset bin (`_patch_offset_bins`)
    n_patch_bins: int = 0  # side**2 + 1: the last bin takes pairs with a non-patch token
    _masks: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.seq_index)

    def visible(self, mask_rule: str, window: int | None) -> torch.Tensor:
        """[query, key, batch] bool: real query, real key, visible under the rule."""
        real = torch.arange(self.length)[:, None] < self.lengths[None, :]  # [pos, batch]
        return visible_keys(self.length, mask_rule, window)[:, :, None] & real[None, :, :] & real[:, None, :]

    def masks(self, mask_rule: str, window: int | None, device: torch.device = CPU) -> Masks:
        """Built once per (mask rule, window) on the CPU, copied once to another `device`, then
        shared by every head of those layers."""
        key = (mask_rule, window, device)
        if key not in self._masks:
            self._masks[key] = (self._build_masks(mask_rule, window) if device == CPU
                                else self.masks(mask_rule, window).to(device))
        return self._masks[key]

    def _build_masks(self, mask_rule: str, window: int | None) -> Masks:
        length, n = self.length, self.size
        rule = visible_keys(length, mask_rule, window)
        real = torch.arange(length)[:, None] < self.lengths[None, :]  # [pos, batch]
        visible = rule[:, :, None] & real[None, :, :] & real[:, None, :]
        n_visible = visible.sum(1)  # [query, batch]
        counted = n_visible >= 2
        has_prev = torch.zeros(length, n, dtype=torch.bool)
        has_prev[1:] = counted[1:] & visible[1:, :-1].diagonal(0, 0, 1).T
        has_next = torch.zeros(length, n, dtype=torch.bool)
        has_next[:-1] = counted[:-1] & visible[:-1, 1:].diagonal(0, 0, 1).T
        count = counted.float()
        query = torch.arange(length)[:, None].expand(length, n)
        batch = torch.arange(n)[None, :].expand(length, n)
        diagonal_keys = [torch.zeros_like(query), query, (query - 1).clamp(min=0), (query + 1).clamp(max=length - 1)]
        columns, groups = [], []
        for group, flags in enumerate((self.special, self.punct)):
            b, pos = flags.nonzero().unbind(1)
            columns.append(pos * n + b)
            groups.append(torch.full((len(b),), group))
        feature_columns = torch.cat(columns)
        b, i, j = self.duplicates.unbind(1)
        keep = visible[i, j, b] & counted[i, b]
        b, i, j = b[keep], i[keep], j[keep]
        pair_offsets = (torch.arange(length)[None, :] - torch.arange(length)[:, None] + self.max_length).view(-1)
        queries_per_pair = (visible & counted[:, None, :]).sum(2).view(-1).double()  # [query * key]
        return Masks(
            additive=None if bool(rule.all()) else torch.zeros(length, length, 1).masked_fill_(
                ~rule[:, :, None], float("-inf")),
            key_padding=None if bool(real.all()) else torch.zeros(1, length, n).masked_fill_(~real[None], PADDING),
            counted=count.view(-1),
            diagonal_index=torch.stack([(query * length + key) * n + batch for key in diagonal_keys]).view(-1).int(),
            diagonal_coefficients=torch.stack([count, count, has_prev.float(), has_next.float()]).view(4, -1),
            entropy_coefficients=torch.stack([count, count / n_visible.clamp(min=2).float().log()]).view(2, -1),
            feature_columns=feature_columns, feature_batch=feature_columns % n,
            feature_groups=torch.nn.functional.one_hot(torch.cat(groups), 2).float(),
            duplicate_index=((i * length + j) * n + b, i * n + b),
            offset_base=(self.max_length - torch.arange(length))[:, None],
            pair_offsets=pair_offsets,
            patch_queries=None if self.patch_bins is None else torch.bincount(
                self.patch_bins, weights=queries_per_pair, minlength=self.n_patch_bins),
            offset_queries=torch.bincount(pair_offsets, weights=queries_per_pair, minlength=2 * self.max_length + 1),
            reversed_keys=torch.arange(length - 1, 0, -1, dtype=torch.float32)[None, :, None],
            n_counted=counted.sum(0).float(),
            counts={"queries": int(counted.sum()), "prev": int(has_prev.sum()), "next": int(has_next.sum()),
                    "duplicate": len(torch.unique(i * n + b))})


def visible_keys(length: int, mask_rule: str, window: int | None) -> torch.Tensor:
    """[query, key] bool: the rule of `pipeline.attention.attention_weights`."""
    query_pos = torch.arange(length)[:, None]
    key_pos = torch.arange(length)[None, :]
    allowed = torch.ones(length, length, dtype=torch.bool)
    if mask_rule == "causal":
        allowed &= key_pos <= query_pos
    elif mask_rule != "bidirectional":
        raise HeadsError(f"unknown mask rule {mask_rule!r} in the run manifest")
    if window is not None:
        allowed &= query_pos - key_pos < window
        if mask_rule == "bidirectional":
            allowed &= key_pos - query_pos < window
    return allowed


@dataclass
class SequencePlan:
    """How a run's sequences are batched; built once per run, shared by all its heads."""
    seq_ids: np.ndarray
    n_tokens: np.ndarray  # [sequence]
    order: np.ndarray  # token row of each batch slot, bucket after bucket ([batch, pos] within one)
    buckets: list[Bucket]
    max_length: int
    patch_side: int | None = None  # image runs: 2 * grid - 1, the patch offsets along one axis


def _batches(lengths: np.ndarray, batch_elements: int) -> list[np.ndarray]:
    """Sequence indices grouped by ascending length: each group within PAD_TOLERANCE of its
    shortest, about `batch_elements` weights, at least MIN_BATCH sequences where that stays
    under MAX_BATCH_ELEMENTS weights. A sequence is never split: one of L tokens takes
    about 16 * L**2 bytes (L = 4096: 270 MB)."""
    order = np.argsort(lengths, kind="stable")
    groups, first = [], 0
    while first < len(order):
        shortest = int(lengths[order[first]])
        last = first
        while last + 1 < len(order):
            longest = int(lengths[order[last + 1]])
            size = last + 2 - first
            weights = size * longest * longest
            within = longest <= shortest * (1 + PAD_TOLERANCE) or size <= MIN_BATCH
            if not within or weights > MAX_BATCH_ELEMENTS or (size > MIN_BATCH and weights > batch_elements):
                break
            last += 1
        groups.append(order[first:last + 1])
        first = last + 1
    return groups


def plan_sequences(run, batch_elements: int = BATCH_ELEMENTS) -> SequencePlan:
    """Batch the run's sequences by length (see `_batches`); pad slots read token row 0 and are masked."""
    sequences = run.sequences()
    tokens = run.tokens()
    token_ids = tokens["token_id"].to_numpy(np.int64)
    special = tokens["is_special"].to_numpy(bool)
    punct = tokens["is_punct"].to_numpy(bool)
    seq_ids = sequences["seq_id"].to_numpy(np.int64)
    offsets = sequences["token_offset"].to_numpy(np.int64)
    lengths = sequences["n_tokens"].to_numpy(np.int64)
    buckets, order, start, max_length = [], [], 0, int(lengths.max())
    patch_side, patch_bins = _patch_offset_bins(tokens, offsets, lengths)
    for index in _batches(lengths, batch_elements):
        index = index[np.argsort(offsets[index], kind="stable")]
        length = int(lengths[index].max())
        positions = np.arange(length)[None, :]
        real = positions < lengths[index][:, None]  # [batch, pos]
        rows = np.where(real, offsets[index][:, None] + positions, 0)
        ids = torch.from_numpy(np.where(real, token_ids[rows], -1))
        same = (ids[:, :, None] == ids[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril(-1)
        same &= torch.from_numpy(real)[:, :, None]
        buckets.append(Bucket(length, index, torch.from_numpy(lengths[index]), start,
                              torch.from_numpy(special[rows] & real), torch.from_numpy(punct[rows] & real),
                              same.nonzero(), max_length, patch_bins, (patch_side or 0) ** 2 + 1))
        order.append(rows.reshape(-1))
        start += rows.size
    return SequencePlan(seq_ids, lengths, np.concatenate(order), buckets, max_length, patch_side)


def _patch_offset_bins(tokens: pd.DataFrame, offsets: np.ndarray, lengths: np.ndarray):
    """Image runs (every sequence the same patches): (2 * grid - 1, [pos * pos] int64 bin of each
    (query, key) pair of patches, (d_row + grid - 1) * side + d_col + grid - 1, or side**2 for a
    pair with a non-patch token such as [CLS]); (None, None) for text."""
    if "patch_row" not in tokens or tokens["patch_row"].isna().all() or (lengths != lengths[0]).any():
        return None, None
    first = tokens.iloc[int(offsets[0]):int(offsets[0] + lengths[0])]
    row = first["patch_row"].fillna(-1).to_numpy(np.int64)
    col = first["patch_col"].fillna(-1).to_numpy(np.int64)
    grid = int(max(row.max(), col.max())) + 1
    side = 2 * grid - 1
    bins = (row[None, :] - row[:, None] + grid - 1) * side + (col[None, :] - col[:, None] + grid - 1)
    patches = (row >= 0)[:, None] & (row >= 0)[None, :]
    return side, torch.from_numpy(np.where(patches, bins, side * side).reshape(-1))


def in_plan_order(plan: SequencePlan, vectors: np.ndarray, device: torch.device = CPU) -> torch.Tensor:
    """[n_tokens, d_head] in store order -> [slot, d_head] on `device`, each bucket's slots contiguous."""
    return torch.from_numpy(vectors).index_select(0, torch.from_numpy(plan.order)).to(device)


def torch_device(device: str | torch.device | None) -> torch.device:
    """`device`, or where the process's array backend runs torch math (`pipeline.arrays`):
    CUDA on the GPU backend, the CPU otherwise."""
    if device is None:
        from pipeline.arrays import backend

        device = backend().torch_device
    device = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device == torch.device("cuda") else device


def bucket_attention(bucket: Bucket, masks: Masks, queries: torch.Tensor, keys: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalized weights of one bucket, [query, key, batch]: (`exp_scores` = exp(score - row
    max), `shifted` = score - row max clamped at CLAMP, `total` [query, batch] = sum of
    exp_scores over keys), so that weights = exp_scores / total. `queries`, `keys`: the head's
    vectors in plan order."""
    n, length = bucket.size, bucket.length
    rows = slice(bucket.start, bucket.start + n * length)
    scores = torch.bmm(queries[rows].view(n, length, -1), keys[rows].view(n, length, -1).transpose(1, 2))
    shifted = torch.empty(length, length, n, device=queries.device)
    first_mask = masks.additive if masks.additive is not None else masks.key_padding
    if first_mask is None:
        torch.mul(scores.permute(1, 2, 0), scale, out=shifted)
    else:
        torch.add(first_mask, scores.permute(1, 2, 0), alpha=scale, out=shifted)
        if masks.additive is not None and masks.key_padding is not None:
            shifted.add_(masks.key_padding)
    shifted.sub_(shifted.amax(1, keepdim=True)).clamp_(min=CLAMP)
    exp_scores = shifted.exp()
    return exp_scores, shifted, exp_scores.sum(1)


class HeadAccumulator:
    """Running sums of every measure over the buckets of one head."""

    def __init__(self, plan: SequencePlan, mask_rule: str, device: torch.device = CPU):
        self.mask_rule = mask_rule
        self.sums = torch.zeros(len(SUMMED), dtype=torch.float64, device=device)
        self.counts = {"queries": 0, "prev": 0, "next": 0, "duplicate": 0}
        self.offsets = torch.zeros(2 * plan.max_length + 1, dtype=torch.float64, device=device)  # offset -> queries
        self.offset_weights = torch.zeros_like(self.offsets)  # offset j - i -> summed weight a[i, j]
        self.offset_queries = torch.zeros_like(self.offsets)  # offset j - i -> queries that see it
        self.value_offset_weights: torch.Tensor | None = None  # offset j - i -> summed value-weighted a[i, j]
        self.max_length = plan.max_length
        self.sequence_scores = np.full(len(plan.seq_ids), np.nan)
        self.patch_side = plan.patch_side
        n_bins = (plan.patch_side or 0) ** 2 + 1
        self.patch_weights = torch.zeros(n_bins, dtype=torch.float64, device=device)  # bin -> summed weight
        self.patch_queries = torch.zeros_like(self.patch_weights)  # bin -> queries that see it

    def add(self, bucket: Bucket, masks: Masks, exp_scores: torch.Tensor, shifted: torch.Tensor,
            total: torch.Tensor, value_norms: torch.Tensor | None = None) -> None:
        """Add one bucket's counted queries (few, large tensor ops: per-op overhead matters).
        `value_norms`: the norm of each token's value vector in plan order, or None."""
        if masks.counts["queries"] == 0:
            return
        length, n = bucket.length, bucket.size
        inverse = total.reciprocal().view(-1)  # [query * batch]; also each query's largest weight
        counted_inverse = inverse * masks.counted
        entropy = total.log().view(-1) - torch.linalg.vecdot(exp_scores, shifted, dim=1).view(-1) * inverse
        flat = exp_scores.view(-1)
        max_at_first = (shifted[:, 0] == 0).view(-1)
        on_diagonals = flat.index_select(0, masks.diagonal_index).view(4, -1)  # keys 0, i, i - 1, i + 1
        features = flat.new_zeros(2)
        if len(masks.feature_columns):
            on_features = exp_scores.view(length, -1).index_select(1, masks.feature_columns)
            weights = counted_inverse.view(length, n).index_select(1, masks.feature_batch)
            features = torch.linalg.vecdot(on_features, weights, dim=0) @ masks.feature_groups
        pairs, queries = masks.duplicate_index
        duplicate = flat.index_select(0, pairs) @ inverse.index_select(0, queries)
        self.sums += torch.cat([torch.linalg.vecdot(on_diagonals.view(4, -1) * inverse, masks.diagonal_coefficients),
                                masks.entropy_coefficients @ entropy, counted_inverse.sum()[None],
                                (max_at_first.float() @ masks.counted)[None], features, duplicate[None]]).double()
        for name in self.counts:
            self.counts[name] += masks.counts[name]
        # largest weight off key 0, and the first key at the row's maximum (exp_scores == 1 only there):
        # exp + floor(exp) * (length - k) exceeds 2 exactly where a key k >= 1 holds the maximum
        later = exp_scores[:, 1:]
        top = torch.addcmul(later, later.floor(), masks.reversed_keys).amax(1).view(-1)
        best_other = top.clamp(max=1.0).view(length, n)  # times inverse: the weight
        per_sequence = torch.linalg.vecdot(best_other, counted_inverse.view(length, n), dim=0) / masks.n_counted
        self.sequence_scores[bucket.seq_index] = per_sequence.cpu().numpy()
        first_max = torch.where((top >= 2) & ~max_at_first, length + 1 - top, 0.0).long()
        offsets = (first_max.view(length, n) + masks.offset_base).view(-1)
        self.offsets += torch.bincount(offsets, weights=masks.counted, minlength=len(self.offsets))
        on_pairs = torch.bmm(exp_scores, counted_inverse.view(length, n, 1)).view(-1).double()  # [query * key]
        self.offset_weights += torch.bincount(masks.pair_offsets, weights=on_pairs, minlength=len(self.offsets))
        self.offset_queries += masks.offset_queries
        if value_norms is not None:
            self._add_value_weighted(bucket, masks, exp_scores, value_norms)
        if bucket.patch_bins is not None and masks.patch_queries is not None:
            patch_bins = bucket.patch_bins.to(on_pairs.device)
            self.patch_weights += torch.bincount(patch_bins, weights=on_pairs, minlength=len(self.patch_weights))
            self.patch_queries += masks.patch_queries

    def _add_value_weighted(self, bucket: Bucket, masks: Masks, exp_scores: torch.Tensor,
                            value_norms: torch.Tensor) -> None:
        length, n = bucket.length, bucket.size
        norms = value_norms[bucket.start:bucket.start + n * length].view(n, length).t()  # [key, batch]
        weighted = exp_scores * norms[None]  # padding keys hold zero vectors: norm 0
        totals = weighted.sum(1).view(-1)
        inverse = torch.where(totals > 0, masks.counted / totals.clamp(min=1e-30), 0.0)
        on_pairs = torch.bmm(weighted, inverse.view(length, n, 1)).view(-1).double()
        if self.value_offset_weights is None:
            self.value_offset_weights = torch.zeros_like(self.offset_weights)
        self.value_offset_weights += torch.bincount(masks.pair_offsets, weights=on_pairs, minlength=len(self.offsets))

    def row(self) -> dict:
        n = self.counts["queries"]
        sums = dict(zip(SUMMED, self.sums.tolist()))
        count_of = {"prev_weight": self.counts["prev"], "next_weight": self.counts["next"],
                    "duplicate_weight": self.counts["duplicate"]}
        row = {name: value / count_of.get(name, n) if count_of.get(name, n) else math.nan
               for name, value in sums.items()}
        if self.mask_rule == "causal":
            row["next_weight"] = math.nan
        mode = int(self.offsets.argmax())
        row.update(positional_offset=mode - self.max_length if n else 0,
                   positional_share=float(self.offsets[mode]) / n if n else math.nan, n_queries=n)
        seen = self.offset_queries > 0  # masked keys hold exp(CLAMP) > 0: unseen offsets are set NaN, not 0/0
        by_offset = torch.where(seen, self.offset_weights / self.offset_queries.clamp(min=1), math.nan)
        row["offset_weights"] = by_offset[1:-1].cpu().tolist()  # offsets 1 - max_length .. max_length - 1
        row["value_offset_weights"] = None
        if self.value_offset_weights is not None:
            by_value = torch.where(seen, self.value_offset_weights / self.offset_queries.clamp(min=1), math.nan)
            row["value_offset_weights"] = by_value[1:-1].cpu().tolist()
        row["patch_offset_weights"] = None
        if self.patch_side:
            seen = self.patch_queries[:-1] > 0
            by_patch = torch.where(seen, self.patch_weights[:-1] / self.patch_queries[:-1].clamp(min=1), math.nan)
            row["patch_offset_weights"] = by_patch.cpu().tolist()
        return row


def top_sequences(plan: SequencePlan, scores: np.ndarray, top_k: int, min_length: int) -> list[tuple[int, float]]:
    """(seq_id, score) of the `top_k` best-scoring sequences of at least `min_length` tokens."""
    scored = ~np.isnan(scores)
    long_enough = scored & (plan.n_tokens >= min_length)
    eligible = np.flatnonzero(long_enough if long_enough.any() else scored)
    best = eligible[np.lexsort((plan.seq_ids[eligible], -scores[eligible]))[:top_k]]
    return [(int(plan.seq_ids[index]), float(scores[index])) for index in best]


def measure_head(run, layer: int, head: int, top_k: int = 5, plan: SequencePlan | None = None,
                 min_top_length: int = 8, device: str | torch.device | None = None) -> tuple[dict, list[dict]]:
    """One head over every sequence of `run` -> (measurement row, top-sequence rows).

    `plan` (from `plan_sequences`) may be passed in to share it across heads. `device`: where
    the torch math runs (default: the array backend's, `torch_device`)."""
    plan = plan or plan_sequences(run)
    device = torch_device(device)
    queries, keys, value_norms = _read_head(run, plan, layer, head, device)
    return _measure_ordered(run, layer, head, plan, queries, keys, top_k, min_top_length, value_norms)


def _read_head(run, plan: SequencePlan, layer: int, head: int, device: torch.device,
               shared: tuple[torch.Tensor, torch.Tensor | None] | None = None):
    """(queries, keys, value norms or None) of one head in plan order; `shared`: the keys and value
    norms of the previous head when both read the same key/value head."""
    if shared is None:
        value_norms = None
        if getattr(run, "has_values", False):
            value_norms = torch.linalg.vector_norm(in_plan_order(plan, run.values(layer, head), device), dim=1)
        shared = in_plan_order(plan, run.keys(layer, head), device), value_norms
    return in_plan_order(plan, run.queries(layer, head), device), *shared


def _measure_ordered(run, layer: int, head: int, plan: SequencePlan, queries: torch.Tensor, keys: torch.Tensor,
                     top_k: int, min_top_length: int,
                     value_norms: torch.Tensor | None = None) -> tuple[dict, list[dict]]:
    scale, window = run.scale(layer), run.sliding_window(layer)
    accumulator = HeadAccumulator(plan, run.mask_rule, queries.device)
    with torch.inference_mode():
        for bucket in plan.buckets:
            masks = bucket.masks(run.mask_rule, window, queries.device)
            accumulator.add(bucket, masks, *bucket_attention(bucket, masks, queries, keys, scale), value_norms)
    row = {"layer": layer, "head": head, **accumulator.row()}
    top = [{"layer": layer, "head": head, "rank": rank, "seq_id": seq_id, "score": score}
           for rank, (seq_id, score) in enumerate(
               top_sequences(plan, accumulator.sequence_scores, top_k, min_top_length), start=1)]
    return row, top


# --- induction probe --------------------------------------------------------------------------


def repeated_random_tokens(vocab_size: int, n_sequences: int, half_length: int, seed: int,
                           bos_id: int | None = None, exclude_ids=()) -> np.ndarray:
    """[n_sequences, (1 if bos) + 2 * half_length] int64: [BOS] + R + R, R drawn uniformly with
    replacement from the vocabulary less `exclude_ids` and `bos_id` (as TL's demos draw them)."""
    excluded = {int(i) for i in exclude_ids} | ({int(bos_id)} if bos_id is not None else set())
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    if len(allowed) == 0 or half_length < 1 or n_sequences < 1:
        raise HeadsError(f"cannot draw {n_sequences} x {half_length} probe tokens from a vocabulary of "
                         f"{vocab_size} less {len(excluded)} excluded ids")
    halves = np.random.default_rng(seed).choice(allowed, size=(n_sequences, half_length))
    probe = np.concatenate([halves, halves], axis=1)
    if bos_id is not None:
        probe = np.concatenate([np.full((n_sequences, 1), bos_id), probe], axis=1)
    return probe.astype(np.int64)


def probe_scores(probe_run, layer: int, head: int, exclude_bos: bool = False, exclude_current_token: bool = False,
                 plan: SequencePlan | None = None, device: str | torch.device | None = None) -> dict:
    """TransformerLens "mul" scores of one head, averaged over the probe run's sequences;
    `device` as in `measure_head`."""
    if probe_run.mask_rule != "causal":
        return {name: math.nan for name in PROBE_SCORES}
    plan = plan or plan_sequences(probe_run)
    device = torch_device(device)
    queries = in_plan_order(plan, probe_run.queries(layer, head), device)
    keys = in_plan_order(plan, probe_run.keys(layer, head), device)
    scale, window = probe_run.scale(layer), probe_run.sliding_window(layer)
    per_sequence: dict[str, list[np.ndarray]] = {name: [] for name in PROBE_SCORES}
    with torch.inference_mode():
        for bucket in plan.buckets:
            masks = bucket.masks("causal", window, device)
            exp_scores, _, total = bucket_attention(bucket, masks, queries, keys, scale)
            weights = (exp_scores / total[:, None, :]).masked_fill_(~bucket.visible("causal", window).to(device), 0.0)
            weights = weights.permute(2, 0, 1).double()  # [batch, query, key]
            if exclude_bos:
                weights[:, :, 0] = 0
            if exclude_current_token:
                weights.diagonal(0, 1, 2).zero_()
            attention = weights.sum((1, 2))
            b, i, j = bucket.duplicates.to(device).unbind(1)
            shifted = j + 1 <= i
            duplicate = torch.zeros(bucket.size, dtype=torch.float64, device=device).index_add_(0, b, weights[b, i, j])
            induction = torch.zeros(bucket.size, dtype=torch.float64, device=device).index_add_(
                0, b[shifted], weights[b[shifted], i[shifted], j[shifted] + 1])
            previous = weights.diagonal(-1, 1, 2).sum(-1)
            for name, on_pattern in (("induction_score", induction), ("duplicate_score", duplicate),
                                     ("previous_token_score", previous)):
                per_sequence[name].append((on_pattern / attention).cpu().numpy())
    return {name: float(np.concatenate(values).mean()) for name, values in per_sequence.items()}


# --- a whole run ------------------------------------------------------------------------------


def _heads_read_ahead(run, plan: SequencePlan, layers: list[int], heads: list[int], device: torch.device):
    """Yield (layer, head, queries, keys, value norms or None) in plan order, the next head's read
    already under way."""
    def read(layer: int, head: int, shared):
        return _read_head(run, plan, layer, head, device, shared)

    order = [(layer, head) for layer in layers for head in heads]
    shares_keys = [index > 0 and order[index - 1][0] == layer and run.kv_head_of_q[order[index - 1][1]] ==
                   run.kv_head_of_q[head] for index, (layer, head) in enumerate(order)]
    if not order:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkatlas-read") as reader:
        pending = reader.submit(read, *order[0], None)
        for index, (layer, head) in enumerate(order):
            queries, keys, value_norms = pending.result()
            if index + 1 < len(order):
                next_layer, next_head = order[index + 1]
                pending = reader.submit(read, next_layer, next_head,
                                        (keys, value_norms) if shares_keys[index + 1] else None)
            yield layer, head, queries, keys, value_norms


def check_probe(run, probe_run, layers: list[int]) -> None:
    if probe_run.model_id != run.model_id:
        raise HeadsError(f"probe run {probe_run.url} was extracted with {probe_run.model_id}, not {run.model_id}; "
                         "extract the probe with the run's model")
    missing = sorted(set(layers) - set(probe_run.layers))
    if missing:
        raise HeadsError(f"probe run {probe_run.url} lacks layers {missing}; extract it with the run's --layers")


def measure_run(run, probe_run=None, layers: list[int] | None = None, heads: list[int] | None = None,
                on_head: Callable[[int, int, dict], None] | None = None, top_k: int = 5,
                min_top_length: int = 8, device: str | torch.device | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measure every (layer, head) -> (measurements, one row per head; top sequences).

    Reads the next head's Q/K in a thread while measuring this one (reading and reordering
    release the GIL), so at most two heads' Q/K are in memory; keys are read once per key/value
    head. The probe columns
    are NaN without a probe run or for bidirectional runs. `on_head(layer, head, row)` is
    called after each head. `device`: where the torch math runs (default: the array
    backend's, `torch_device`); the CPU and CUDA results agree to float32 rounding."""
    device = torch_device(device)
    layers = run.layers if layers is None else layers
    heads = list(range(run.n_heads)) if heads is None else heads
    if probe_run is not None:
        check_probe(run, probe_run, layers)
    plan = plan_sequences(run)
    probe_plan = plan_sequences(probe_run) if probe_run is not None else None
    rows, tops = [], []
    for layer, head, queries, keys, value_norms in _heads_read_ahead(run, plan, layers, heads, device):
        row, top = _measure_ordered(run, layer, head, plan, queries, keys, top_k, min_top_length, value_norms)
        if probe_plan is not None:
            row.update(probe_scores(probe_run, layer, head, plan=probe_plan, device=device))
        else:
            row.update({name: math.nan for name in PROBE_SCORES})
        rows.append(row)
        tops.extend(top)
        if on_head is not None:
            on_head(layer, head, row)
    measurements = pd.DataFrame(rows, columns=["layer", "head", *MEASURES, *PROBE_SCORES, *PROFILES])
    return measurements, pd.DataFrame(tops, columns=TOP_COLUMNS)


def commit_layer_measurements(run, layer: int, on_head: Callable[[int, int, dict], None] | None = None) -> dict:
    """Measure every query head of one layer (with the run's probe, if it has one) and commit
    the rows to the run's head atlas; returns the layer's marker."""
    import time

    from pipeline.store import write_head_layer

    began = time.perf_counter()
    probe = run.probe()
    measurements, top = measure_run(run, probe, layers=[layer], on_head=on_head)
    return write_head_layer(run.dir, layer, measurements, top,
                            {"seconds": round(time.perf_counter() - began, 3), "probe": probe is not None,
                             "n_tokens": run.n_tokens})

"""Aligning the runs of a group: their tokens, and their layouts of a head.

Tokens. The runs of a group read one corpus, so they hold the same sequences (same `seq_id`,
same text). Runs whose tokenizer is the same have identical token tables (`token_fingerprint`
tells); across tokenizers, a token of one run is matched to the tokens of the other whose
characters overlap it: `char_spans` re-tokenizes each stored text with the run's tokenizer (its
offset mapping), checks that the ids are the stored ones, and `match_by_spans` pairs tokens whose
character ranges overlap, so a word can be followed from a WordPiece model to a byte-level BPE.

Layouts. `procrustes` finds the rotation (or reflection), uniform scale and translation that
carry one layout onto another on shared points (orthogonal Procrustes, `scipy.linalg.
orthogonal_procrustes`, after centring; the scale matches the two layouts' spreads).
`aligned_layouts` runs a head over an ordered group: member t's UMAP starts from member t-1's
layout of the same tokens and is then carried onto it by Procrustes, so that what moves on
screen is change in the head rather than the layout's arbitrary rotation. `displacement`
measures it: the mean distance between a shared point's two positions, in units of the target
layout's RMS radius, next to the same mean over a shuffled pairing (chance).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import pandas as pd

from pipeline.errors import QkatlasError


class AlignError(QkatlasError, ValueError):
    """Tokens or layouts that cannot be aligned; the message names the run and what differs."""


# --- tokens -----------------------------------------------------------------------------------


def token_fingerprint(tokens: pd.DataFrame) -> str:
    """SHA-256 of a token table's identity columns (seq_id, pos, token_id, token), in store order:
    equal fingerprints mean one table serves both runs, row for row."""
    digest = hashlib.sha256()
    for column in ("seq_id", "pos", "token_id"):
        digest.update(np.ascontiguousarray(tokens[column].to_numpy(np.int64)).tobytes())
    digest.update("\x1f".join(tokens["token"].astype(str)).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def char_spans(tokens: pd.DataFrame, sequences: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """[n_tokens] rows (store order) of `char_start`, `char_end`: each token's characters in its
    sequence's text, leading and trailing white space left out; -1, -1 for a token with none
    ([CLS], BOS, ...). `tokenizer` must be the run's (a fast tokenizer, for its offset mapping).
    Raises AlignError when its tokens are not the stored ones."""
    if not getattr(tokenizer, "is_fast", False):
        raise AlignError(f"{type(tokenizer).__name__} has no offset mapping (not a fast tokenizer); character "
                         "alignment needs one")
    starts = np.full(len(tokens), -1, dtype=np.int64)
    ends = np.full(len(tokens), -1, dtype=np.int64)
    stored_ids = tokens["token_id"].to_numpy(np.int64)
    rows = sequences.sort_values("token_offset")
    texts = rows["text"].astype(str).tolist()
    truncated = rows["truncated"].to_numpy(bool) if "truncated" in rows else np.zeros(len(rows), bool)
    lengths = rows["n_tokens"].to_numpy(np.int64)
    whole = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    for index, (seq_id, offset, length, text) in enumerate(zip(rows["seq_id"], rows["token_offset"], lengths, texts)):
        ids, offsets = whole["input_ids"][index], whole["offset_mapping"][index]
        if truncated[index]:
            again = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=True,
                              max_length=int(length))
            ids, offsets = again["input_ids"], again["offset_mapping"]
        stop = int(offset) + int(length)
        if len(ids) != length or not np.array_equal(np.asarray(ids, dtype=np.int64), stored_ids[int(offset):stop]):
            raise AlignError(f"sequence {seq_id}: this tokenizer gives other tokens than the run stored; give the "
                             "tokenizer the run was extracted with")
        for row, (start, end) in zip(range(int(offset), stop), offsets):
            while start < end and text[start].isspace():
                start += 1
            while end > start and text[end - 1].isspace():
                end -= 1
            if end > start:
                starts[row], ends[row] = start, end
    return pd.DataFrame({"char_start": starts, "char_end": ends})


def match_by_spans(tokens_a: pd.DataFrame, spans_a: pd.DataFrame, tokens_b: pd.DataFrame,
                   spans_b: pd.DataFrame) -> pd.DataFrame:
    """Every pair of tokens (row_a, row_b) of one sequence whose characters overlap, with the
    overlap in characters. Sequences are matched by `seq_id`; tokens without characters match
    nothing. Within a sequence both runs' spans increase with position, so each token of A
    overlaps one contiguous run of B's tokens, found by binary search."""
    def keyed(tokens, spans):
        frame = pd.DataFrame({"seq_id": tokens["seq_id"].to_numpy(np.int64), "start": spans["char_start"].to_numpy(),
                              "end": spans["char_end"].to_numpy(), "row": np.arange(len(tokens))})
        return frame[frame["start"] >= 0]

    a, b = keyed(tokens_a, spans_a), keyed(tokens_b, spans_b)
    common = np.intersect1d(a["seq_id"].unique(), b["seq_id"].unique())
    if len(common) == 0:
        return pd.DataFrame({"row_a": [], "row_b": [], "overlap": []}, dtype=np.int64)
    width = int(max(a["end"].max(), b["end"].max())) + 1  # characters of the longest text, and one
    base = {seq: index * width for index, seq in enumerate(common)}
    a = a[a["seq_id"].isin(common)]
    b = b[b["seq_id"].isin(common)]
    a_start = a["seq_id"].map(base).to_numpy() + a["start"].to_numpy()
    a_end = a["seq_id"].map(base).to_numpy() + a["end"].to_numpy()
    b = b.assign(key=b["seq_id"].map(base) + b["start"]).sort_values(["key", "row"])
    b_start = b["key"].to_numpy()
    b_end = (b["seq_id"].map(base) + b["end"]).to_numpy()
    if np.any(np.diff(b_end) < 0):
        raise AlignError("token spans of a sequence are not in character order; cannot match them by position")
    first = np.searchsorted(b_end, a_start, side="right")  # first B token ending after A starts
    last = np.searchsorted(b_start, a_end, side="left")  # B tokens starting before A ends
    counts = np.maximum(last - first, 0)
    row_a = np.repeat(a["row"].to_numpy(), counts)
    index_b = np.concatenate([np.arange(lo, hi) for lo, hi in zip(first, last) if hi > lo]) if counts.sum() else \
        np.zeros(0, np.int64)
    overlap = np.minimum(np.repeat(a_end, counts), b_end[index_b]) - np.maximum(np.repeat(a_start, counts),
                                                                                b_start[index_b])
    return pd.DataFrame({"row_a": row_a.astype(np.int64), "row_b": b["row"].to_numpy()[index_b].astype(np.int64),
                         "overlap": overlap.astype(np.int64)})


def best_match(pairs: pd.DataFrame, n_a: int) -> np.ndarray:
    """[n_a] int64: for each token of A, the token of B it overlaps most (first on ties), or -1."""
    match = np.full(n_a, -1, dtype=np.int64)
    if len(pairs):
        best = pairs.sort_values(["row_a", "overlap", "row_b"], ascending=[True, False, True]).drop_duplicates("row_a")
        match[best["row_a"].to_numpy()] = best["row_b"].to_numpy()
    return match


def point_match(token_match: np.ndarray, n_target: int) -> np.ndarray:
    """Token match [n_tokens] -> point match [2 * n_tokens]: queries to queries, keys to keys
    (a target of `n_target` tokens); -1 stays -1."""
    keys = np.where(token_match >= 0, token_match + n_target, -1)
    return np.concatenate([token_match, keys])


# --- layouts ----------------------------------------------------------------------------------


@dataclass
class Similarity:
    """x -> (x - source_mean) @ rotation * scale + target_mean: a rotation or reflection, a uniform
    scale and a translation."""

    rotation: np.ndarray  # [dim, dim] orthogonal
    scale: float
    source_mean: np.ndarray
    target_mean: np.ndarray

    def apply(self, points: np.ndarray) -> np.ndarray:
        return ((points - self.source_mean) @ self.rotation * self.scale + self.target_mean).astype(np.float32)


def procrustes(source: np.ndarray, target: np.ndarray) -> Similarity:
    """The similarity that carries `source` [n, dim] onto `target` [n, dim]: the rotation (or
    reflection) of least squares after centring, and the scale that gives the source the target's
    spread (as `scipy.spatial.procrustes` standardizes both). The least-squares scale would shrink
    a layout towards its centre the less it agrees with the target, which makes unrelated layouts
    look close and an animation over many members shrink."""
    from scipy.linalg import orthogonal_procrustes

    if source.shape != target.shape or len(source) < source.shape[1] + 1:
        raise AlignError(f"Procrustes needs two [n, dim] arrays of the same shape with n > dim shared points, got "
                         f"{source.shape} and {target.shape}")
    source = source.astype(np.float64)
    target = target.astype(np.float64)
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    centred_source, centred_target = source - source_mean, target - target_mean
    rotation, _ = orthogonal_procrustes(centred_source, centred_target)
    norm = float(np.linalg.norm(centred_source))
    scale = float(np.linalg.norm(centred_target)) / norm if norm > 0 else 1.0
    return Similarity(rotation, scale, source_mean, target_mean)


def displacement(moved: np.ndarray, reference: np.ndarray, seed: int = 0) -> dict:
    """Mean distance between each point's two positions, in units of the reference layout's RMS
    radius, and the same under a random pairing of the points (chance)."""
    radius = float(np.sqrt(((reference - reference.mean(axis=0)) ** 2).sum(axis=1).mean())) or 1.0
    shuffled = np.random.default_rng(seed).permutation(len(reference))
    return {"displacement": float(np.linalg.norm(moved - reference, axis=1).mean() / radius),
            "chance": float(np.linalg.norm(moved - reference[shuffled], axis=1).mean() / radius),
            "shared_points": int(len(reference))}


def _initial_layout(previous: np.ndarray, match: np.ndarray, seed: int) -> np.ndarray:
    """Each point starts where its match sat in the previous layout; an unmatched point at the
    previous layout's centre (with a little noise, so that no two points coincide)."""
    init = np.repeat(previous.mean(axis=0, keepdims=True), len(match), axis=0)
    init[match >= 0] = previous[match[match >= 0]]
    spread = previous.std(axis=0).mean() or 1.0
    return (init + np.random.default_rng(seed).normal(scale=1e-3 * spread, size=init.shape)).astype(np.float32)


def project(points: np.ndarray, method: str, dim: int, params: dict, seed: int, backend: ModuleType,
            init: np.ndarray | None = None, epochs: int | None = None) -> np.ndarray:
    """One layout of [2 * n_tokens, d_head] points; UMAP from `init` where given (on the CPU when the
    backend cannot start from a layout)."""
    from pipeline.reduce import Unsupported, load_backend

    if method == "pca":
        return backend.pca(points, dim, seed)
    try:
        return backend.umap(points, dim, params, seed, init=init, n_epochs=epochs if init is not None else None)
    except Unsupported:
        return load_backend("cpu").umap(points, dim, params, seed, init=init, n_epochs=epochs)


def aligned_layouts(points: list[np.ndarray], matches: list[np.ndarray | None], method: str, dim: int,
                    params: dict, backend: ModuleType, epochs: int = 200, seed: int = 0,
                    start_from_previous: bool = True) -> tuple[list[np.ndarray], list[dict]]:
    """Layouts of one head over an ordered group. `points[t]`: member t's normalized points;
    `matches[t]` [len(points[t])]: the point of member t-1 each point is (-1: none; t = 0: None).
    Returns the layouts, each carried onto its predecessor by Procrustes on matched points, and per
    member a record: seconds, and (t > 0) displacement vs chance on the matched points."""
    layouts, records = [], []
    for t, member_points in enumerate(points):
        began = time.perf_counter()
        if t == 0:
            layout = project(member_points, method, dim, params, seed, backend)
            layouts.append(layout)
            records.append({"seconds": round(time.perf_counter() - began, 3)})
            continue
        match = matches[t]
        if match is None:
            raise AlignError(f"member {t} has no match to member {t - 1}")
        shared = np.flatnonzero(match >= 0)
        if len(shared) <= dim:
            raise AlignError(f"member {t} shares {len(shared)} points with member {t - 1}; too few to align")
        init = _initial_layout(layouts[-1], match, seed) if start_from_previous and method == "umap" else None
        layout = project(member_points, method, dim, params, seed, backend, init=init, epochs=epochs)
        layout = procrustes(layout[shared], layouts[-1][match[shared]]).apply(layout)
        layouts.append(layout)
        records.append(dict(displacement(layout[shared], layouts[-2][match[shared]], seed),
                            seconds=round(time.perf_counter() - began, 3)))
    return layouts, records

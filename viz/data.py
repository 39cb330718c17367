"""Data shaping for the dashboard: plain functions and one per-process cache, no widgets.

Every colour mode becomes one small categorical code per point (queries and keys of a head,
`2 * n_tokens` points, queries first) with one colour per category. Numeric modes are
binned into a ramp, queries and keys on separate ramps where AttentionViz used them, so a
single datashader `count_cat` pass draws any mode and a pixel shared by several points
blends their colours by count.
"""

from __future__ import annotations

import functools
import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import re2
from cachetools import LRUCache

from pipeline.errors import QkatlasError
from viz.palette import (KEY_COLOUR, KEY_RAMP, MOD5_COLOURS, QUERY_COLOUR, QUERY_RAMP, SEARCH_COLOUR,  # noqa: F401
                         SELECTED_COLOUR, VIRIDIS)

# --- colour modes ------------------------------------------------------------------------

TEXT_MODES = ["query / key", "position", "position mod 5", "punctuation / special", "norm", "token length",
              "token frequency", "sequence length"]
IMAGE_MODES = ["query / key", "query / key (fill)", "no outline", "position", "patch row", "patch column",
               "patch colour", "norm"]
QUERY_KEY_MODES = ("query / key", "query / key (fill)", "no outline")  # dots green / pink; image patches differ
N_BINS = 8
NORM_TIERS = 3  # dot sizes when sized by norm: small, medium, large

# one line beside each mode's legend: what the colour says
MODE_DESCRIPTIONS = {
    "query / key": "queries green, keys pink: a query sits near the keys it attends to",
    "position": "position / (sequence length - 1), queries and keys on separate ramps",
    "position mod 5": "position modulo 5: stripes show heads that track fine position",
    "punctuation / special": "punctuation red, special tokens ([CLS], [SEP], <s>, ...) blue, other tokens grey",
    "norm": "length of the stored query or key vector (1st-99th percentile)",
    "token length": "characters in the token, without sub-word markers",
    "token frequency": "how often the token occurs in the whole corpus, log-scaled bins",
    "sequence length": "tokens in the point's sequence",
    "patch row": "the patch's row in the image grid ([CLS] has none)",
    "patch column": "the patch's column in the image grid ([CLS] has none)",
    "patch colour": "the mean colour of the patch's pixels",
    "query / key (fill)": "queries green, keys pink; zoomed in, each image patch under a green or pink fill",
    "no outline": "queries green, keys pink; zoomed in, each image patch as the model saw it, no outline",
}


def colour_modes(modality: str) -> list[str]:
    return list(IMAGE_MODES if modality == "image" else TEXT_MODES)


@dataclass
class Colouring:
    """`codes[i]` is point i's category; `colours[c]` its colour, `labels[c]` its legend text."""

    codes: np.ndarray  # uint8 [2 * n_tokens]
    labels: list[str]
    colours: list[str]

    @property
    def categories(self) -> list[str]:
        """Each code's category in datashader's frames: "0", "1", ..., not the labels, which in
        some modes differ from head to head: datashader compiles its aggregation once per list
        of categories (a second or so, in the middle of a user's click)."""
        return [str(code) for code in range(len(self.labels))]

    @property
    def colour_key(self) -> dict[str, str]:
        """Category -> colour, for `datashader.transfer_functions.shade`."""
        return dict(zip(self.categories, self.colours))

    def point_colours(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.colours, dtype=object)[self.codes[index]]


def _bins(values: np.ndarray, lo: float | None = None, hi: float | None = None, n: int = N_BINS) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if lo is None and finite.size else (lo or 0.0)
    hi = float(finite.max()) if hi is None and finite.size else (hi if hi is not None else 1.0)
    scaled = (values - lo) / max(hi - lo, 1e-12)
    return np.clip(np.nan_to_num(scaled * n), 0, n - 1).astype(np.uint8)


def _ramp_labels(name: str, lo: float, hi: float, n: int = N_BINS) -> list[str]:
    edges = np.linspace(lo, hi, n + 1)
    return [f"{name} {edges[i]:.3g}-{edges[i + 1]:.3g}" for i in range(n)]


def _frequency_labels(top: float, n: int = N_BINS) -> list[str]:
    """Legend text of the log-spaced count bins from 1 to `top`; distinct, as categories must be."""
    edges = np.logspace(0, np.log10(max(top, 1.0)), n + 1)
    labels: list[str] = []
    for i in range(n):
        label = f"seen {edges[i]:,.0f}-{edges[i + 1]:,.0f}×"
        labels.append(label if label not in labels else f"{label} ({i + 1})")
    return labels


def colouring(mode: str, tokens: pd.DataFrame, norms: np.ndarray | None = None) -> Colouring:
    """The categories of every point of a head (queries then keys) for one colour mode.

    `tokens` is `run.tokens()` plus `token_len` (see `token_table`); `norms` the vector norms
    of the head's points ([2 * n_tokens], queries first), needed only by the "norm" mode."""
    n = len(tokens)
    kind = np.repeat(np.array([0, 1], dtype=np.uint8), n)
    both = lambda column: np.concatenate([column, column])  # noqa: E731
    if mode in QUERY_KEY_MODES:
        return Colouring(kind, ["query", "key"], [QUERY_COLOUR, KEY_COLOUR])
    if mode == "position":  # normalized position, one ramp for queries and one for keys
        bins = _bins(both(tokens["pos_norm"].to_numpy()), 0.0, 1.0)
        labels = [f"query {label}" for label in _ramp_labels("pos", 0, 1)] + \
                 [f"key {label}" for label in _ramp_labels("pos", 0, 1)]
        return Colouring((bins + kind * N_BINS).astype(np.uint8), labels, QUERY_RAMP + KEY_RAMP)
    if mode == "position mod 5":
        return Colouring(both(tokens["pos"].to_numpy() % 5).astype(np.uint8), [f"pos mod 5 = {r}" for r in range(5)],
                         list(MOD5_COLOURS))
    if mode == "token frequency":
        counts = token_counts(tokens)
        top = max(float(counts.max()) if n else 1.0, 1.0)
        bins = _bins(np.log10(counts), 0.0, np.log10(top)) if top > 1 else np.zeros(n, dtype=np.uint8)
        return Colouring(both(bins), _frequency_labels(top), VIRIDIS)
    if mode == "punctuation / special":
        category = np.where(tokens["is_special"].to_numpy(), 2, np.where(tokens["is_punct"].to_numpy(), 1, 0))
        return Colouring(both(category).astype(np.uint8), ["word", "punctuation", "special"],
                         ["#c8c8c8", "#d62728", "#1f3fff"])
    if mode == "norm":
        if norms is None:
            raise ValueError("the norm colour mode needs the head's vector norms")
        lo, hi = np.percentile(norms, [1, 99]) if len(norms) else (0.0, 1.0)
        bins = _bins(norms, float(lo), float(hi))
        return Colouring(bins, _ramp_labels("norm", float(lo), float(hi)), VIRIDIS)
    numeric = {"token length": "token_len", "sequence length": "seq_len", "patch row": "patch_row",
               "patch column": "patch_col"}
    if mode in numeric:
        values = tokens[numeric[mode]].to_numpy().astype(np.float64)
        lo, hi = (0.0, float(np.nanmax(values)) if n else 1.0)
        if mode.startswith("patch"):
            values = np.where(values < 0, np.nan, values)  # [CLS]: no patch
        bins = _bins(both(values), lo, hi)
        return Colouring(bins, _ramp_labels(mode, lo, hi), VIRIDIS)
    if mode == "patch colour":  # the mean colour of each patch, quantized to 4 levels per channel
        rgb = tokens[["mean_r", "mean_g", "mean_b"]].to_numpy().astype(np.int64) // 64
        code = rgb[:, 0] * 16 + rgb[:, 1] * 4 + rgb[:, 2]
        colours = [f"#{(r * 85):02x}{(g * 85):02x}{(b * 85):02x}" for r in range(4) for g in range(4) for b in range(4)]
        return Colouring(both(code).astype(np.uint8), [f"rgb {c}" for c in colours], colours)
    raise ValueError(f"unknown colour mode {mode!r}")


def token_counts(tokens: pd.DataFrame) -> np.ndarray:
    """int64 [n_tokens]: how many times each token's id occurs in `tokens` (the whole corpus)."""
    ids = tokens["token_id"] if "token_id" in tokens else tokens["token"].astype(str)
    codes, _ = pd.factorize(ids)
    return np.bincount(codes)[codes].astype(np.int64) if len(codes) else np.zeros(0, dtype=np.int64)


def norm_tiers(norms: np.ndarray, n_tiers: int = NORM_TIERS) -> np.ndarray:
    """uint8 [2 * n_tokens]: each point's dot size, 0 (smallest) .. n_tiers - 1, by the norm
    quantile of its vector among the head's queries or among its keys (their norms differ in
    scale, so each gets every size)."""
    norms = np.asarray(norms, dtype=np.float64)
    n = len(norms) // 2
    tiers = np.zeros(len(norms), dtype=np.uint8)
    for half in (slice(0, n), slice(n, 2 * n)):
        values = norms[half]
        if len(values):
            edges = np.quantile(values, np.linspace(0, 1, n_tiers + 1)[1:-1])
            tiers[half] = np.searchsorted(edges, values, side="right")
    return tiers


def token_table(tokens: pd.DataFrame) -> pd.DataFrame:
    """`run.tokens()` plus the columns the views need: `token_len` (characters, without WordPiece
    `##` or BPE space markers)."""
    frame = tokens.copy()
    frame["token_len"] = clean_tokens(frame["token"]).str.len().astype(np.int32)
    return frame


def clean_tokens(tokens: pd.Series) -> pd.Series:
    return tokens.astype(str).str.replace(r"^(##|Ġ|▁)", "", regex=True)


# --- search ------------------------------------------------------------------------------

MAX_PATTERN_CHARS = 200
SEARCH_SECONDS = 1.0  # a search that has not finished by then stops and says so
_MATCH_CHUNK = 4096  # distinct tokens matched between two looks at the clock


class SearchError(QkatlasError, ValueError):
    """A search that cannot run (a pattern RE2 refuses, too long, too slow); the dashboard shows
    the message where the count would be."""


@dataclass(frozen=True)
class TokenVocabulary:
    """The token index of a run, built once per run per server: the distinct search forms of its
    tokens (lower case, sub-word marker removed), sorted, and the token rows of each form as one
    CSR (`rows[starts[f]:starts[f + 1]]`, ascending). An exact or prefix search is a binary search
    over the forms and a slice of rows; a regex tests each form once, not every token."""

    forms: np.ndarray  # object [n_forms], sorted
    form_of_token: np.ndarray  # int64 [n_tokens]
    starts: np.ndarray  # int64 [n_forms + 1]
    rows: np.ndarray  # int64 [n_tokens]: token rows grouped by form, forms in sorted order

    def rows_of(self, first: int, stop: int) -> np.ndarray:
        """Token rows (ascending) of forms `first` .. `stop - 1`: one contiguous slice."""
        found = self.rows[self.starts[first]:self.starts[stop]]
        return found if stop - first <= 1 else np.sort(found)

    def exact(self, form: str) -> np.ndarray:
        at = int(np.searchsorted(self.forms, form))
        return self.rows_of(at, at + 1) if at < len(self.forms) and self.forms[at] == form \
            else np.zeros(0, dtype=np.int64)

    def prefix(self, prefix: str) -> np.ndarray:
        first = int(np.searchsorted(self.forms, prefix, side="left"))
        stop = int(np.searchsorted(self.forms, prefix + "\U0010ffff", side="left"))
        return self.rows_of(first, stop)


def token_vocabulary(tokens: pd.DataFrame) -> TokenVocabulary:
    form_of_token, forms = pd.factorize(clean_tokens(tokens["token"]).str.lower(), sort=True)
    form_of_token = form_of_token.astype(np.int64)
    counts = np.bincount(form_of_token, minlength=len(forms))
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return TokenVocabulary(np.asarray(forms, dtype=object), form_of_token, starts,
                           np.argsort(form_of_token, kind="stable").astype(np.int64))


def compile_pattern(pattern: str):
    """An RE2 pattern (linear time in the text: no catastrophic backtracking), case-insensitive;
    SearchError with RE2's reason for one it refuses."""
    if not pattern:
        raise SearchError("re: needs a pattern after it, e.g. re:^un.* or re:[0-9]+")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SearchError(f"re: pattern of {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    options.never_capture = True
    try:
        return re2.compile(pattern, options)
    except re2.error as error:
        reason = error.args[0].decode("utf-8", "replace") if error.args and isinstance(error.args[0], bytes) \
            else str(error)
        raise SearchError(f"re:{pattern} is not a pattern RE2 accepts ({reason}); RE2 has no backreferences "
                          "or look-around") from None


def _pattern_hits(forms: np.ndarray, pattern: str, time_limit: float) -> np.ndarray:
    """bool [n_forms]: which forms the whole pattern matches."""
    compiled = compile_pattern(pattern)
    deadline = time.perf_counter() + time_limit
    hits = np.zeros(len(forms), dtype=bool)
    for start in range(0, len(forms), _MATCH_CHUNK):
        chunk = forms[start:start + _MATCH_CHUNK]
        hits[start:start + len(chunk)] = [compiled.fullmatch(form) is not None for form in chunk]
        if time.perf_counter() > deadline and start + _MATCH_CHUNK < len(forms):
            raise SearchError(f"re:{pattern} stopped after {time_limit:g} s on {len(forms):,} distinct tokens; "
                              "make it more specific")
    return hits


def search_tokens(tokens: pd.DataFrame, query: str, vocabulary: TokenVocabulary | None = None,
                  time_limit: float = SEARCH_SECONDS) -> np.ndarray:
    """Token indices (store order) whose token matches `query`: case-insensitive, ignoring
    sub-word markers (`##`, `Ġ`, `▁`); `"un*"` is every token that starts with "un"; `"re:..."` is
    an RE2 regular expression that must match the whole token. Empty: none. `vocabulary`
    (`token_vocabulary(tokens)`, the run's token index) saves rebuilding it. Raises SearchError
    for a pattern that cannot run."""
    query = (query or "").strip()
    if not query:
        return np.zeros(0, dtype=np.int64)
    vocabulary = vocabulary if vocabulary is not None else token_vocabulary(tokens)
    if query.startswith("re:"):
        return np.flatnonzero(_pattern_hits(vocabulary.forms, query[3:], time_limit)[vocabulary.form_of_token])
    word = query.lower().lstrip("#")
    if word.endswith("*") and len(word) > 1:
        return vocabulary.prefix(word.rstrip("*"))
    return vocabulary.exact(word)


# --- points, hover, selection ------------------------------------------------------------


def point_info(tokens: pd.DataFrame, sequences: pd.DataFrame | None, point: int, snippet_width: int = 6,
               norm: float | None = None) -> dict:
    """What the hover card shows for point `point` (queries first, then keys); `norm`: the length
    of the point's vector (`RunData.point_norm`), shown when given."""
    n = len(tokens)
    row = tokens.iloc[point % n]
    info = {"point": int(point), "token_index": int(point % n), "kind": "query" if point < n else "key",
            "token": str(row["token"]), "seq_id": int(row["seq_id"]), "pos": int(row["pos"]),
            "seq_len": int(row["seq_len"]), "position": f"position {int(row['pos'])} of {int(row['seq_len'])}"}
    start = point % n - int(row["pos"])
    lo, hi = max(int(row["pos"]) - snippet_width, 0), min(int(row["pos"]) + snippet_width + 1, int(row["seq_len"]))
    words = tokens["token"].iloc[start + lo:start + hi].astype(str).tolist()
    words[int(row["pos"]) - lo] = f"[{words[int(row['pos']) - lo]}]"
    info["snippet"] = ("… " if lo > 0 else "") + " ".join(words) + (" …" if hi < int(row["seq_len"]) else "")
    if norm is not None:
        info["norm"] = float(norm)
    return info


def pick_point(index_raster: np.ndarray, col: int, row: int, radius: int = 4) -> int | None:
    """The point drawn nearest to raster pixel (row, col): `index_raster` holds one point index
    per pixel (-1 where empty). Searches outwards up to `radius` pixels."""
    height, width = index_raster.shape
    if not (0 <= row < height and 0 <= col < width):
        return None
    for r in range(radius + 1):
        window = index_raster[max(row - r, 0):row + r + 1, max(col - r, 0):col + r + 1]
        hits = np.argwhere(window >= 0)
        if len(hits):
            centre = np.array([min(row, r), min(col, r)])
            best = hits[np.argmin(((hits - centre) ** 2).sum(axis=1))]
            return int(window[best[0], best[1]])
    return None


def points_in_box(x: np.ndarray, y: np.ndarray, bounds: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = bounds
    return np.flatnonzero((x >= min(x0, x1)) & (x <= max(x0, x1)) & (y >= min(y0, y1)) & (y <= max(y0, y1)))


def points_in_lasso(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    polygon = np.asarray(polygon, dtype=np.float64)
    if len(polygon) < 3:
        return np.zeros(0, dtype=np.int64)
    candidates = points_in_box(x, y, (*polygon.min(axis=0), *polygon.max(axis=0)))
    px, py = x[candidates].astype(np.float64), y[candidates].astype(np.float64)
    inside = np.zeros(len(candidates), dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):  # even-odd ray casting
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < at)
    return candidates[inside]


def selection_frame(tokens: pd.DataFrame, coords: np.ndarray, points: np.ndarray, layer: int, head: int,
                    method: str) -> pd.DataFrame:
    """One row per selected point: where it is and which token of which sequence it is."""
    n = len(tokens)
    points = np.asarray(points, dtype=np.int64)
    rows = tokens.iloc[points % n].reset_index(drop=True)
    frame = pd.DataFrame({"point": points, "kind": np.where(points < n, "query", "key"),
                          "x": coords[points, 0], "y": coords[points, 1]})
    keep = [c for c in ("seq_id", "pos", "seq_len", "token", "token_id", "is_special", "is_punct", "patch_row",
                        "patch_col") if c in rows.columns]
    frame = pd.concat([frame, rows[keep]], axis=1)
    frame.insert(0, "head", head)
    frame.insert(0, "layer", layer)
    frame.insert(0, "method", method)
    return frame


def export_bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "csv":
        buffer.write(frame.to_csv(index=False).encode())
    elif fmt == "parquet":
        frame.to_parquet(buffer, index=False)
    else:
        raise ValueError(f"unknown export format {fmt!r} (csv or parquet)")
    return buffer.getvalue()


# --- attention ---------------------------------------------------------------------------


def top_keys(attention: np.ndarray, query_pos: int, k: int = 5) -> list[tuple[int, float]]:
    """The `k` key positions the query at `query_pos` attends to most, with their weights."""
    weights = attention[query_pos]
    order = np.argsort(-weights)[:k]
    return [(int(j), float(weights[j])) for j in order if weights[j] > 0]


def head_statistics(attention_maps: list[np.ndarray]) -> dict[str, float]:
    """Summary of one head's attention over some sequences: mean entropy (nats), and the mean
    weight on the token itself, the previous token, the next token and the first token."""
    entropy, self_w, prev_w, next_w, first_w = [], [], [], [], []
    for a in attention_maps:
        n = len(a)
        entropy.append(float(-(a * np.log(np.clip(a, 1e-12, None))).sum(axis=1).mean()))
        self_w.append(float(np.trace(a) / n))
        prev_w.append(float(np.trace(a, offset=-1) / max(n - 1, 1)) if n > 1 else 0.0)
        next_w.append(float(np.trace(a, offset=1) / max(n - 1, 1)) if n > 1 else 0.0)
        first_w.append(float(a[:, 0].mean()))
    mean = lambda values: float(np.mean(values)) if values else 0.0  # noqa: E731
    return {"entropy": mean(entropy), "self": mean(self_w), "previous": mean(prev_w), "next": mean(next_w),
            "first": mean(first_w)}


def attention_signature(attention_maps: list[np.ndarray], max_len: int = 48) -> np.ndarray:
    """One vector per head: its attention maps over a fixed set of sequences, each cropped to
    `max_len` tokens and flattened. Two heads with similar vectors attend alike on the same inputs."""
    return np.concatenate([a[:max_len, :max_len].ravel() for a in attention_maps]).astype(np.float32)


def rank_similar(signatures: np.ndarray, target: int, k: int = 5) -> list[tuple[int, float]]:
    """Indices of the `k` rows of `signatures` most cosine-similar to row `target` (itself
    excluded), best first, with their similarity."""
    unit = signatures / np.maximum(np.linalg.norm(signatures, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit[target]
    similarity[target] = -np.inf
    order = np.argsort(-similarity)[:k]
    return [(int(i), float(similarity[i])) for i in order]


# --- URL state ---------------------------------------------------------------------------


def url_state(args: dict, choices: dict[str, list]) -> dict:
    """Validated view state from URL query arguments (`?layer=2&head=3&method=pca&dim=2&colour=norm`).

    Only values among `choices` are kept; anything else (a path, an unknown head) is dropped,
    so a URL can only choose among what the run already has."""
    state = {}
    for name, allowed in choices.items():
        raw = args.get(name)
        if raw is None:
            continue
        if isinstance(raw, list):
            raw = raw[0] if raw else None
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        for value in allowed:
            if str(value) == str(raw):
                state[name] = value
                break
    return state


# --- the per-process cache of a run ------------------------------------------------------


# entries kept per cache: a head's arrays or thumbnail; every colour mode's colouring (the server's warm-up
# computes them all, up to a second each at 10 M points: none may be evicted before a user switches to it);
# a search's hit pixels in every head; a whole mosaic; the open heads' datashader frames
# (`viz.head_view.shared_points`), one copy per server for every session;
# an image's patches as the model saw them (`viz.patches_layer`)
CACHE_SIZES = {"coords": 6, "norms": 6, "colourings": 16, "tiers": 6, "regions": 6, "thumbnails": 4096,
               "hit_pixels": 4, "mosaics": 8, "head_tables": 8,
               "head_points": 4, "frames": 6, "tier_frames": 2,
               "image_patches": 256}


class RunData:
    """What every session of one server shares: the run, its token table, projections, head tables,
    and bounded LRU caches of whatever depends only on the run and a few choices (a head's
    coordinates, colourings, thumbnails, matrix mosaics), head similarity. Thread-safe."""

    def __init__(self, run):
        self.run = run
        self.tokens = token_table(run.tokens())
        self.sequences = run.sequences()
        self.n = len(self.tokens)
        self._lock = threading.RLock()
        self._caches = {name: LRUCache(size) for name, size in CACHE_SIZES.items()}
        self._similarity = None
        self._images: LRUCache = LRUCache(256)  # decoded images of the image grid and sequence view
        self.projections = run.projections()
        self.head_measurements = run.head_measurements()
        self.head_top_sequences = run.head_top_sequences()
        self.available: dict[tuple[str, int], set[tuple[int, int]]] = {}
        for row in self.projections.itertuples():
            self.available.setdefault((row.method, int(row.dim)), set()).add((int(row.layer), int(row.head)))

    @property
    def methods(self) -> list[str]:
        order = {"umap": 0, "tsne": 1, "pca": 2}
        return sorted({m for m, _ in self.available}, key=lambda m: (order.get(m, 9), m))

    def dims(self, method: str) -> list[int]:
        return sorted(d for m, d in self.available if m == method)

    @functools.cached_property
    def vocabulary(self) -> TokenVocabulary:
        """The run's search forms, built on first use (or by the server's warm-up)."""
        return token_vocabulary(self.tokens)

    def has(self, method: str, dim: int, layer: int, head: int) -> bool:
        return (layer, head) in self.available.get((method, dim), set())

    def cached(self, name: str, key, make):
        """`make()`, kept in the `name` cache under `key` (made outside the lock: two sessions
        asking at once may both make it; either result is kept)."""
        cache = self._caches[name]
        with self._lock:
            if key in cache:
                return cache[key]
        value = make()
        with self._lock:
            cache[key] = value
        return value

    def coords(self, method: str, dim: int, layer: int, head: int) -> np.ndarray:
        return self.cached("coords", (method, dim, layer, head),
                           lambda: self.run.projection(method, layer, head, dim=dim))

    def norms(self, layer: int, head: int) -> np.ndarray:
        def make():
            q = np.linalg.norm(self.run.queries(layer, head), axis=1)
            k = np.linalg.norm(self.run.keys(layer, head), axis=1)
            return np.concatenate([q, k]).astype(np.float32)
        return self.cached("norms", (layer, head), make)

    def point_norm(self, layer: int, head: int, point: int) -> float:
        """The norm of point `point`'s vector (queries first, then keys): from the head's norms
        when a colour mode has computed them, else from that one vector (a hover must not read
        a whole head)."""
        with self._lock:
            norms = self._caches["norms"].get((layer, head))
        if norms is not None:
            return float(norms[point])
        return float(np.linalg.norm(self.run.vector("q" if point < self.n else "k", layer, head, point % self.n)))

    def colouring(self, mode: str, layer: int, head: int) -> Colouring:
        head_specific = mode == "norm"
        key = (mode, layer, head) if head_specific else (mode,)
        return self.cached("colourings", key, lambda: colouring(
            mode, self.tokens, self.norms(layer, head) if head_specific else None))

    def norm_tiers(self, layer: int, head: int) -> np.ndarray:
        return self.cached("tiers", (layer, head), lambda: norm_tiers(self.norms(layer, head)))

    def attention(self, seq_id: int, layer: int, head: int, weighting: str = "attention") -> np.ndarray:
        """[len, len]; `weighting="value_norm"` (runs with values): each key's weight scaled by
        its value's norm, renormalized per query."""
        return self.run.attention(seq_id, layer, head, weighting)

    def sequence_tokens(self, seq_id: int) -> pd.DataFrame:
        row = self.sequences.loc[self.sequences["seq_id"] == seq_id].iloc[0]
        start = int(row["token_offset"])
        return self.tokens.iloc[start:start + int(row["n_tokens"])]

    def token_offset(self, seq_id: int) -> int:
        return int(self.sequences.loc[self.sequences["seq_id"] == seq_id, "token_offset"].iloc[0])

    # similarity ------------------------------------------------------------------------
    def head_similarity(self, n_sequences: int = 12, max_len: int = 48):
        """(heads [(layer, head)], signatures [n_heads, ...], statistics DataFrame), computed
        once: every head's attention over the same `n_sequences` sequences, spread over the run."""
        with self._lock:
            if self._similarity is not None:
                return self._similarity
            ids = self.sequences["seq_id"].to_numpy()
            chosen = ids[np.linspace(0, len(ids) - 1, min(n_sequences, len(ids))).astype(int)]
            heads, signatures, stats = [], [], []
            for layer in self.run.layers:
                for head in range(self.run.n_heads):
                    maps = [self.run.attention(int(s), layer, head) for s in chosen]
                    heads.append((layer, head))
                    signatures.append(attention_signature(maps, max_len))
                    stats.append(dict(layer=layer, head=head, **head_statistics(maps)))
            self._similarity = (heads, np.stack(signatures), pd.DataFrame(stats))
            return self._similarity

    def similar_heads(self, layer: int, head: int, k: int = 5) -> pd.DataFrame:
        heads, signatures, stats = self.head_similarity()
        ranked = rank_similar(signatures, heads.index((layer, head)), k)
        frame = stats.iloc[[i for i, _ in ranked]].copy()
        frame.insert(2, "similarity", [s for _, s in ranked])
        return frame.reset_index(drop=True)

    # images ----------------------------------------------------------------------------
    def image(self, seq_id: int):
        """The input image of an image run's sequence, as the extraction read it. Only the
        run's own source (its manifest's data spec) is read; a stored path that leaves the
        source folder is refused."""
        with self._lock:
            if seq_id in self._images:
                return self._images[seq_id]
        from PIL import Image

        spec = str(self.run.manifest.config.data)
        row = self.sequences.loc[self.sequences["seq_id"] == seq_id]
        if row.empty:
            raise KeyError(f"no sequence {seq_id} in this run")
        if spec.startswith("demo:"):
            from pipeline.sources import open_source

            image = next((item.image for item in open_source(spec) if item.row == seq_id), None)
            if image is None:
                raise KeyError(f"{spec} has no row {seq_id}")
        else:
            root = Path(spec).expanduser().resolve()
            path = (root / str(row["path"].iloc[0])).resolve()
            if root not in path.parents:
                raise PermissionError(f"image path {path} is outside the run's source {root}")
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        with self._lock:
            self._images[seq_id] = image
        return image


_SHARED: dict[str, RunData] = {}
_SHARED_LOCK = threading.Lock()


def shared_run_data(run) -> RunData:
    """One RunData per run per process, shared by every session."""
    key = getattr(getattr(run, "dir", None), "url", None) or str(id(run))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = RunData(run)
        return _SHARED[key]

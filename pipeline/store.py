"""The run store: a directory (local path or fsspec URL) that every stage reads and writes.

    RUN/manifest.json                    model, attention rules, config, layers
    RUN/vectors.zarr/part-NNNNN/q        [layer, head_index, token, d_head]     Zarr v3
    RUN/vectors.zarr/part-NNNNN/k        [layer, kv_head_index, token, d_head]
    RUN/tokens/part-NNNNN.parquet        one row per token, store order
    RUN/sequences/part-NNNNN.parquet     one row per sequence
    RUN/parts/part-NNNNN.json            commit marker, written last

A part holds the sequences of one range of source rows, written by one writer; parts never
share a chunk, so shards can be written in parallel. A part counts only once its commit
marker exists, so a crash never leaves data that reads as complete.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from pipeline.attention import attention_weights
from pipeline.errors import QkatlasError

FORMAT = "qkatlas-run/1"
TOKEN_SCHEMA = pa.schema([
    ("seq_id", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32()), ("token", pa.string()),
    ("seq_len", pa.int32()), ("pos_norm", pa.float32()), ("is_special", pa.bool_()), ("is_punct", pa.bool_()),
    ("patch_row", pa.int16()), ("patch_col", pa.int16()),
    ("mean_r", pa.uint8()), ("mean_g", pa.uint8()), ("mean_b", pa.uint8()),
])
SEQUENCE_SCHEMA = pa.schema([
    ("seq_id", pa.int64()), ("part", pa.string()), ("token_start", pa.int64()), ("n_tokens", pa.int32()),
    ("truncated", pa.bool_()), ("text", pa.string()), ("path", pa.string()), ("meta", pa.string()),
])


class StoreError(QkatlasError, ValueError):
    """A run directory that is missing, incomplete or not a qkatlas run."""


def part_name(index: int) -> str:
    return f"part-{index:05d}"


class RunDir:
    """Paths and small atomic files of one run directory, local or remote."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        return posixpath.join(self.url, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str) -> dict:
        with self.fs.open(self.path(*parts), "rb") as handle:
            return json.loads(handle.read())

    def write_json(self, obj: dict, *parts: str) -> None:
        """Write atomically: readers see the old file or the new one, never a torn one."""
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True, default=str).encode(), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write atomically (temporary file + rename locally, one PUT on object stores)."""
        target = self.path(*parts)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self.is_local:
            temporary = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        else:  # one PUT to an object store is atomic
            self.fs.pipe_file(target, data)

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self.path(*parts), recursive=True)

    def move(self, source: str, target: str) -> None:
        if self.is_local:
            os.replace(self.path(source), self.path(target))
        else:
            self.fs.mv(self.path(source), self.path(target))


# --- writing ------------------------------------------------------------------------------


@dataclass
class VectorSpec:
    n_layers: int  # stored layers
    n_heads: int
    n_kv_heads: int
    d_head: int
    dtype: str = "float16"
    chunk_tokens: int = 16384
    compression: str = "lz4"


COMPRESSORS = {
    # Real fp16 Q/K barely compress (ratio ~1.01 on MiniLM), so the default is the cheapest codec.
    "lz4": lambda: BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.shuffle),
    "zstd": lambda: BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle),
    "none": lambda: None,
}


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`), once per chunk.

    Per-batch tensors of varying shapes fragment glibc's heap: without this, peak RSS grew
    ~20% from 50k to 500k tokens. A fixed mmap threshold also kept it flat but cost ~30% of
    forward speed; trimming once per chunk costs nothing measurable (`qkatlas bench extract`)."""
    import ctypes
    import ctypes.util
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class PartWriter:
    """Streams one part: Q/K go into two preallocated chunk buffers; a full buffer is written
    by a background thread while the other fills.

    Memory is two chunks' worth of tokens whatever the corpus size, and every chunk is written
    exactly once (no read-modify-write).
    """

    def __init__(self, run: RunDir, index: int, spec: VectorSpec):
        self.run, self.name, self.spec = run, part_name(index), spec
        for stale in (("vectors.zarr", self.name), ("tokens", f"{self.name}.parquet.partial"),
                      ("sequences", f"{self.name}.parquet.partial")):
            run.remove(*stale)
        group = zarr.open_group(run.url_of("vectors.zarr"), mode="a")
        part = group.require_group(self.name)
        heads = {"q": spec.n_heads, "k": spec.n_kv_heads}
        self.arrays = {
            name: part.create_array(
                name, shape=(spec.n_layers, heads[name], 0, spec.d_head), dtype=spec.dtype,
                chunks=(1, 1, spec.chunk_tokens, spec.d_head), compressors=COMPRESSORS[spec.compression](),
                dimension_names=("layer", "head_index" if name == "q" else "kv_head_index", "token", "d_head"),
            )
            for name in ("q", "k")
        }
        self._buffers = [{name: np.empty((spec.n_layers, heads[name], spec.chunk_tokens, spec.d_head), spec.dtype)
                          for name in ("q", "k")} for _ in range(2)]
        self._current, self._fill = 0, 0
        for folder in ("tokens", "sequences"):
            run.fs.makedirs(run.path(folder), exist_ok=True)
        self._token_file = run.fs.open(run.path("tokens", f"{self.name}.parquet.partial"), "wb")
        self._sequence_file = run.fs.open(run.path("sequences", f"{self.name}.parquet.partial"), "wb")
        self._tokens = pq.ParquetWriter(self._token_file, TOKEN_SCHEMA, compression="zstd")
        self._sequences = pq.ParquetWriter(self._sequence_file, SEQUENCE_SCHEMA, compression="zstd")
        self._pending_tokens: list[pa.Table] = []
        self._pending_sequences: list[pa.Table] = []
        self.n_tokens = 0  # tokens handed to append()
        self._written = 0  # tokens whose vectors were handed to the writer thread
        self.n_sequences = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkatlas-writer")
        self._inflight: Future | None = None

    def reserve(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Views of the current buffer for the next `n` tokens, to be filled in place and then
        passed to `append(..., reserved=True)`; None when they do not fit before the chunk ends."""
        if self._fill + n > self.spec.chunk_tokens:
            return None
        buffer = self._buffers[self._current]
        window = slice(self._fill, self._fill + n)
        return buffer["q"][:, :, window], buffer["k"][:, :, window]

    def append(self, queries: np.ndarray, keys: np.ndarray, tokens: dict, sequences: dict,
               reserved: bool = False) -> None:
        """`queries` [layer, head_index, token, d_head], `keys` [layer, kv_head_index, token, d_head];
        `tokens` / `sequences`: columns of TOKEN_SCHEMA / SEQUENCE_SCHEMA for these tokens.
        `reserved`: the vectors are already in the buffer (written through `reserve`)."""
        n = queries.shape[2]
        sequences = dict(sequences, part=[self.name] * len(sequences["seq_id"]),
                         token_start=[self.n_tokens + start for start in sequences["token_start"]])
        self._pending_tokens.append(pa.table(tokens, schema=TOKEN_SCHEMA))
        self._pending_sequences.append(pa.table(sequences, schema=SEQUENCE_SCHEMA))
        self.n_tokens += n
        self.n_sequences += len(sequences["seq_id"])
        if reserved:
            self._fill += n
            if self._fill == self.spec.chunk_tokens:
                self._submit()
            return
        offset = 0
        while offset < n:
            take = min(n - offset, self.spec.chunk_tokens - self._fill)
            buffer = self._buffers[self._current]
            buffer["q"][:, :, self._fill:self._fill + take] = queries[:, :, offset:offset + take]
            buffer["k"][:, :, self._fill:self._fill + take] = keys[:, :, offset:offset + take]
            self._fill += take
            offset += take
            if self._fill == self.spec.chunk_tokens:
                self._submit()

    def _submit(self) -> None:
        """Hand the current buffer to the writer thread and switch to the other one."""
        self._wait()  # the other buffer's write must be done before it is refilled
        buffer, n = self._buffers[self._current], self._fill
        tokens = pa.concat_tables(self._pending_tokens) if self._pending_tokens else None
        sequences = pa.concat_tables(self._pending_sequences) if self._pending_sequences else None
        self._pending_tokens, self._pending_sequences = [], []
        self._inflight = self._pool.submit(self._write, self._written, buffer, n, tokens, sequences)
        trim_heap()
        self._written += n
        self._current, self._fill = 1 - self._current, 0

    def _write(self, start: int, buffer: dict, n: int, tokens: pa.Table | None, sequences: pa.Table | None) -> None:
        stop = start + n
        for name, array in self.arrays.items():
            array.resize(array.shape[:2] + (stop, self.spec.d_head))
            array[:, :, start:stop, :] = buffer[name][:, :, :n]
        if tokens is not None:
            self._tokens.write_table(tokens)
        if sequences is not None:
            self._sequences.write_table(sequences)

    def _wait(self) -> None:
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None

    def close(self) -> dict:
        """Write what is buffered and close the files; the caller commits the part."""
        if self._fill or self._pending_tokens:
            self._submit()
        self._wait()
        self._pool.shutdown()
        self._tokens.close()
        self._sequences.close()
        self._token_file.close()
        self._sequence_file.close()
        for folder in ("tokens", "sequences"):
            self.run.move(posixpath.join(folder, f"{self.name}.parquet.partial"),
                          posixpath.join(folder, f"{self.name}.parquet"))
        return {"n_tokens": self.n_tokens, "n_sequences": self.n_sequences}

    def abort(self) -> None:
        """Drop what this part wrote; nothing of it was committed."""
        self._pool.shutdown(cancel_futures=True)
        for handle in (self._tokens, self._sequences, self._token_file, self._sequence_file):
            try:
                handle.close()
            except Exception:
                pass
        for stale in (("vectors.zarr", self.name), ("tokens", f"{self.name}.parquet.partial"),
                      ("sequences", f"{self.name}.parquet.partial")):
            self.run.remove(*stale)


def projection_name(method: str, dim: int, layer: int, head: int) -> tuple[str, str]:
    return f"{method}{dim}d", f"L{layer:03d}H{head:03d}"


def write_projection(run: RunDir, method: str, dim: int, layer: int, head: int, coords: np.ndarray,
                     record: dict) -> None:
    """Write one head's layout, then its commit marker: a crash in between leaves no marker,
    so a half-written layout never reads as complete and is simply redone."""
    folder, name = projection_name(method, dim, layer, head)
    group = zarr.open_group(run.url_of("projections.zarr"), mode="a").require_group(folder)
    array = group.create_array(name, shape=coords.shape, dtype="float32", chunks=(1 << 20, coords.shape[1]),
                               overwrite=True, dimension_names=("point", "dim"))
    array[...] = coords.astype(np.float32)
    run.write_json(dict(record, method=method, dim=dim, layer=layer, head=head, complete=True),
                   "projections", folder, f"{name}.json")


def committed_projections(run: RunDir) -> dict[tuple[str, int, int, int], dict]:
    if not run.exists("projections"):
        return {}
    records = {}
    for path in run.fs.glob(run.path("projections", "*", "*.json")):
        folder, name = path.split("/")[-2:]
        record = run.read_json("projections", folder, name)
        records[(record["method"], record["dim"], record["layer"], record["head"])] = record
    return records


def write_head_tables(run: RunDir, measurements: pd.DataFrame, top_sequences: pd.DataFrame, record: dict) -> None:
    """Write the head atlas tables, then their commit marker."""
    for name, frame in (("measurements", measurements), ("top_sequences", top_sequences)):
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer, compression="zstd")
        run.write_bytes(buffer.getvalue().to_pybytes(), "heads", f"{name}.parquet")
    run.write_json(dict(record, complete=True), "heads", "measurements.json")


def mark_extraction_complete(run: RunDir, parts: int) -> dict:
    """Once all `parts` are committed, record their totals in the manifest and mark the
    extraction complete, so that the run opens for reading. Returns the totals."""
    from collections import Counter

    committed = committed_parts(run)
    if len(committed) < parts:
        raise StoreError(f"{run.url}: only {len(committed)} of {parts} parts are committed")
    skipped = Counter()
    for record in committed.values():
        skipped.update(record.get("skipped", {}))
    totals = {"parts": parts, "complete": True,
              "n_sequences": sum(record["n_sequences"] for record in committed.values()),
              "n_tokens": sum(record["n_tokens"] for record in committed.values()),
              "truncated": sum(record.get("truncated", 0) for record in committed.values()),
              "skipped": dict(skipped)}
    manifest = run.read_json("manifest.json")
    manifest["extract"] = dict(manifest.get("extract", {}), **totals)
    run.write_json(manifest, "manifest.json")
    return totals


def commit_part(run: RunDir, index: int, record: dict) -> None:
    run.write_json(dict(record, part=part_name(index), complete=True), "parts", f"{part_name(index)}.json")


def committed_parts(run: RunDir) -> dict[str, dict]:
    if not run.exists("parts"):
        return {}
    markers = sorted(path for path in run.fs.ls(run.path("parts"), detail=False) if path.endswith(".json"))
    records = {}
    for path in markers:
        name = posixpath.basename(path).removesuffix(".json")
        records[name] = run.read_json("parts", f"{name}.json")
    return records


# --- reading ------------------------------------------------------------------------------


class Run:
    """Read access to a run directory; everything downstream uses this API."""

    def __init__(self, url: str):
        self.dir = RunDir(url)
        if not self.dir.exists("manifest.json"):
            raise StoreError(f"{url} is not a qkatlas run (no manifest.json)")
        self.manifest = self.dir.read_json("manifest.json")
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{url}: unknown run format {self.manifest.get('format')!r}")
        self.parts = committed_parts(self.dir)
        expected = self.manifest.get("extract", {}).get("parts")
        if not self.parts or (expected is not None and len(self.parts) < expected):
            raise StoreError(f"{url}: extraction is not complete ({len(self.parts)} of {expected or '?'} parts "
                             "committed); rerun the extraction to finish it")
        attention = self.manifest["attention"]
        self.layers: list[int] = self.manifest["layers"]
        self.n_layers = len(self.layers)
        self.n_heads: int = attention["n_heads"]
        self.n_kv_heads: int = attention["n_kv_heads"]
        self.d_head: int = attention["d_head"]
        self.kv_head_of_q: list[int] = attention["kv_head_of_q"]
        self.mask_rule: str = attention["mask_rule"]
        self._group = zarr.open_group(self.dir.url_of("vectors.zarr"), mode="r")

    def __repr__(self) -> str:
        return (f"Run({self.dir.url!r}: {self.manifest['model']['id']}, {self.n_layers} layers x {self.n_heads} heads, "
                f"{self.n_tokens} tokens)")

    @property
    def n_tokens(self) -> int:
        return sum(record["n_tokens"] for record in self.parts.values())

    @property
    def modality(self) -> str:
        return self.manifest["model"]["modality"]

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise IndexError(f"layer {layer} is not stored in this run (stored: {self.layers})")
        return self.layers.index(layer)

    def _head(self, head: int) -> int:
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range: the model has {self.n_heads} query heads")
        return head

    def scale(self, layer: int) -> float:
        return self.manifest["attention"]["scale"][layer]

    def sliding_window(self, layer: int) -> int | None:
        return self.manifest["attention"]["sliding_window"][layer]

    def _vectors(self, name: str, layer: int, head: int, start: int | None = None, stop: int | None = None,
                 part: str | None = None) -> np.ndarray:
        row = self._layer_index(layer)
        if part is not None:
            return np.asarray(self._group[part][name][row, head, start:stop], dtype=np.float32)
        blocks = [self._group[part][name][row, head] for part in self.parts]
        return np.concatenate(blocks, axis=0).astype(np.float32, copy=False)

    def queries(self, layer: int, head: int) -> np.ndarray:
        """[n_tokens, d_head] float32, in `tokens()` order."""
        return self._vectors("q", layer, self._head(head))

    def keys(self, layer: int, head: int) -> np.ndarray:
        """The keys query head `head` reads (its key/value head), [n_tokens, d_head] float32."""
        return self._vectors("k", layer, self.kv_head_of_q[self._head(head)])

    @cached_property
    def _tokens(self) -> pd.DataFrame:
        tables = [pq.read_table(self.dir.path("tokens", f"{part}.parquet"), filesystem=self.dir.fs)
                  for part in self.parts]
        frame = pa.concat_tables(tables).to_pandas()
        if self.modality == "text":
            frame = frame.drop(columns=["patch_row", "patch_col", "mean_r", "mean_g", "mean_b"])
        return frame

    def tokens(self) -> pd.DataFrame:
        """One row per token, in store order (row i is point i of every head)."""
        return self._tokens.copy()

    @cached_property
    def _sequences(self) -> pd.DataFrame:
        tables = [pq.read_table(self.dir.path("sequences", f"{part}.parquet"), filesystem=self.dir.fs)
                  for part in self.parts]
        frame = pa.concat_tables(tables).to_pandas()
        offsets, total = {}, 0
        for part, record in self.parts.items():
            offsets[part] = total
            total += record["n_tokens"]
        frame["token_offset"] = frame["part"].map(offsets) + frame["token_start"]
        meta = pd.json_normalize([json.loads(text) if isinstance(text, str) else {} for text in frame["meta"]])
        meta = meta.drop(columns=[c for c in meta.columns if c in frame.columns], errors="ignore")
        frame = pd.concat([frame.drop(columns=["meta"]), meta.set_index(frame.index)], axis=1)
        return frame.dropna(axis=1, how="all")

    def sequences(self) -> pd.DataFrame:
        """One row per sequence: `seq_id`, text or image path, `token_offset` (its first token), metadata."""
        return self._sequences.copy()

    def _sequence(self, seq_id: int) -> pd.Series:
        frame = self._sequences
        match = frame.index[frame["seq_id"] == seq_id]
        if len(match) == 0:
            raise KeyError(f"no sequence {seq_id} in this run")
        return frame.loc[match[0]]

    def attention(self, seq_id: int, layer: int, head: int) -> np.ndarray:
        """The head's attention weights within one sequence, [len, len], recomputed from stored Q/K."""
        row = self._sequence(seq_id)
        start, stop = int(row["token_start"]), int(row["token_start"] + row["n_tokens"])
        queries = self._vectors("q", layer, self._head(head), start, stop, part=row["part"])
        keys = self._vectors("k", layer, self.kv_head_of_q[head], start, stop, part=row["part"])
        return attention_weights(queries, keys, self.scale(layer), self.mask_rule, self.sliding_window(layer))

    def projections(self) -> pd.DataFrame:
        """One row per completed projection: method, dim, layer, head, backend, time, quality."""
        records = committed_projections(self.dir)
        if not records:
            return pd.DataFrame(columns=["method", "dim", "layer", "head"])
        return pd.json_normalize(list(records.values())).sort_values(["method", "dim", "layer", "head"])

    def projection(self, method: str, layer: int, head: int, dim: int = 2) -> np.ndarray:
        """[2 * n_tokens, dim] float32: queries first, then keys, each in `tokens()` order."""
        folder, name = projection_name(method, dim, layer, head)
        if not self.dir.exists("projections", folder, f"{name}.json"):
            raise KeyError(f"no {dim}-D {method} projection of layer {layer} head {head} in {self.dir.url}; "
                           f"run: qkatlas reduce {self.dir.url} --method {method} --dim {dim}")
        group = zarr.open_group(self.dir.url_of("projections.zarr"), mode="r")
        return np.asarray(group[folder][name][...], dtype=np.float32)

    def head_measurements(self) -> pd.DataFrame | None:
        """One row per (layer, head) of the head atlas (see `pipeline.heads`), or None when
        `qkatlas heads` has not committed them yet."""
        if not self.dir.exists("heads", "measurements.json"):
            return None
        return pq.read_table(self.dir.path("heads", "measurements.parquet"), filesystem=self.dir.fs).to_pandas()

    def head_top_sequences(self) -> pd.DataFrame | None:
        """Rows (layer, head, rank, seq_id, score): the sequences where each head is most itself."""
        if not self.dir.exists("heads", "measurements.json"):
            return None
        return pq.read_table(self.dir.path("heads", "top_sequences.parquet"), filesystem=self.dir.fs).to_pandas()

    def store_bytes(self) -> int:
        return sum(self.dir.fs.du(self.dir.path(folder)) for folder in ("vectors.zarr", "tokens", "sequences"))


def open_run(url: str) -> Run:
    """Open a run directory (a local path or an fsspec URL) for reading."""
    return Run(url)

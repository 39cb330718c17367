"""Writing a run: parts of Q/K vectors, projections, thumbnails, regions and head tables.

Each writer writes a new version under a fresh token, commits it by replacing one marker file,
and only then removes the version that marker pointed at (see `pipeline.store.layout`).
A marker proves its data: it records each array's shape, the CRC-32 of every chunk's values and
every file's size, so readers and `verify` can tell a missing, truncated or zero-filled chunk."""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import os
import posixpath
import sys
import zlib
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec
from zarr.core.metadata import ArrayV3Metadata

from pipeline.store.layout import RunDir, head_name, layout_name, new_token, part_name
from pipeline.store.manifest import Manifest, StoreError, is_run, load_manifest, save_manifest

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

COMPRESSORS = {
    # Real fp16 Q/K barely compress (ratio ~1.01 on MiniLM with lz4), so the default is none.
    "lz4": lambda: BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.shuffle),
    "zstd": lambda: BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle),
    "none": lambda: None,
}


def crc(values: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(values).view(np.uint8).reshape(-1).data)


def file_record(run: RunDir, *parts: str) -> dict:
    data = run.read_bytes(*parts)
    return {"path": "/".join(parts), "bytes": len(data), "crc": zlib.crc32(data)}


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`), once per chunk: per-batch
    tensors of varying shapes fragment glibc's heap (peak RSS grew ~20% from 50k to 500k tokens)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


# --- creating and replacing a run -------------------------------------------------------


def check_writable(run: RunDir) -> None:
    """Refuse a target that is a file, or a directory holding something other than a run."""
    if run.fs.exists(run.root) and not run.fs.isdir(run.root):
        raise StoreError(f"--out {run.url} is a file, not a directory; choose a new directory for the run")
    if not run.is_empty_or_missing() and not is_run(run):
        raise StoreError(f"{run.url} is not empty and is not a qkatlas run; refusing to write into it "
                         "(choose a new or empty --out)")


def create_run(run: RunDir, manifest: Manifest) -> None:
    check_writable(run)
    try:
        run.fs.makedirs(run.root, exist_ok=True)
        save_manifest(run, manifest)
    except (PermissionError, NotADirectoryError, FileExistsError) as error:
        raise StoreError(f"cannot write the run at {run.url}: {error.strerror or error}; "
                         "choose a writable --out") from None


def staging_for(run: RunDir) -> RunDir:
    """A fresh directory beside `run` where its replacement is built."""
    parent, name = posixpath.split(run.url.rstrip("/"))
    return RunDir(posixpath.join(parent, f".{name}.staging-{new_token()}"))


def swap_in(staging: RunDir, run: RunDir) -> None:
    """Put a committed replacement in place of `run`, then delete the old run, thumbnails,
    projections and everything else of it. Locally two renames; on object stores a move."""
    parent, name = posixpath.split(run.root.rstrip("/"))
    retired = posixpath.join(parent, f".{name}.retired-{new_token()}")
    if run.fs.exists(run.root):
        run.fs.mv(run.root, retired, recursive=True)
    run.fs.mv(staging.root, run.root, recursive=True)
    if run.fs.exists(retired):
        run.fs.rm(retired, recursive=True)


def leftovers(run: RunDir) -> list[str]:
    """Staging or retired directories that a crash left beside the run."""
    parent, name = posixpath.split(run.root.rstrip("/"))
    try:
        siblings = run.fs.ls(parent, detail=False)
    except FileNotFoundError:
        return []
    prefixes = (f".{name}.staging-", f".{name}.retired-")
    return [path for path in siblings if posixpath.basename(path.rstrip("/")).startswith(prefixes)]


def recover(run: RunDir) -> None:
    """Finish or undo what a crash left beside the run (hold the run's lock): a swap cut between
    its two moves is completed from a committed staging run, or the old run is moved back; then
    leftover staging and retired directories are removed."""
    if not run.fs.exists(run.root):
        for path in leftovers(run):
            candidate = RunDir(run.url.rsplit("/", 1)[0] + "/" + posixpath.basename(path.rstrip("/")))
            if ".staging-" in path and is_run(candidate) and load_manifest(candidate).extract.complete:
                run.fs.mv(path, run.root, recursive=True)
                break
        else:
            retired = [path for path in leftovers(run) if ".retired-" in path]
            if retired:
                run.fs.mv(retired[0], run.root, recursive=True)
    for path in leftovers(run):
        run.fs.rm(path, recursive=True)


def update_manifest(run: RunDir, **changes) -> Manifest:
    manifest = load_manifest(run).model_copy(update=changes)
    save_manifest(run, manifest)
    return manifest


# --- parts ------------------------------------------------------------------------------


@dataclass
class VectorSpec:
    n_layers: int  # stored layers
    n_heads: int
    n_kv_heads: int
    d_head: int
    dtype: str = "float16"
    chunk_tokens: int = 16384
    compression: str = "none"
    values: bool = False  # also store the value vectors, "v", per key/value head

    def heads_of(self) -> dict[str, int]:
        """Stored array name -> heads along its axis 1."""
        heads = {"q": self.n_heads, "k": self.n_kv_heads}
        return dict(heads, v=self.n_kv_heads) if self.values else heads


class PartWriter:
    """Streams one part under a fresh token: Q/K (and V) go into two preallocated chunk buffers,
    which a background thread writes while the forward fills them.

    Each batch's tokens are added to the running CRC of each (layer, head, chunk) and, on a local
    disk with uncompressed chunks, written into their chunk files (`_write_rows`) by that thread
    while the next batch's forward runs, so that little is left to do after the last forward;
    otherwise zarr writes each chunk once it is full. Memory is two chunks' worth of tokens
    whatever the corpus size. A failure on the writer thread is raised by the next `append` or
    by `close`, before anything is committed."""

    def __init__(self, run: RunDir, index: int, spec: VectorSpec):
        self.run, self.name, self.spec, self.token = run, part_name(index), spec, new_token()
        heads = spec.heads_of()
        vectors = run.part_vectors(self.name, self.token)
        self.arrays = {
            name: zarr.create_array(
                run.url_of(*vectors, name), shape=(spec.n_layers, heads[name], 0, spec.d_head), dtype=spec.dtype,
                chunks=(1, 1, spec.chunk_tokens, spec.d_head), compressors=COMPRESSORS[spec.compression](),
                dimension_names=("layer", "head_index" if name == "q" else "kv_head_index", "token", "d_head"),
                config={"write_empty_chunks": True})  # every chunk has a file, as `_write_rows` writes them
            for name in heads
        }
        self._rows_to_files = run.is_local and hasattr(os, "pwrite") and all(
            stores_plain_chunks(array) for array in self.arrays.values())
        # "q" | "k" | "v" -> [layer][head] -> the CRC of each chunk
        self.crcs: dict[str, list[list[list[int]]]] = {
            name: [[[] for _ in range(heads[name])] for _ in range(spec.n_layers)] for name in heads}
        # "q" | "k" | "v" -> [layer][head] -> the CRC of the current chunk's tokens so far (writer thread)
        self._running_crcs = {name: [[0] * heads[name] for _ in range(spec.n_layers)] for name in heads}
        self._buffers = [{name: np.empty((spec.n_layers, heads[name], spec.chunk_tokens, spec.d_head), spec.dtype)
                          for name in heads} for _ in range(2)]
        self._current, self._fill = 0, 0
        self._files = {table: run.part_table(table, self.name, self.token) for table in ("tokens", "sequences")}
        for folder, _ in self._files.values():
            run.fs.makedirs(run.path(folder), exist_ok=True)
        self._handles = {table: run.fs.open(run.path(*path), "wb") for table, path in self._files.items()}
        self._tokens = pq.ParquetWriter(self._handles["tokens"], TOKEN_SCHEMA, compression="zstd")
        self._sequences = pq.ParquetWriter(self._handles["sequences"], SEQUENCE_SCHEMA, compression="zstd")
        self._pending_tokens: list[pa.Table] = []
        self._pending_sequences: list[pa.Table] = []
        self.n_tokens = 0  # tokens handed to append()
        self._written = 0  # tokens whose vectors were handed to the writer thread
        self.n_sequences = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkatlas-writer")
        self._tasks: deque[Future] = deque()  # queued on the writer thread, oldest first
        self._inflight: Future | None = None  # the last chunk's write

    def reserve(self, n: int) -> dict[str, np.ndarray] | None:
        """Views of the current buffer for the next `n` tokens ("q", "k" and, with values, "v"),
        to be filled in place and then passed to `append`; None when they do not fit before the
        chunk ends."""
        if self._fill + n > self.spec.chunk_tokens:
            return None
        buffer = self._buffers[self._current]
        window = slice(self._fill, self._fill + n)
        return {name: rows[:, :, window] for name, rows in buffer.items()}

    def append(self, vectors: dict[str, np.ndarray], tokens: dict, sequences: dict, reserved: bool = False) -> None:
        """`vectors`: "q" [layer, head_index, token, d_head], "k" (and "v" when the spec stores
        values) [layer, kv_head_index, token, d_head]; `tokens` / `sequences`: columns of
        TOKEN_SCHEMA / SEQUENCE_SCHEMA for these tokens. `reserved`: the vectors are the views
        `reserve` returned, already in the buffer."""
        if vectors.keys() != self.arrays.keys():
            raise ValueError(f"this part stores {sorted(self.arrays)}, got {sorted(vectors)}")
        n = vectors["q"].shape[2]
        sequences = dict(sequences, part=[self.name] * len(sequences["seq_id"]),
                         token_start=[self.n_tokens + start for start in sequences["token_start"]])
        self._pending_tokens.append(pa.table(tokens, schema=TOKEN_SCHEMA))
        self._pending_sequences.append(pa.table(sequences, schema=SEQUENCE_SCHEMA))
        self.n_tokens += n
        self.n_sequences += len(sequences["seq_id"])
        if reserved:
            self._filled(n)
            return
        offset = 0
        while offset < n:
            take = min(n - offset, self.spec.chunk_tokens - self._fill)
            buffer = self._buffers[self._current]
            for name, rows in vectors.items():
                buffer[name][:, :, self._fill:self._fill + take] = rows[:, :, offset:offset + take]
            offset += take
            self._filled(take)

    def _filled(self, n: int) -> None:
        """The current buffer's next `n` tokens hold their vectors: queue their CRCs, and the
        chunk's write once the buffer is full."""
        start, self._fill = self._fill, self._fill + n
        self._queue(self._take, self._buffers[self._current], self._written // self.spec.chunk_tokens, start,
                    self._fill)
        if self._fill == self.spec.chunk_tokens:
            self._submit()

    def _queue(self, task, *args) -> Future:
        """Run `task` on the writer thread after the tasks queued before it; the first failure
        among those already done is raised here."""
        while self._tasks and self._tasks[0].done():
            self._tasks.popleft().result()
        future = self._pool.submit(task, *args)
        self._tasks.append(future)
        return future

    def _submit(self) -> None:
        """Queue the current buffer's write and switch to the other buffer, once its own write
        (queued before) is done."""
        buffer, n = self._buffers[self._current], self._fill
        tokens = pa.concat_tables(self._pending_tokens) if self._pending_tokens else None
        sequences = pa.concat_tables(self._pending_sequences) if self._pending_sequences else None
        self._pending_tokens, self._pending_sequences = [], []
        previous, self._inflight = self._inflight, self._queue(self._write, self._written, buffer, n, tokens, sequences)
        if previous is not None:
            previous.result()
        self._written += n
        self._current, self._fill = 1 - self._current, 0

    def _take(self, buffer: dict, chunk: int, start: int, stop: int) -> None:
        """Add tokens [start, stop) of `buffer` (chunk `chunk`) to the running CRC of each
        (layer, head), and write them into its chunk file where `_write_rows` applies."""
        for name, running in self._running_crcs.items():
            for layer, heads in enumerate(running):
                for head, value in enumerate(heads):
                    rows = buffer[name][layer, head, start:stop]
                    heads[head] = zlib.crc32(rows, value)
                    if self._rows_to_files:
                        self._write_rows(self._chunk_path(name, layer, head, chunk), start * rows.strides[0], rows)

    def _chunk_path(self, name: str, layer: int, head: int, chunk: int) -> str:
        key = self.arrays[name].metadata.encode_chunk_key((layer, head, chunk, 0))
        return self.run.path(*self.run.part_vectors(self.name, self.token), name, key)

    @staticmethod
    def _write_rows(path: str, offset: int, rows: np.ndarray) -> None:
        """Put `rows` at byte `offset` of a chunk file that holds the chunk's values as they are
        (`stores_plain_chunks`): the file zarr would write, built batch by batch instead of at
        the chunk's end, and without zarr's per-chunk asyncio round trips."""
        if offset == 0:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
        data = rows.data.cast("B")
        handle = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            while data:
                written = os.pwrite(handle, data, offset)
                data, offset = data[written:], offset + written
        finally:
            os.close(handle)

    def _write(self, start: int, buffer: dict, n: int, tokens: pa.Table | None, sequences: pa.Table | None) -> None:
        stop = start + n
        for name, array in self.arrays.items():
            array.resize(array.shape[:2] + (stop, self.spec.d_head))
            if not self._rows_to_files:
                array[:, :, start:stop, :] = buffer[name][:, :, :n]
            elif n < self.spec.chunk_tokens:  # an edge chunk's file holds the whole chunk, zero-padded (the fill value)
                chunk_bytes = buffer[name][0, 0].nbytes
                for layer, head in np.ndindex(*buffer[name].shape[:2]):
                    os.truncate(self._chunk_path(name, layer, head, start // self.spec.chunk_tokens), chunk_bytes)
            for layer, heads in enumerate(self.crcs[name]):
                for head, chunks in enumerate(heads):
                    chunks.append(self._running_crcs[name][layer][head])
                    self._running_crcs[name][layer][head] = 0
        if tokens is not None:
            self._tokens.write_table(tokens)
        if sequences is not None:
            self._sequences.write_table(sequences)
        trim_heap()

    def _drain(self) -> None:
        while self._tasks:
            self._tasks.popleft().result()

    def close(self) -> dict:
        """Write what is buffered, close the files; returns the marker's proof of the data
        (the caller adds its own fields and commits with `commit_part`)."""
        if self._fill or self._pending_tokens:
            self._submit()
        self._drain()
        self._pool.shutdown()
        self._tokens.close()
        self._sequences.close()
        for handle in self._handles.values():
            handle.close()
        vectors = self.run.part_vectors(self.name, self.token)
        return {"n_tokens": self.n_tokens, "n_sequences": self.n_sequences, "token": self.token,
                "arrays": {name: {"shape": list(array.shape), "crc": self.crcs[name]}
                           for name, array in self.arrays.items()},
                "chunk_files": self.run.files_with_sizes(*vectors),
                "files": {table: file_record(self.run, *path) for table, path in self._files.items()}}

    def abort(self) -> None:
        """Drop this writer's own files (its token is unique: nobody else's are touched)."""
        self._pool.shutdown(cancel_futures=True)
        for handle in (self._tokens, self._sequences, *self._handles.values()):
            try:
                handle.close()
            except Exception:  # closing a half-written file after a failure
                pass
        remove_part_version(self.run, self.name, self.token)


def stores_plain_chunks(array: zarr.Array) -> bool:
    """Whether each chunk file of `array` holds just the chunk's values in this machine's byte
    order, an edge chunk padded with zero bytes (no compressor, a zero fill value)."""
    metadata = array.metadata
    if not isinstance(metadata, ArrayV3Metadata) or len(metadata.codecs) != 1:
        return False
    codec = metadata.codecs[0]
    return (isinstance(codec, BytesCodec) and codec.endian is not None and codec.endian.value == sys.byteorder
            and not metadata.storage_transformers
            and not np.asarray(metadata.fill_value, dtype=array.dtype).tobytes().strip(b"\0"))


def remove_part_version(run: RunDir, name: str, token: str) -> None:
    run.remove(*run.part_vectors(name, token))
    for table in ("tokens", "sequences"):
        run.remove(*run.part_table(table, name, token))


def commit_part(run: RunDir, index: int, record: dict) -> None:
    """Replace the part's marker with `record` (from `PartWriter.close`), then drop the version
    the old marker pointed at."""
    name = part_name(index)
    previous = read_marker(run, *run.part_marker(name))
    run.write_json(dict(record, part=name, complete=True), *run.part_marker(name))
    if previous and previous.get("token") not in (None, record["token"]):
        remove_part_version(run, name, previous["token"])


def read_marker(run: RunDir, *parts: str) -> dict | None:
    try:
        return run.read_json(*parts)
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a marker is written atomically: an unreadable one was damaged from outside


def part_damage(run: RunDir, record: dict) -> str | None:
    """Cheap check of a committed part (one listing, no data read): every chunk file there
    with its recorded size, and its tables. Returns what is wrong, or None."""
    vectors = run.part_vectors(record["part"], record["token"])
    found = run.files_with_sizes(*vectors)
    for key, size in record["chunk_files"].items():
        if key not in found:
            return f"{posixpath.join(*vectors, key)} is missing"
        if found[key] != size:
            return f"{posixpath.join(*vectors, key)} has {found[key]} bytes, {size} were written"
    for table in record["files"].values():
        folder, name = posixpath.split(table["path"])
        sizes = run.files_with_sizes(folder)
        if sizes.get(name) != table["bytes"]:
            return f"{table['path']} is missing or has the wrong size"
    return None


def committed_parts(run: RunDir) -> dict[str, dict]:
    """Markers of committed parts, by part name."""
    records = {}
    for file in run.listdir("parts"):
        if file.endswith(".json"):
            record = read_marker(run, "parts", file)
            if record and record.get("complete") and not record.get("damaged"):
                records[file.removesuffix(".json")] = record
    return records


def mark_extraction_complete(run: RunDir, parts: int) -> dict:
    """Once all `parts` are committed, record their totals in the manifest and mark the
    extraction complete, so that the run opens for reading. Returns the totals."""
    committed = committed_parts(run)
    if len(committed) < parts:
        raise StoreError(f"{run.url}: only {len(committed)} of {parts} parts are committed")
    skipped: Counter[str] = Counter()
    for record in committed.values():
        skipped.update(record.get("skipped", {}))
    manifest = load_manifest(run)
    state = manifest.extract.model_copy(update={
        "parts": parts, "complete": True, "skipped": dict(skipped),
        "n_sequences": sum(record["n_sequences"] for record in committed.values()),
        "n_tokens": sum(record["n_tokens"] for record in committed.values()),
        "truncated": sum(record.get("truncated", 0) for record in committed.values())})
    save_manifest(run, manifest.model_copy(update={"extract": state}))
    return state.model_dump()


# --- projections and what derives from them ------------------------------------------------


def write_projection(run: RunDir, method: str, dim: int, layer: int, head: int, coords: np.ndarray,
                     record: dict) -> dict:
    """Write one head's layout as a new version, then its marker; the old version (and its
    thumbnail and regions) is removed only after that. Returns the marker."""
    token = new_token()
    coords = np.ascontiguousarray(coords, dtype=np.float32)
    path = run.projection_array(method, dim, layer, head, token)
    array = zarr.create_array(run.url_of(*path), shape=coords.shape, dtype="float32",
                              chunks=(1 << 20, coords.shape[1]), dimension_names=("point", "dim"))
    array[...] = coords
    marker = dict(record, method=method, dim=dim, layer=layer, head=head, complete=True, token=token,
                  shape=list(coords.shape), crc=crc(coords), chunk_files=run.files_with_sizes(*path))
    previous = read_marker(run, *run.projection_marker(method, dim, layer, head))
    run.write_json(marker, *run.projection_marker(method, dim, layer, head))
    if previous and previous.get("token"):
        remove_projection_version(run, method, dim, layer, head, previous["token"])
    return marker


def remove_projection_version(run: RunDir, method: str, dim: int, layer: int, head: int, token: str) -> None:
    run.remove(*run.projection_array(method, dim, layer, head, token))
    run.remove(*run.thumbnail(method, dim, layer, head, token))
    run.remove(*run.regions(method, dim, layer, head, token))


def committed_marker(directory, *marker: str) -> dict | None:
    """The marker at `marker` if it commits a version (complete, with a token, not flagged damaged)."""
    record = read_marker(directory, *marker)
    return record if record and record.get("complete") and record.get("token") and not record.get("damaged") else None


def committed_projection(run: RunDir, method: str, dim: int, layer: int, head: int) -> dict | None:
    return committed_marker(run, *run.projection_marker(method, dim, layer, head))


def committed_projections(run: RunDir) -> dict[tuple[str, int, int, int], dict]:
    records = {}
    for folder in run.listdir("projections"):
        for file in run.listdir("projections", folder):
            if file.endswith(".json"):
                record = committed_marker(run, "projections", folder, file)
                if record is not None:
                    records[(record["method"], record["dim"], record["layer"], record["head"])] = record
    return records


def projection_damage(run: RunDir, record: dict) -> str | None:
    path = run.projection_array(record["method"], record["dim"], record["layer"], record["head"], record["token"])
    found = run.files_with_sizes(*path)
    for key, size in record.get("chunk_files", {}).items():
        if found.get(key) != size:
            return f"{posixpath.join(*path, key)} is missing or has the wrong size"
    return None


def write_thumbnail(run: RunDir, projection: dict, png: bytes) -> tuple[str, ...]:
    """The matrix-view picture of one projection version (named by that version's token)."""
    path = run.thumbnail(projection["method"], projection["dim"], projection["layer"], projection["head"],
                         projection["token"])
    run.write_bytes(png, *path)
    return path


def write_regions(run: RunDir, projection: dict, regions: pd.DataFrame) -> tuple[str, ...]:
    """Labelled regions of one projection version, one atomic Parquet file."""
    path = run.regions(projection["method"], projection["dim"], projection["layer"], projection["head"],
                       projection["token"])
    run.write_bytes(_parquet_bytes(regions), *path)
    return path


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer, compression="zstd")
    return buffer.getvalue()


# --- head atlas ---------------------------------------------------------------------------


def write_head_layer(run: RunDir, layer: int, measurements: pd.DataFrame, top_sequences: pd.DataFrame,
                     record: dict) -> dict:
    """Write one layer's head-atlas rows under a new token, then its marker, then drop the old ones."""
    token = new_token()
    files = {}
    for table, frame in (("measurements", measurements), ("top_sequences", top_sequences)):
        data = _parquet_bytes(frame)
        path = run.heads_table(table, layer, token)
        run.write_bytes(data, *path)
        files[table] = {"path": "/".join(path), "bytes": len(data), "crc": zlib.crc32(data)}
    previous = read_marker(run, *run.heads_marker(layer))
    marker = dict(record, layer=layer, complete=True, token=token, files=files, n_heads=len(measurements))
    run.write_json(marker, *run.heads_marker(layer))
    if previous and previous.get("token") not in (None, token):
        for table in ("measurements", "top_sequences"):
            run.remove(*run.heads_table(table, layer, previous["token"]))
    return marker


def write_head_tables(run: RunDir, measurements: pd.DataFrame, top_sequences: pd.DataFrame, record: dict) -> None:
    """Write whole head-atlas tables (rows of several layers), one layer at a time."""
    for layer, rows in measurements.groupby("layer"):
        write_head_layer(run, int(layer), rows, top_sequences[top_sequences["layer"] == layer], record)


def committed_head_layers(run: RunDir) -> dict[int, dict]:
    """Markers of the layers whose head measurements are committed, by layer."""
    records = {}
    for file in run.listdir("heads"):
        if file.endswith(".json"):
            record = read_marker(run, "heads", file)
            if record and record.get("complete") and not record.get("damaged"):
                records[record["layer"]] = record
    return records


def mark_damaged(run: RunDir, marker: tuple[str, ...], problem: str) -> None:
    """Flag a committed item whose data no longer matches its marker, so that the next run
    redoes it; its files stay until the replacement is committed (hold the run's lock)."""
    record = read_marker(run, *marker)
    if record is not None:
        run.write_json(dict(record, damaged=problem), *marker)


# --- clean-up of what crashes left --------------------------------------------------------


def collect_garbage(run: RunDir) -> int:
    """Remove versions that no marker points at (left by crashed writers). Only call while
    holding the run's write lock, with no tasks running. Returns how many were removed."""
    removed = 0
    parts = committed_parts(run)
    live = {f"{name}-{record['token']}" for name, record in parts.items()}
    for folder in run.listdir("vectors.zarr"):
        if folder not in live:
            run.remove("vectors.zarr", folder)
            removed += 1
    for table in ("tokens", "sequences"):
        for file in run.listdir(table):
            if file.removesuffix(".parquet") not in live:
                run.remove(table, file)
                removed += 1
    projections = committed_projections(run)
    live_heads = {(layout_name(method, dim), f"{head_name(layer, head)}-{record['token']}")
                  for (method, dim, layer, head), record in projections.items()}
    for folder in run.listdir("projections.zarr"):
        for entry in run.listdir("projections.zarr", folder):
            if (folder, entry) not in live_heads:
                run.remove("projections.zarr", folder, entry)
                removed += 1
    for derived in RunDir.DERIVED:
        for folder in run.listdir(derived):
            for file in run.listdir(derived, folder):
                if (folder, file.rsplit(".", 1)[0]) not in live_heads:
                    run.remove(derived, folder, file)
                    removed += 1
    tokens = [record["token"] for record in committed_head_layers(run).values()]
    for file in run.listdir("heads"):
        if file.endswith(".parquet") and not any(token in file for token in tokens):
            run.remove("heads", file)
            removed += 1
    return removed

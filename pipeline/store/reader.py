"""Reading a run. Every read is checked against the marker that committed it: a missing,
truncated or zero-filled chunk raises a one-line `StoreError` naming the part, layer, head and
file instead of reading as zeros; `Run.verify()` checks everything at once."""

from __future__ import annotations

import io
import json
import os
import posixpath
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline.attention import attention_weights, value_norm_weighted
from pipeline.store.layout import RunDir
from pipeline.store.manifest import Manifest, StoreError, load_manifest
from pipeline.store.writer import (committed_head_layers, committed_parts, committed_projection,
                                   committed_projections, crc, mark_damaged, part_damage, projection_damage)

TEXT_ONLY_DROPS = ["patch_row", "patch_col", "mean_r", "mean_g", "mean_b"]


@dataclass
class Damage:
    """One thing `verify` found wrong: what (part, projection, ...), and why."""

    kind: str  # "part" | "projection" | "heads"
    name: str
    problem: str
    marker: tuple[str, ...]  # the commit marker it is recorded against

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.problem}"


class Run:
    """Read access to a run directory; everything downstream uses this API."""

    def __init__(self, url: str | os.PathLike):
        self.dir = RunDir(url)
        self.manifest: Manifest = load_manifest(self.dir)
        self.parts = committed_parts(self.dir)
        expected = self.manifest.extract.parts
        if not self.parts or not self.manifest.extract.complete or (expected and len(self.parts) < expected):
            raise StoreError(f"{self.dir.url}: extraction is not complete ({len(self.parts)} of {expected or '?'} "
                             "parts committed); rerun the extraction to finish it")
        attention = self.manifest.attention
        self.layers: list[int] = self.manifest.layers
        self.n_layers = len(self.layers)
        self.n_heads: int = attention.n_heads
        self.n_kv_heads: int = attention.n_kv_heads
        self.d_head: int = attention.d_head
        self.kv_head_of_q: list[int] = attention.kv_head_of_q
        self.mask_rule: str = attention.mask_rule
        self._arrays: dict[tuple[str, str], zarr.Array] = {}

    def __repr__(self) -> str:
        return (f"Run({self.dir.url!r}: {self.model_id}, {self.n_layers} layers x {self.n_heads} heads, "
                f"{self.n_tokens} tokens)")

    # --- what the run is -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.dir.url

    @property
    def model_id(self) -> str:
        return self.manifest.model.id

    @property
    def modality(self) -> str:
        return self.manifest.model.modality

    @property
    def n_tokens(self) -> int:
        return sum(record["n_tokens"] for record in self.parts.values())

    def scale(self, layer: int) -> float:
        return self.manifest.attention.scale[layer]

    def sliding_window(self, layer: int) -> int | None:
        return self.manifest.attention.sliding_window[layer]

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise IndexError(f"layer {layer} is not stored in this run (stored: {self.layers})")
        return self.layers.index(layer)

    def _head(self, head: int) -> int:
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range: the model has {self.n_heads} query heads")
        return head

    # --- vectors ---------------------------------------------------------------------------

    def _array(self, part: str, name: str) -> zarr.Array:
        key = (part, name)
        if key not in self._arrays:
            record = self.parts[part]
            path = self.dir.part_vectors(part, record["token"])
            try:
                self._arrays[key] = zarr.open_array(self.dir.url_of(*path, name), mode="r")
            except Exception as error:  # zarr raises several types for a missing or broken array
                raise StoreError(f"{self.dir.url}: {part} {name} ({posixpath.join(*path, name)}) cannot be "
                                 f"opened ({type(error).__name__}); "
                                 f"run `qkatlas info {self.dir.url} --verify`") from None
        return self._arrays[key]

    def _damaged(self, part: str, name: str, layer: int, head: int, chunk: int | None, why: str) -> StoreError:
        record = self.parts[part]
        vectors = posixpath.join(*self.dir.part_vectors(part, record["token"]), name)
        where = f"chunk {chunk} (file {vectors}/c/{self._layer_index(layer)}/{head}/{chunk}/0)" if chunk is not None \
            else f"({vectors})"
        return StoreError(f"{self.dir.url}: {part} layer {layer} head {head} {name} {where} is {why}; "
                          f"`qkatlas run` or `qkatlas extract` on this run redoes the part")

    def _part_vectors(self, part: str, name: str, layer: int, head: int, start: int | None = None,
                      stop: int | None = None) -> np.ndarray:
        """One part's stored vectors of a head, checked: whole-head reads against every chunk's
        CRC; slices against the chunk files they touch."""
        row = self._layer_index(layer)
        record = self.parts[part]
        chunk_tokens = self.manifest.chunk_tokens
        try:
            values = np.asarray(self._array(part, name)[row, head, start:stop])
        except StoreError:
            raise
        except Exception as error:  # a truncated chunk fails in its codec
            raise self._damaged(part, name, layer, head, None, f"unreadable ({type(error).__name__})") from None
        if start is None and stop is None:
            expected = record["arrays"][name]["crc"][row][head]
            for chunk, want in enumerate(expected):
                if crc(values[chunk * chunk_tokens:(chunk + 1) * chunk_tokens]) != want:
                    raise self._damaged(part, name, layer, head, chunk, "missing or overwritten (checksum mismatch)")
        else:
            first, last = (start or 0) // chunk_tokens, max((stop or record["n_tokens"]) - 1, 0) // chunk_tokens
            for chunk in range(first, last + 1):
                key = f"{name}/c/{row}/{head}/{chunk}/0"
                if key not in record["chunk_files"]:
                    continue
                path = self.dir.path(*self.dir.part_vectors(part, record["token"]), key)
                if not self.dir.fs.exists(path):
                    raise self._damaged(part, name, layer, head, chunk, "missing")
        return values

    def _vectors(self, name: str, layer: int, head: int) -> np.ndarray:
        blocks = [self._part_vectors(part, name, layer, head) for part in self.parts]
        return np.concatenate(blocks, axis=0).astype(np.float32, copy=False)

    def queries(self, layer: int, head: int) -> np.ndarray:
        """[n_tokens, d_head] float32, in `tokens()` order."""
        return self._vectors("q", layer, self._head(head))

    def keys(self, layer: int, head: int) -> np.ndarray:
        """The keys query head `head` reads (its key/value head), [n_tokens, d_head] float32."""
        return self._vectors("k", layer, self.kv_head_of_q[self._head(head)])

    def vector(self, kind: str, layer: int, head: int, token: int) -> np.ndarray:
        """One token's "q", "k" or "v" vector as query head `head` reads it, [d_head] float32:
        a read of one chunk, for a hover card, where the whole head's vectors are not needed."""
        if kind == "v":
            self._check_values()
        if not 0 <= token < self.n_tokens:
            raise IndexError(f"token {token} outside 0..{self.n_tokens - 1}")
        stored_head = self._head(head) if kind == "q" else self.kv_head_of_q[self._head(head)]
        for part, record in self.parts.items():
            if token < record["n_tokens"]:
                return self._part_vectors(part, kind, layer, stored_head, token, token + 1)[0].astype(np.float32)
            token -= record["n_tokens"]
        raise AssertionError("the parts hold n_tokens tokens")

    @property
    def has_values(self) -> bool:
        """Whether the run stores value vectors (extracted with `--values`)."""
        return bool(self.parts) and all("v" in record["arrays"] for record in self.parts.values())

    def _check_values(self) -> None:
        if not self.has_values:
            raise StoreError(f"{self.dir.url} stores no value vectors; extract it with --values "
                             "(config: extract.values: true) into a new --out")

    def values(self, layer: int, head: int) -> np.ndarray:
        """The values query head `head` reads (its key/value head), [n_tokens, d_head] float32."""
        self._check_values()
        return self._vectors("v", layer, self.kv_head_of_q[self._head(head)])

    # --- tables ----------------------------------------------------------------------------

    def _read_parquet(self, what: str, file: dict) -> pa.Table:
        try:
            data = self.dir.read_bytes(*file["path"].split("/"))
        except FileNotFoundError:
            raise StoreError(f"{self.dir.url}: {what} {file['path']} is missing; run "
                             f"`qkatlas info {self.dir.url} --verify`") from None
        if len(data) != file["bytes"] or zlib.crc32(data) != file["crc"]:
            raise StoreError(f"{self.dir.url}: {what} {file['path']} is damaged (size or checksum differs from "
                             f"its commit); run `qkatlas info {self.dir.url} --verify`")
        return pq.read_table(io.BytesIO(data))

    def _part_table(self, table: str) -> pa.Table:
        return pa.concat_tables([self._read_parquet(f"{part} {table}", record["files"][table])
                                 for part, record in self.parts.items()])

    @cached_property
    def _tokens(self) -> pd.DataFrame:
        frame = self._part_table("tokens").to_pandas()
        if self.modality == "text":
            frame = frame.drop(columns=TEXT_ONLY_DROPS)
        return frame

    def tokens(self) -> pd.DataFrame:
        """One row per token, in store order (row i is point i of every head)."""
        return self._tokens.copy()

    @cached_property
    def _sequences(self) -> pd.DataFrame:
        frame = self._part_table("sequences").to_pandas()
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

    def _sequence_vectors(self, seq_id: int, name: str, layer: int, head: int) -> np.ndarray:
        """One sequence's stored "q", "k" or "v" rows of query head `head`, [len, d_head] float32."""
        row = self._sequence(seq_id)
        start, stop = int(row["token_start"]), int(row["token_start"] + row["n_tokens"])
        stored_head = self._head(head) if name == "q" else self.kv_head_of_q[self._head(head)]
        return self._part_vectors(row["part"], name, layer, stored_head, start, stop).astype(np.float32)

    def attention(self, seq_id: int, layer: int, head: int, weighting: str = "attention") -> np.ndarray:
        """The head's attention weights within one sequence, [len, len], recomputed from stored Q/K;
        `weighting="value_norm"` scales each key's weight by its value's norm (`--values` runs)."""
        if weighting not in ("attention", "value_norm"):
            raise ValueError(f"unknown weighting {weighting!r}: attention or value_norm")
        weights = attention_weights(self._sequence_vectors(seq_id, "q", layer, head),
                                    self._sequence_vectors(seq_id, "k", layer, head), self.scale(layer),
                                    self.mask_rule, self.sliding_window(layer))
        if weighting == "attention":
            return weights
        self._check_values()
        return value_norm_weighted(weights, self._sequence_vectors(seq_id, "v", layer, head))

    def sequence_values(self, seq_id: int, layer: int, head: int) -> np.ndarray:
        """The values head `head` reads within one sequence, [len, d_head]."""
        self._check_values()
        return self._sequence_vectors(seq_id, "v", layer, head)

    # --- projections and what derives from them --------------------------------------------

    def projection_records(self) -> dict[tuple[str, int, int, int], dict]:
        return committed_projections(self.dir)

    def projections(self) -> pd.DataFrame:
        """One row per committed projection: method, dim, layer, head, backend, time, quality."""
        records = self.projection_records()
        if not records:
            return pd.DataFrame(columns=["method", "dim", "layer", "head"])
        rows = [{key: value for key, value in record.items() if key not in ("chunk_files", "crc", "shape")}
                for record in records.values()]
        return pd.json_normalize(rows).sort_values(["method", "dim", "layer", "head"])

    def projection_record(self, method: str, layer: int, head: int, dim: int) -> dict:
        """The marker of the committed projection version (to write what derives from it);
        KeyError, naming the command to run, when there is none."""
        record = committed_projection(self.dir, method, dim, layer, head)
        if record is None:
            raise KeyError(f"no {dim}-D {method} projection of layer {layer} head {head} in {self.dir.url}; "
                           f"run: qkatlas reduce {self.dir.url} --method {method} --dim {dim}")
        return record

    def projection(self, method: str, layer: int, head: int, dim: int = 2) -> np.ndarray:
        """[2 * n_tokens, dim] float32: queries first, then keys, each in `tokens()` order."""
        record = self.projection_record(method, layer, head, dim)
        path = self.dir.projection_array(method, dim, layer, head, record["token"])
        where = f"{self.dir.url}: projection {method} {dim}-D layer {layer} head {head} ({'/'.join(path)}) is"
        redo = "`qkatlas run` or `qkatlas reduce` redoes it"
        try:
            coords = np.asarray(zarr.open_array(self.dir.url_of(*path), mode="r")[...], dtype=np.float32)
        except Exception as error:  # missing or truncated array
            raise StoreError(f"{where} unreadable ({type(error).__name__}); {redo}") from None
        if crc(coords) != record["crc"]:
            raise StoreError(f"{where} missing or overwritten (checksum mismatch); {redo}")
        return coords

    def thumbnail_png(self, method: str, dim: int, layer: int, head: int) -> bytes | None:
        """The pre-rendered thumbnail of the current projection, or None."""
        record = committed_projection(self.dir, method, dim, layer, head)
        if record is None:
            return None
        try:
            return self.dir.read_bytes(*self.dir.thumbnail(method, dim, layer, head, record["token"]))
        except FileNotFoundError:
            return None

    def regions(self, method: str, dim: int, layer: int, head: int) -> pd.DataFrame | None:
        """Labelled regions of the current projection (see `pipeline.regions`), or None."""
        record = committed_projection(self.dir, method, dim, layer, head)
        if record is None:
            return None
        try:
            data = self.dir.read_bytes(*self.dir.regions(method, dim, layer, head, record["token"]))
        except FileNotFoundError:
            return None
        return pq.read_table(io.BytesIO(data)).to_pandas()

    # --- head atlas ------------------------------------------------------------------------

    def _head_table(self, table: str) -> pd.DataFrame | None:
        records = committed_head_layers(self.dir)
        if not records:
            return None
        frames = [self._read_parquet(f"head table L{layer}", records[layer]["files"][table]).to_pandas()
                  for layer in sorted(records)]
        return pd.concat(frames, ignore_index=True)

    def head_measurements(self) -> pd.DataFrame | None:
        """One row per (layer, head) of the head atlas (see `pipeline.heads`) for every layer
        measured so far, or None before `qkatlas heads` / `qkatlas run` measured any."""
        return self._head_table("measurements")

    def head_top_sequences(self) -> pd.DataFrame | None:
        """Rows (layer, head, rank, seq_id, score): the sequences where each head is most itself."""
        return self._head_table("top_sequences")

    def probe(self) -> "Run | None":
        """The induction probe extracted beside the corpus (a nested run), or None."""
        probe = self.dir.probe()
        return Run(probe.url) if probe.exists(*probe.manifest) else None

    # --- checking --------------------------------------------------------------------------

    def verify(self) -> list[Damage]:
        """Check every committed part, projection and head table against its marker (reads all
        data). An empty list means the run is whole."""
        damage = []
        for part, record in self.parts.items():
            problem = part_damage(self.dir, record)
            if problem is None:
                try:
                    for layer in self.layers:
                        for name, array in record["arrays"].items():
                            for head in range(array["shape"][1]):
                                self._part_vectors(part, name, layer, head)
                    for table, file in record["files"].items():
                        self._read_parquet(f"{part} {table}", file)
                except StoreError as error:
                    problem = str(error).split(": ", 1)[-1]
            if problem:
                damage.append(Damage("part", part, problem, self.dir.part_marker(part)))
        for (method, dim, layer, head), record in self.projection_records().items():
            problem = projection_damage(self.dir, record)
            if problem is None:
                try:
                    self.projection(method, layer, head, dim)
                except StoreError as error:
                    problem = str(error).split(": ", 1)[-1]
            if problem:
                damage.append(Damage("projection", f"{method}{dim}d L{layer}H{head}", problem,
                                     self.dir.projection_marker(method, dim, layer, head)))
        for layer, record in committed_head_layers(self.dir).items():
            try:
                for file in record["files"].values():
                    self._read_parquet(f"head table L{layer}", file)
            except StoreError as error:
                damage.append(Damage("heads", f"layer {layer}", str(error).split(": ", 1)[-1],
                                     self.dir.heads_marker(layer)))
        return damage

    def verify_and_record(self) -> list[Damage]:
        """`verify`, then flag each damaged item in its marker (under the run's write lock) so
        that the next `qkatlas run`, `extract` or `reduce` redoes exactly those."""
        from pipeline.store.lock import writing

        damage = self.verify()
        if damage:
            with writing(self.dir, "qkatlas info --verify"):
                for item in damage:
                    mark_damaged(self.dir, item.marker, item.problem)
        return damage

    def store_bytes(self) -> int:
        return sum(self.dir.fs.du(self.dir.path(folder)) for folder in ("vectors.zarr", "tokens", "sequences"))


def open_run(url: str | os.PathLike) -> Run:
    """Open a run directory (a local path, a `pathlib.Path` or an fsspec URL) for reading."""
    return Run(url)

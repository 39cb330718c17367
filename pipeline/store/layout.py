"""Where everything of a run lives. This module alone names a run's paths.

    RUN/manifest.json                              Manifest (pipeline.store.manifest)
    RUN/parts/part-NNNNN.json                      part marker: points at one version of the part
    RUN/vectors.zarr/part-NNNNN-TOKEN/{q,k}        [layer, head_index | kv_head_index, token, d_head]
    RUN/tokens/part-NNNNN-TOKEN.parquet            one row per token, store order
    RUN/sequences/part-NNNNN-TOKEN.parquet         one row per sequence
    RUN/projections/METHOD{2,3}d/LlllHhhh.json     projection marker
    RUN/projections.zarr/METHODDd/LlllHhhh-TOKEN   [point, dim]: queries then keys
    RUN/thumbnails/METHODDd/LlllHhhh-PTOKEN.png    PTOKEN: the projection version it shows
    RUN/regions/METHODDd/LlllHhhh-PTOKEN.parquet   labelled regions of that projection version
    RUN/heads/Llll.json                            head-atlas marker of one layer
    RUN/heads/{measurements,top_sequences}-Llll-TOKEN.parquet
    RUN/probe/                                     a nested run: the induction probe sequences

Every writer writes new files under a fresh TOKEN, then commits by replacing the marker
(one atomic write), then removes the version the old marker pointed at. So a crash leaves the
old version or the new one, never a mix, and two writers never touch each other's files.
The run lock (`pipeline.store.lock`) lives beside the run: `PARENT/.NAME.qkatlas-lock`.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
import uuid
from typing import Final

import fsspec

FORMAT: Final = "qkatlas-run/2"
MANIFEST = "manifest.json"


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def head_name(layer: int, head: int) -> str:
    return f"L{layer:03d}H{head:03d}"


def layout_name(method: str, dim: int) -> str:
    return f"{method}{dim}d"


def new_token() -> str:
    return uuid.uuid4().hex[:12]


class RunDir:
    """The paths of one run directory (a local path or an fsspec URL) and atomic small writes."""

    def __init__(self, url: str | os.PathLike):
        self.url = os.fspath(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocol or "local" in protocol

    # --- generic -----------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        return posixpath.join(self.url, *parts)

    def _fresh(self) -> None:
        """Object-store clients cache listings; a run changes under them (other writers, tasks)."""
        if not self.is_local:
            self.fs.invalidate_cache()

    def exists(self, *parts: str) -> bool:
        self._fresh()
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open(self.path(*parts), "rb") as handle:
            return handle.read()

    def read_json(self, *parts: str) -> dict:
        return json.loads(self.read_bytes(*parts))

    def write_json(self, obj: dict, *parts: str) -> None:
        """Atomic: readers see the old file or the new one, never a torn one."""
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True, default=str).encode(), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Atomic (temporary file, fsync, rename locally; one PUT on object stores)."""
        target = self.path(*parts)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self.is_local:
            temporary = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        else:
            self.fs.pipe_file(target, data)

    def remove(self, *parts: str) -> None:
        try:
            self.fs.rm(self.path(*parts), recursive=True)
        except FileNotFoundError:
            pass

    def listdir(self, *parts: str) -> list[str]:
        """Names directly inside a folder of the run ([] when it does not exist)."""
        self._fresh()
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(*parts), detail=False))
        except FileNotFoundError:
            return []

    def files_with_sizes(self, *parts: str) -> dict[str, int]:
        """Every file below a folder, relative to it, with its size in bytes."""
        base = self.path(*parts)
        self._fresh()
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.relpath(path, base): int(info["size"]) for path, info in found.items()}

    def is_empty_or_missing(self) -> bool:
        self._fresh()
        return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)

    # --- the named places of a run ------------------------------------------------------

    manifest = (MANIFEST,)

    @staticmethod
    def part_marker(name: str) -> tuple[str, str]:
        return "parts", f"{name}.json"

    @staticmethod
    def part_vectors(name: str, token: str) -> tuple[str, str]:
        return "vectors.zarr", f"{name}-{token}"

    @staticmethod
    def part_table(table: str, name: str, token: str) -> tuple[str, str]:
        """`table`: "tokens" or "sequences"."""
        return table, f"{name}-{token}.parquet"

    @staticmethod
    def projection_marker(method: str, dim: int, layer: int, head: int) -> tuple[str, str, str]:
        return "projections", layout_name(method, dim), f"{head_name(layer, head)}.json"

    @staticmethod
    def projection_array(method: str, dim: int, layer: int, head: int, token: str) -> tuple[str, str, str]:
        return "projections.zarr", layout_name(method, dim), f"{head_name(layer, head)}-{token}"

    @staticmethod
    def thumbnail(method: str, dim: int, layer: int, head: int, projection_token: str) -> tuple[str, str, str]:
        return "thumbnails", layout_name(method, dim), f"{head_name(layer, head)}-{projection_token}.png"

    @staticmethod
    def regions(method: str, dim: int, layer: int, head: int, projection_token: str) -> tuple[str, str, str]:
        return "regions", layout_name(method, dim), f"{head_name(layer, head)}-{projection_token}.parquet"

    @staticmethod
    def heads_marker(layer: int) -> tuple[str, str]:
        return "heads", f"L{layer:03d}.json"

    @staticmethod
    def heads_table(table: str, layer: int, token: str) -> tuple[str, str]:
        """`table`: "measurements" or "top_sequences"."""
        return "heads", f"{table}-L{layer:03d}-{token}.parquet"

    def probe(self) -> "RunDir":
        return RunDir(self.url_of("probe"))

    # derived artefacts of projections, by folder, so that stale ones can be found
    DERIVED = ("thumbnails", "regions")

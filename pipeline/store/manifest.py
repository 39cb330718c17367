"""The run's manifest, typed: what was extracted, with which model and attention rules.

Read and written only through `load_manifest` / `save_manifest`, so a manifest that is not
ours (garbage, another tool's, another qkatlas format) is refused with one line."""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import ExtractConfig
from pipeline.errors import QkatlasError
from pipeline.store.layout import FORMAT, RunDir


class StoreError(QkatlasError, ValueError):
    """A run directory that is missing, damaged, incomplete or not a qkatlas run."""


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    revision: str | None = None
    architecture: str
    modality: Literal["text", "image"]
    max_positions: int | None = None
    patch_grid: int | None = None
    image_size: int | None = None  # image models: pixels per side of the model's input


class AttentionRules(BaseModel):
    """What makes `softmax(q @ k.T * scale + mask)` equal the model's own attention."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    scale: list[float]  # per model layer
    mask_rule: Literal["causal", "bidirectional"]
    sliding_window: list[int | None]  # per model layer
    kv_head_of_q: list[int]
    captured: str = ""


class ExtractionState(BaseModel):
    """The shard plan (fixed when the run is prepared) and, once complete, the totals."""

    parts: int | None = None
    shards: list[list[int | None]] | None = None
    complete: bool = False
    n_sequences: int = 0
    n_tokens: int = 0
    truncated: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)


class Manifest(BaseModel):
    format: Literal["qkatlas-run/2"] = FORMAT
    created: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    model: ModelInfo
    config: ExtractConfig
    layers: list[int]
    dtype: str
    chunk_tokens: int
    attention: AttentionRules
    extract: ExtractionState = Field(default_factory=ExtractionState)
    probe: dict | None = None  # the induction probe's settings, when the run holds one


def load_manifest(run: RunDir) -> Manifest:
    if not run.exists(*run.manifest):
        raise StoreError(f"{run.url} is not a qkatlas run (no manifest.json)")
    try:
        raw = json.loads(run.read_bytes(*run.manifest))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoreError(f"{run.url_of(*run.manifest)} is not readable JSON ({error}); "
                         "this directory is not a usable qkatlas run") from None
    if not isinstance(raw, dict) or "format" not in raw:
        raise StoreError(f"{run.url_of(*run.manifest)} is not a qkatlas manifest")
    if raw["format"] != FORMAT:
        raise StoreError(f"{run.url} was written in run format {raw['format']!r}; this qkatlas reads {FORMAT!r}: "
                         "extract it again into a new --out")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(item) for item in first["loc"])
        raise StoreError(f"{run.url_of(*run.manifest)} is damaged: {where}: {first['msg']}") from None


def save_manifest(run: RunDir, manifest: Manifest) -> None:
    run.write_json(manifest.model_dump(mode="json"), *run.manifest)


def is_run(run: RunDir) -> bool:
    """Whether the directory holds a readable qkatlas manifest."""
    try:
        load_manifest(run)
    except StoreError:
        return False
    return True

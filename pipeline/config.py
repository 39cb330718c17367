"""Run configuration: one YAML schema, validated by pydantic.

Every field is also a command-line flag (see `workflows/cli.py`); an unknown key or a bad
value fails with a message naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the bad key or value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExtractConfig(_Strict):
    """What to run through which model, and how to store the vectors."""

    model: str = Field(description="Hugging Face model id, local path, or demo:minilm / demo:smollm2")
    data: str = Field(description="text/JSONL/CSV/Parquet file, saved HF dataset dir, image folder, or demo:NAME")
    out: str = Field(description="run directory: a local path or an fsspec URL")
    text_column: str = Field("text", description="column holding the text in JSONL/CSV/Parquet/HF data")
    max_length: int | None = Field(None, gt=1, description="tokens per sequence; default: the model's limit")
    overlong: Literal["truncate", "skip"] = Field(
        "truncate", description="what to do with a sequence longer than max_length (counted either way)"
    )
    batch_size: int = Field(16, gt=0)
    limit: int | None = Field(None, gt=0, description="stop after this many sequences")
    dtype: Literal["float16", "float32"] = "float16"
    layers: list[int] | None = Field(None, description="model layers to store; default: all")
    chunk_tokens: int = Field(16384, ge=256, description="tokens per Zarr chunk along the token axis")
    compression: Literal["lz4", "zstd", "none"] = Field("lz4", description="codec of the Q/K chunks")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, gt=0, description="torch CPU threads; default: all cores")

    @field_validator("layers", mode="before")
    @classmethod
    def _parse_layers(cls, value):
        if isinstance(value, str):
            try:
                return [int(part) for part in value.split(",") if part.strip()]
            except ValueError:
                raise ValueError(f"layers must be comma-separated integers, got {value!r}") from None
        return value

    @field_validator("layers")
    @classmethod
    def _layers_valid(cls, value):
        if value is not None:
            if not value:
                raise ValueError("layers must name at least one layer")
            if any(layer < 0 for layer in value):
                raise ValueError(f"layers must be >= 0, got {value}")
            if len(set(value)) != len(value):
                raise ValueError(f"layers repeat an index: {value}")
            return sorted(value)
        return value


class RunConfig(_Strict):
    """A whole run file (`configs/*.yaml`)."""

    extract: ExtractConfig


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{where}'")
        else:
            lines.append(f"  {where}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def validate(raw: dict, source: str = "configuration") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a YAML run file; `overrides` (from flags) replace keys of its `extract` section."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    if overrides:
        section = raw.setdefault("extract", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: 'extract' must be a mapping")
        section.update({key: value for key, value in overrides.items() if value is not None})
    return validate(raw, str(path))

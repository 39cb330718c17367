"""Run configuration: one YAML schema, validated by pydantic.

The scalar and list fields of the `extract` and `reduce` sections are also command-line flags
of `qkatlas extract` / `qkatlas reduce` (generated from these fields by `workflows/cli/options.py`,
so a field's description is its `--help`); an unknown key or a bad value fails with a message
naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import QkatlasError


def cache_dir() -> Path:
    """Where qkatlas keeps what it can rebuild (dequantized models, numba code, bench runs)."""
    import os

    return Path(os.environ.get("QKATLAS_CACHE", Path.home() / ".cache" / "qkatlas"))


class ConfigError(QkatlasError, ValueError):
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
    batch_size: int = Field(16, gt=0, description="sequences per forward pass")
    limit: int | None = Field(None, gt=0, description="stop after this many sequences")
    dtype: Literal["float16", "float32"] = Field("float16", description="storage type of the Q/K vectors")
    layers: list[int] | None = Field(None, description="model layers to store; default: all")
    chunk_tokens: int = Field(16384, ge=256, description="tokens per Zarr chunk along the token axis")
    compression: Literal["lz4", "zstd", "none"] = Field(
        "none", description="codec of the Q/K chunks; none by default: real fp16 Q/K compress by ~1% (lz4) while "
                            "costing ~6% of extraction speed (`qkatlas bench extract`)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs; auto: CUDA if visible")
    threads: int | None = Field(None, gt=0, description="torch CPU threads; default: all cores")
    values: bool = Field(False, description="also store each key/value head's value vectors (as much again as the "
                                            "keys): the sequence and aggregate views can then weight attention by "
                                            "value norm")
    probe: bool = Field(True, description="causal text models: also extract repeated random-token sequences (a "
                                          "nested run RUN/probe) for the head atlas's induction scores")

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


class UMAPParams(_Strict):
    n_neighbors: int = Field(10, ge=2, description="10 keeps more local structure than 15, and is faster")
    min_dist: float = Field(0.1, ge=0)
    init: Literal["pca", "spectral", "random"] = "pca"
    negative_sample_rate: int = Field(5, ge=1)
    n_epochs: int | None = Field(None, ge=10, description="default: umap-learn's (500 below 10k points, else 200)")


class TSNEParams(_Strict):
    perplexity: float = Field(50.0, gt=1)
    n_iter: int = Field(300, ge=50)


class ReduceConfig(_Strict):
    """Which per-head projections to compute, and how (defaults follow AttentionViz)."""

    methods: list[Literal["pca", "umap", "tsne"]] = Field(["umap"], description="projection methods, comma-separated")
    dims: list[Literal[2, 3]] = Field([2], description="layout dimensions, comma-separated")
    layers: list[int] | None = Field(None, description="layers to project, comma-separated; default: every stored one")
    heads: list[int] | None = Field(None, description="query heads to project, comma-separated; default: all")
    backend: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto: the GPU where cuML sees a device")
    translate_keys: bool = Field(True, description="key translation: k - mean(k) + mean(q)")
    scale_norms: bool = Field(True, description="equal mean norms: q / c, k * c")
    metric: Literal["cosine", "euclidean"] = Field("cosine", description="distance of the kNN graph")
    sample_threshold: int | None = Field(None, ge=100, description="points above which a head is fitted on a "
                                                                  "sample; default per backend")
    sample_size: int | None = Field(None, ge=100, description="points in that sample; default per backend")
    refine_epochs: int = Field(15, ge=0, description="UMAP epochs over the full kNN graph after interpolation "
                                                     "(0: interpolation only)")
    refine_learning_rate: float = Field(0.2, gt=0, description="starting learning rate of those epochs: low, as "
                                                               "the interpolated layout is already in place")
    refine_negative_sample_rate: int = Field(1, ge=1, description="negative samples per edge in those epochs")
    seed: int | None = Field(None, description="fixes the layout; umap-learn then runs single-threaded")
    umap: UMAPParams = Field(default_factory=UMAPParams)
    tsne: TSNEParams = Field(default_factory=TSNEParams)

    @field_validator("layers", "heads", mode="before")
    @classmethod
    def _parse_list(cls, value):
        return ExtractConfig._parse_layers(value)

    @field_validator("methods", "dims", mode="before")
    @classmethod
    def _parse_choices(cls, value):
        """`pca,umap` and `2,3` as the command line gives them."""
        if isinstance(value, str):
            return [int(part) if part.strip().isdigit() else part.strip() for part in value.split(",") if part.strip()]
        return value


# --- where `qkatlas run` runs (workflows/cluster.py builds the cluster; pipeline/ never does) ---

_SCHEDULER_ADDRESS = re.compile(r"^(tcp|tls|ucx|ws|wss)://[^\s:/]+:\d{1,5}$")


class LocalClusterConfig(_Strict):
    """dask.distributed LocalCluster on this machine. Defaults fit the machine without
    oversubscribing it: workers x threads_per_worker <= cores, each worker pinned to its cores."""

    kind: Literal["local"] = "local"
    n_workers: int | None = Field(None, gt=0, description="worker processes; default: one per core, at most 8")
    threads_per_worker: int | None = Field(None, gt=0, description="cores each worker uses (torch / numba "
                                                                   "threads); default: cores // n_workers")
    memory_limit: str = Field("auto", description="per worker, e.g. '4GB'; 'auto' splits the machine's memory")
    pin_cores: bool = Field(True, description="give each worker its own cores (CPU affinity)")
    dashboard_address: str = Field(":8787", description="where the Dask dashboard listens (':0' = any port)")


class CudaClusterConfig(_Strict):
    """dask-cuda's LocalCUDACluster: one worker per GPU (`pip install dask-cuda`)."""

    kind: Literal["cuda"]
    devices: list[int] | None = Field(None, description="GPU indices (CUDA_VISIBLE_DEVICES); default: all")
    threads_per_worker: int = Field(1, gt=0)
    memory_limit: str = "auto"
    device_memory_limit: str | float = Field(
        0.8, description="device memory a worker fills before spilling to the host: bytes ('40GB') or a "
                         "fraction of its GPU")
    rmm_pool_size: str | float | None = Field(
        None, description="an RMM pool per worker, bytes or a fraction of its GPU: faster cuDF/cuML "
                          "allocations, but torch (extraction) allocates outside it, so none by default")
    dashboard_address: str = ":8787"

    @field_validator("devices", mode="before")
    @classmethod
    def _parse_devices(cls, value):
        return ExtractConfig._parse_layers(value)


class SchedulerClusterConfig(_Strict):
    """An existing Dask scheduler, e.g. started with `dask scheduler` + `dask worker`."""

    kind: Literal["scheduler"] = "scheduler"
    address: str = Field(description="tcp://HOST:PORT of the scheduler")
    timeout: float = Field(30.0, gt=0, description="seconds to wait for the scheduler and a first worker")

    @field_validator("address")
    @classmethod
    def _address_valid(cls, value):
        if not _SCHEDULER_ADDRESS.match(value):
            raise ValueError(f"address must look like tcp://HOST:PORT (or tls://, ucx://), got {value!r}")
        return value


class JobQueueClusterConfig(_Strict):
    """dask-jobqueue's SLURMCluster / PBSCluster: each batch job runs `processes` workers
    sharing `cores` cores and `memory` (`pip install dask-jobqueue`)."""

    kind: Literal["slurm", "pbs"]
    jobs: int = Field(1, gt=0, description="batch jobs to submit (cluster.scale(jobs=...))")
    cores: int = Field(gt=0, description="cores per job")
    memory: str = Field(description="memory per job, e.g. '32GB'")
    processes: int = Field(1, gt=0, description="worker processes per job; threads = cores / processes")
    queue: str | None = Field(None, description="partition (SLURM -p) or queue (PBS -q)")
    account: str | None = Field(None, description="accounting string (-A)")
    walltime: str = Field("01:00:00", description="per job, HH:MM:SS")
    job_extra_directives: list[str] = Field(default_factory=list, description="extra #SBATCH / #PBS lines, "
                                                                                "e.g. ['--gres=gpu:1']")
    job_script_prologue: list[str] = Field(default_factory=list, description="shell lines run before the worker, "
                                                                               "e.g. ['source .venv/bin/activate']")
    local_directory: str | None = Field(None, description="worker scratch directory on the compute nodes")
    log_directory: str | None = None
    interface: str | None = Field(None, description="network interface of the workers, e.g. 'ib0'")
    timeout: float = Field(600.0, gt=0, description="seconds to wait for the first worker to start")
    dashboard_address: str = ":8787"

    @field_validator("walltime")
    @classmethod
    def _walltime_valid(cls, value):
        if not re.match(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$", value):
            raise ValueError(f"walltime must look like HH:MM:SS (or D-HH:MM:SS), got {value!r}")
        return value

    @model_validator(mode="after")
    def _cores_split(self):
        if self.cores % self.processes:
            raise ValueError(f"cores ({self.cores}) must be a multiple of processes ({self.processes})")
        return self


ClusterConfig = Annotated[Union[LocalClusterConfig, CudaClusterConfig, SchedulerClusterConfig,
                                JobQueueClusterConfig], Field(discriminator="kind")]
CLUSTER_KINDS = ("local", "cuda", "scheduler", "slurm", "pbs")


class WorkflowConfig(_Strict):
    """How `qkatlas run` splits the work into Dask tasks."""

    shards: int | None = Field(None, gt=0, description="extraction shards (source row ranges, one part each); "
                                                      "default: 2 per worker. Fixed in the run at its first start")
    thumbnails: bool = Field(True, description="render per-head thumbnails for the dashboard's matrix view")
    thumbnail_size: int = Field(160, ge=16, le=1024)
    measure_heads: bool = Field(True, description="measure every head over the whole corpus (the head atlas)")
    regions: bool = Field(True, description="find and label the regions of every 2-D layout (head-view labels)")


def cluster_shorthand(value):
    """`cluster: local` means {kind: local}; a mapping with `address` and no `kind` is a scheduler."""
    if value is None:
        return {"kind": "local"}
    if isinstance(value, str):
        if value not in CLUSTER_KINDS:
            raise ValueError(f"cluster must be one of {', '.join(CLUSTER_KINDS)} or a mapping, got {value!r}")
        return {"kind": value}
    if isinstance(value, dict) and "kind" not in value:
        return dict(value, kind="scheduler" if "address" in value else "local")
    return value


class RunConfig(_Strict):
    """A whole run file (`configs/*.yaml`)."""

    extract: ExtractConfig
    reduce: ReduceConfig = Field(default_factory=ReduceConfig)
    cluster: ClusterConfig = Field(default_factory=LocalClusterConfig)
    workflow: WorkflowConfig = Field(default_factory=WorkflowConfig)

    @field_validator("cluster", mode="before")
    @classmethod
    def _cluster_shorthand(cls, value):
        return cluster_shorthand(value)


def describe_error(error: ValidationError, source: str) -> str:
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
        raise ConfigError(describe_error(error, source)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a YAML run file; `overrides` (from flags) replace keys of its `extract` section."""
    path = Path(path)
    raw = _read_mapping(path)
    if "group" in raw:
        raise ConfigError(f"{path} is a group file (it has a 'group' section); run it with: qkatlas compare-run {path}")
    if overrides:
        section = raw.setdefault("extract", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: 'extract' must be a mapping")
        section.update({key: value for key, value in overrides.items() if value is not None})
    return validate(raw, str(path))


def _read_mapping(path: Path) -> dict:
    """The YAML mapping in `path`; one-line errors for a missing, unreadable or malformed file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start}); save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return raw


# --- groups of runs over one corpus (`qkatlas compare-run`) ----------------------------------

_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class GroupMember(_Strict):
    """One run of a group: a checkpoint or a model."""

    name: str = Field(description="the member's run folder in the group directory (letters, digits, . _ -)")
    model: str = Field(description="what `extract.model` takes: a save_pretrained folder, a hub id, demo:NAME")
    step: int | None = Field(None, ge=0, description="training step of a checkpoint (the trajectories' x axis)")
    extract: dict = Field(default_factory=dict, description="extract keys for this member only, e.g. layers")

    @field_validator("name")
    @classmethod
    def _name_valid(cls, value):
        if not _MEMBER_NAME.match(value):
            raise ValueError(f"member names are 1-64 letters, digits, '.', '_' or '-', got {value!r}")
        return value


class AlignConfig(_Strict):
    """Aligned layouts of an ordered group: member t's layout of a head starts from member
    t-1's and is rotated, scaled and translated onto it (orthogonal Procrustes on shared tokens)."""

    method: Literal["umap", "pca"] = "umap"
    dim: Literal[2, 3] = 2
    layers: list[int] | None = None
    heads: list[int] | None = None
    epochs: int = Field(200, ge=10, description="UMAP epochs of a member started from the previous layout")

    @field_validator("layers", "heads", mode="before")
    @classmethod
    def _parse_list(cls, value):
        return ExtractConfig._parse_layers(value)


class GroupSection(_Strict):
    out: str = Field(description="group directory (a local path or an fsspec URL); member runs go in OUT/NAME")
    ordered: bool = Field(True, description="members form a sequence (checkpoints): layouts are aligned in order")
    members: list[GroupMember] = Field(min_length=2)
    align: AlignConfig | None = Field(default_factory=AlignConfig, description="null: no aligned layouts")

    @field_validator("members")
    @classmethod
    def _names_unique(cls, value):
        names = [member.name for member in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"member names repeat: {repeated}")
        return value


class GroupConfig(_Strict):
    """A group file (`configs/groups/*.yaml`): several models over one corpus. `extract` holds
    every extract key but `model` and `out`, which each member supplies."""

    group: GroupSection
    extract: dict = Field(default_factory=dict)
    reduce: ReduceConfig = Field(default_factory=ReduceConfig)
    cluster: ClusterConfig = Field(default_factory=LocalClusterConfig)
    workflow: WorkflowConfig = Field(default_factory=WorkflowConfig)

    @field_validator("cluster", mode="before")
    @classmethod
    def _cluster_shorthand(cls, value):
        return cluster_shorthand(value)

    @field_validator("extract")
    @classmethod
    def _no_member_keys(cls, value):
        taken = sorted({"model", "out"} & set(value))
        if taken:
            raise ValueError(f"{', '.join(taken)} belong to each member (group.members), not to the shared extract")
        return value

    def member_config(self, member: GroupMember, out: str) -> RunConfig:
        """The run file of one member, its run written to `out` (the group store names it)."""
        raw = self.model_dump(exclude={"group"})
        raw["extract"] = {**self.extract, **member.extract, "model": member.model, "out": out}
        return validate(raw, f"group member {member.name!r}")


def load_group_config(path: str | Path, out: str | None = None) -> GroupConfig:
    """Read a group file; `out` replaces `group.out`. Every member's run config is checked too."""
    path = Path(path)
    raw = _read_mapping(path)
    if out is not None and isinstance(raw.get("group"), dict):
        raw["group"]["out"] = out
    try:
        config = GroupConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_error(error, str(path))) from None
    for member in config.group.members:
        config.member_config(member, config.group.out)
    return config

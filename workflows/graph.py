"""The `qkatlas run` workflow: one Dask graph of plain functions over `pipeline/`.

    prepare ─► extract shard 0 ─┐
            ├► extract shard 1 ─┼► finish ─┬► project (method, dim, layer, head) ─► thumbnail
            ├► ...              ┘          │  └► ...                                 └► ...
            └► extract probe ──────────────┴► measure heads of layer 0, 1, ...

Every task reads and writes the run directory (a path or an fsspec URL) and commits its work
there only after its data is written (a part marker, a projection marker, a PNG written in one
piece), so a rerun submits only what is not committed yet. The tasks know nothing of the cluster:
they run the same on a LocalCluster, dask-cuda workers, batch-queue workers or a remote scheduler.

Worker-side state: each worker process keeps the last model it loaded (`cached_model`), so
a worker loads it once however many shards it extracts, and runs one heavy task (a forward
pass or a projection) at a time on the cores it was given (`worker_cores`). Tasks import the
pipeline stage they run inside their bodies, so that the driver never loads umap or datashader.
"""

from __future__ import annotations

import array
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from dask.system import cpu_count

from pipeline.config import ExtractConfig, ReduceConfig, RunConfig
from pipeline.hooks import hold
from pipeline.reduce.project import chosen_heads
from pipeline.store import (ExtractionState, RunDir, committed_head_layers, committed_parts,
                            committed_projection, is_run,
                            committed_projections, load_manifest, mark_extraction_complete, part_damage, part_name,
                            projection_damage, update_manifest)


# --- per-process state on a worker ----------------------------------------------------------

_models: dict[tuple, object] = {}
_runs: dict[str, tuple[str, object]] = {}
_state = threading.Lock()
_heavy = threading.Lock()  # one forward pass or projection at a time per worker process


def worker_cores() -> int:
    """Cores this process may use: the Dask worker's thread count inside a worker (a
    LocalCluster sizes it so that workers x threads <= cores), else this process's CPU set."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return cpu_count()


def cached_model(config: ExtractConfig):
    """The model of `config`, loaded once per process and kept (only the latest one)."""
    from pipeline.models import load_model, quiet_transformers

    key = (config.model, config.device, config.max_length)
    with _state:
        if key not in _models:
            quiet_transformers()
            _models.clear()  # a new model replaces the old one: memory holds one model per worker
            _models[key] = load_model(config.model, config.device, config.max_length)
        return _models[key]


def cached_run(url: str):
    """The run at `url`, opened once per process (reopened when the run was recreated or grew)."""
    from pipeline.store import open_run

    directory = RunDir(url)
    manifest = load_manifest(directory)
    versions = sorted(record["token"] for record in committed_parts(directory).values())
    stamp = f"{manifest.created}|{manifest.extract}|{versions}"
    with _state:
        cached = _runs.get(url)
        if cached is None or cached[0] != stamp:
            _runs[url] = (stamp, open_run(url))
        return _runs[url][1]


def _configure_threads(config: ExtractConfig | None = None) -> int:
    from pipeline.extract import configure_threads

    return configure_threads((config.threads if config is not None else None) or worker_cores())


# --- the tasks ------------------------------------------------------------------------------


def plan_shards(config: ExtractConfig, shards: int) -> list[list[int]]:
    """Split the source rows that extraction uses into `shards` ranges [start, stop) holding
    about the same number of sequences; every range but the first starts at a kept row."""
    from pipeline.extract import ExtractError
    from pipeline.sources import open_source

    rows = array.array("q")
    for item in open_source(config.data, config.text_column, Counter()):
        rows.append(item.row)
        if config.limit is not None and len(rows) >= config.limit:
            break
    if not rows:
        raise ExtractError(f"no usable sequences in {config.data}")
    shards = max(1, min(shards, len(rows)))
    bounds = [0] + [rows[(index * len(rows)) // shards] for index in range(1, shards)] + [rows[-1] + 1]
    return [[bounds[index], bounds[index + 1]] for index in range(shards)]


def prepare(config: ExtractConfig, shards: int) -> dict:
    """Create the run (or check an existing one) and fix its shard plan in the manifest; the
    plan never changes afterwards, so a rerun on another cluster writes the same parts."""
    from pipeline.extract import check_source, prepare_run

    with _heavy:
        _configure_threads(config)
        loaded = cached_model(config)
        check_source(config, loaded)
        run = prepare_run(config, loaded)
    state = load_manifest(run).extract
    if state.shards is None:
        if state.parts or committed_parts(run):  # started by `qkatlas extract`: one part
            plan = ExtractionState(parts=1, shards=[[0, None]], complete=state.complete)
        else:
            ranges = plan_shards(config, shards)
            plan = ExtractionState(parts=len(ranges), shards=ranges)
        update_manifest(run, extract=plan)
    return {"prepared": config.out}


def extract_shard(config: ExtractConfig, index: int, rows: list) -> dict:
    """Extract source rows [start, stop) into part `index` and commit it (skipped if committed)."""
    from pipeline.extract import extract_part

    run = RunDir(config.out)
    done = committed_parts(run).get(part_name(index))
    if done is not None and part_damage(run, done) is None:
        return {"n_tokens": done["n_tokens"], "skipped_task": True}
    start, stop = rows
    shard_config = config if stop is None else config.model_copy(update={"limit": None})  # rows hold the limit
    batches = 0

    def on_batch(_sequences: int, _tokens: int) -> None:
        nonlocal batches
        batches += 1
        if batches == 1:
            hold(f"extract-shard-{index}")

    with _heavy:
        threads = _configure_threads(config)
        loaded = cached_model(config)
        began = time.perf_counter()
        record = extract_part(loaded, shard_config, run, index, rows=(start, stop), on_batch=on_batch)
    return {"n_tokens": record["n_tokens"], "n_sequences": record["n_sequences"], "threads": threads,
            "task_seconds": round(time.perf_counter() - began, 3), "pid": os.getpid()}


def finish_extraction(url: str, parts: int, *records: dict) -> dict:
    """All shards are committed: mark the extraction complete, so the run opens for reading."""
    totals = mark_extraction_complete(RunDir(url), parts)
    return {"parts": parts, "n_tokens": totals["n_tokens"]}


def extract_probe(config: ExtractConfig) -> dict:
    """The induction probe (repeated random tokens) into RUN/probe, for causal text models."""
    from pipeline.extract import extract_probe as run_probe

    with _heavy:
        _configure_threads(config)
        record = run_probe(cached_model(config), config, RunDir(config.out))
    return record or {"skipped_task": True}


def measure_layer(url: str, layer: int, *_after) -> dict:
    """The head atlas rows of every query head of one layer, written and committed."""
    from pipeline.heads import commit_layer_measurements

    run = cached_run(url)
    if layer in committed_head_layers(run.dir):
        return {"skipped_task": True}
    with _heavy:
        hold(f"heads-L{layer:03d}")
        _configure_threads()
        began = time.perf_counter()
        commit_layer_measurements(run, layer)
    return {"seconds": round(time.perf_counter() - began, 3), "pid": os.getpid()}


def project_head(url: str, config: ReduceConfig, method: str, dim: int, layer: int, head: int,
                 *_after) -> dict:
    """One head's joint projection, written and then committed (skipped if committed)."""
    from pipeline.reduce import pick_backend
    from pipeline.reduce.project import reduce_head
    run = cached_run(url)
    done = committed_projection(run.dir, method, dim, layer, head)
    if done is not None and projection_damage(run.dir, done) is None:
        return {"skipped_task": True}
    with _heavy:
        hold(f"project-{method}{dim}d-L{layer:03d}H{head:03d}")
        _configure_threads()
        record = reduce_head(run, method, dim, layer, head, config, pick_backend(config.backend))
    return {"seconds": record["seconds"], "backend": record["backend"], "n_points": record["n_points"],
            "pid": os.getpid()}


def thumbnail(url: str, method: str, dim: int, layer: int, head: int, size: int, *_after) -> str:
    """The matrix view's thumbnail of one projected head (skipped if it exists)."""
    from viz.raster import render_thumbnail

    run = cached_run(url)
    if run.thumbnail_png(method, dim, layer, head) is not None:
        return "exists"
    return render_thumbnail(run, method, dim, layer, head, size=size)


def label_regions(url: str, method: str, dim: int, layer: int, head: int, *_after) -> dict:
    """The labelled regions of one 2-D layout (skipped if stored for its current version)."""
    from pipeline.regions import commit_regions

    run = cached_run(url)
    if run.regions(method, dim, layer, head) is not None:
        return {"skipped_task": True}
    with _heavy:
        _configure_threads()
        regions = commit_regions(run, method, layer, head)
    return {"regions": len(regions)}


def warm_worker(config: ExtractConfig, umap: bool = True) -> float:
    """Load the model into this worker's cache and compile umap-learn's numba code (benchmarks
    time the stages without these one-off costs). Returns the seconds it took."""
    import numpy as np

    began = time.perf_counter()
    with _heavy:
        _configure_threads(config)
        cached_model(config)
        if umap:
            from pipeline.reduce import cpu

            cpu.umap(np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32), 2,
                     ReduceConfig().umap.model_dump(), 0)
    return time.perf_counter() - began


# --- what is left to do (read on the client, without a cluster) -----------------------------


@dataclass
class Todo:
    """The work a run still needs; empty lists mean that stage is complete."""

    url: str
    manifest: object | None  # pipeline.store.Manifest
    shards: list[tuple[int, list]] = field(default_factory=list)  # (index, rows) not committed
    parts: int = 0
    extraction_complete: bool = False
    heads: list[tuple[str, int, int, int]] = field(default_factory=list)  # every (method, dim, layer, head)
    projections: list[tuple[str, int, int, int]] = field(default_factory=list)  # not committed
    thumbnails: list[tuple[str, int, int, int]] = field(default_factory=list)  # not rendered
    head_layers: list[int] = field(default_factory=list)  # layers whose head measurements are not committed
    regions: list[tuple[str, int, int, int]] = field(default_factory=list)  # 2-D layouts without labelled regions
    probe: bool = False  # the induction probe is wanted and not committed

    @property
    def prepared(self) -> bool:
        return self.manifest is not None and self.manifest.extract.shards is not None

    @property
    def done(self) -> bool:
        return (self.prepared and self.extraction_complete and not self.projections and not self.thumbnails
                and not self.head_layers and not self.probe and not self.regions)


def heads_of(manifest, config: ReduceConfig) -> list[tuple[str, int, int, int]]:
    """Every (method, dim, layer, head) the reduce section asks for, checked against the run."""
    layers, heads = chosen_heads(config.layers, config.heads, manifest.layers, manifest.attention.n_heads,
                                 "reduce", "the run")
    return [(method, dim, layer, head) for method in config.methods for dim in config.dims
            for layer in layers for head in heads]


def pending(config: RunConfig) -> Todo:
    """Read the run directory and list what is not committed yet."""
    from pipeline.extract import ExtractError
    from pipeline.store import check_writable

    url = config.extract.out
    run = RunDir(url)
    if run.is_empty_or_missing():
        return Todo(url, None)
    if not is_run(run):
        check_writable(run)  # refuses a file or a foreign directory with one line
        load_manifest(run)  # names what is wrong with the manifest
    manifest = load_manifest(run)
    if manifest.config != config.extract:
        raise ExtractError(f"{url} holds a run made with other extract settings; use another extract.out")
    todo = Todo(url, manifest)
    plan = manifest.extract
    if plan.shards is None:
        return todo
    committed = {name: record for name, record in committed_parts(run).items() if part_damage(run, record) is None}
    todo.parts = plan.parts
    todo.shards = [(index, rows) for index, rows in enumerate(plan.shards) if part_name(index) not in committed]
    todo.extraction_complete = plan.complete and not todo.shards
    todo.heads = heads_of(manifest, config.reduce)
    projected = {task: record for task, record in committed_projections(run).items()
                 if projection_damage(run, record) is None}
    todo.projections = [task for task in todo.heads if task not in projected]
    if config.workflow.thumbnails:
        todo.thumbnails = [task for task in todo.heads if task not in projected
                           or not run.exists(*run.thumbnail(*task, projected[task]["token"]))]
    if config.workflow.regions:
        todo.regions = [task for task in todo.heads if task[1] == 2 and (
            task not in projected or not run.exists(*run.regions(*task, projected[task]["token"])))]
    if config.workflow.measure_heads:
        measured = committed_head_layers(run)
        todo.head_layers = [layer for layer in manifest.layers if layer not in measured]
    causal_text = manifest.model.modality == "text" and manifest.attention.mask_rule == "causal"
    if config.extract.probe and causal_text:
        probe = run.probe()
        todo.probe = not (is_run(probe) and load_manifest(probe).extract.complete)
    return todo


# --- building and running the graph (client side) -------------------------------------------


@dataclass
class Outcome:
    """What a run did: per stage, tasks run and tasks found already committed; errors."""

    counts: dict = field(default_factory=lambda: Counter())
    records: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stage_seconds: dict = field(default_factory=dict)


def _key(stage: str, token: str, *parts) -> str:
    return "-".join([f"qkatlas_{stage}", *map(str, parts), token])


def submit_graph(client, config: RunConfig, todo: Todo) -> dict[str, list]:
    """Submit every shard, projection and thumbnail of a prepared run that is not committed,
    with the finishing task between them; returns {stage: [(label, future)]}."""
    token = uuid.uuid4().hex[:8]
    url = config.extract.out
    stages: dict[str, list] = {"extract": [], "probe": [], "finish": [], "project": [], "thumbnail": [], "regions": [],
                               "heads": []}
    for index, rows in todo.shards:
        future = client.submit(extract_shard, config.extract, index, rows, key=_key("extract", token, index),
                               pure=False)
        stages["extract"].append((f"shard {index}", future))
    after = []
    if not todo.extraction_complete:
        finish = client.submit(finish_extraction, url, todo.parts, *(f for _, f in stages["extract"]),
                               key=_key("finish", token), pure=False)
        stages["finish"].append(("finish", finish))
        after = [finish]
    if todo.probe:
        probe = client.submit(extract_probe, config.extract, key=_key("probe", token), pure=False)
        stages["probe"].append(("probe", probe))
        after_probe = [*after, probe]
    else:
        after_probe = after
    for layer in todo.head_layers:
        future = client.submit(measure_layer, url, layer, *after_probe, key=_key("heads", token, layer), pure=False)
        stages["heads"].append((f"L{layer}", future))
    projections = {}
    for task in todo.projections:
        projections[task] = client.submit(project_head, url, config.reduce, *task, *after,
                                          key=_key("project", token, *task), pure=False)
        stages["project"].append((_label(task), projections[task]))
    if config.workflow.thumbnails:
        for task in todo.heads:
            if task in projections or task in todo.thumbnails:
                depends = [projections[task]] if task in projections else after
                future = client.submit(thumbnail, url, *task, config.workflow.thumbnail_size, *depends,
                                       key=_key("thumbnail", token, *task), pure=False)
                stages["thumbnail"].append((_label(task), future))
    for task in todo.regions:
        depends = [projections[task]] if task in projections else after
        future = client.submit(label_regions, url, *task, *depends, key=_key("regions", token, *task), pure=False)
        stages["regions"].append((_label(task), future))
    return stages


def _label(task: tuple[str, int, int, int]) -> str:
    method, dim, layer, head = task
    return f"L{layer}H{head} {method} {dim}-D"


def run_graph(client, stages: dict, on_done: Callable[[str, str, object], None] | None = None) -> Outcome:
    """Wait for every future, in completion order; a failed task is reported, the others go on
    (work that does not depend on it still commits, and a rerun redoes only what failed)."""
    from distributed import as_completed

    outcome = Outcome()
    stage_of = {future.key: (stage, label) for stage, items in stages.items() for label, future in items}
    futures = [future for items in stages.values() for _, future in items]
    began = time.perf_counter()
    first_error: dict[str, str] = {}
    for future in as_completed(futures):
        stage, label = stage_of[future.key]
        if future.status == "error":
            error = future.exception()
            message = f"{stage} {label}: {type(error).__name__}: {error}"
            root = f"{type(error).__name__}: {error}"
            if root not in first_error:  # dependents fail with the same error; report it once
                first_error[root] = message
                outcome.errors.append(message)
            outcome.counts[f"{stage}_failed"] += 1
            result = None
        elif future.status == "cancelled":
            outcome.counts[f"{stage}_cancelled"] += 1
            result = None
        else:
            result = future.result()
            skipped = isinstance(result, dict) and result.get("skipped_task")
            outcome.counts[f"{stage}_{'skipped' if skipped else 'done'}"] += 1
            outcome.records.setdefault(stage, []).append(result)
        outcome.stage_seconds[stage] = round(time.perf_counter() - began, 3)
        if on_done is not None:
            on_done(stage, label, result)
    return outcome

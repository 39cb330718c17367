"""Running a run file on a Dask client: the file with command-line overrides (`load_run_config`)
and `execute` (prepare, submit the graph, wait, report progress); used by `qkatlas run`,
`qkatlas compare-run` and `qkatlas status`."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.config import ConfigError, load_config, validate
from pipeline.store import collect_garbage, recover, writing
from workflows.graph import pending, prepare, run_graph, submit_graph
from workflows.progress import progress


def load_run_config(path: Path, out: str | None = None, limit: int | None = None, address: str | None = None,
                    workers: int | None = None, threads: int | None = None, shards: int | None = None):
    """The run file with command-line overrides applied (validated like the file itself)."""

    config = load_config(path, {"out": out, "limit": limit})
    raw = config.model_dump()
    if address is not None:
        raw["cluster"] = {"kind": "scheduler", "address": address}
    if workers is not None or threads is not None:
        if raw["cluster"]["kind"] != "local":
            raise ConfigError(f"--workers / --threads-per-worker apply to cluster kind 'local', not "
                              f"'{raw['cluster']['kind']}' (set them in the cluster section of {path})")
        raw["cluster"].update({key: value for key, value in (("n_workers", workers),
                                                              ("threads_per_worker", threads)) if value})
    if shards is not None:
        raw["workflow"]["shards"] = shards
    return validate(raw, f"{path} with command-line overrides")


TITLES = {"extract": "extracting shards", "finish": "finishing extraction", "project": "projecting heads",
          "thumbnail": "rendering thumbnails", "heads": "measuring heads", "probe": "extracting probe",
          "regions": "labelling regions"}


def _reporting(advance):
    """`run_graph`'s `on_done(stage, label, result)` -> the progress reporter (None: a failed task)."""
    def on_done(stage: str, label: str, result) -> None:
        tokens = result.get("n_tokens") if stage == "extract" and isinstance(result, dict) else None
        advance(stage, detail=label, tokens=tokens if isinstance(tokens, int) else 0, failed=result is None)
    return on_done


def execute(config, client, show_progress: bool = True):
    """Prepare the run if needed, then submit and wait for everything not committed.
    Returns (todo before the graph ran, outcome)."""

    with writing(config.extract.out, "qkatlas run") as run:
        recover(run)
        todo = pending(config)
        if not todo.prepared:
            shards = config.workflow.shards or max(2, 2 * len(client.nthreads()))
            key = f"qkatlas_prepare-{os.getpid()}-{time.time_ns()}"
            client.submit(prepare, config.extract, shards, key=key, pure=False).result()
            todo = pending(config)
        collect_garbage(run)  # versions left by writers that crashed; nothing runs now
        stages = submit_graph(client, config, todo)
        if show_progress:
            with progress({stage: (TITLES[stage], len(items)) for stage, items in stages.items() if items}) as advance:
                outcome = run_graph(client, stages, _reporting(advance))
        else:
            outcome = run_graph(client, stages)
    return todo, outcome



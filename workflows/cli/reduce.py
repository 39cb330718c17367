"""`qkatlas reduce`: project every selected head's queries and keys into one joint layout."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from pipeline.config import ConfigError, ReduceConfig, describe_error, load_config
from workflows.cli.app import app, cache_numba
from workflows.cli.options import schema_options
from workflows.progress import console, progress


@app.command()
@schema_options(ReduceConfig, aliases={"methods": "method", "dims": "dim"})
def reduce(
    run: str = typer.Argument(..., help="run directory or URL made by `qkatlas extract`"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run file; its `reduce:` section is used"),
    overwrite: bool = typer.Option(False, help="recompute heads that are already projected"),
    flags: dict | None = None,
) -> None:
    """Project every selected head's normalized queries and keys into one joint 2-D/3-D layout."""
    from pipeline.reduce.project import head_tasks, reduce_run  # umap-learn, numba: imported when used
    from pipeline.store import open_run

    cache_numba()
    base = load_config(config).reduce.model_dump() if config is not None else {}
    try:
        settings = ReduceConfig.model_validate(dict(base, **(flags or {})))
    except ValidationError as error:
        raise ConfigError(describe_error(error, "reduce options")) from None
    try:
        tasks = head_tasks(open_run(run), settings)
    except ValueError as error:  # layers or heads the run does not have
        raise ConfigError(str(error)) from None
    with progress({"project": ("projecting heads", len(tasks))}) as advance:

        def on_head(task, record):
            method, dim, layer, head = task
            advance("project", detail=f"L{layer}H{head} {method} {dim}-D {record['seconds']:.1f}s "
                                      f"kNN {record['quality']['knn_preservation']:.2f}")

        summary = reduce_run(run, settings, overwrite=overwrite, on_head=on_head)
    console.print(f"[bold green]projected[/] {summary['projected']} heads on the {summary['backend']} backend in "
                  f"{summary['seconds']:.1f} s ({summary['done_before']} already done)")

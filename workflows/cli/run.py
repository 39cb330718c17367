"""`qkatlas run`: a run file as one Dask graph (extract, project, thumbnails, regions, head atlas)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import LocalClusterConfig
from workflows.cli.app import app, cache_numba
from workflows.progress import console


@app.command()
def run(
    config: Path = typer.Argument(..., help="YAML run file (configs/*.yaml): extract, reduce, cluster, workflow"),
    out: Optional[str] = typer.Option(None, help="run directory or fsspec URL (overrides extract.out); "
                                                 "scheduled runs give each run its own"),
    limit: Optional[int] = typer.Option(None, help="overrides extract.limit"),
    address: Optional[str] = typer.Option(None, help="use the Dask scheduler at tcp://HOST:PORT instead of the "
                                                     "file's cluster section"),
    workers: Optional[int] = typer.Option(None, help="LocalCluster workers (cluster.n_workers)"),
    threads_per_worker: Optional[int] = typer.Option(None, help="LocalCluster threads per worker"),
    shards: Optional[int] = typer.Option(None, help="extraction shards for a new run (workflow.shards)"),
) -> None:
    """Extract, project every head and render thumbnails as one Dask graph; resumable: a rerun
    skips committed shards and projections, and a complete run is a quick no-op."""
    from pipeline.models import quiet_transformers  # transformers, distributed: imported when used
    from workflows.cluster import local_layout, open_client
    from workflows.graph import pending
    from workflows.runner import execute, load_run_config

    began = time.perf_counter()
    settings = load_run_config(config, out, limit, address, workers, threads_per_worker, shards)
    todo = pending(settings)
    if todo.done:
        console.print(f"[bold green]complete[/] {settings.extract.out}: {todo.parts} parts, {len(todo.heads)} "
                      f"projections{' and thumbnails' if settings.workflow.thumbnails else ''} committed; "
                      "nothing to do")
        return
    quiet_transformers()
    cache_numba()
    if isinstance(settings.cluster, LocalClusterConfig):
        _, _, warning = local_layout(settings.cluster)
        if warning:
            console.print(f"[bold yellow]warning:[/] {warning}")
    with open_client(settings.cluster) as (client, description):
        console.print(f"[bold]cluster[/]    {description}\n[bold]dashboard[/]  {client.dashboard_link}",
                      highlight=False)
        before, outcome = execute(settings, client)
    counts = outcome.counts
    elapsed = time.perf_counter() - began
    lines = [f"  shards       {counts['extract_done']} extracted, "
             f"{before.parts - len(before.shards)} already committed (of {before.parts})",
             f"  projections  {counts['project_done']} computed, "
             f"{len(before.heads) - len(before.projections)} already committed (of {len(before.heads)})"]
    if settings.workflow.thumbnails:
        lines.append(f"  thumbnails   {counts['thumbnail_done']} rendered")
    if settings.workflow.measure_heads:
        already = len(before.manifest.layers) - len(before.head_layers) if before.manifest else 0
        lines.append(f"  head atlas   {counts['heads_done']} layers measured, {already} already committed")
    lines.append(f"  time         {elapsed:.1f} s")
    if outcome.errors:
        console.print("[bold red]failed[/] " + settings.extract.out + "\n" + "\n".join(lines))
        for message in outcome.errors[:10]:
            console.print(f"  [red]{message}[/]", highlight=False)
        console.print("committed work is kept; rerun the same command to redo what failed")
        raise typer.Exit(code=1)
    console.print(f"[bold green]done[/] {settings.extract.out}\n" + "\n".join(lines))

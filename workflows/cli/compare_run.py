"""`qkatlas compare-run`: every member of a group of runs, aligned across members."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import ConfigError, LocalClusterConfig, SchedulerClusterConfig, load_group_config
from workflows.cli.app import app, cache_numba
from workflows.progress import console


@app.command("compare-run")
def compare_run(
    config: Path = typer.Argument(..., help="group file (configs/groups/*.yaml): group, extract, reduce, cluster"),
    out: Optional[str] = typer.Option(None, help="group directory (overrides group.out)"),
    address: Optional[str] = typer.Option(None, help="use the Dask scheduler at tcp://HOST:PORT"),
    workers: Optional[int] = typer.Option(None, help="LocalCluster workers (cluster.n_workers)"),
    threads_per_worker: Optional[int] = typer.Option(None, help="LocalCluster threads per worker"),
) -> None:
    """Run every member of a group (`qkatlas run` into GROUP/NAME), record which token tables are
    shared, align tokens across tokenizers by characters and, for ordered groups, align each
    head's layouts from member to member; resumable, and a complete group is a quick no-op."""
    from pipeline.models import quiet_transformers  # torch, transformers: imported when used
    from workflows.cluster import open_client
    from workflows.compare import group_todo, run_group

    began = time.perf_counter()
    settings = load_group_config(config, out)
    if address is not None:
        settings.cluster = SchedulerClusterConfig(address=address)
    if workers is not None or threads_per_worker is not None:
        if not isinstance(settings.cluster, LocalClusterConfig):
            raise ConfigError("--workers / --threads-per-worker apply to cluster kind 'local'")
        settings.cluster = settings.cluster.model_copy(update={
            key: value for key, value in (("n_workers", workers), ("threads_per_worker", threads_per_worker))
            if value})
    todo = group_todo(settings)
    if todo.done:
        console.print(f"[bold green]complete[/] {settings.group.out}: {len(settings.group.members)} members, "
                      "nothing to do", highlight=False)
        return
    quiet_transformers()
    cache_numba()
    with open_client(settings.cluster) as (client, description):
        console.print(f"[bold]cluster[/]    {description}\n[bold]dashboard[/]  {client.dashboard_link}",
                      highlight=False)
        outcome = run_group(settings, client, say=lambda text: console.print(f"[bold]{text}[/]", highlight=False))
    elapsed = time.perf_counter() - began
    lines = [f"  {name:<14} {before.parts - len(before.shards)} of {before.parts} shards and "
             f"{len(before.heads) - len(before.projections)} of {len(before.heads)} projections were committed "
             f"before" for name, (before, _) in outcome.members.items()]
    lines.append(f"  aligned heads {outcome.aligned} computed; spans {outcome.spans} members")
    lines.append(f"  time         {elapsed:.1f} s")
    if outcome.errors:
        console.print(f"[bold red]failed[/] {settings.group.out}\n" + "\n".join(lines), highlight=False)
        for message in outcome.errors[:10]:
            console.print(f"  [red]{message}[/]", highlight=False)
        console.print("committed work is kept; rerun the same command to redo what failed")
        raise typer.Exit(code=1)
    console.print(f"[bold green]done[/] {settings.group.out}\n" + "\n".join(lines), highlight=False)

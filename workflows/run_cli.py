"""`qkatlas run` and `qkatlas bench scale`: the Dask workflow's commands."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Optional

import typer


def load_run_config(path: Path, out: str | None = None, limit: int | None = None, address: str | None = None,
                    workers: int | None = None, threads: int | None = None, shards: int | None = None):
    """The run file with command-line overrides applied (validated like the file itself)."""
    from pipeline.config import ConfigError, load_config, validate

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


@contextlib.contextmanager
def stage_progress(stages: dict):
    """A rich progress bar per stage; yields the `on_done(stage, label, result)` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from workflows.progress import console, stage_lines

    titles = {"extract": "extracting shards", "finish": "finishing extraction", "project": "projecting heads",
              "thumbnail": "rendering thumbnails", "heads": "measuring heads", "probe": "extracting probe",
              "regions": "labelling regions"}
    if not console.is_terminal:  # a log (cron, SLURM): plain stage lines at least every 30 s
        with stage_lines({stage: (titles[stage], len(items)) for stage, items in stages.items() if items}) as on_done:
            yield on_done
        return
    columns = [TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[last]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        tasks = {stage: bar.add_task(titles[stage], total=len(items), last="")
                 for stage, items in stages.items() if items}

        def on_done(stage: str, label: str, result) -> None:
            detail = label if result is not None else f"{label} FAILED"
            if stage == "extract" and isinstance(result, dict) and "n_tokens" in result:
                detail += f"  {result['n_tokens']:,} tokens"
            bar.update(tasks[stage], advance=1, last=detail)

        yield on_done


def execute(config, client, show_progress: bool = True):
    """Prepare the run if needed, then submit and wait for everything not committed.
    Returns (todo before the graph ran, outcome)."""
    from pipeline.store import collect_garbage, recover, writing
    from workflows.graph import pending, prepare, run_graph, submit_graph

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
            with stage_progress(stages) as on_done:
                outcome = run_graph(client, stages, on_done)
        else:
            outcome = run_graph(client, stages)
    return todo, outcome


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this module's commands to the `qkatlas` command line."""

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
        from pipeline.config import ConfigError, LocalClusterConfig
        from pipeline.extract import ExtractError
        from pipeline.models import ModelError
        from pipeline.sources import SourceError
        from pipeline.store import StoreError
        from pipeline.models import quiet_transformers
        from workflows.cli import _cache_numba, _fail
        from workflows.cluster import ClusterError, local_layout, open_client
        from workflows.graph import pending
        from workflows.progress import console

        began = time.perf_counter()
        try:
            settings = load_run_config(config, out, limit, address, workers, threads_per_worker, shards)
            todo = pending(settings)
        except (ConfigError, ExtractError, StoreError, ValueError, OSError) as error:
            _fail(error)
        if todo.done:
            console.print(f"[bold green]complete[/] {settings.extract.out}: {todo.parts} parts, {len(todo.heads)} "
                          f"projections{' and thumbnails' if settings.workflow.thumbnails else ''} committed; "
                          "nothing to do")
            return
        quiet_transformers()
        _cache_numba()
        if isinstance(settings.cluster, LocalClusterConfig):
            _, _, warning = local_layout(settings.cluster)
            if warning:
                console.print(f"[bold yellow]warning:[/] {warning}")
        try:
            with open_client(settings.cluster) as (client, description):
                console.print(f"[bold]cluster[/]    {description}\n[bold]dashboard[/]  {client.dashboard_link}",
                              highlight=False)
                before, outcome = execute(settings, client)
        except (ConfigError, ClusterError, ExtractError, ModelError, SourceError, StoreError, ValueError) as error:
            _fail(error)
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

    @bench_app.command("scale")
    def bench_scale(
        model: str = typer.Option("demo:minilm", help="model to extract"),
        data: str = typer.Option("demo:wiki", help="source of the sequences"),
        sequences: int = typer.Option(300, help="sequences to extract per layout"),
        methods: str = typer.Option("pca,umap", help="projection methods"),
        heads: int = typer.Option(4, help="heads of layer 0 to project per method"),
        shards: int = typer.Option(4, help="extraction shards (the same for both layouts)"),
        demo: Optional[Path] = typer.Option(Path("configs/demo.yaml"), help="run file whose total time is measured "
                                                                             "(cold, `qkatlas run`); '' skips it"),
    ) -> None:
        """Extraction and projection throughput with 1 and 2 local workers on the same cores, in
        one run, with the ratio; then the demo config's total time."""
        from pipeline.models import quiet_transformers
        from workflows.cli import _cache_numba
        from workflows.bench.scale import bench_scale as run_bench

        quiet_transformers()
        _cache_numba()
        run_bench(model, data, sequences, methods.split(","), heads, shards,
                  demo if demo and str(demo) not in ("", ".") else None)

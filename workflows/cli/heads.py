"""`qkatlas heads`: the head atlas of an existing run."""

from __future__ import annotations

from typing import Optional

import typer

from workflows.cli.app import app
from workflows.progress import console, progress


@app.command()
def heads(run: str = typer.Argument(..., help="run directory or URL"),
          layers: Optional[str] = typer.Option(None, help="comma-separated layers to measure [every stored layer]"),
          overwrite: bool = typer.Option(False, help="measure layers that are already measured again"),
          threads: Optional[int] = typer.Option(None, help="torch CPU threads [all cores]")) -> None:
    """Measure what every head does over the whole corpus (the head atlas: entropy, sink, previous-token,
    positional, induction, ...) and store the table in the run; resumable per layer."""
    import torch  # torch, pandas, zarr, dask: imported when used, so that --help is instant
    from dask.system import cpu_count

    from pipeline.heads import commit_layer_measurements
    from pipeline.store import StoreError, committed_head_layers, open_run, writing

    opened = open_run(run)
    try:
        chosen = [int(layer) for layer in layers.split(",")] if layers else opened.layers
    except ValueError:
        raise StoreError(f"--layers must be comma-separated integers, got {layers!r}") from None
    missing = sorted(set(chosen) - set(opened.layers))
    if missing:
        raise StoreError(f"--layers {missing} are not stored in {run} (stored: {opened.layers})")
    torch.set_num_threads(threads or cpu_count())
    with writing(opened.dir, "qkatlas heads"):
        done = set() if overwrite else set(committed_head_layers(opened.dir))
        todo = [layer for layer in chosen if layer not in done]
        with progress({"heads": ("measuring heads", len(todo) * opened.n_heads)}) as advance:
            for layer in todo:
                commit_layer_measurements(opened, layer,
                                          on_head=lambda layer, head, _: advance("heads", detail=f"L{layer}H{head}"))
    table = opened.head_measurements()
    console.print(f"[bold green]measured[/] {run}: {len(table)} heads over {opened.n_tokens:,} tokens "
                  f"({len(todo)} layers now, {len(chosen) - len(todo)} already committed)", highlight=False)
    for column, label in (("sink_weight", "sink"), ("prev_weight", "previous-token"),
                          ("induction_score", "induction"), ("entropy_norm", "broad (entropy)")):
        if column in table and table[column].notna().any():
            best = table.nlargest(3, column)
            heads_text = ", ".join(f"L{r.layer}H{r.head} {getattr(r, column):.2f}" for r in best.itertuples())
            console.print(f"  top {label:<16} {heads_text}", highlight=False)

"""`qkatlas bench ...`: one command per benchmark in workflows/bench/; each prints its figures as
ratios against a baseline measured in the same run, or against its goals. The benchmarks import
torch, umap-learn, the models and panel when they run, not when the CLI starts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from workflows.cli.app import bench_app, cache_numba


def _prepare() -> None:
    """Quiet transformers' warnings; keep numba's compiled code between runs."""
    from pipeline.models import quiet_transformers

    quiet_transformers()
    cache_numba()


@bench_app.command("heads")
def bench_heads(run: Optional[str] = typer.Option(None, help="run to measure [a cached demo:minilm run of demo:wiki]"),
                limit: Optional[int] = typer.Option(None, help="sentences of demo:wiki for the cached run [all]"),
                threads: int = typer.Option(1, help="torch threads (1 is steadiest on a shared 2-core machine)"),
                ) -> None:
    """Measuring every head of a run (the head atlas) vs only reading the same Q/K, in one process."""
    from workflows.bench import heads as benchmark  # torch: imported when used

    benchmark.bench_heads(run, limit, threads)


@bench_app.command("extract")
def bench_extract(
    model: str = typer.Option("demo:minilm", help="model to benchmark"),
    data: str = typer.Option("demo:wiki", help="source of the sequences"),
    sequences: int = typer.Option(1500, help="sequences for the throughput comparison"),
    memory_sequences: int = typer.Option(1600, help="sequences at 1x for the memory check, which also runs 10x "
                                                    "(each a whole extraction in a fresh process)"),
    batch_size: int = typer.Option(32),
    threads: Optional[int] = typer.Option(None, help="torch threads [all cores]"),
    memory: bool = typer.Option(True, help="also measure peak RSS at 1x and 10x (two subprocesses)"),
) -> None:
    """Plain forward vs extract-and-write on the same batches, and peak RSS at 1x vs 10x sequences."""
    from workflows.bench import extract as benchmark  # torch, models: imported when used

    _prepare()
    benchmark.bench_extract(model, data, sequences, batch_size, threads, memory, memory_sequences)


@bench_app.command("reduce")
def bench_reduce(
    run: Optional[str] = typer.Option(None, help="run to read the head from [extract demo:minilm over demo:wiki "
                                                 "into ~/.cache/qkatlas/bench-run]"),
    layer: int = typer.Option(2),
    head: int = typer.Option(3),
    points: int = typer.Option(200_000, help="points (2 x tokens) of the head to project"),
    budget: float = typer.Option(600, help="seconds umap-learn on every point may take (estimated first); "
                                           "above it the baseline is umap-learn on a 200k subsample"),
) -> None:
    """Direct umap-learn on every point vs qkatlas's default, on one real head, in one run."""
    from workflows.bench import reduce as benchmark  # torch, models: imported when used

    _prepare()
    benchmark.bench_reduce(run, layer, head, points, budget)


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
    from workflows.bench import scale as benchmark  # torch, models: imported when used

    _prepare()
    benchmark.bench_scale(model, data, sequences, methods.split(","), heads, shards,
                          demo if demo and str(demo) not in ("", ".") else None)


@bench_app.command("serve")
def bench_serve(
    points: str = typer.Option("1000000,10000000", help="points per head to rasterize (comma list)"),
    repeats: int = typer.Option(7, help="timed re-rasterizations per size (median reported)"),
    sessions: int = typer.Option(20, help="concurrent sessions in the load test (max 50)"),
    tokens: int = typer.Option(500_000, help="tokens of the load test's synthetic run (2 points each per head)"),
    width: int = typer.Option(700),
    height: int = typer.Option(600),
) -> None:
    """Re-rasterizing one head (the dashboard's code path) vs raw datashader on the same data,
    the server's memory, and concurrent sessions against a server process, with the old
    serving path (search with Python's regex on the event loop) as the baseline."""
    from workflows.bench.serve import bench_serve  # panel, bokeh: imported when used

    bench_serve([int(p) for p in points.split(",")], repeats, min(max(sessions, 1), 50), width, height, tokens)


@bench_app.command("compare")
def bench_compare(
    group: Optional[str] = typer.Option(None, help="an ordered group with 8+ members [train the demo checkpoints "
                                                   "and run them into ~/.cache/qkatlas/bench-compare]"),
    layer: int = typer.Option(1),
    head: Optional[int] = typer.Option(None, help="head of --layer [the one with the highest final induction "
                                                  "score, else 0]"),
    members: int = typer.Option(8, help="members (checkpoints) to lay out, spread evenly over the group"),
    epochs: Optional[int] = typer.Option(None, help="UMAP epochs of a layout started from the previous one "
                                                    "[group.align.epochs' default]"),
) -> None:
    """One head over 8 checkpoints: UMAP of each started from the previous layout and carried onto it
    by Procrustes, vs 8 independent UMAPs; time ratio and mean displacement of shared points between
    consecutive checkpoints, measured in one run."""
    from workflows.bench import compare as benchmark  # torch, models: imported when used

    _prepare()
    benchmark.bench_compare(group, layer, head, members, epochs)


@bench_app.command("browser")
def bench_browser(
    points: str = typer.Option("1000000,10000000", help="points per synthetic head (comma list)"),
    run: Optional[str] = typer.Option(None, help="a real run whose head is driven too"),
    head: str = typer.Option("pca,2,3", help="that run's head: method,layer,head"),
    repeats: int = typer.Option(8, help="times each interaction is timed"),
    sessions: int = typer.Option(20, help="sessions for the memory figure"),
    workdir: Optional[Path] = typer.Option(None, help="synthetic layouts (.npy), timings and server logs"),
) -> None:
    """Each dashboard interaction's server-side latency (p50/p95) in Chromium, and the server's
    RSS with 1 and N sessions on one head."""
    from workflows.bench.browser import bench_browser as run_bench  # playwright, panel: imported when used

    method, layer, index = head.split(",")
    run_bench([int(p) for p in points.split(",")], run, (method, int(layer), int(index)), None, repeats, sessions,
              str(workdir) if workdir else None)

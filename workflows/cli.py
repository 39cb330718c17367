"""The `qkatlas` command line."""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.markup import escape

from pipeline.errors import QkatlasError
from workflows.progress import console


class _Commands(typer.Typer):
    """A Typer whose every command reports a user error (`QkatlasError`, or an `OSError` such as
    an unwritable path) as one line and exit code 2, in one place; `--debug` adds the traceback."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda function: register(_one_line_errors(function))


app = _Commands(help="qkatlas: per-head joint query/key embeddings of transformer attention at corpus scale "
                     "(AttentionViz, Yeh et al. 2023).", no_args_is_help=True, pretty_exceptions_enable=False)
bench_app = _Commands(help="Benchmarks that print ratios against a baseline measured in the same run.",
                      no_args_is_help=True)
app.add_typer(bench_app, name="bench")
_debug = False


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", envvar="QKATLAS_DEBUG",
                                        help="on an error, also print its traceback")) -> None:
    global _debug
    _debug = debug


def _one_line_errors(command):
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (QkatlasError, OSError) as error:
            _fail(error)
    return run


def one_line(error: Exception) -> str:
    """The error's message on one line (a multi-line message's lines joined by '; ')."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}; check the path and its permissions"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def _fail(error: Exception) -> NoReturn:
    if _debug:
        traceback.print_exception(error)
    console.print(f"[bold red]error:[/] {escape(one_line(error))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024


@app.command()
def extract(
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="YAML run file (configs/*.yaml); flags override it"),
    model: Optional[str] = typer.Option(None, help="HF model id, local path, demo:minilm or demo:smollm2"),
    data: Optional[str] = typer.Option(None, help="text / JSONL / CSV / Parquet file, HF dataset dir, image folder, "
                                                  "or demo:wiki|lee|digits|skimage|fashion-mnist"),
    out: Optional[str] = typer.Option(None, help="run directory (local path or fsspec URL)"),
    text_column: Optional[str] = typer.Option(None, help="text column of JSONL/CSV/Parquet/HF data [text]"),
    max_length: Optional[int] = typer.Option(None, help="tokens per sequence [the model's limit]"),
    overlong: Optional[str] = typer.Option(None, help="truncate|skip sequences longer than max-length [truncate]"),
    batch_size: Optional[int] = typer.Option(None, help="sequences per forward pass [16]"),
    limit: Optional[int] = typer.Option(None, help="stop after N sequences"),
    dtype: Optional[str] = typer.Option(None, help="float16|float32 storage [float16]"),
    layers: Optional[str] = typer.Option(None, help="comma-separated layers to store [all]"),
    chunk_tokens: Optional[int] = typer.Option(None, help="tokens per Zarr chunk [16384]"),
    device: Optional[str] = typer.Option(None, help="auto|cpu|cuda [auto]"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads [all cores]"),
    overwrite: bool = typer.Option(False, help="replace an existing run in --out"),
) -> None:
    """Capture the query and key vectors of every head for every token into a run store."""
    from pipeline.config import ConfigError, load_config, validate
    from pipeline.extract import extract as run_extract
    from pipeline.store import open_run

    flags = dict(model=model, data=data, out=out, text_column=text_column, max_length=max_length, overlong=overlong,
                 batch_size=batch_size, limit=limit, dtype=dtype, layers=layers, chunk_tokens=chunk_tokens,
                 device=device, threads=threads)
    if config is not None:
        run_config = load_config(config, flags)
    else:
        missing = [f"--{name}" for name in ("model", "data", "out") if flags[name] is None]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (or give --config FILE)")
        run_config = validate({"extract": {k: v for k, v in flags.items() if v is not None}}, "flags")
    settings = run_config.extract
    from pipeline.models import quiet_transformers

    quiet_transformers()
    from workflows.progress import extraction_progress

    began = time.perf_counter()
    with extraction_progress(settings.limit) as on_batch:
        summary = run_extract(settings, overwrite=overwrite, progress=on_batch)
    run = open_run(settings.out)
    elapsed = time.perf_counter() - began
    state = "already complete, nothing redone" if summary["already_done"] else "extracted"
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    console.print(
        f"[bold green]{state}[/] {settings.out}\n"
        f"  model      {settings.model} ({run.manifest.model.architecture})\n"
        f"  sequences  {summary['n_sequences']:,} (skipped: {skipped}; truncated: {summary['truncated']})\n"
        f"  tokens     {summary['n_tokens']:,}\n"
        f"  heads      {run.n_layers} layers x {run.n_heads} heads = {run.n_layers * run.n_heads} "
        f"({run.n_kv_heads} key/value heads per layer, d_head {run.d_head})\n"
        f"  store      {_human_bytes(run.store_bytes())} ({settings.dtype})\n"
        f"  time       {elapsed:.1f} s ({summary['n_tokens'] / max(elapsed, 1e-9):,.0f} tokens/s)"
    )


@app.command()
def reduce(
    run: str = typer.Argument(..., help="run directory or URL made by `qkatlas extract`"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run file; its `reduce:` section is used"),
    method: Optional[str] = typer.Option(None, help="pca, umap, tsne, or a comma list [umap]"),
    dim: Optional[str] = typer.Option(None, help="2, 3, or 2,3 [2]"),
    layers: Optional[str] = typer.Option(None, help="comma-separated layers [all stored]"),
    heads: Optional[str] = typer.Option(None, help="comma-separated query heads [all]"),
    backend: Optional[str] = typer.Option(None, help="auto|cpu|gpu [auto: GPU where cuML sees a device]"),
    sample_threshold: Optional[int] = typer.Option(None, help="points above which a head is fitted on a sample "
                                                              "[cpu: umap 50k, tsne 20k; gpu: millions]"),
    sample_size: Optional[int] = typer.Option(None, help="points in that sample [cpu: umap 20k, tsne 10k]"),
    refine_epochs: Optional[int] = typer.Option(None, help="UMAP epochs over the full kNN graph after "
                                                           "interpolation [70]; 0 = interpolation only"),
    metric: Optional[str] = typer.Option(None, help="cosine|euclidean [cosine]"),
    translate_keys: Optional[bool] = typer.Option(None, "--translate-keys/--no-translate-keys",
                                                  help="key translation [on]"),
    scale_norms: Optional[bool] = typer.Option(None, "--scale-norms/--no-scale-norms", help="equal mean norms [on]"),
    seed: Optional[int] = typer.Option(None, help="fix the layout (umap-learn then runs single-threaded)"),
    overwrite: bool = typer.Option(False, help="recompute heads that are already projected"),
) -> None:
    """Project every selected head's normalized queries and keys into one joint 2-D/3-D layout."""
    from pipeline.config import load_config
    from pipeline.store import open_run

    _cache_numba()
    flags = dict(methods=method.split(",") if method else None,  # non-numbers reach the validator's message
                 dims=[int(d) if d.strip().isdigit() else d for d in dim.split(",")] if dim else None,
                 layers=layers, heads=heads,
                 backend=backend, sample_threshold=sample_threshold, sample_size=sample_size,
                 refine_epochs=refine_epochs, metric=metric, translate_keys=translate_keys,
                 scale_norms=scale_norms, seed=seed)
    flags = {key: value for key, value in flags.items() if value is not None}
    base = load_config(config).reduce.model_dump() if config is not None else {}
    settings = _validate_reduce(dict(base, **flags))
    from pipeline.reduce.project import head_tasks, reduce_run

    try:
        tasks = head_tasks(open_run(run), settings)
    except ValueError as error:  # layers or heads the run does not have
        _fail(error)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]projecting"), BarColumn(), MofNCompleteColumn(),
               TextColumn("heads  {task.fields[last]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        job = bar.add_task("reduce", total=len(tasks), last="")

        def on_head(task, record):
            method_, dim_, layer_, head_ = task
            quality = record["quality"]
            bar.update(job, advance=1, last=f"L{layer_}H{head_} {method_} {dim_}-D {record['seconds']:.1f}s "
                                            f"kNN {quality['knn_preservation']:.2f}")

        summary = reduce_run(run, settings, overwrite=overwrite, on_head=on_head)
    console.print(f"[bold green]projected[/] {summary['projected']} heads on the {summary['backend']} backend in "
                  f"{summary['seconds']:.1f} s ({summary['done_before']} already done)")


def _validate_reduce(raw: dict):
    from pydantic import ValidationError

    from pipeline.config import ConfigError, ReduceConfig, _describe

    try:
        return ReduceConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, "reduce options")) from None


def _cache_numba() -> None:
    """umap-learn and pynndescent compile with numba; keep the compiled code between processes."""
    from pipeline.config import cache_dir

    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir() / "numba"))


@app.command()
def info(run: str = typer.Argument(..., help="run directory or URL"),
         verify: bool = typer.Option(False, "--verify", help="read every committed part, projection and head table "
                                                             "and check it against its commit marker")) -> None:
    """Print what a run holds; with --verify, what of it is damaged (exit 1 if anything is)."""
    from pipeline.store import open_run

    opened = open_run(run)
    manifest = opened.manifest
    console.print(f"{opened!r}\n  layers stored: {opened.layers}\n  mask: {opened.mask_rule}\n"
                  f"  parts: {len(opened.parts)}\n  projections: {len(opened.projection_records())}\n"
                  f"  store: {_human_bytes(opened.store_bytes())}\n"
                  f"  skipped: {manifest.extract.skipped}\n"
                  f"  model: {manifest.model.id} ({manifest.model.architecture})", highlight=False)
    if verify:
        damage = opened.verify_and_record()
        if not damage:
            console.print("[bold green]verified[/]: every committed part, projection and head table matches its marker")
            return
        for item in damage:
            console.print(f"[bold red]damaged[/] {item}", highlight=False)
        console.print(f"{len(damage)} damaged, flagged in their markers; `qkatlas run` (or `qkatlas extract` / "
                      "`reduce`) on this run redoes exactly those")
        raise typer.Exit(code=1)


@app.command()
def heads(run: str = typer.Argument(..., help="run directory or URL"),
          layers: Optional[str] = typer.Option(None, help="comma-separated layers to measure [every stored layer]"),
          overwrite: bool = typer.Option(False, help="measure layers that are already measured again"),
          threads: Optional[int] = typer.Option(None, help="torch CPU threads [all cores]")) -> None:
    """Measure what every head does over the whole corpus (the head atlas: entropy, sink, previous-token,
    positional, induction, ...) and store the table in the run; resumable per layer."""
    import torch
    from dask.system import cpu_count as dask_cpu_count

    from pipeline.heads import HeadsError, commit_layer_measurements
    from workflows.progress import stage_bar
    from pipeline.store import StoreError, committed_head_layers, open_run, writing

    try:
        opened = open_run(run)
        chosen = [int(layer) for layer in layers.split(",")] if layers else opened.layers
        missing = sorted(set(chosen) - set(opened.layers))
        if missing:
            raise StoreError(f"--layers {missing} are not stored in {run} (stored: {opened.layers})")
        torch.set_num_threads(threads or dask_cpu_count())
        with writing(opened.dir, "qkatlas heads"):
            done = set() if overwrite else set(committed_head_layers(opened.dir))
            todo = [layer for layer in chosen if layer not in done]
            with stage_bar("measuring heads", len(todo) * opened.n_heads) as advance:
                for layer in todo:
                    commit_layer_measurements(opened, layer, on_head=lambda *_: advance())
    except (StoreError, HeadsError, ValueError) as error:
        _fail(error)
    table = opened.head_measurements()
    console.print(f"[bold green]measured[/] {run}: {len(table)} heads over {opened.n_tokens:,} tokens "
                  f"({len(todo)} layers now, {len(chosen) - len(todo)} already committed)", highlight=False)
    for column, label in (("sink_weight", "sink"), ("prev_weight", "previous-token"),
                          ("induction_score", "induction"), ("entropy_norm", "broad (entropy)")):
        if column in table and table[column].notna().any():
            best = table.nlargest(3, column)
            heads_text = ", ".join(f"L{r.layer}H{r.head} {getattr(r, column):.2f}" for r in best.itertuples())
            console.print(f"  top {label:<16} {heads_text}", highlight=False)


@bench_app.command("heads")
def bench_heads(run: Optional[str] = typer.Option(None, help="run to measure [a cached demo:minilm run of demo:wiki]"),
                limit: Optional[int] = typer.Option(None, help="sentences of demo:wiki for the cached run [all]"),
                threads: int = typer.Option(1, help="torch threads (1 is steadiest on a shared 2-core machine)"),
                ) -> None:
    """Measuring every head of a run (the head atlas) vs only reading the same Q/K, in one process."""
    from workflows.bench.heads import bench_heads as run_bench

    run_bench(run, limit, threads)


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
    from pipeline.models import quiet_transformers

    quiet_transformers()
    from workflows.bench.extract import bench_extract as run_bench

    run_bench(model, data, sequences, batch_size, threads, memory, memory_sequences)


@bench_app.command("reduce")
def bench_reduce(
    run: Optional[str] = typer.Option(None, help="run to read the head from [extract demo:minilm over demo:wiki "
                                                 "into ~/.cache/qkatlas/bench-run]"),
    layer: int = typer.Option(2),
    head: int = typer.Option(3),
    points: int = typer.Option(200_000, help="points (2 x tokens) of the head to project"),
) -> None:
    """Direct umap-learn on every point vs qkatlas's default, on one real head, in one run."""
    from pipeline.models import quiet_transformers

    quiet_transformers()
    _cache_numba()
    from workflows.bench.reduce import bench_reduce as run_bench

    run_bench(run, layer, head, points)


from workflows import run_cli, serve_cli, status_cli  # noqa: E402  (commands kept in their own modules)

run_cli.register(app, bench_app)
serve_cli.register(app, bench_app)
status_cli.register(app, bench_app)
from workflows import compare_cli  # noqa: E402

compare_cli.register(app, bench_app)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

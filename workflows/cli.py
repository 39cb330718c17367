"""The `qkatlas` command line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from workflows.progress import console

app = typer.Typer(help="qkatlas: per-head joint query/key embeddings of transformer attention at corpus scale "
                       "(AttentionViz, Yeh et al. 2023).", no_args_is_help=True, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks that print ratios against a baseline measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(code=2)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024


@app.command()
def extract(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run file (configs/*.yaml); flags override it"),
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
    from pipeline.extract import ExtractError, extract as run_extract
    from pipeline.models import ModelError
    from pipeline.sources import SourceError
    from pipeline.store import StoreError, open_run

    flags = dict(model=model, data=data, out=out, text_column=text_column, max_length=max_length, overlong=overlong,
                 batch_size=batch_size, limit=limit, dtype=dtype, layers=layers, chunk_tokens=chunk_tokens,
                 device=device, threads=threads)
    try:
        if config is not None:
            run_config = load_config(config, flags)
        else:
            missing = [f"--{name}" for name in ("model", "data", "out") if flags[name] is None]
            if missing:
                raise ConfigError(f"missing {', '.join(missing)} (or give --config FILE)")
            run_config = validate({"extract": {k: v for k, v in flags.items() if v is not None}}, "flags")
        settings = run_config.extract
        _quiet_transformers()
        from workflows.progress import extraction_progress

        began = time.perf_counter()
        with extraction_progress(settings.limit) as on_batch:
            summary = run_extract(settings, overwrite=overwrite, progress=on_batch)
        run = open_run(settings.out)
    except (ConfigError, SourceError, ModelError, ExtractError, StoreError) as error:
        _fail(error)
    elapsed = time.perf_counter() - began
    state = "already complete, nothing redone" if summary["already_done"] else "extracted"
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    console.print(
        f"[bold green]{state}[/] {settings.out}\n"
        f"  model      {settings.model} ({run.manifest['model']['architecture']})\n"
        f"  sequences  {summary['n_sequences']:,} (skipped: {skipped}; truncated: {summary['truncated']})\n"
        f"  tokens     {summary['n_tokens']:,}\n"
        f"  heads      {run.n_layers} layers x {run.n_heads} heads = {run.n_layers * run.n_heads} "
        f"({run.n_kv_heads} key/value heads per layer, d_head {run.d_head})\n"
        f"  store      {_human_bytes(run.store_bytes())} ({settings.dtype})\n"
        f"  time       {elapsed:.1f} s ({summary['n_tokens'] / max(elapsed, 1e-9):,.0f} tokens/s)"
    )


@app.command()
def info(run: str = typer.Argument(..., help="run directory or URL")) -> None:
    """Print what a run holds."""
    from pipeline.store import StoreError, open_run

    try:
        opened = open_run(run)
    except (StoreError, FileNotFoundError) as error:
        _fail(error)
    manifest = opened.manifest
    console.print(f"{opened!r}\n  layers stored: {opened.layers}\n  mask: {opened.mask_rule}\n"
                  f"  parts: {len(opened.parts)}\n  store: {_human_bytes(opened.store_bytes())}\n"
                  f"  skipped: {[p['skipped'] for p in opened.parts.values()]}\n"
                  f"  model: {manifest['model']}")


@bench_app.command("extract")
def bench_extract(
    model: str = typer.Option("demo:minilm", help="model to benchmark"),
    data: str = typer.Option("demo:wiki", help="source of the sequences"),
    sequences: int = typer.Option(400, help="sequences at 1x; the memory check also runs 10x"),
    batch_size: int = typer.Option(32),
    threads: Optional[int] = typer.Option(None, help="torch threads [all cores]"),
    memory: bool = typer.Option(True, help="also measure peak RSS at 1x and 10x (two subprocesses)"),
) -> None:
    """Plain forward vs extract-and-write on the same batches, and peak RSS at 1x vs 10x sequences."""
    _quiet_transformers()
    from workflows.bench import bench_extract as run_bench

    run_bench(model, data, sequences, batch_size, threads, memory)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

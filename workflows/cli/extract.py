"""`qkatlas extract`: capture every head's query and key vectors into a run store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import ConfigError, ExtractConfig, load_config, validate
from workflows.cli.app import app, human_bytes
from workflows.cli.options import schema_options
from workflows.progress import console, progress


@app.command()
@schema_options(ExtractConfig)
def extract(
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="YAML run file (configs/*.yaml); flags override its extract section"),
    overwrite: bool = typer.Option(False, help="replace an existing run in --out"),
    flags: dict | None = None,
) -> None:
    """Capture the query and key vectors of every head for every token into a run store."""
    from pipeline.extract import extract as run_extract  # torch and transformers: imported when used
    from pipeline.models import quiet_transformers
    from pipeline.store import open_run

    flags = flags or {}
    if config is not None:
        run_config = load_config(config, flags)
    else:
        missing = [f"--{name}" for name in ("model", "data", "out") if name not in flags]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (or give --config FILE)")
        run_config = validate({"extract": flags}, "flags")
    settings = run_config.extract
    quiet_transformers()
    began = time.perf_counter()
    with progress({"extract": ("extracting sequences", settings.limit)}) as advance:
        summary = run_extract(settings, overwrite=overwrite,
                              progress=lambda sequences, tokens: advance("extract", sequences, tokens=tokens))
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
        f"  store      {human_bytes(run.store_bytes())} ({settings.dtype})\n"
        f"  time       {elapsed:.1f} s ({summary['n_tokens'] / max(elapsed, 1e-9):,.0f} tokens/s)"
    )

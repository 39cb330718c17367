"""`qkatlas info`: what a run holds; with --verify, what of it is damaged."""

from __future__ import annotations

import typer

from workflows.cli.app import app, human_bytes
from workflows.progress import console


@app.command()
def info(run: str = typer.Argument(..., help="run directory or URL"),
         verify: bool = typer.Option(False, "--verify", help="read every committed part, projection and head table "
                                                             "and check it against its commit marker")) -> None:
    """Print what a run holds; with --verify, what of it is damaged (exit 1 if anything is)."""
    from pipeline.store import open_run  # pandas, zarr: imported when used, so that --help is instant

    opened = open_run(run)
    manifest = opened.manifest
    console.print(f"{opened!r}\n  layers stored: {opened.layers}\n  mask: {opened.mask_rule}\n"
                  f"  parts: {len(opened.parts)}\n  projections: {len(opened.projection_records())}\n"
                  f"  store: {human_bytes(opened.store_bytes())}\n"
                  f"  skipped: {manifest.extract.skipped}\n"
                  f"  model: {manifest.model.id} ({manifest.model.architecture})", highlight=False)
    if not verify:
        return
    damage = opened.verify_and_record()
    if not damage:
        console.print("[bold green]verified[/]: every committed part, projection and head table matches its marker")
        return
    for item in damage:
        console.print(f"[bold red]damaged[/] {item}", highlight=False)
    console.print(f"{len(damage)} damaged, flagged in their markers; `qkatlas run` (or `qkatlas extract` / "
                  "`reduce`) on this run redoes exactly those")
    raise typer.Exit(code=1)

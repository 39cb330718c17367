"""`qkatlas status`: a run's committed, pending and damaged work per stage (exit code for scripts)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from workflows.cli.app import app


@app.command()
def status(
    run: str = typer.Argument(..., help="run directory or URL"),
    config: Path | None = typer.Option(None, "--config", "-c", help=(
        "the run file (YAML) the run was made with: pending projections, thumbnails, regions and head layers "
        "are computed against it")),
    verify: bool = typer.Option(False, "--verify", help=(
        "read every committed part, projection and head table (Run.verify); without it, cheap checks of files "
        "and sizes")),
    as_json: bool = typer.Option(False, "--json", help="print the status as JSON"),
) -> None:
    """What a run has committed, what is pending or damaged, when each stage ran, and the rate
    and ETA of a running run. Exit 0 complete, 1 incomplete (or running, or no run yet),
    3 damaged, 2 a user error."""
    from workflows.status import collect, render  # pandas, zarr: imported when used

    report = collect(run, config, verify)
    typer.echo(json.dumps(report, indent=1) if as_json else render(report))
    raise typer.Exit(code=report["exit_code"])

"""`qkatlas run` and `qkatlas bench scale`: the Dask workflow's commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this module's commands to the `qkatlas` command line."""

"""The `qkatlas` command line: one module per command, each registered on `app`
(workflows/cli/app.py) when imported here. Options of `extract` and `reduce` come from the config
schema (workflows/cli/options.py). Commands import torch, transformers and panel inside their
bodies, so that `qkatlas --help` answers at once."""

from workflows.cli import (bench, compare_run, demo_checkpoints, extract, heads, info, reduce, run,  # noqa: F401
                           serve, serve_compare, status)
from workflows.cli.app import app


def main() -> None:
    app()

"""The `qkatlas` Typer app and what every command shares: one-line user errors (exit 2, the
traceback only with `--debug`), the bench sub-app, numba's cache."""

from __future__ import annotations

import functools
import os
import traceback
from typing import NoReturn

import typer
from rich.markup import escape

from pipeline.config import cache_dir
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
            fail(error)
    return run


def one_line(error: Exception) -> str:
    """The error's message on one line (a multi-line message's lines joined by '; ')."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}; check the path and its permissions"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def fail(error: Exception) -> NoReturn:
    """Print `error` as one line (and its traceback with --debug); exit 2."""
    if _debug:
        traceback.print_exception(error)
    console.print(f"[bold red]error:[/] {escape(one_line(error))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def cache_numba() -> None:
    """umap-learn and pynndescent compile with numba; keep the compiled code between processes."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir() / "numba"))

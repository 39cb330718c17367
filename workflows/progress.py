"""A rich progress bar for streaming extraction: sequences, tokens and tokens/s."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


@contextlib.contextmanager
def extraction_progress(total_sequences: int | None, label: str = "extracting"):
    """Yield a callback `on_batch(n_sequences, n_tokens)` that advances the bar."""
    columns = [SpinnerColumn(), TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("seqs  {task.fields[tokens]:,} tokens  {task.fields[rate]:,.0f} tokens/s"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=total_sequences, tokens=0, rate=0.0)
        began = time.perf_counter()
        tokens = 0

        def on_batch(n_sequences: int, n_tokens: int) -> None:
            nonlocal tokens
            tokens += n_tokens
            rate = tokens / max(time.perf_counter() - began, 1e-9)
            bar.update(task, advance=n_sequences, tokens=tokens, rate=rate)

        yield on_batch


@contextlib.contextmanager
def stage_bar(label: str, total: int, every: float = 30.0):
    """Yield `advance(n=1)`. On a terminal, a rich bar; otherwise (a cron or SLURM log) a plain line
    `label: done/total, rate/s, ETA` at most every `every` seconds and once at the end."""
    began = time.perf_counter()
    if console.is_terminal:
        columns = [SpinnerColumn(), TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n=1: bar.update(task, advance=n)
        return
    state = {"done": 0, "printed": began}

    def line() -> None:
        elapsed = time.perf_counter() - began
        rate = state["done"] / max(elapsed, 1e-9)
        eta = (total - state["done"]) / rate if rate > 0 else float("nan")
        console.print(f"{label}: {state['done']}/{total}  {rate:.2f}/s  elapsed {elapsed:.0f} s  ETA {eta:.0f} s",
                      highlight=False, soft_wrap=True)

    def advance(n: int = 1) -> None:
        state["done"] += n
        if time.perf_counter() - state["printed"] >= every:
            state["printed"] = time.perf_counter()
            line()

    yield advance
    line()

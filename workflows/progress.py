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

"""Progress of extraction and of `qkatlas run`'s stages: rich bars on a terminal, plain lines
in logs (cron, SLURM), where a bar prints nothing until it ends."""

from __future__ import annotations

import contextlib
import os
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
PROGRESS_SECONDS_ENV = "QKATLAS_PROGRESS_SECONDS"  # seconds between plain progress lines (default 30)


def progress_every() -> float:
    """Seconds between plain progress lines: $QKATLAS_PROGRESS_SECONDS, else 30."""
    try:
        return max(0.1, float(os.environ.get(PROGRESS_SECONDS_ENV, 30)))
    except ValueError:
        return 30.0


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


def duration_text(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `2 h 10 min`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@contextlib.contextmanager
def stage_lines(stages: dict[str, tuple[str, int]], every: float | None = None):
    """Plain progress lines for a log: yields `on_done(stage, label, result)` (result None for a
    failed task). `stages`: {stage: (title, number of tasks)}.

    Every `every` seconds (default `progress_every()`), whether or not a task finished, a line per
    running stage, `HH:MM:SS title: done/total, rate/s, ETA` (tokens too for extraction), and
    one naming the stages still waiting; a line at once for each failed task and each stage that
    completes. A stage's rate counts from when it could start: the last time another stage
    completed before its first task did (its dependencies), else the start."""
    every = every if every is not None else progress_every()
    began = time.perf_counter()
    counts = {stage: {"done": 0, "failed": 0, "tokens": 0, "start": None} for stage in stages}
    completed_at = [began]
    lock = threading.Lock()
    stop = threading.Event()

    def say(text: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False, soft_wrap=True, markup=False)

    def finished(stage: str) -> int:
        return counts[stage]["done"] + counts[stage]["failed"]

    def line(stage: str) -> str:
        title, total = stages[stage]
        count = counts[stage]
        elapsed = time.perf_counter() - count["start"]
        text = f"{title}: {finished(stage)}/{total}"
        if count["failed"]:
            text += f" ({count['failed']} failed)"
        if count["tokens"]:
            text += f", {count['tokens']:,} tokens ({count['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s)"
        if finished(stage) == total:
            return text + f", done in {duration_text(time.perf_counter() - began)}"
        rate = finished(stage) / max(elapsed, 1e-9)
        return text + f", {rate:.2f}/s, ETA {duration_text((total - finished(stage)) / rate)}"

    def report() -> None:
        waiting = [f"{title} 0/{total}" for stage, (title, total) in stages.items() if finished(stage) == 0]
        for stage, (_, total) in stages.items():
            if 0 < finished(stage) < total:
                say(line(stage))
        if waiting:
            say(f"waiting ({duration_text(time.perf_counter() - began)} elapsed): {', '.join(waiting)}")

    def beat() -> None:
        while not stop.wait(every):
            with lock:
                report()

    def on_done(stage: str, label: str, result) -> None:
        with lock:
            count = counts[stage]
            if count["start"] is None:
                count["start"] = max(completed_at)
            if result is None:
                count["failed"] += 1
                say(f"{stages[stage][0]}: {label} FAILED (the error is listed at the end; a rerun redoes it)")
            else:
                count["done"] += 1
                if stage == "extract" and isinstance(result, dict) and isinstance(result.get("n_tokens"), int):
                    count["tokens"] += result["n_tokens"]
            if finished(stage) == stages[stage][1]:
                completed_at.append(time.perf_counter())
                say(line(stage))

    with lock:
        report()
    heartbeat = threading.Thread(target=beat, name="qkatlas-progress", daemon=True)
    heartbeat.start()
    try:
        yield on_done
    finally:
        stop.set()
        heartbeat.join()

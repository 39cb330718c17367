"""Progress of every long command: rich bars on a terminal, plain lines in logs (cron, SLURM),
where a bar prints nothing until it ends."""

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


def duration_text(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `2 h 10 min`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _Counts:
    """What one stage has done: tasks done and failed, tokens, when it could start."""

    def __init__(self, title: str, total: int | None):
        self.title, self.total = title, total
        self.done = self.failed = self.tokens = 0
        self.start: float | None = None

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def complete(self) -> bool:
        return self.total is not None and self.finished >= self.total

    def line(self, began: float) -> str:
        elapsed = time.perf_counter() - (self.start if self.start is not None else began)
        text = f"{self.title}: {self.finished}/{self.total if self.total is not None else '?'}"
        if self.failed:
            text += f" ({self.failed} failed)"
        if self.tokens:
            text += f", {self.tokens:,} tokens ({self.tokens / max(elapsed, 1e-9):,.0f} tokens/s)"
        if self.complete:
            return text + f", done in {duration_text(time.perf_counter() - began)}"
        rate = self.finished / max(elapsed, 1e-9)
        if self.total is None or rate == 0:
            return text + f", {rate:.2f}/s"
        return text + f", {rate:.2f}/s, ETA {duration_text((self.total - self.finished) / rate)}"


@contextlib.contextmanager
def progress(stages: dict[str, tuple[str, int | None]], every: float | None = None):
    """The one progress reporter of every long command. `stages`: {stage: (title, number of
    tasks, None if unknown)}. Yields `advance(stage, n=1, detail="", tokens=0, failed=False)`.

    On a terminal, a rich bar per stage with the last task's `detail`. Otherwise (a cron or SLURM
    log, where a bar prints nothing until it ends): every `every` seconds (default
    `progress_every()`), whether or not a task finished, a line per running stage,
    `HH:MM:SS title: done/total, rate/s, ETA` (tokens too where given), and one naming the
    stages still waiting; a line at once for each failed task and each stage that completes.
    A stage's rate counts from when it could start: the last time another stage completed
    before its first task did (its dependencies), else the start."""
    counts = {stage: _Counts(title, total) for stage, (title, total) in stages.items()}
    if console.is_terminal:
        with _bars(counts) as advance:
            yield advance
        return
    every = every if every is not None else progress_every()
    began = time.perf_counter()
    completed_at = [began]
    lock = threading.Lock()
    stop = threading.Event()

    def say(text: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False, soft_wrap=True, markup=False)

    def report() -> None:
        for count in counts.values():
            if count.finished and not count.complete:
                say(count.line(began))
        waiting = [f"{count.title} 0/{count.total}" for count in counts.values() if count.finished == 0]
        if waiting:
            say(f"waiting ({duration_text(time.perf_counter() - began)} elapsed): {', '.join(waiting)}")

    def beat() -> None:
        while not stop.wait(every):
            with lock:
                report()

    def advance(stage: str, n: int = 1, detail: str = "", tokens: int = 0, failed: bool = False) -> None:
        with lock:
            count = counts[stage]
            if count.start is None:
                count.start = max(completed_at)
            if failed:
                count.failed += n
                say(f"{count.title}: {detail} FAILED (the error is listed at the end; a rerun redoes it)")
            else:
                count.done += n
                count.tokens += tokens
            if count.complete:
                completed_at.append(time.perf_counter())
                say(count.line(began))

    with lock:
        report()
    heartbeat = threading.Thread(target=beat, name="qkatlas-progress", daemon=True)
    heartbeat.start()
    try:
        yield advance
    finally:
        stop.set()
        heartbeat.join()
        with lock:
            for count in counts.values():
                if count.finished and not count.complete:  # an open-ended stage (no total) ends here
                    say(count.line(began))


@contextlib.contextmanager
def _bars(counts: dict[str, _Counts]):
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        began = time.perf_counter()
        tasks = {stage: bar.add_task(count.title, total=count.total, detail="") for stage, count in counts.items()}

        def advance(stage: str, n: int = 1, detail: str = "", tokens: int = 0, failed: bool = False) -> None:
            count = counts[stage]
            count.tokens += tokens
            if count.tokens:
                rate = count.tokens / max(time.perf_counter() - began, 1e-9)
                detail = f"{detail}  {count.tokens:,} tokens  {rate:,.0f} tokens/s".strip()
            bar.update(tasks[stage], advance=n, detail=f"{detail} FAILED" if failed else detail)

        yield advance

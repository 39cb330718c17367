"""`qkatlas bench heads`: measuring every head of a run against only reading its Q/K, in one process."""

from __future__ import annotations

import json
import time

import torch
from rich.table import Table

from pipeline.config import ExtractConfig, cache_dir
from pipeline.extract import extract
from pipeline.heads import measure_run
from pipeline.store import StoreError, open_run
from workflows.progress import console


def whole_corpus_run(limit: int | None) -> str:
    """A cached demo:minilm run over demo:wiki (the whole corpus unless `limit`), built once."""

    out = cache_dir() / f"bench-heads-{limit or 'all'}"
    try:
        open_run(out)
        return str(out)
    except StoreError:
        pass
    console.print(f"extracting demo:wiki ({limit or 'every'} sentences) through demo:minilm into {out} (once)")
    extract(ExtractConfig(model="demo:minilm", data="demo:wiki", out=str(out), limit=limit, max_length=128,
                          batch_size=32), overwrite=True)
    return str(out)


def bench_heads(run_url: str | None, limit: int | None, threads: int) -> dict:

    run = open_run(run_url or whole_corpus_run(limit))
    torch.set_num_threads(threads)  # after the extraction, which sets its own
    heads = [(layer, head) for layer in run.layers for head in range(run.n_heads)]
    console.print(f"{run!r}: {len(heads)} heads, {torch.get_num_threads()} torch threads")
    for _ in range(2):  # the second pass is timed: both passes below then read from a warm page cache
        began = time.perf_counter()
        for layer, head in heads:  # what measuring must read: each head's queries, its keys once per kv head
            run.queries(layer, head)
            if head == 0 or run.kv_head_of_q[head] != run.kv_head_of_q[head - 1]:
                run.keys(layer, head)
        reading = time.perf_counter() - began
    began = time.perf_counter()
    measurements, _ = measure_run(run, run.probe())
    measuring = time.perf_counter() - began
    table = Table(title=f"qkatlas bench heads: {len(heads)} heads x {run.n_tokens:,} tokens")
    for column in ("", "seconds", "per head", "vs reading"):
        table.add_column(column)
    for name, seconds in (("read Q/K only", reading), ("measure (read + every measurement)", measuring)):
        table.add_row(name, f"{seconds:.1f}", f"{seconds / len(heads):.2f}", f"{seconds / reading:.2f}x")
    console.print(table)
    console.print("goal: measuring <= 2x reading")
    result = {"heads": len(heads), "tokens": run.n_tokens, "threads": threads, "read_seconds": round(reading, 2),
              "measure_seconds": round(measuring, 2), "ratio": round(measuring / reading, 2),
              "measured": len(measurements)}
    print(json.dumps(result))
    return result

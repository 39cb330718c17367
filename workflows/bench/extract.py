"""`qkatlas bench extract`: a plain forward vs extract-and-write on the same batches, in one process,
and peak RSS of whole extractions at 1x and 10x sequences (fresh processes)."""

from __future__ import annotations

import itertools
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import torch
from rich.table import Table

from pipeline.extract import configure_threads
from workflows.progress import console

ROUNDS = 3


def _prepared_batches(model: str, data: str, n_sequences: int, batch_size: int):
    from pipeline.extract import image_batches, text_batches
    from pipeline.models import load_model
    from pipeline.sources import open_source

    loaded = load_model(model)
    sequences = list(itertools.islice(open_source(data), n_sequences))
    if loaded.modality == "text":
        batches = list(text_batches(loaded, sequences, batch_size, 128, "truncate", Counter()))
    else:
        batches = list(image_batches(loaded, sequences, batch_size))
    return loaded, batches


def _time_plain(loaded, batches) -> float:
    loaded.model.set_attn_implementation("sdpa")
    began = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            loaded.model(**{k: v.to(loaded.device) for k, v in batch.inputs.items()})
    loaded.model.set_attn_implementation("qkatlas")
    return time.perf_counter() - began


def _time_extract(loaded, batches, out: str, layers: list[int] | None = None, compression: str = "none") -> float:
    from pipeline.extract import write_batches
    from pipeline.store import PartWriter, RunDir, VectorSpec

    layout = loaded.layout
    layers = layers or list(range(layout.n_layers))
    spec = VectorSpec(len(layers), layout.n_heads, layout.n_kv_heads, layout.d_head, compression=compression)
    began = time.perf_counter()
    writer = PartWriter(RunDir(out), 0, spec)
    write_batches(loaded, batches, layers, np.dtype(spec.dtype), writer)
    writer.close()
    seconds = time.perf_counter() - began
    shutil.rmtree(out)  # rounds would otherwise pile up gigabytes in the page cache and on disk
    return seconds


def _time_capture(loaded, batches) -> float:
    """The extraction's forward and capture into fresh buffers, nothing handed to the store: what
    extract-and-write costs before the writer (its difference from `_time_extract` is the
    writer's share: CRCs, and the kernel's work copying the vectors into the page cache)."""
    from pipeline.extract import forward_vectors
    from pipeline.store import VectorSpec

    layers = list(range(loaded.layout.n_layers))
    dtype = np.dtype(VectorSpec.dtype)  # as `_time_extract` stores them
    began = time.perf_counter()
    for batch in batches:
        forward_vectors(loaded, batch, layers, dtype)
    return time.perf_counter() - began


def bench_extract(model: str, data: str, sequences: int, batch_size: int, threads: int | None, memory: bool,
                  memory_sequences: int = 1600) -> dict:
    configure_threads(threads)
    loaded, batches = _prepared_batches(model, data, sequences, batch_size)
    n_tokens = sum(sum(batch.lengths) for batch in batches)
    _time_plain(loaded, batches[:2])  # warm-up
    first_three = [layer for layer in (0, 1, 2) if layer < loaded.layout.n_layers]
    plain, captured, extracted, compressed, early, early_three = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(ROUNDS):  # interleaved, so that a busy spell on a shared machine hits every measure
            plain.append(_time_plain(loaded, batches))
            captured.append(_time_capture(loaded, batches))
            extracted.append(_time_extract(loaded, batches, f"{scratch}/none-{round_}", compression="none"))
            compressed.append(_time_extract(loaded, batches, f"{scratch}/lz4-{round_}", compression="lz4"))
            early.append(_time_extract(loaded, batches, f"{scratch}/early-{round_}", layers=first_three[:2]))
            early_three.append(_time_extract(loaded, batches, f"{scratch}/three-{round_}", layers=first_three))
    plain_rate, extract_rate = n_tokens / min(plain), n_tokens / min(extracted)
    result = {"model": model, "sequences": len([s for b in batches for s in b.sequences]), "tokens": n_tokens,
              "threads": torch.get_num_threads(), "plain_tokens_per_s": round(plain_rate),
              "extract_tokens_per_s": round(extract_rate), "throughput_ratio": round(extract_rate / plain_rate, 3),
              "capture_ratio": round(min(plain) / min(captured), 3),
              "lz4_ratio": round(min(plain) / min(compressed), 3),
              "layers_0_1_ratio": round(min(plain) / min(early), 3),
              "layers_0_2_ratio": round(min(plain) / min(early_three), 3)}
    table = Table(title=f"qkatlas bench extract: {model} on {data}, {n_tokens:,} tokens, "
                        f"{torch.get_num_threads()} threads (best of {ROUNDS} rounds)")
    for column in ("measure", "value", "goal"):
        table.add_column(column)
    table.add_row("plain forward (sdpa), tokens/s", f"{plain_rate:,.0f}", "baseline")
    table.add_row("extract + write, tokens/s", f"{extract_rate:,.0f}", "")
    table.add_row("ratio extract / plain (all layers, default: no compression)", f"{result['throughput_ratio']:.3f}",
                  ">= 0.90")
    table.add_row("ratio capture only (no store writes) / plain", f"{result['capture_ratio']:.3f}",
                  "the writer's share is the gap")
    table.add_row("ratio extract / plain (all layers, lz4)", f"{result['lz4_ratio']:.3f}", "")
    table.add_row("ratio extract layers 0,1 / plain full forward", f"{result['layers_0_1_ratio']:.3f}", ">= 1.5")
    table.add_row(f"ratio extract layers 0-2 of {loaded.layout.n_layers} / plain full forward",
                  f"{result['layers_0_2_ratio']:.3f}", "> 1")
    if memory:
        del loaded, batches
        small = _rss_subprocess(model, data, memory_sequences, batch_size, threads)
        large = _rss_subprocess(model, data, memory_sequences * 10, batch_size, threads)
        result.update(rss_1x=small, rss_10x=large, rss_ratio=round(large["peak_rss_mb"] / small["peak_rss_mb"], 3))
        table.add_row(f"peak RSS, 1x = {small['sequences']:,} seqs ({small['tokens']:,} tokens)",
                      f"{small['peak_rss_mb']:,.0f} MB", "")
        table.add_row(f"peak RSS, 10x = {large['sequences']:,} seqs ({large['tokens']:,} tokens)",
                      f"{large['peak_rss_mb']:,.0f} MB", "")
        table.add_row("ratio RSS 10x / 1x", f"{result['rss_ratio']:.3f}", "<= 1.10")
    console.print(table)
    print(json.dumps(result))
    return result


def _rss_subprocess(model: str, data: str, sequences: int, batch_size: int, threads: int | None) -> dict:
    """Run a whole extraction in a fresh process and report that process's peak RSS."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "workflows.bench.extract", "rss", model, data, str(sequences), str(batch_size),
                   str(threads or 0), f"{scratch}/run"]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _rss_child(model: str, data: str, sequences: int, batch_size: int, threads: int, out: str) -> None:
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract
    from pipeline.models import quiet_transformers

    quiet_transformers()
    config = ExtractConfig(model=model, data=data, out=out, limit=sequences, batch_size=batch_size,
                           max_length=128, threads=threads or None)
    summary = extract(config)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"sequences": summary["n_sequences"], "tokens": summary["n_tokens"],
                      "peak_rss_mb": round(peak_kb / 1024, 1), "seconds": summary["wall_seconds"]}))


if __name__ == "__main__" and sys.argv[1] == "rss":
    _rss_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7])



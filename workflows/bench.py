"""Benchmarks. Each prints its figures next to a baseline measured in the same run."""

from __future__ import annotations

import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import torch
from rich.table import Table

from workflows.progress import console


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
    return time.perf_counter() - began


def bench_extract(model: str, data: str, sequences: int, batch_size: int, threads: int | None, memory: bool,
                  memory_sequences: int = 1600) -> dict:
    import os

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    loaded, batches = _prepared_batches(model, data, sequences, batch_size)
    n_tokens = sum(sum(batch.lengths) for batch in batches)
    _time_plain(loaded, batches[:2])  # warm-up
    plain, extracted, compressed, early = [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(2):
            plain.append(_time_plain(loaded, batches))
            extracted.append(_time_extract(loaded, batches, f"{scratch}/none-{round_}", compression="none"))
            compressed.append(_time_extract(loaded, batches, f"{scratch}/lz4-{round_}", compression="lz4"))
            early.append(_time_extract(loaded, batches, f"{scratch}/early-{round_}", layers=[0, 1]))
    plain_rate, extract_rate = n_tokens / min(plain), n_tokens / min(extracted)
    result = {"model": model, "sequences": len([s for b in batches for s in b.sequences]), "tokens": n_tokens,
              "threads": torch.get_num_threads(), "plain_tokens_per_s": round(plain_rate),
              "extract_tokens_per_s": round(extract_rate), "throughput_ratio": round(extract_rate / plain_rate, 3),
              "lz4_ratio": round(min(plain) / min(compressed), 3),
              "layers_0_1_ratio": round(min(plain) / min(early), 3)}
    table = Table(title=f"qkatlas bench extract: {model} on {data}, {n_tokens:,} tokens, "
                        f"{torch.get_num_threads()} threads (best of 2 rounds)")
    for column in ("measure", "value", "goal"):
        table.add_column(column)
    table.add_row("plain forward (sdpa), tokens/s", f"{plain_rate:,.0f}", "baseline")
    table.add_row("extract + write, tokens/s", f"{extract_rate:,.0f}", "")
    table.add_row("ratio extract / plain (all layers, default: no compression)", f"{result['throughput_ratio']:.3f}",
                  ">= 0.90")
    table.add_row("ratio extract / plain (all layers, lz4)", f"{result['lz4_ratio']:.3f}", "")
    table.add_row("ratio extract layers 0,1 / plain full forward", f"{result['layers_0_1_ratio']:.3f}", ">= 1.5")
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
        command = [sys.executable, "-m", "workflows.bench", "rss", model, data, str(sequences), str(batch_size),
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


def _bench_run(points: int) -> str:
    """A cached demo:minilm run over enough demo:wiki sentences for `points` points per head."""
    from pipeline.config import ExtractConfig, cache_dir
    from pipeline.extract import extract
    from pipeline.store import StoreError, open_run

    cache = cache_dir() / f"bench-run-{points}"
    try:
        if open_run(str(cache)).n_tokens * 2 >= points:
            return str(cache)
    except StoreError:
        pass
    console.print(f"extracting a demo:minilm run for {points:,} points per head into {cache} (once)")
    sentences = int(points / 2 / 28) + 200  # demo:wiki sentences average about 30 tokens
    extract(ExtractConfig(model="demo:minilm", data="demo:wiki", out=str(cache), limit=sentences, max_length=128,
                          batch_size=32), overwrite=True)
    return str(cache)


def bench_reduce(run_url: str | None, layer: int, head: int, n_points: int) -> dict:
    import umap as umap_learn

    from pipeline.config import ReduceConfig
    from pipeline.normalize import normalize_head
    from pipeline.reduce import BackendError, load_backend
    from pipeline.reduce.project import head_points, knn_preservation, project_points
    from pipeline.store import open_run

    run = open_run(run_url or _bench_run(n_points))
    n_tokens = min(n_points // 2, run.n_tokens)
    queries, keys = run.queries(layer, head)[:n_tokens], run.keys(layer, head)[:n_tokens]
    config = ReduceConfig()
    unit_points, _ = head_points(queries, keys, config)
    normalized_q, normalized_k, _ = normalize_head(queries, keys)
    raw_points = np.vstack([normalized_q, normalized_k])
    cpu = load_backend("cpu")
    console.print(f"head L{layer}H{head} of {run.dir.url}: {len(unit_points):,} points, d_head {run.d_head}; "
                  "warming up numba in this process first")
    umap_learn.UMAP(n_epochs=20, metric="cosine").fit_transform(raw_points[:3000])
    project_points(unit_points[:6000], "umap", 2, config.model_copy(update={"sample_threshold": 4000,
                                                                            "sample_size": 2000}), cpu)
    rows = []
    began = time.perf_counter()
    direct = umap_learn.UMAP(n_components=2, metric="cosine").fit_transform(raw_points)
    rows.append(("umap-learn on all points (defaults, cosine)", time.perf_counter() - began,
                 knn_preservation(unit_points, direct, cpu)))
    began = time.perf_counter()
    ours, record = project_points(unit_points, "umap", 2, config, cpu)
    rows.append(("qkatlas default (cpu)", time.perf_counter() - began,
                 knn_preservation(unit_points, ours, cpu)))
    try:
        gpu = load_backend("gpu")
        began = time.perf_counter()
        on_gpu, _ = project_points(unit_points, "umap", 2, config, gpu)
        rows.append(("qkatlas default (gpu, cuML)", time.perf_counter() - began,
                     knn_preservation(unit_points, on_gpu, cpu)))
    except BackendError as why:
        console.print(f"[dim]no GPU figures: {why}[/]")
    baseline_time, baseline_quality = rows[0][1], rows[0][2]
    table = Table(title=f"qkatlas bench reduce: {len(unit_points):,} points, 2-D UMAP, "
                        f"{len(__import__('os').sched_getaffinity(0))} cores")
    for column in ("", "seconds", "speed-up vs direct", "kNN preservation (k=15)", "vs direct"):
        table.add_column(column)
    for name, seconds, quality in rows:
        table.add_row(name, f"{seconds:.1f}", f"{baseline_time / seconds:.2f}x", f"{quality:.3f}",
                      f"{quality - baseline_quality:+.3f}")
    console.print(table)
    console.print(f"qkatlas default placement: {record.get('placement', 'all points')}")
    console.print("goals: qkatlas >= 5x faster than direct, kNN preservation within 0.02")
    result = {"points": len(unit_points), "rows": [{"name": n, "seconds": round(s, 2), "knn_preservation": round(q, 4)}
                                                    for n, s, q in rows],
              "speedup": round(baseline_time / rows[1][1], 2), "quality_delta": round(rows[1][2] - baseline_quality, 4)}
    print(json.dumps(result))
    return result

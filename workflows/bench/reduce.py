"""`qkatlas bench reduce`: umap-learn on every point vs qkatlas's default projection, on one real head."""

from __future__ import annotations

import json
import time

import numpy as np
from rich.table import Table

from workflows.progress import console


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

"""`qkatlas bench reduce`: qkatlas's default projection vs umap-learn's defaults on one real head.

umap-learn runs on every point where its estimated time fits the budget; above that (a
million-point head takes it ~15 min on two cores) it runs on a 200k-point subsample and the
other points are placed by the same interpolation qkatlas uses, so both rows cover every point.
Both rows are scored on every point: kNN preservation (k = 15) and attention agreement."""

from __future__ import annotations

import json
import os
import time

import numpy as np
from dask.system import cpu_count
from rich.table import Table

from workflows.progress import console

SUBSAMPLE_POINTS = 200_000
UMAP_LEARN_BUDGET_S = 600.0
GOAL_SECONDS_PER_MILLION = 90 / 1.16  # issue 15: a 1.16 M-point head in 90 s on two cores


def _bench_run(points: int) -> str:
    """A cached demo:minilm run with enough demo:wiki sentences for `points` points per head: the
    whole corpus (1.16 M points, shared with `qkatlas bench heads`) above 200k points."""
    from pipeline.config import ExtractConfig, cache_dir
    from pipeline.extract import extract
    from pipeline.store import StoreError, open_run

    if points > SUBSAMPLE_POINTS:
        from workflows.bench.heads import whole_corpus_run

        return whole_corpus_run(None)
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


def _umap_learn(raw_points: np.ndarray) -> np.ndarray:
    import umap as umap_learn

    return umap_learn.UMAP(n_components=2, metric="cosine").fit_transform(raw_points).astype(np.float32)


def _umap_learn_on_subsample(raw_points: np.ndarray, unit_points: np.ndarray, cpu) -> tuple[np.ndarray, float]:
    """umap-learn's defaults on SUBSAMPLE_POINTS points (queries and keys of the same tokens), the
    rest placed at the distance-weighted mean of their 10 nearest subsample points, as qkatlas
    places its own; returns the layout and the seconds of umap-learn alone."""
    from pipeline.reduce.project import INTERPOLATION_NEIGHBOURS, interpolate, sample_points

    subsample = sample_points(len(unit_points) // 2, SUBSAMPLE_POINTS, seed=0)
    began = time.perf_counter()
    subsample_coords = _umap_learn(raw_points[subsample])
    fit_seconds = time.perf_counter() - began
    coords = interpolate(subsample_coords, cpu.knn(unit_points[subsample], unit_points, INTERPOLATION_NEIGHBOURS))
    coords[subsample] = subsample_coords
    return coords, fit_seconds


def bench_reduce(run_url: str | None, layer: int, head: int, n_points: int,
                 budget_s: float = UMAP_LEARN_BUDGET_S) -> dict:
    import umap as umap_learn

    from pipeline.config import ReduceConfig
    from pipeline.normalize import normalize_head
    from pipeline.reduce import BackendError, load_backend
    from pipeline.reduce.project import attention_agreement, head_points, knn_preservation, project_points
    from pipeline.store import open_run

    run = open_run(run_url or _bench_run(n_points))
    n_tokens = min(n_points // 2, run.n_tokens)
    queries, keys = run.queries(layer, head)[:n_tokens], run.keys(layer, head)[:n_tokens]
    sequences = run.sequences()[["token_offset", "n_tokens"]].to_numpy()
    sequences = sequences[sequences.sum(axis=1) <= n_tokens]
    config = ReduceConfig()
    unit_points, _ = head_points(queries, keys, config)
    normalized_q, normalized_k, _ = normalize_head(queries, keys)
    raw_points = np.vstack([normalized_q, normalized_k])
    n = len(unit_points)
    cpu = load_backend("cpu")
    cores = cpu_count()
    console.print(f"head L{layer}H{head} of {run.dir.url}: {n:,} points, d_head {run.d_head}; "
                  "warming up numba in this process first")
    umap_learn.UMAP(n_epochs=20, metric="cosine").fit_transform(raw_points[:3000])
    project_points(unit_points[:6000], "umap", 2, config.model_copy(update={"sample_threshold": 4000,
                                                                            "sample_size": 2000}), cpu)

    def score(coords: np.ndarray) -> dict:
        agreement = attention_agreement(queries, keys, coords, sequences, run.scale(layer), run.mask_rule)
        return {"knn_preservation": knn_preservation(unit_points, coords, cpu), **agreement}

    load_before = os.getloadavg()[0]
    rows = []
    if n <= SUBSAMPLE_POINTS:
        began = time.perf_counter()
        direct = _umap_learn(raw_points)
        rows.append(("umap-learn on all points (defaults, cosine)", time.perf_counter() - began, score(direct)))
        baseline = "umap-learn on every point"
    else:
        began = time.perf_counter()
        placed, fit_seconds = _umap_learn_on_subsample(raw_points, unit_points, cpu)
        rows.append((f"umap-learn on {SUBSAMPLE_POINTS // 1000}k points (defaults, cosine) + interpolation",
                     time.perf_counter() - began, score(placed)))
        estimate = fit_seconds * (n / SUBSAMPLE_POINTS) ** 1.1  # NN-descent grows a little faster than n
        if estimate <= budget_s:
            began = time.perf_counter()
            direct = _umap_learn(raw_points)
            rows.insert(0, ("umap-learn on all points (defaults, cosine)", time.perf_counter() - began, score(direct)))
            baseline = "umap-learn on every point"
        else:
            console.print(f"[dim]umap-learn on all {n:,} points: estimated {estimate:.0f} s from its "
                          f"{fit_seconds:.0f} s on {SUBSAMPLE_POINTS:,}, over the {budget_s:.0f} s budget: not run[/]")
            baseline = f"umap-learn on a {SUBSAMPLE_POINTS:,}-point subsample + interpolation"
    began = time.perf_counter()
    ours, record = project_points(unit_points, "umap", 2, config, cpu)
    rows.append(("qkatlas default (cpu)", time.perf_counter() - began, score(ours)))
    try:
        gpu = load_backend("gpu")
        began = time.perf_counter()
        on_gpu, _ = project_points(unit_points, "umap", 2, config, gpu)
        rows.append(("qkatlas default (gpu, cuML)", time.perf_counter() - began, score(on_gpu)))
    except BackendError as why:
        console.print(f"[dim]no GPU figures: {why}[/]")
    load_after = os.getloadavg()[0]

    base_seconds, base_quality = rows[0][1], rows[0][2]
    ours_row = next(row for row in rows if row[0] == "qkatlas default (cpu)")
    table = Table(title=f"qkatlas bench reduce: {n:,} points of L{layer}H{head}, 2-D UMAP, {cores} cores, "
                        f"load average {load_before:.1f} -> {load_after:.1f}")
    for column in ("", "seconds", "speed-up vs baseline", "kNN preservation (k=15)", "vs baseline",
                   "attention agreement (chance)"):
        table.add_column(column)
    for name, seconds, quality in rows:
        agreement = quality["attention_agreement"]
        table.add_row(name, f"{seconds:.1f}", f"{base_seconds / seconds:.2f}x", f"{quality['knn_preservation']:.3f}",
                      f"{quality['knn_preservation'] - base_quality['knn_preservation']:+.3f}",
                      "-" if agreement is None else f"{agreement:.3f} ({quality['attention_chance']:.3f})")
    console.print(table)
    console.print(f"baseline: {baseline}; qkatlas default placement: {record.get('placement', 'all points')}")
    goal_seconds = GOAL_SECONDS_PER_MILLION * n / 1e6
    console.print(f"goals: qkatlas default within {goal_seconds:.0f} s ({GOAL_SECONDS_PER_MILLION:.0f} s per million "
                  f"points on {cores} cores): {ours_row[1]:.0f} s; kNN preservation no lower than the baseline's")
    result = {"points": n, "layer": layer, "head": head, "cores": cores, "baseline": baseline,
              "load_average": [round(load_before, 2), round(load_after, 2)],
              "rows": [{"name": name, "seconds": round(seconds, 2),
                        **{key: None if value is None else round(value, 4) for key, value in quality.items()}}
                       for name, seconds, quality in rows],
              "speedup": round(base_seconds / ours_row[1], 2),
              "quality_delta": round(ours_row[2]["knn_preservation"] - base_quality["knn_preservation"], 4),
              "goal_seconds": round(goal_seconds, 1)}
    print(json.dumps(result))
    return result

"""`qkatlas bench compare`: one head over 8 checkpoints, aligned layouts vs independent ones.

Aligned: checkpoint t's UMAP starts from checkpoint t-1's layout and is carried onto it by
Procrustes (`pipeline.align.aligned_layouts`, what `qkatlas compare-run` stores). Baseline: 8
independent UMAPs (qkatlas's defaults), as 8 separate `qkatlas run`s would make them. Both in
one process, after numba is warm. Reported per consecutive pair: the mean displacement of the
shared points (in units of the layout's RMS radius) for the aligned layouts, the independent
ones as they are, and the independent ones carried by Procrustes alone; a shuffled pairing gives
chance; and the time ratio.
"""

from __future__ import annotations

import json
import time

import numpy as np
from rich.table import Table

from pipeline.align import aligned_layouts, displacement, procrustes, project
from pipeline.config import AlignConfig, GroupConfig, ReduceConfig, cache_dir
from pipeline.reduce import load_backend
from pipeline.reduce.project import head_points, knn_preservation
from pipeline.store.group import open_group
from workflows.checkpoints import TrainingSettings, group_file, train_checkpoints
from workflows.cluster import open_client
from workflows.compare import group_todo, head_matches, run_group
from workflows.progress import console


def _bench_group() -> str:
    """The demo checkpoints (trained once) run over demo:wiki into the cache, without aligned layouts."""

    root = cache_dir() / "bench-compare"
    checkpoints = root / "checkpoints"
    if not (checkpoints / "training.json").exists():
        console.print(f"training the demo checkpoints into {checkpoints} (once, a few minutes)")
        log = train_checkpoints(checkpoints, TrainingSettings())
    else:
        log = json.loads((checkpoints / "training.json").read_text())
    raw = group_file(checkpoints, log["checkpoints"], str(root / "group"))
    raw["group"]["align"] = None
    raw["reduce"]["methods"] = ["pca"]
    raw["workflow"].update(thumbnails=False, measure_heads=True)
    config = GroupConfig.model_validate(raw)
    if not group_todo(config).done:
        console.print(f"running the checkpoints over demo:wiki into {root / 'group'} (once)")
        with open_client(config.cluster) as (client, _):
            outcome = run_group(config, client, show_progress=False, say=lambda text: console.print(text))
        if outcome.errors:
            raise RuntimeError("; ".join(outcome.errors))
    return str(root / "group")


def _pick_head(group, names: list[str], layer: int) -> int:
    """The head of `layer` with the highest induction score at the last member (else 0)."""
    table = group.run(names[-1]).head_measurements()
    if table is None or "induction_score" not in table or table["induction_score"].isna().all():
        return 0
    rows = table[table["layer"] == layer]
    return int(rows.loc[rows["induction_score"].idxmax(), "head"]) if len(rows) else 0


def bench_compare(group_url: str | None, layer: int, head: int | None, n_members: int = 8,
                  epochs: int | None = None) -> dict:

    group = open_group(group_url or _bench_group())
    if len(group.members) < n_members:
        raise ValueError(f"{group.url} has {len(group.members)} members; the bench needs {n_members}")
    chosen = np.unique(np.linspace(0, len(group.members) - 1, n_members).round().astype(int))
    names = [group.members[i] for i in chosen]
    steps = [group.steps()[i] for i in chosen]
    head = _pick_head(group, names, layer) if head is None else head
    config = ReduceConfig(seed=0)
    params = config.umap.model_dump()
    points = [head_points(group.run(name).queries(layer, head), group.run(name).keys(layer, head), config)[0]
              for name in names]
    matches = head_matches(group, names)
    cpu = load_backend("cpu")
    console.print(f"{group.url}: layer {layer} head {head}, members {', '.join(names)}; {len(points[0]):,} points "
                  "per layout; warming up numba first")
    project(points[0][:2000], "umap", 2, params, 0, cpu)
    project(points[0][:2000], "umap", 2, params, 0, cpu, init=np.zeros((2000, 2), np.float32) + 1e-3 *
            np.random.default_rng(0).normal(size=(2000, 2)).astype(np.float32), epochs=20)
    epochs = epochs or AlignConfig().epochs
    began = time.perf_counter()
    aligned, records = aligned_layouts(points, matches, "umap", 2, params, cpu, epochs=epochs, seed=0)
    aligned_seconds = time.perf_counter() - began
    began = time.perf_counter()
    independent = [project(p, "umap", 2, params, 0, cpu) for p in points]
    independent_seconds = time.perf_counter() - began

    rows = []
    for t in range(1, len(names)):
        match = matches[t]
        if match is None:
            raise ValueError(f"{names[t]} has no token match to {names[t - 1]}")
        shared = np.flatnonzero(match >= 0)
        before = independent[t - 1][match[shared]]
        raw = displacement(independent[t][shared], before)
        carried = displacement(procrustes(independent[t][shared], before).apply(independent[t][shared]), before)
        rows.append({"from": names[t - 1], "to": names[t], "aligned": records[t]["displacement"],
                     "independent": raw["displacement"], "independent_procrustes": carried["displacement"],
                     "chance": records[t]["chance"]})
    means = {key: float(np.mean([row[key] for row in rows]))
             for key in ("aligned", "independent", "independent_procrustes", "chance")}
    knn = {"aligned": float(np.mean([knn_preservation(p, layout, cpu) for p, layout in zip(points, aligned)])),
           "independent": float(np.mean([knn_preservation(p, layout, cpu) for p, layout in zip(points, independent)]))}
    table = Table(title=f"qkatlas bench compare: L{layer}H{head} over {len(names)} checkpoints, 2-D UMAP, "
                        f"{len(points[0]):,} points each")
    for column in ("steps", "aligned", "independent", "independent + Procrustes", "chance"):
        table.add_column(column, justify="right")
    for row, (a, b) in zip(rows, zip(steps, steps[1:])):
        table.add_row(f"{a} -> {b}", f"{row['aligned']:.3f}", f"{row['independent']:.3f}",
                      f"{row['independent_procrustes']:.3f}", f"{row['chance']:.3f}")
    table.add_row("mean", *(f"{means[key]:.3f}" for key in ("aligned", "independent", "independent_procrustes",
                                                            "chance")))
    console.print(table)
    console.print("mean displacement of shared points between consecutive checkpoints, in units of the layout's "
                  "RMS radius (chance: the same points paired at random)")
    console.print(f"time: aligned {aligned_seconds:.1f} s (first UMAP in full, then {epochs} epochs from the previous "
                  f"layout), independent {independent_seconds:.1f} s; ratio aligned / independent "
                  f"{aligned_seconds / independent_seconds:.2f}")
    console.print(f"layout quality, mean kNN preservation (k=15): aligned {knn['aligned']:.3f}, independent "
                  f"{knn['independent']:.3f}")
    least = max(means["aligned"], 1e-12)
    console.print(f"aligned displacement is {means['independent'] / least:.1f}x smaller than independent "
                  f"layouts', {means['independent_procrustes'] / least:.1f}x smaller than independent ones carried "
                  "by Procrustes")
    result = {"group": group.url, "layer": layer, "head": head, "members": names, "points": len(points[0]),
              "aligned_seconds": round(aligned_seconds, 2), "independent_seconds": round(independent_seconds, 2),
              "time_ratio": round(aligned_seconds / independent_seconds, 3),
              "epochs": epochs, "mean_displacement": {key: round(value, 4) for key, value in means.items()},
              "knn_preservation": {key: round(value, 4) for key, value in knn.items()},
              "pairs": [{key: (round(value, 4) if isinstance(value, float) else value) for key, value in row.items()}
                        for row in rows]}
    print(json.dumps(result))
    return result

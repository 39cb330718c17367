"""`qkatlas bench scale`: the workflow's throughput with 1 and 2 local workers on the same cores.

Both layouts get the same cores (1 worker x C threads, then 2 workers x C/2 threads), the same
shards and the same heads, in one invocation; each worker is warmed first (model loaded, numba
compiled), so the stages are timed without one-off costs. The demo config is then run cold, as
`make demo` runs it, in a fresh process.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dask.system import cpu_count
from rich.table import Table

from pipeline.config import validate
from workflows.cluster import open_client
from workflows.graph import pending, prepare, submit_graph, warm_worker
from workflows.progress import console


def _layouts(cores: int) -> list[tuple[int, int]]:
    return [(1, cores), (2, max(1, cores // 2))]


def _measure(model: str, data: str, sequences: int, methods: list[str], heads: int, shards: int,
             workers: int, threads: int, root: Path) -> dict:
    from distributed import wait


    config = validate({
        "extract": {"model": model, "data": data, "out": str(root / f"run-{workers}w"), "limit": sequences,
                    "max_length": 128, "batch_size": 32},
        "reduce": {"methods": methods, "dims": [2], "layers": [0], "heads": list(range(heads))},
        "cluster": {"kind": "local", "n_workers": workers, "threads_per_worker": threads, "dashboard_address": ":0"},
        "workflow": {"shards": shards, "thumbnails": False},
    }, "bench scale")
    with open_client(config.cluster) as (client, _):
        began = time.perf_counter()
        addresses = list(client.nthreads())
        warm = [client.submit(warm_worker, config.extract, "umap" in methods, workers=[address],
                              allow_other_workers=False, pure=False) for address in addresses]
        warm_seconds = max(client.gather(warm))
        client.submit(prepare, config.extract, shards, pure=False).result()
        todo = pending(config)

        began = time.perf_counter()
        stages = submit_graph(client, config, dataclasses.replace(todo, projections=[], thumbnails=[]))
        futures = [future for items in stages.values() for _, future in items]
        wait(futures)
        extract_seconds = time.perf_counter() - began
        records = [future.result() for _, future in stages["extract"]]
        tokens = sum(record["n_tokens"] for record in records)

        todo = pending(config)
        began = time.perf_counter()
        stages = submit_graph(client, config, todo)
        wait([future for items in stages.values() for _, future in items])
        project_seconds = time.perf_counter() - began
        for _, future in stages["project"]:
            future.result()  # raise a failure here rather than report a rate over failed tasks
    return {"workers": workers, "threads": threads, "warm_seconds": warm_seconds, "tokens": tokens,
            "extract_seconds": extract_seconds, "tokens_per_s": tokens / extract_seconds,
            "projections": len(todo.projections), "project_seconds": project_seconds,
            "projections_per_min": 60 * len(todo.projections) / project_seconds}


def _demo_seconds(config: Path, root: Path) -> tuple[float, int]:
    """Total wall time of `qkatlas run CONFIG` in a fresh process (cold: cluster start, model
    loads, numba compilation included), into a fresh run directory."""
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from workflows.cli import main; main()", "run", str(config),
                             "--out", str(root / "demo")], capture_output=True, text=True)
    if result.returncode != 0:
        console.print(result.stderr[-2000:])
    return time.perf_counter() - began, result.returncode


def bench_scale(model: str, data: str, sequences: int, methods: list[str], heads: int, shards: int,
                demo: Path | None) -> dict:

    cores = cpu_count()
    results = []
    with tempfile.TemporaryDirectory(prefix="qkatlas-bench-scale-") as tmp:
        for workers, threads in _layouts(cores):
            console.print(f"measuring {workers} worker(s) x {threads} thread(s) ...")
            results.append(_measure(model, data, sequences, methods, heads, shards, workers, threads, Path(tmp)))
        table = Table(title=f"{model}, {sequences} seqs of {data}, {shards} shards; "
                            f"{heads} heads x {'+'.join(methods)} 2-D; {cores} cores; layout = workers x threads")
        for column in ("layout", "warm s", "tokens", "extract s", "tokens/s", "proj.", "project s",
                       "proj./min"):
            table.add_column(column, justify="right")
        for row in results:
            table.add_row(f"{row['workers']} x {row['threads']}", f"{row['warm_seconds']:.1f}", f"{row['tokens']:,}",
                          f"{row['extract_seconds']:.2f}", f"{row['tokens_per_s']:,.0f}", str(row["projections"]),
                          f"{row['project_seconds']:.2f}", f"{row['projections_per_min']:.1f}")
        console.print(table)
        one, two = results
        ratios = {"extract": two["tokens_per_s"] / one["tokens_per_s"],
                  "project": two["projections_per_min"] / one["projections_per_min"]}
        console.print(f"2 workers / 1 worker on the same {cores} cores: extraction x{ratios['extract']:.2f}, "
                      f"projection x{ratios['project']:.2f}", highlight=False)
        summary = {"cores": cores, "layouts": results, "ratios": ratios}
        if demo is not None:
            console.print(f"running {demo} cold (qkatlas run, default LocalCluster) ...")
            seconds, code = _demo_seconds(demo, Path(tmp))
            state = "" if code == 0 else f" (FAILED, exit {code})"
            console.print(f"demo config {demo}: {seconds:.1f} s in total{state}", highlight=False)
            summary["demo_seconds"] = seconds
    return summary

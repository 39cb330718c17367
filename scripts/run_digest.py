"""Print a SHA-256 of every logical item of a run, read through the store, so that two runs can
be compared regardless of their version tokens and timings: each head's Q and K, the token and
sequence tables, each projection, thumbnail, region table, and the head atlas.

    python scripts/run_digest.py RUN > a.txt; python scripts/run_digest.py OTHER > b.txt; diff a.txt b.txt
"""

import hashlib
import sys

import numpy as np
import pandas as pd

from pipeline.store import open_run


def digest(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, pd.DataFrame):
        value = pd.util.hash_pandas_object(value.reset_index(drop=True), index=False).to_numpy()
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value).tobytes()
    return hashlib.sha256(value).hexdigest()[:16]


def main(url: str) -> None:
    run = open_run(url)
    print("tokens", digest(run.tokens()))
    print("sequences", digest(run.sequences().drop(columns=["part"], errors="ignore")))
    for layer in run.layers:
        for head in range(run.n_heads):
            print(f"q L{layer}H{head}", digest(run.queries(layer, head)))
        for head in sorted(set(run.kv_head_of_q)):
            print(f"k L{layer}H{head}", digest(run.keys(layer, run.kv_head_of_q.index(head))))
    for row in run.projections().sort_values(["method", "dim", "layer", "head"]).itertuples():
        key = (row.method, row.layer, row.head, row.dim)
        print(f"projection {key}", digest(run.projection(*key)))
        print(f"thumbnail {key}", digest(run.thumbnail_png(row.method, row.dim, row.layer, row.head)))
        print(f"regions {key}", digest(run.regions(row.method, row.dim, row.layer, row.head)))
    measurements = run.head_measurements()
    print("head measurements", digest(measurements.round(6) if measurements is not None else None))
    print("head top sequences", digest(run.head_top_sequences()))


if __name__ == "__main__":
    main(sys.argv[1])

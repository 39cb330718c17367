"""kill -9 of `qkatlas run` at random moments, each followed by a rerun, always ends in a run
equal to an uninterrupted one (issue 8). Kills land across extraction, the probe, projection,
thumbnails and head measurements; after every kill, whatever is committed must verify.

QKATLAS_SOAK_KILLS sets the number of kills that hit a running process (default 20)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.store import RunDir, committed_parts, committed_projections, open_run, part_damage, projection_damage

QKATLAS = str(Path(sys.executable).parent / "qkatlas")
KILLS = int(os.environ.get("QKATLAS_SOAK_KILLS", "20"))
WORDS = "the cat sat on a mat while queries attend to keys and heads learn positions , ; !".split()


def write_config(path: Path, model: str, data: Path, out: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "extract": {"model": model, "data": str(data), "out": str(out), "batch_size": 8, "chunk_tokens": 256},
        "reduce": {"methods": ["pca"], "dims": [2]},
        "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1, "dashboard_address": ":0"},
        "workflow": {"shards": 4, "thumbnail_size": 32},
    }))
    return path


def environment() -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def committed_state(out: Path) -> dict:
    """What is committed now, each item checked against its marker (a kill must never leave a
    committed item that does not verify)."""
    run = RunDir(out)
    parts = committed_parts(run)
    assert all(part_damage(run, record) is None for record in parts.values())
    projections = committed_projections(run)
    assert all(projection_damage(run, record) is None for record in projections.values())
    state = {"parts": len(parts), "projections": len(projections)}
    try:
        opened = open_run(out)
    except Exception:  # extraction not complete yet
        return state
    assert opened.verify() == [], opened.verify()
    measured = opened.head_measurements()
    state.update(heads=0 if measured is None else len(measured),
                 thumbnails=sum(opened.thumbnail_png("pca", 2, layer, head) is not None
                                for layer in opened.layers for head in range(opened.n_heads)))
    return state


def assert_same_run(reference: Path, other: Path) -> None:
    a, b = open_run(reference), open_run(other)
    pd.testing.assert_frame_equal(a.tokens(), b.tokens())
    pd.testing.assert_frame_equal(a.sequences(), b.sequences())
    for layer in a.layers:
        for head in range(a.n_heads):
            np.testing.assert_array_equal(a.queries(layer, head), b.queries(layer, head))
            np.testing.assert_array_equal(a.keys(layer, head), b.keys(layer, head))
            np.testing.assert_allclose(a.projection("pca", layer, head), b.projection("pca", layer, head), atol=1e-5)
            assert b.thumbnail_png("pca", 2, layer, head) is not None
    pd.testing.assert_frame_equal(a.head_measurements(), b.head_measurements(), atol=1e-6)
    pd.testing.assert_frame_equal(a.head_top_sequences(), b.head_top_sequences(), atol=1e-6)
    assert a.probe() is not None and b.probe() is not None
    np.testing.assert_array_equal(a.probe().queries(0, 0), b.probe().queries(0, 0))
    assert b.verify() == []
    leftovers = [p for p in (other / "vectors.zarr").iterdir()]
    assert len(leftovers) == len(b.parts), "versions no marker points at were not collected"


def test_kill_at_random_points_then_rerun_equals_uninterrupted(tiny_models, tmp_path):
    rng = random.Random(8)
    data = tmp_path / "lines.txt"
    data.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))
                              for _ in range(160)) + "\n")
    reference = tmp_path / "reference"
    began = time.monotonic()
    done = subprocess.run([QKATLAS, "run", str(write_config(tmp_path / "ref.yaml", tiny_models["gpt2"], data,
                                                             reference))],
                          capture_output=True, text=True, timeout=300, env=environment())
    assert done.returncode == 0, done.stdout + done.stderr
    full = time.monotonic() - began

    kills, chains, log = 0, 0, []
    while kills < KILLS:
        chains += 1
        out = tmp_path / f"run{chains}"
        config = write_config(tmp_path / f"run{chains}.yaml", tiny_models["gpt2"], data, out)
        while True:
            process = subprocess.Popen([QKATLAS, "run", str(config)], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, env=environment(), start_new_session=True)
            delay = rng.uniform(1.0, full)
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the CLI, the scheduler and the worker
                process.wait(timeout=30)
            output = process.stdout.read().decode()
            process.stdout.close()
            if process.returncode == 0:
                break
            assert process.returncode == -signal.SIGKILL, output
            kills += 1
            log.append((chains, round(delay, 1), committed_state(out)))
        assert_same_run(reference, out)
        shutil.rmtree(out)
    stages = {key for _, _, state in log for key, value in state.items() if value}
    print(f"\n{kills} kills in {chains} chains (uninterrupted run {full:.1f} s):")
    for entry in log:
        print("  chain %d, killed after %.1f s: committed %s" % entry)
    assert {"parts", "projections"} <= stages

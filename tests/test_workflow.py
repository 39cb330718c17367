"""`qkatlas run`: the whole pipeline on a 2-worker LocalCluster, killed with SIGKILL during
extraction and during projection, then resumed; the result must equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

QKATLAS = str(Path(sys.executable).parent / "qkatlas")
SHARDS = 6
WORDS = ("the cat sat on a mat while queries attend to keys and heads learn positions in long sentences, "
         "some short; others go on!").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """240 rows, a few of them empty (skipped rows keep their row numbers)."""
    rng = random.Random(0)
    lines = []
    for row in range(240):
        lines.append("" if row % 37 == 5 else " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + ".")
    path = tmp_path_factory.mktemp("corpus") / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_config(path: Path, model: str, data: str, out: str, **sections) -> Path:
    config = {
        "extract": {"model": model, "data": data, "out": out, "batch_size": 8, "chunk_tokens": 256},
        "reduce": {"methods": ["pca"], "dims": [2, 3]},
        "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"},
        "workflow": {"shards": SHARDS},
    }
    for name, values in sections.items():
        config[name].update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def environment(**extra) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **extra)
    return env


def run_cli(config: Path, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run([QKATLAS, "run", str(config)], capture_output=True, text=True, timeout=timeout,
                          env=environment(**env))


def markers(run: Path, folder: str) -> dict[str, tuple[int, bytes]]:
    """Commit markers under RUN/folder: relative path -> (mtime_ns, content)."""
    root = run / folder
    if not root.exists():
        return {}
    return {str(path.relative_to(run)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(root.rglob("*.json"))}


def data_files(run: Path, parts: list[str]) -> dict[str, int]:
    """mtime_ns of every file written for these parts (vectors, tokens, sequences)."""
    files = {}
    for part in parts:
        version = f"{part}-{json.loads((run / 'parts' / f'{part}.json').read_text())['token']}"
        for path in (run / "vectors.zarr" / version).rglob("*"):
            if path.is_file():
                files[str(path.relative_to(run))] = path.stat().st_mtime_ns
        for folder in ("tokens", "sequences"):
            path = run / folder / f"{version}.parquet"
            files[str(path.relative_to(run))] = path.stat().st_mtime_ns
    return files


def kill_when(config: Path, run: Path, hold: str, folder: str, tmp_path: Path, timeout: float = 240) -> None:
    """Start `qkatlas run`; one of its tasks blocks at `hold` (QKATLAS_HOLD_AT); once it does and
    at least one commit marker exists in RUN/folder, SIGKILL the whole process group."""
    marker = tmp_path / f"held-{hold}"
    process = subprocess.Popen([QKATLAS, "run", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=environment(QKATLAS_HOLD_AT=hold, QKATLAS_HOLD_MARKER=str(marker)),
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not (marker.exists() and markers(run, folder)):
            if process.poll() is not None:
                pytest.fail(f"run exited ({process.returncode}) before reaching {hold}:\n"
                            f"{process.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"run did not reach {hold} within {timeout} s")
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the CLI, the scheduler and every worker process
        process.wait(timeout=30)
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL


def assert_same_store(left: Path, right: Path) -> None:
    from pipeline.store import open_run

    a, b = open_run(str(left)), open_run(str(right))
    assert len(a.parts) == len(b.parts) == SHARDS
    pd.testing.assert_frame_equal(a.tokens(), b.tokens())
    pd.testing.assert_frame_equal(a.sequences(), b.sequences())
    for layer in a.layers:
        for head in range(a.n_heads):
            np.testing.assert_array_equal(a.queries(layer, head), b.queries(layer, head))
            np.testing.assert_array_equal(a.keys(layer, head), b.keys(layer, head))
    projections = a.projections()
    assert len(projections) == len(b.projections()) == 2 * a.n_layers * a.n_heads
    for row in projections.itertuples():
        np.testing.assert_allclose(a.projection(row.method, row.layer, row.head, row.dim),
                                   b.projection(row.method, row.layer, row.head, row.dim), atol=1e-5)
        for run in (a, b):
            assert run.thumbnail_png(row.method, row.dim, row.layer, row.head) is not None


def test_plan_shards_and_skip_counts(tiny_models, corpus, tmp_path):
    """Shards cover the rows the extraction uses, hold about equal numbers of sequences, and the
    skipped rows of each part are its own (they add up to the source's)."""
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract_part, prepare_run
    from pipeline.models import load_model
    from workflows.graph import plan_shards

    config = ExtractConfig(model=tiny_models["bert"], data=corpus, out=str(tmp_path / "run"), batch_size=8)
    shards = plan_shards(config, 4)
    assert shards[0][0] == 0 and shards[-1][1] == 240
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    limited = plan_shards(config.model_copy(update={"limit": 100}), 4)
    kept_rows = [row for row in range(240) if row % 37 != 5][:100]
    assert limited[-1][1] == kept_rows[-1] + 1
    loaded = load_model(config.model)
    run = prepare_run(config, loaded)
    records = [extract_part(loaded, config.model_copy(update={"limit": None}), run, index, rows=tuple(rows))
               for index, rows in enumerate(shards)]
    assert sum(record["n_sequences"] for record in records) == len([r for r in range(240) if r % 37 != 5])
    assert all(abs(record["n_sequences"] - records[0]["n_sequences"]) <= 1 for record in records)
    total = sum((Counter(record["skipped"]) for record in records), Counter())
    assert total == Counter(empty=7)


def test_kill_and_resume_equals_uninterrupted(tiny_models, corpus, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    config_ref = write_config(tmp_path / "ref.yaml", tiny_models["bert"], corpus, str(reference))
    config = write_config(tmp_path / "run.yaml", tiny_models["bert"], corpus, str(resumed))

    done = run_cli(config_ref)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LocalCluster, 2 workers x 1 threads" in done.stderr
    assert "dashboard" in done.stderr and "http://" in done.stderr

    # 1. killed during extraction: shard 3 blocks after its first batch (its data half written)
    kill_when(config, resumed, "extract-shard-3", "parts", tmp_path)
    parts_1 = markers(resumed, "parts")
    assert 1 <= len(parts_1) < SHARDS and "parts/part-00003.json" not in parts_1
    data_1 = data_files(resumed, [Path(name).stem for name in parts_1])

    # 2. resumed, then killed during projection
    kill_when(config, resumed, "project-pca2d-L001H002", "projections", tmp_path)
    parts_2 = markers(resumed, "parts")
    assert len(parts_2) == SHARDS
    assert {name: parts_2[name] for name in parts_1} == parts_1, "a committed shard was extracted again"
    assert data_files(resumed, [Path(name).stem for name in parts_1]) == data_1
    projections_2 = markers(resumed, "projections")
    assert 1 <= len(projections_2) < 16 and "projections/pca2d/L001H002.json" not in projections_2

    # 3. resumed to the end: same store as the uninterrupted run, committed work not redone
    finished = run_cli(config)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"{len(projections_2)} already committed" in finished.stderr
    assert markers(resumed, "parts") == parts_2
    projections_3 = markers(resumed, "projections")
    assert {name: projections_3[name] for name in projections_2} == projections_2, "a projection was redone"
    assert_same_store(reference, resumed)
    from pipeline.store import open_run

    run = open_run(str(resumed))
    assert len(run.parts) == SHARDS
    queries, keys = run.queries(1, 2), run.keys(1, 2)
    for token in (0, run.parts["part-00000"]["n_tokens"], run.n_tokens - 1):  # one vector, across part boundaries
        np.testing.assert_array_equal(run.vector("q", 1, 2, token), queries[token])
        np.testing.assert_array_equal(run.vector("k", 1, 2, token), keys[token])

    # 4. a complete run: a quick no-op (no cluster is started)
    began = time.monotonic()
    again = run_cli(config)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stderr and "dashboard" not in again.stderr
    assert time.monotonic() - began < 30
    assert markers(resumed, "projections") == projections_3


def test_failed_task_reports_and_exits_nonzero(tiny_models, corpus, tmp_path):
    """A head the model does not have stops the run with a message naming the key."""
    config = write_config(tmp_path / "bad.yaml", tiny_models["bert"], corpus, str(tmp_path / "bad"),
                          reduce={"heads": [0, 9]}, cluster={"n_workers": 1})
    result = run_cli(config)
    assert result.returncode != 0
    assert "reduce.heads [9]" in result.stderr


def test_extract_refuses_a_sharded_run(tiny_models, corpus, tmp_path):
    """`qkatlas extract` must not finish a run that `qkatlas run` planned in shards."""
    from pipeline.config import load_config
    from pipeline.extract import ExtractError, extract
    from pipeline.store import RunDir, load_manifest
    from workflows.graph import prepare

    config = write_config(tmp_path / "run.yaml", tiny_models["bert"], corpus, str(tmp_path / "run"))
    settings = load_config(config).extract
    prepare(settings, 3)
    state = load_manifest(RunDir(settings.out)).extract
    assert state.parts == 3 and not state.complete
    with pytest.raises(ExtractError, match="3 shards"):
        extract(settings)

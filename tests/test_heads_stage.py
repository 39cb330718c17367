"""The head atlas as a stage of a run: `qkatlas heads` and `qkatlas run` commit it per layer and
resume after a kill with the same table (issue 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from typer.testing import CliRunner

from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.store import RunDir, committed_head_layers, open_run
from workflows.cli import app

QKATLAS = str(Path(sys.executable).parent / "qkatlas")


def environment(**extra) -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


def test_heads_command_measures_every_head_with_the_probe(tiny_models, text_file, tmp_path):
    out = tmp_path / "run"
    extract(ExtractConfig(model=tiny_models["gpt2"], data=text_file, out=str(out)))
    run = open_run(out)
    assert run.probe() is not None and run.probe().mask_rule == "causal"
    assert run.head_measurements() is None
    result = CliRunner().invoke(app, ["heads", str(out), "--layers", "1"])
    assert result.exit_code == 0, result.output
    table = open_run(out).head_measurements()
    assert sorted(table["layer"].unique()) == [1] and len(table) == run.n_heads
    assert table["induction_score"].notna().all() and table["next_weight"].isna().all()
    again = CliRunner().invoke(app, ["heads", str(out)])
    assert "1 layers now, 1 already committed" in again.output
    assert len(open_run(out).head_measurements()) == run.n_layers * run.n_heads
    bad = CliRunner().invoke(app, ["heads", str(out), "--layers", "7"])
    assert bad.exit_code == 2 and "not stored" in bad.output


def test_encoder_runs_have_no_probe_and_no_induction_scores(tiny_models, text_file, tmp_path):
    out = tmp_path / "run"
    extract(ExtractConfig(model=tiny_models["bert"], data=text_file, out=str(out)))
    assert open_run(out).probe() is None
    assert CliRunner().invoke(app, ["heads", str(out)]).exit_code == 0
    table = open_run(out).head_measurements()
    assert table["induction_score"].isna().all() and table["next_weight"].notna().all()


def test_killed_while_measuring_then_rerun_gives_the_same_table(tiny_models, text_file, tmp_path):
    configs = {}
    for name in ("reference", "killed"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({
            "extract": {"model": tiny_models["gpt2"], "data": text_file, "out": str(tmp_path / name)},
            "reduce": {"methods": ["pca"], "dims": [2]},
            "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1, "dashboard_address": ":0"},
            "workflow": {"shards": 2, "thumbnails": False, "regions": False}}))
    done = subprocess.run([QKATLAS, "run", str(configs["reference"])], capture_output=True, text=True,
                          env=environment(), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    held = tmp_path / "held"
    process = subprocess.Popen([QKATLAS, "run", str(configs["killed"])], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               env=environment(QKATLAS_HOLD_AT="heads-L001", QKATLAS_HOLD_MARKER=str(held)))
    try:
        deadline = time.monotonic() + 240
        while not held.exists():  # layer 1's task holds its worker; layer 0 may or may not have run
            assert process.poll() is None, process.stdout.read().decode()  # it exited early: why
            assert time.monotonic() < deadline, "the run never reached the held layer"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
    before = sorted(committed_head_layers(RunDir(tmp_path / "killed")))
    assert 1 not in before

    resumed = subprocess.run([QKATLAS, "run", str(configs["killed"])], capture_output=True, text=True,
                             env=environment(), timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{2 - len(before)} layers measured, {len(before)} already committed" in resumed.stderr
    reference, killed = open_run(tmp_path / "reference"), open_run(tmp_path / "killed")
    pd.testing.assert_frame_equal(reference.head_measurements(), killed.head_measurements())
    pd.testing.assert_frame_equal(reference.head_top_sequences(), killed.head_top_sequences())
    assert np.isfinite(killed.head_measurements()["entropy"]).all()

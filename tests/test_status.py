"""`qkatlas status RUN`: each state of a run (none yet, extraction incomplete, running, complete,
damaged) with its exit code (0 complete, 1 incomplete, 3 damaged), and the plain progress lines
that `qkatlas run` writes to a log while it runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from workflows.cli import app

QKATLAS = str(Path(sys.executable).parent / "qkatlas")
runner = CliRunner()


def status(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["status", *map(str, args)])
    return result.exit_code, result.output


def status_json(*args: str) -> tuple[int, dict]:
    code, output = status(*args, "--json")
    return code, json.loads(output)


def write_config(path: Path, model: str, data: str, out: Path) -> Path:
    config = {"extract": {"model": model, "data": data, "out": str(out), "batch_size": 2, "chunk_tokens": 256},
              "reduce": {"methods": ["pca"], "dims": [2]},
              "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1, "dashboard_address": ":0"},
              "workflow": {"shards": 3}}
    path.write_text(yaml.safe_dump(config))
    return path


def environment(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "QKATLAS_HOLD_AT"}
    return dict(env, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def finished(tiny_models, text_file, tmp_path_factory) -> tuple[Path, Path, str]:
    """A run of `qkatlas run` that was held mid-projection (its log and a status taken then kept),
    killed, and rerun to the end: (run, run file, status output while it ran)."""
    root = tmp_path_factory.mktemp("status")
    out = root / "run"
    config = write_config(root / "run.yaml", tiny_models["bert"], text_file, out)
    held, log = root / "held", root / "held-run.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([QKATLAS, "run", str(config)], stdout=handle, stderr=subprocess.STDOUT,
                                   env=environment(QKATLAS_HOLD_AT="project-pca2d-L001H002",
                                                   QKATLAS_HOLD_MARKER=str(held), QKATLAS_PROGRESS_SECONDS="1"),
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not held.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(2.5)  # a heartbeat or two of progress lines while the projection is held
        code, running = status(out, "--config", config)
        progress_while_running = log.read_text()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    rerun = subprocess.run([QKATLAS, "run", str(config)], capture_output=True, text=True, env=environment(),
                           timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    return out, config, (code, running, progress_while_running)


def test_no_run_yet(tiny_models, text_file, tmp_path):
    code, output = status(tmp_path / "nothing")
    assert code == 1 and "no run" in output
    config = write_config(tmp_path / "run.yaml", tiny_models["bert"], text_file, tmp_path / "nothing")
    code, report = status_json(tmp_path / "nothing", "--config", config)
    assert code == 1 and report["state"] == "no run" and report["running"] is None


def test_not_a_run_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, output = status(tmp_path)
    assert code == 2 and "not a qkatlas run" in output


def test_extraction_incomplete_then_a_stale_and_a_live_writer(tiny_models, text_file, tmp_path):
    """One of three shards committed: 2 pending (exit 1). A writer that died leaves a stale lock;
    a live one is shown running, with the rate and ETA of the parts it committed."""
    from pipeline.store import RunDir, load_manifest, writing
    from workflows.graph import extract_shard, prepare
    from workflows.runner import load_run_config

    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_models["bert"], text_file, out)
    settings = load_run_config(config)
    prepare(settings.extract, 3)
    plan = load_manifest(RunDir(str(out))).extract.shards
    extract_shard(settings.extract, 0, plan[0])

    code, report = status_json(out)
    parts = report["stages"]["parts"]
    assert code == 1 and report["state"] == "incomplete" and not report["extraction_complete"]
    assert (parts["committed"], parts["pending"], parts["total"]) == (1, 2, 3)
    assert parts["first_commit"] is not None and parts["task_seconds"] > 0 and parts["tokens"] == report["tokens"] > 0
    assert report["stages"]["projections"]["pending"] is None  # the run does not store its reduce settings

    code, report = status_json(out, "--config", config)
    stages = report["stages"]
    assert code == 1 and stages["projections"]["pending"] == stages["projections"]["total"] == 8
    assert stages["head_layers"]["pending"] == 2 and stages["regions"]["pending"] == 8

    subprocess.run([sys.executable, "-c", "import sys; from pipeline.store.lock import acquire; "
                    "from pipeline.store import RunDir; acquire(RunDir(sys.argv[1]), 'qkatlas run')", str(out)],
                   check=True, env=environment())
    code, output = status(out)
    assert code == 1 and "stale lock" in output

    with writing(str(out), "qkatlas run"):  # takes over the stale lock, as a rerun would
        time.sleep(1.1)  # commits after the lock's `since` (whole seconds) count toward the rate
        extract_shard(settings.extract, 1, plan[1])
        code, report = status_json(out)
        code_text, output = status(out)
    parts = report["stages"]["parts"]
    assert code == code_text == 1 and report["running"]["pid"] == os.getpid() and report["running"]["alive"]
    assert (parts["committed"], parts["pending"]) == (2, 1)
    assert parts["rate_per_second"] > 0 and parts["eta_seconds"] == pytest.approx(1 / parts["rate_per_second"], abs=0.1)
    assert f"running: pid {os.getpid()}" in output and "ETA" in output


def test_running_run_and_its_log(finished):
    """While `qkatlas run` runs (held in a projection): status says running (exit 1) with the
    committed parts and the pending projections; the run's log has stage lines with rates."""
    _, _, (code, output, log) = finished
    assert code == 1 and "state     incomplete" in output and "running: pid" in output
    assert re.search(r"parts\s+3/3\s+0\s+0", output), output
    assert re.search(r"projections\s+\d/8\s+[1-8]\s+0", output), output
    assert re.search(r"\d\d:\d\d:\d\d extracting shards: 3/3, [\d,]+ tokens \([\d,]+ tokens/s\), done", log), log
    beats = re.findall(r"\d\d:\d\d:\d\d (?:projecting heads: \d/8, [\d.]+/s, ETA|waiting .*projecting heads 0/8)", log)
    assert len(beats) >= 2, log  # lines keep coming while nothing finishes


def test_complete_run(finished):
    from pipeline.store import open_run

    out, config, _ = finished
    code, report = status_json(out, "--config", config)
    assert code == 0 and report["state"] == "complete" and report["running"] is None, report
    run = open_run(str(out))
    assert report["tokens"] == run.n_tokens and report["points"] == 8 * 2 * run.n_tokens
    for name in ("parts", "projections", "thumbnails", "regions", "head_layers"):
        stage = report["stages"][name]
        assert stage["pending"] == 0 and stage["committed"] == stage["total"] > 0, (name, stage)
        assert stage["first_commit"] <= stage["last_commit"] and stage["wall_seconds"] >= 0
    code, output = status(out, "--verify")
    assert code == 0 and "every committed byte verified" in output
    assert "pending unknown" in output  # without --config, only what is committed is known


def test_damaged_part_and_projection(finished, tmp_path):
    out, config, _ = finished
    damaged = tmp_path / "run"
    shutil.copytree(out, damaged)
    marker = json.loads((damaged / "parts" / "part-00001.json").read_text())
    chunk = min((damaged / "vectors.zarr" / f"part-00001-{marker['token']}" / "q").rglob("c/*/*/*/*"))
    chunk.unlink()
    code, report = status_json(damaged)
    assert code == 3 and report["state"] == "damaged"
    problems = report["stages"]["parts"]["damaged"]
    assert [item["name"] for item in problems] == ["part-00001"] and "missing" in problems[0]["problem"]
    assert report["stages"]["parts"]["committed"] == 2

    projection = json.loads((damaged / "projections" / "pca2d" / "L000H001.json").read_text())
    array = damaged / "projections.zarr" / "pca2d" / f"L000H001-{projection['token']}"
    next(path for path in sorted(array.rglob("c/*/*")) if path.is_file()).write_bytes(b"")
    code, output = status(damaged, "--verify")
    assert code == 3 and "damaged part-00001" in output and "damaged pca2d L0H1" in output

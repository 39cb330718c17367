"""`qkatlas run` on a real one-node SLURM (Debian's `slurm-wlm` and `munge`, started by
tests/slurm/start.sh) through dask-jobqueue: worker jobs submitted with sbatch and seen in squeue;
a worker job cancelled with scancel mid-extraction is replaced by the driver; the driver killed
mid-projection, then a rerun completes the run, equal to an uninterrupted one.

Skipped, with the reason, where SLURM is not installed or cannot start (not root, no munge)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

QKATLAS = str(Path(sys.executable).parent / "qkatlas")
SCRIPTS = Path(__file__).parent / "slurm"
WORDS = "the cat sat on a mat while queries attend to keys and heads learn positions".split()
SHARDS = 3


@pytest.fixture(scope="module")
def slurm() -> str:
    """SLURM_CONF of a one-node SLURM started for this module (stopped after it)."""
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed (pip install -e '.[cluster]')")
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed here (apt-get install slurm-wlm munge; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld, slurmd and munged for the test needs root")
    started = subprocess.run(["bash", str(SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        pytest.skip(f"SLURM did not start here: {(started.stderr or started.stdout).strip()[-600:]}")
    conf = re.search(r"^SLURM_CONF=(.+)$", started.stdout, re.MULTILINE).group(1)
    yield conf
    subprocess.run(["bash", str(SCRIPTS / "stop.sh")], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def lines(tmp_path_factory) -> str:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("slurm-corpus") / "lines.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + "."
                              for _ in range(60)) + "\n")
    return str(path)


class QueueWatch:
    """squeue every half second while a run goes on: every (job id, name, state) seen."""

    def __init__(self, env: dict):
        self.env, self.seen, self._stop = env, set(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True,
                                 env=self.env).stdout
            self.seen.update(tuple(row.split()) for row in out.splitlines() if row.strip())
            self._stop.wait(0.5)

    def __enter__(self) -> QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def running(self) -> list[str]:
        return sorted({job for job, name, state in self.seen if name == "dask-worker" and state == "RUNNING"}, key=int)


def write_config(tmp_path: Path, model: str, data: str, out: Path) -> Path:
    """A SLURM run file; its job prologue moves the test's hold points (QKATLAS_HOLD_AT) along:
    the first job holds in shard 1, its replacement in a projection."""
    held_1, held_2 = tmp_path / "held-extract", tmp_path / "held-project"
    prologue = [f'if [ -e {held_1} ] && [ -n "$QKATLAS_HOLD_AT" ]; then export QKATLAS_HOLD_AT=project-pca2d-L001H002 '
                f'QKATLAS_HOLD_MARKER={held_2}; fi']
    config = {
        "extract": {"model": model, "data": data, "out": str(out), "batch_size": 8, "chunk_tokens": 256},
        "reduce": {"methods": ["pca"], "dims": [2]},
        "cluster": {"kind": "slurm", "jobs": 1, "cores": 1, "memory": "2GB", "walltime": "00:15:00",
                    "timeout": 120, "dashboard_address": ":0", "log_directory": str(tmp_path / "job-logs"),
                    "job_script_prologue": prologue},
        "workflow": {"shards": SHARDS, "regions": False, "measure_heads": False},  # the cluster path, kept short
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen([QKATLAS, "run", str(config)], stdout=handle, stderr=subprocess.STDOUT, env=env,
                                cwd=config.parent, start_new_session=True)


def wait_for(path: Path, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"run exited ({process.returncode}) before {path.name}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {path.name} within {timeout} s:\n{log.read_text()}")
        time.sleep(0.2)


def submitted(log: str) -> list[str]:
    """Job ids the driver logged as submitted."""
    return re.findall(r"worker jobs? ([\d, ]+) submitted", log)


def assert_same_run(left: Path, right: Path) -> None:
    from pipeline.store import open_run

    a, b = open_run(str(left)), open_run(str(right))
    assert len(a.parts) == len(b.parts) == SHARDS
    pd.testing.assert_frame_equal(a.tokens(), b.tokens())
    pd.testing.assert_frame_equal(a.sequences(), b.sequences())
    for layer in a.layers:
        for head in range(a.n_heads):
            np.testing.assert_array_equal(a.queries(layer, head), b.queries(layer, head))
            np.testing.assert_array_equal(a.keys(layer, head), b.keys(layer, head))
            np.testing.assert_allclose(a.projection("pca", layer, head, 2), b.projection("pca", layer, head, 2),
                                       atol=1e-5)


def test_slurm_run_scancel_and_rerun(slurm, tiny_models, lines, tmp_path):
    env = dict(os.environ, SLURM_CONF=slurm, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               QKATLAS_PROGRESS_SECONDS="2", DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT="3s")  # Dask's default: 15 s
    env.pop("QKATLAS_HOLD_AT", None)

    # 1. an uninterrupted run: its worker job goes through sbatch and shows in squeue
    reference = tmp_path / "reference"
    config = write_config(tmp_path, tiny_models["bert"], lines, reference)
    log = tmp_path / "reference.log"
    with QueueWatch(env) as queue:
        process = start(config, log, env)
        assert process.wait(timeout=150) == 0, log.read_text()
    text = log.read_text()
    jobs = submitted(text)
    print(f"\nrun 1: sbatch job ids logged {jobs}, seen running in squeue {queue.running()}")
    assert jobs and jobs[0] in queue.running(), text
    assert "SLURMCluster, 1 jobs x 1 workers" in text
    assert re.search(r"\d\d:\d\d:\d\d extracting shards: 3/3, \d[\d,]* tokens", text), text  # log progress lines

    # 2. the worker job is cancelled mid-extraction: the driver submits a replacement and goes
    # on; then the driver is killed mid-projection (its job prologue holds it there)
    resumed = tmp_path / "resumed"
    config = write_config(tmp_path, tiny_models["bert"], lines, resumed)
    log = tmp_path / "resumed.log"
    hold_env = dict(env, QKATLAS_HOLD_AT="extract-shard-1", QKATLAS_HOLD_MARKER=str(tmp_path / "held-extract"))
    with QueueWatch(env) as queue:
        process = start(config, log, hold_env)
        try:
            wait_for(tmp_path / "held-extract", process, log, 120)
            first = queue.running() or submitted(log.read_text())
            subprocess.run(["scancel", first[-1]], env=env, check=True)
            wait_for(tmp_path / "held-project", process, log, 150)
            status = subprocess.run([QKATLAS, "status", str(resumed), "--config", str(config)], capture_output=True,
                                    text=True, env=env)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            subprocess.run(["scancel", "--user", str(os.getuid())], env=env)
    text = log.read_text()
    print(f"run 2: sbatch job ids logged {submitted(text)}, seen running in squeue {queue.running()}, "
          f"cancelled {first[-1]}")
    assert f"worker job {first[-1]} ended" in text, text
    replacement = [job for job in submitted(text) if job != first[-1]]
    assert replacement and replacement[0] in queue.running(), text
    assert status.returncode == 1, status.stdout + status.stderr
    assert "running: pid" in status.stdout and re.search(r"parts\s+3/3\s+0\s+0", status.stdout), status.stdout

    # 3. the rerun completes the same run, redoing only what was not committed
    finished = subprocess.run([QKATLAS, "run", str(config)], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=150)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"0 extracted, {SHARDS} already committed" in finished.stderr, finished.stderr
    print(f"run 3: sbatch job ids logged {submitted(finished.stderr)}")
    assert_same_run(reference, resumed)
    status = subprocess.run([QKATLAS, "status", str(resumed), "--config", str(config)], capture_output=True,
                            text=True, env=env)
    assert status.returncode == 0, status.stdout + status.stderr

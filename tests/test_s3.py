"""`qkatlas run` into an `s3://` run directory, end to end, against a local S3-compatible
server (moto's, on 127.0.0.1, started by the test)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

QKATLAS = str(Path(sys.executable).parent / "qkatlas")
BUCKET = "qkatlas-test"


@pytest.fixture()
def s3(monkeypatch):
    """A moto S3 server on a free loopback port; this process and its children point at it."""
    monkeypatch.setattr(logging.getLogger("werkzeug"), "level", logging.WARNING)  # one line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint, "NO_PROXY": "127.0.0.1,localhost"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import fsspec

    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    try:
        yield env
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
        server.stop()


def test_run_into_s3(tiny_models, text_file, tmp_path, s3):
    from pipeline.store import open_run

    url = f"s3://{BUCKET}/runs/tiny"
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump({
        "extract": {"model": tiny_models["bert"], "data": text_file, "out": url, "batch_size": 2,
                    "chunk_tokens": 256},
        "reduce": {"methods": ["pca"], "dims": [2], "layers": [1]},
        "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"},
        "workflow": {"shards": 3},
    }))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    result = subprocess.run([QKATLAS, "run", str(config)], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    run = open_run(url)
    assert len(run.parts) == 3 and run.manifest.extract.complete
    assert sorted(run.sequences()["seq_id"]) == list(range(7))  # the fixture's 7 sentences
    assert len(run.tokens()) == run.n_tokens == len(run.queries(1, 0))
    assert len(run.projections()) == run.n_heads
    assert run.projection("pca", 1, 2).shape == (2 * run.n_tokens, 2)
    thumbnails = run.dir.fs.find(run.dir.path("thumbnails"))
    assert len(thumbnails) == run.n_heads and all(path.endswith(".png") for path in thumbnails)
    assert not [path for path in run.dir.fs.find(run.dir.path()) if path.endswith(".partial")]

    again = subprocess.run([QKATLAS, "run", str(config)], capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stdout + again.stderr

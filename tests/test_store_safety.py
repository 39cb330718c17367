"""The store never loses a run and never serves wrong data: overwrite builds beside the old run,
one writer per run, markers prove their data, damage is found and repaired (issue 8)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.config import ExtractConfig, ReduceConfig
from pipeline.extract import extract
from pipeline.reduce.project import reduce_run
from viz.raster import render_thumbnail
from pipeline.store import RunDir, StoreError, open_run, writing
from pipeline.store.lock import lock_path
from workflows.cli import app

QKATLAS = str(Path(sys.executable).parent / "qkatlas")


def tree_digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def make_run(model: str, data: str, out: Path, project: bool = False, **options) -> str:
    extract(ExtractConfig(model=model, data=data, out=str(out), chunk_tokens=256, **options))
    if project:
        reduce_run(str(out), ReduceConfig(methods=["pca"], layers=[0], heads=[0, 1]))
        for head in (0, 1):
            render_thumbnail(open_run(out), "pca", 2, 0, head, size=32)
    return str(out)


@pytest.fixture()
def projected_run(tiny_models, text_file, tmp_path) -> Path:
    out = tmp_path / "run"
    make_run(tiny_models["bert"], text_file, out, project=True)
    return out


# --- overwrite ---------------------------------------------------------------------------------


def test_overwrite_with_a_bad_source_keeps_the_old_run_byte_identical(tiny_models, projected_run, tmp_path):
    before = tree_digest(projected_run)
    result = CliRunner().invoke(app, ["extract", "--model", tiny_models["bert"], "--data", str(tmp_path / "typo.txt"),
                                      "--out", str(projected_run), "--overwrite"])
    assert result.exit_code == 2 and "typo.txt" in result.output and "Traceback" not in result.output
    assert tree_digest(projected_run) == before
    assert not [p for p in projected_run.parent.iterdir() if ".staging-" in p.name or ".retired-" in p.name]


def test_overwrite_with_a_bad_model_keeps_the_old_run(projected_run, text_file):
    before = tree_digest(projected_run)
    result = CliRunner().invoke(app, ["extract", "--model", "/no/such/model", "--data", text_file,
                                      "--out", str(projected_run), "--overwrite"])
    assert result.exit_code == 2 and "/no/such/model" in result.output
    assert tree_digest(projected_run) == before


def test_overwrite_refuses_a_foreign_directory_and_deletes_nothing(tiny_models, text_file, tmp_path):
    foreign = tmp_path / "mine"
    (foreign / "tokens").mkdir(parents=True)
    (foreign / "manifest.json").write_text('{"name": "my own project"}')
    (foreign / "tokens" / "notes.txt").write_text("keep me")
    (foreign / "parts").mkdir()
    before = tree_digest(foreign)
    for overwrite in ([], ["--overwrite"]):
        result = CliRunner().invoke(app, ["extract", "--model", tiny_models["bert"], "--data", text_file,
                                          "--out", str(foreign), *overwrite])
        assert result.exit_code == 2, result.output
        assert "not a qkatlas" in result.output and "Traceback" not in result.output
    assert tree_digest(foreign) == before


def test_overwrite_replaces_the_whole_run_with_its_projections_and_thumbnails(tiny_models, projected_run, text_file):
    old = open_run(projected_run)
    assert len(old.projections()) == 2 and old.thumbnail_png("pca", 2, 0, 0) is not None
    extract(ExtractConfig(model=tiny_models["gpt2"], data=text_file, out=str(projected_run), chunk_tokens=256),
            overwrite=True)
    new = open_run(projected_run)
    assert new.manifest.model.architecture == "GPT2Model"
    assert len(new.projections()) == 0 and new.thumbnail_png("pca", 2, 0, 0) is None
    assert not (projected_run / "thumbnails").exists() and not (projected_run / "projections.zarr").exists()
    assert not [p for p in projected_run.parent.iterdir() if ".staging-" in p.name or ".retired-" in p.name]


def test_a_crash_during_overwrite_leaves_the_old_run(tiny_models, projected_run, text_file, monkeypatch):
    import pipeline.extract as extract_module

    before = tree_digest(projected_run)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_module, "write_batches", crash)
    with pytest.raises(KeyboardInterrupt):
        extract(ExtractConfig(model=tiny_models["gpt2"], data=text_file, out=str(projected_run)), overwrite=True)
    assert tree_digest(projected_run) == before
    assert not [p for p in projected_run.parent.iterdir() if ".staging-" in p.name]


def test_out_that_is_a_file_is_refused(tiny_models, text_file, tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    result = CliRunner().invoke(app, ["extract", "--model", tiny_models["bert"], "--data", text_file,
                                      "--out", str(target)])
    assert result.exit_code == 2 and "is a file" in result.output
    assert target.read_text() == "x"


# --- one writer per run ------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holder_named(tiny_models, text_file, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        Path(lock_path(RunDir(out))).parent.mkdir(parents=True, exist_ok=True)
        Path(lock_path(RunDir(out))).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                             "since": "2026-11-28T00:00:00Z", "command": "test"}))
        with pytest.raises(StoreError, match=f"being written by pid {holder.pid} on host"):
            make_run(tiny_models["bert"], text_file, out)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    make_run(tiny_models["bert"], text_file, out)  # the holder is gone: its stale lock is taken over
    assert open_run(out).n_tokens > 0 and not Path(lock_path(RunDir(out))).exists()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with writing(tmp_path / "run"):
        with pytest.raises(StoreError, match="being written by pid"):
            with writing(tmp_path / "run"):
                pass
    with writing(tmp_path / "run"):  # released
        pass


def test_two_concurrent_extractions_one_refuses_the_other_completes(tiny_models, text_file, tmp_path):
    out = tmp_path / "run"
    reference = make_run(tiny_models["bert"], text_file, tmp_path / "reference")
    command = [QKATLAS, "extract", "--model", tiny_models["bert"], "--data", text_file, "--out", str(out),
               "--chunk-tokens", "256"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    held = tmp_path / "held"
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(env, QKATLAS_HOLD_AT="extract-locked", QKATLAS_HOLD_MARKER=str(held)))
    try:
        deadline = time.monotonic() + 120
        while not held.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held.exists(), "the first extraction never took the lock"
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)  # while it holds
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"being written by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()  # the holder dies without releasing: its lock is stale now
        first.communicate(timeout=30)
    third = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert third.returncode == 0, third.stdout + third.stderr
    a, b = open_run(reference), open_run(out)
    np.testing.assert_array_equal(a.queries(1, 2), b.queries(1, 2))
    assert a.tokens().equals(b.tokens())


# --- damage is detected, reported and repaired ------------------------------------------------------


def chunk_files(run: Path) -> list[Path]:
    return sorted(p for p in (run / "vectors.zarr").rglob("c/*/*/*/*") if p.is_file())


def test_deleted_and_truncated_chunks_are_reported_then_repaired(tiny_models, text_file, tmp_path):
    out = tmp_path / "run"
    make_run(tiny_models["bert"], text_file, out, compression="lz4")
    good = open_run(out)
    expected = {(layer, head): (good.queries(layer, head), good.keys(layer, head))
                for layer in good.layers for head in range(good.n_heads)}
    files = chunk_files(out)
    deleted = next(p for p in files if "/k/c/1/2/" in str(p))
    truncated = next(p for p in files if "/q/c/0/3/" in str(p))
    deleted.unlink()
    truncated.write_bytes(truncated.read_bytes()[:40])

    damaged = open_run(out)
    with pytest.raises(StoreError, match=r"part-00000 layer 1 head \d k .*c/1/2/0/0"):
        damaged.keys(1, 2)
    with pytest.raises(StoreError, match="part-00000 layer 0 head 3 q"):
        damaged.queries(0, 3)
    report = CliRunner().invoke(app, ["info", str(out), "--verify"])
    assert report.exit_code == 1 and "damaged" in report.output and "part-00000" in report.output

    summary = extract(ExtractConfig(model=tiny_models["bert"], data=text_file, out=str(out), chunk_tokens=256,
                                    compression="lz4"))  # the same settings: the damaged part is redone
    assert not summary["already_done"]
    again = open_run(out)
    assert again.verify() == []
    for (layer, head), (queries, keys) in expected.items():
        np.testing.assert_array_equal(again.queries(layer, head), queries)
        np.testing.assert_array_equal(again.keys(layer, head), keys)
    assert len(chunk_files(out)) == len(files)  # the damaged version was removed once replaced


def test_a_zero_filled_chunk_never_reads_as_data(tiny_models, text_file, tmp_path):
    """A chunk file removed from the store reads as Zarr's fill value (zeros) without the marker's checksums."""
    out = tmp_path / "run"
    make_run(tiny_models["bert"], text_file, out)
    next(p for p in chunk_files(out) if "/q/c/1/0/" in str(p)).unlink()
    with pytest.raises(StoreError, match="missing or overwritten"):
        open_run(out).queries(1, 0)
    with pytest.raises(StoreError, match="layer 1 head 0 q"):  # partial reads check the chunk files they touch
        open_run(out).attention(0, 1, 0)


def test_a_crash_while_writing_a_projection_keeps_the_old_one(projected_run, monkeypatch):
    import zarr

    import pipeline.store.writer as writer

    old = open_run(projected_run).projection("pca", 0, 0)
    original = writer.zarr.create_array

    def half_written(*args, **kwargs):
        array = original(*args, **kwargs)

        class Torn:
            def __setitem__(self, key, value):
                array[: len(value) // 2] = value[: len(value) // 2]
                raise OSError("disk full")

        return Torn()

    monkeypatch.setattr(writer.zarr, "create_array", half_written)
    with pytest.raises(OSError, match="disk full"):
        reduce_run(str(projected_run), ReduceConfig(methods=["pca"], layers=[0], heads=[0]), overwrite=True)
    monkeypatch.setattr(writer.zarr, "create_array", original)
    run = open_run(projected_run)
    np.testing.assert_array_equal(run.projection("pca", 0, 0), old)
    assert run.thumbnail_png("pca", 2, 0, 0) is not None
    assert zarr  # imported for the patch target


def test_a_projection_with_no_old_version_crashing_leaves_none(tiny_models, text_file, tmp_path, monkeypatch):
    import pipeline.store.writer as writer

    out = make_run(tiny_models["bert"], text_file, tmp_path / "run")
    monkeypatch.setattr(writer, "read_marker", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        reduce_run(out, ReduceConfig(methods=["pca"], layers=[0], heads=[0]))
    monkeypatch.undo()
    assert len(open_run(out).projections()) == 0
    with pytest.raises(KeyError, match="no 2-D pca projection"):
        open_run(out).projection("pca", 0, 0)


def test_a_damaged_projection_is_reported_and_redone(projected_run):
    array = next(p for p in (projected_run / "projections.zarr").rglob("c/*/*") if "L000H001" in str(p))
    array.write_bytes(b"\0" * array.stat().st_size)
    with pytest.raises(StoreError, match="projection pca 2-D layer 0 head 1"):
        open_run(projected_run).projection("pca", 0, 1)
    assert [d.kind for d in open_run(projected_run).verify()] == ["projection"]
    report = CliRunner().invoke(app, ["info", str(projected_run), "--verify"])
    assert report.exit_code == 1 and "pca2d L0H1" in report.output
    reduce_run(str(projected_run), ReduceConfig(methods=["pca"], layers=[0], heads=[0, 1]))
    assert open_run(projected_run).verify() == []


# --- unreadable manifests and path types ----------------------------------------------------


@pytest.mark.parametrize("content", [b"\x00\xffgarbage", b"[1, 2]", b'{"format": "qkatlas-run/2", "model": 3}',
                                     b'{"format": "qkatlas-run/1"}'])
def test_a_garbage_manifest_is_one_line(projected_run, content):
    (projected_run / "manifest.json").write_bytes(content)
    for command in (["info", str(projected_run)], ["serve", str(projected_run), "--port", "59999"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert "manifest" in result.output or "format" in result.output


def test_open_run_takes_paths_and_strings(projected_run):
    assert open_run(projected_run).n_tokens == open_run(str(projected_run)).n_tokens == \
        open_run(os.fspath(projected_run) + "/").n_tokens


def test_two_concurrent_runs_one_refuses_the_other_completes(tiny_models, text_file, tmp_path):
    import signal

    import yaml

    def write(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "extract": {"model": tiny_models["bert"], "data": text_file, "out": str(tmp_path / name)},
            "reduce": {"methods": ["pca"], "dims": [2], "layers": [0], "heads": [0]},
            "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1, "dashboard_address": ":0"},
            "workflow": {"shards": 2, "thumbnails": False, "regions": False, "measure_heads": False}}))
        return path

    config = write("run")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    held = tmp_path / "held"
    first = subprocess.Popen([QKATLAS, "run", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True,
                             env=dict(env, QKATLAS_HOLD_AT="extract-shard-1", QKATLAS_HOLD_MARKER=str(held)))
    try:
        deadline = time.monotonic() + 180
        while not held.exists():
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline, "the first run never reached shard 1"
            time.sleep(0.05)
        second = subprocess.run([QKATLAS, "run", str(config)], capture_output=True, text=True, env=env, timeout=180)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"being written by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        first.stdout.close()
    third = subprocess.run([QKATLAS, "run", str(config)], capture_output=True, text=True, env=env, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr
    alone = subprocess.run([QKATLAS, "run", str(write("reference"))], capture_output=True, text=True, env=env,
                           timeout=300)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    a, b = open_run(tmp_path / "reference"), open_run(tmp_path / "run")
    assert a.tokens().equals(b.tokens())
    np.testing.assert_array_equal(a.projection("pca", 0, 0), b.projection("pca", 0, 0))
    np.testing.assert_array_equal(a.queries(1, 3), b.queries(1, 3))
    assert b.verify() == []

from __future__ import annotations

from typer.testing import CliRunner

from pipeline.store import open_run
from workflows.cli import app

runner = CliRunner()


def test_help_explains_every_option():
    result = runner.invoke(app, ["extract", "--help"])
    assert result.exit_code == 0
    for flag in ("--model", "--data", "--out", "--max-length", "--batch-size", "--limit", "--dtype", "--layers",
                 "--config"):
        assert flag in result.output


def test_extract_with_flags_prints_a_summary(tiny_models, text_file, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["extract", "--model", tiny_models["llama"], "--data", text_file, "--out", str(out),
                                 "--batch-size", "2", "--layers", "1", "--limit", "5", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "sequences  5" in result.output and "1 layers x 4 heads" in result.output
    run = open_run(str(out))
    assert run.layers == [1] and run.manifest.config.batch_size == 2


def test_extract_from_config_file_with_override(tiny_models, text_file, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"extract:\n  model: {tiny_models['bert']}\n  data: {text_file}\n  out: {tmp_path / 'a'}\n")
    result = runner.invoke(app, ["extract", "--config", str(config), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert open_run(str(tmp_path / "b")).n_tokens > 0
    assert not (tmp_path / "a").exists()


def test_bad_input_exits_2_with_a_message(tmp_path, text_file):
    result = runner.invoke(app, ["extract", "--model", "demo:nope", "--data", text_file, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown demo model" in result.output
    result = runner.invoke(app, ["extract", "--model", "demo:minilm"])
    assert result.exit_code == 2 and "missing --data, --out" in result.output


def test_serve_says_where_datashader_aggregates(monkeypatch):
    """`qkatlas serve` names the array backend its rasters aggregate on, and why not the GPU."""
    from types import SimpleNamespace

    import viz.server

    server = SimpleNamespace(start=lambda: None, io_loop=SimpleNamespace(start=lambda: None))
    monkeypatch.setattr(viz.server, "make_server", lambda *args, **kwargs: server)
    monkeypatch.setenv("QKATLAS_ARRAYS", "cpu")
    from pipeline import arrays

    arrays.backend.cache_clear()
    try:
        result = runner.invoke(app, ["serve", "some-run", "--port", "5999"])
    finally:
        arrays.backend.cache_clear()
    assert result.exit_code == 0, result.output
    assert "points aggregated by datashader on the CPU (QKATLAS_ARRAYS=cpu)" in " ".join(result.output.split())

"""Each class of bad input gets a clear error naming it, or a recorded skip, and never a
committed (complete-looking) part."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, ExtractConfig, load_config, validate
from pipeline.extract import ExtractError, extract
from pipeline.models import ModelError
from pipeline.sources import SourceError
from pipeline.store import RunDir, StoreError, committed_parts, open_run


def run_extract(model, data, out, **options):
    return extract(ExtractConfig(model=model, data=str(data), out=str(out), **options))


def test_missing_data_file_names_the_path(tiny_models, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(SourceError, match="nope.txt"):
        run_extract(tiny_models["bert"], missing, tmp_path / "run")
    with pytest.raises(StoreError):
        open_run(str(tmp_path / "run"))


def test_empty_lines_are_skipped_and_counted(tiny_models, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("first line here\n\n   \nsecond line here\n")
    summary = run_extract(tiny_models["bert"], data, tmp_path / "run")
    assert summary["n_sequences"] == 2
    assert summary["skipped"] == {"empty": 2}
    run = open_run(str(tmp_path / "run"))
    assert run.parts["part-00000"]["skipped"] == {"empty": 2}
    assert run.sequences()["seq_id"].tolist() == [0, 3]  # seq_id is the source row


def test_undecodable_bytes_are_skipped_and_counted(tiny_models, tmp_path):
    data = tmp_path / "d.txt"
    data.write_bytes(b"good line one\n\xff\xfe broken \xc3\x28\nanother good line\n")
    summary = run_extract(tiny_models["bert"], data, tmp_path / "run")
    assert summary["n_sequences"] == 2 and summary["skipped"] == {"undecodable": 1}


def test_corrupt_image_is_skipped_and_counted(tiny_models, image_folder, tmp_path):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    summary = run_extract(tiny_models["vit"], folder, tmp_path / "run")
    assert summary["n_sequences"] == 6 and summary["skipped"] == {"corrupt_image": 1}


def test_bad_json_line_is_skipped_and_missing_column_fails(tiny_models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a fine sentence", "source": "x"}\n{not json\n{"text": "another one", "source": "y"}\n')
    summary = run_extract(tiny_models["bert"], data, tmp_path / "run")
    assert summary["n_sequences"] == 2 and summary["skipped"] == {"bad_json": 1}
    with pytest.raises(SourceError, match="no column 'body'"):
        run_extract(tiny_models["bert"], data, tmp_path / "run2", text_column="body")


def test_unknown_model_path_and_demo_name(tiny_models, text_file, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        run_extract(str(tmp_path / "no-such-model"), text_file, tmp_path / "run")
    with pytest.raises(ModelError, match="unknown demo model 'demo:gpt5'"):
        run_extract("demo:gpt5", text_file, tmp_path / "run")
    not_a_model = tmp_path / "empty-dir"
    not_a_model.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        run_extract(str(not_a_model), text_file, tmp_path / "run")


def test_unknown_config_key_and_bad_value(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("extract:\n  model: demo:minilm\n  data: demo:wiki\n  out: runs/x\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'extract.batchsize'"):
        load_config(config)
    with pytest.raises(ConfigError, match="dtype"):
        validate({"extract": {"model": "m", "data": "d", "out": "o", "dtype": "int8"}})
    with pytest.raises(ConfigError, match="layers"):
        validate({"extract": {"model": "m", "data": "d", "out": "o", "layers": "0,x"}})
    with pytest.raises(ConfigError, match="unknown key 'reduce_everything'"):
        validate({"extract": {"model": "m", "data": "d", "out": "o"}, "reduce_everything": True})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overlong_sequences_truncate_or_skip_and_are_counted(tiny_models, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("short one\n" + " ".join(["word"] * 100) + "\n")
    summary = run_extract(tiny_models["bert"], data, tmp_path / "a", max_length=16)
    assert summary["truncated"] == 1 and summary["n_sequences"] == 2
    assert open_run(str(tmp_path / "a")).sequences()["n_tokens"].max() == 16
    summary = run_extract(tiny_models["bert"], data, tmp_path / "b", max_length=16, overlong="skip")
    assert summary["n_sequences"] == 1 and summary["skipped"] == {"overlong": 1}


def test_sequences_longer_than_the_model_allows_are_truncated_to_its_limit(tiny_models, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text(" ".join(["word"] * 200) + "\n")  # the tiny BERT has 64 positions
    summary = run_extract(tiny_models["bert"], data, tmp_path / "run")
    assert summary["truncated"] == 1
    assert open_run(str(tmp_path / "run")).sequences()["n_tokens"].max() == 64


def test_max_length_beyond_the_model_limit_fails(tiny_models, text_file, tmp_path):
    with pytest.raises(ModelError, match="exceeds what .* allows \\(64 positions\\)"):
        run_extract(tiny_models["bert"], text_file, tmp_path / "run", max_length=65)


def test_layers_out_of_range_fail(tiny_models, text_file, tmp_path):
    with pytest.raises(ExtractError, match=r"--layers \[5\] out of range"):
        run_extract(tiny_models["bert"], text_file, tmp_path / "run", layers=[0, 5])


@pytest.mark.parametrize("name,reason", [("t5", "encoder-decoder"), ("bloom", "attention interface|ALiBi|differs")])
def test_architectures_whose_attention_is_not_qk_softmax_are_refused(tiny_models, text_file, tmp_path, name, reason):
    with pytest.raises(ModelError, match=reason):
        run_extract(tiny_models[name], text_file, tmp_path / "run")


def test_source_with_no_usable_rows_commits_nothing(tiny_models, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("\n\n  \n")
    with pytest.raises(ExtractError, match="no usable sequences"):
        run_extract(tiny_models["bert"], data, tmp_path / "run")
    assert committed_parts(RunDir(str(tmp_path / "run"))) == {}
    with pytest.raises(StoreError, match="not a qkatlas run"):  # the source is checked before the run is made
        open_run(str(tmp_path / "run"))


def test_a_crash_mid_extraction_leaves_nothing_that_reads_as_complete(tiny_models, text_file, tmp_path, monkeypatch):
    import pipeline.extract as extract_module

    calls = {"n": 0}
    original = extract_module.forward_vectors

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(extract_module, "forward_vectors", failing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_extract(tiny_models["bert"], text_file, out, batch_size=2)
    with pytest.raises(StoreError, match="not complete"):
        open_run(str(out))
    monkeypatch.setattr(extract_module, "forward_vectors", original)
    summary = run_extract(tiny_models["bert"], text_file, out, batch_size=2)
    assert summary["n_sequences"] == 7 and not summary["already_done"]
    again = run_extract(tiny_models["bert"], text_file, out, batch_size=2)
    assert again["already_done"]
    assert len(open_run(str(out)).tokens()) == summary["n_tokens"]


def test_existing_run_with_other_settings_is_not_mixed(tiny_models, text_file, tmp_path):
    out = tmp_path / "run"
    run_extract(tiny_models["bert"], text_file, out)
    with pytest.raises(ExtractError, match="other settings"):
        run_extract(tiny_models["bert"], text_file, out, dtype="float32")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "float16"


def test_unknown_demo_source(tiny_models, tmp_path):
    with pytest.raises(SourceError, match="unknown demo source 'demo:nope'"):
        run_extract(tiny_models["bert"], "demo:nope", tmp_path / "run")


def test_manifest_records_counts_skips_and_completion(tiny_models, tmp_path):
    data = tmp_path / "d.txt"
    data.write_bytes(b"one good line\n\n\xff bad\n" + b" ".join([b"word"] * 100) + b"\nlast line\n")
    run_extract(tiny_models["bert"], data, tmp_path / "run", max_length=16)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["extract"] == {**manifest["extract"], "complete": True, "parts": 1, "n_sequences": 3,
                                   "truncated": 1, "skipped": {"empty": 1, "undecodable": 1}}
    assert manifest["extract"]["n_tokens"] == open_run(str(tmp_path / "run")).n_tokens
    assert manifest["attention"]["mask_rule"] == "bidirectional" and manifest["model"]["architecture"] == "BertModel"

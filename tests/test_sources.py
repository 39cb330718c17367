from __future__ import annotations

import itertools
from collections import Counter

import pandas as pd
import pytest

from pipeline.config import ExtractConfig
from pipeline.extract import extract, is_punctuation
from pipeline.sources import open_source, read_idx, split_sentences
from pipeline.store import open_run


def test_csv_and_parquet_keep_other_columns_as_sequence_metadata(tiny_models, tmp_path):
    frame = pd.DataFrame({"body": ["one short text", "", "another text here"], "label": [3, 4, 5],
                          "source": ["a", "b", "c"]})
    for suffix in ("csv", "parquet"):
        path = tmp_path / f"d.{suffix}"
        frame.to_csv(path, index=False) if suffix == "csv" else frame.to_parquet(path)
        out = str(tmp_path / suffix)
        summary = extract(ExtractConfig(model=tiny_models["bert"], data=str(path), out=out, text_column="body"))
        assert summary["skipped"] == {"empty": 1} if suffix == "parquet" else summary["n_sequences"] == 2
        sequences = open_run(out).sequences()
        assert sequences["text"].tolist() == ["one short text", "another text here"]
        assert sequences["label"].tolist() == [3, 5]
        assert sequences["source"].tolist() == ["a", "c"]


def test_saved_hugging_face_dataset(tiny_models, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"sentence": ["hello there world", "queries meet keys"], "idx": [7, 8]}).save_to_disk(
        str(tmp_path / "ds"))
    out = str(tmp_path / "run")
    extract(ExtractConfig(model=tiny_models["bert"], data=str(tmp_path / "ds"), out=out, text_column="sentence"))
    sequences = open_run(out).sequences()
    assert sequences["idx"].tolist() == [7, 8]


def test_token_table_columns(tiny_models, text_file, tmp_path):
    out = str(tmp_path / "run")
    extract(ExtractConfig(model=tiny_models["bert"], data=text_file, out=out))
    tokens = open_run(out).tokens()
    first = tokens[tokens["seq_id"] == 0]
    assert first["token"].tolist() == ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]
    assert first["is_special"].tolist() == [True] + [False] * 7 + [True]
    assert first["is_punct"].tolist() == [False] * 7 + [True, False]
    assert first["pos_norm"].iloc[0] == 0 and first["pos_norm"].iloc[-1] == 1
    assert (first["seq_len"] == 9).all()


def test_image_token_colours(tiny_models, tmp_path):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:16, :, 0] = 255  # top half red, bottom half blue
    pixels[16:, :, 2] = 255
    Image.fromarray(pixels).save(folder / "x.png")
    out = str(tmp_path / "run")
    extract(ExtractConfig(model=tiny_models["vit"], data=str(folder), out=out))
    tokens = open_run(out).tokens().query("pos > 0")
    top, bottom = tokens[tokens["patch_row"] == 0], tokens[tokens["patch_row"] == 3]  # away from the edge
    assert (top["mean_r"] == 255).all() and (top["mean_b"] == 0).all()
    assert (bottom["mean_b"] == 255).all() and (bottom["mean_r"] == 0).all()


@pytest.mark.parametrize("name,minimum", [("demo:wiki", 15000), ("demo:lee", 2000)])
def test_demo_text_corpora(name, minimum):
    skipped = Counter()
    rows = list(open_source(name, skipped=skipped))
    assert len(rows) >= minimum
    assert all(row.text and "'''" not in row.text and "[[" not in row.text for row in rows[:500])
    assert [row.row for row in rows[:3]] == [0, 1, 2]


def test_demo_image_corpora():
    digits = list(itertools.islice(open_source("demo:digits"), 5))
    assert len(digits) == 5 and digits[0].image.size == (8, 8) and digits[0].meta["label"] == 0
    pictures = list(open_source("demo:skimage"))
    assert len(pictures) >= 10 and all(p.image.mode == "RGB" for p in pictures)


def test_idx_reader(tmp_path):
    import numpy as np

    data = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(12))
    (tmp_path / "x-idx3-ubyte").write_bytes(data)
    array = read_idx(tmp_path / "x-idx3-ubyte")
    assert array.shape == (2, 2, 3) and array[1, 1, 2] == 11 and array.dtype == np.uint8


def test_sentence_split_and_punctuation():
    text = "Dr. Who met J. R. Smith at 5 p.m. today. Then he left! Was it fun? Yes it was."
    assert split_sentences(text, min_words=1) == [
        "Dr. Who met J. R. Smith at 5 p.m. today.", "Then he left!", "Was it fun?", "Yes it was."]
    assert split_sentences(text, min_words=4) == ["Dr. Who met J. R. Smith at 5 p.m. today.", "Yes it was."][:1]
    assert is_punctuation(",") and is_punctuation("##.") and is_punctuation("Ġ...")
    assert not is_punctuation("cat") and not is_punctuation("Ġ") and not is_punctuation("a.")

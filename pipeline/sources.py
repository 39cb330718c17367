"""Sources: sequences and their metadata, read lazily, one at a time.

Every reader yields `Sequence`s in a fixed order; `row` is the position in that order, so
a shard of rows [start, stop) names the same sequences on every machine. A bad row (empty,
undecodable, corrupt image) is skipped and counted in `skipped`; a missing or unreadable
source fails at once with its path in the message.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import QkatlasError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TABLE_SUFFIXES = {".jsonl", ".ndjson", ".csv", ".parquet", ".pq"}
DEMO_SOURCES = ("demo:wiki", "demo:lee", "demo:digits", "demo:skimage", "demo:fashion-mnist")
IMAGE_DEMOS = ("demo:digits", "demo:skimage", "demo:fashion-mnist")
SOURCES_OF = {"text": "a text, JSONL, CSV or Parquet file, a saved Hugging Face dataset folder, or demo:wiki / "
                      "demo:lee", "image": "a folder of images, or demo:digits / demo:skimage / demo:fashion-mnist"}


class SourceError(QkatlasError, ValueError):
    """A source that cannot be read at all (missing path, wrong column, unknown demo)."""


@dataclass
class Sequence:
    row: int
    text: str | None = None
    image: Any = None  # PIL.Image.Image, RGB
    meta: dict = field(default_factory=dict)


def open_source(spec: str, text_column: str = "text", skipped: Counter | None = None) -> Iterator[Sequence]:
    """Yield the sequences of `spec`; bad rows increment `skipped[reason]`.

    Checks that the source exists before returning, so a wrong path fails at once.
    """
    skipped = Counter() if skipped is None else skipped
    rows: Iterator[Sequence | None]
    if spec.startswith("demo:"):
        readers = {
            "demo:wiki": _demo_wiki,
            "demo:lee": _demo_lee,
            "demo:digits": _demo_digits,
            "demo:skimage": _demo_skimage,
            "demo:fashion-mnist": _demo_fashion_mnist,
        }
        if spec not in readers:
            raise SourceError(f"unknown demo source {spec!r}; known: {', '.join(DEMO_SOURCES)}")
        rows = readers[spec]()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise SourceError(f"data source not found: {path}")
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                rows = _hf_dataset(path, text_column, skipped)
            else:
                rows = _image_folder(path, skipped)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            raise SourceError(f"--data {path} is one image; give the folder that holds the images")
        elif path.suffix.lower() in {".jsonl", ".ndjson"}:
            rows = _jsonl(path, text_column, skipped)
        elif path.suffix.lower() == ".csv":
            rows = _table(path, text_column, skipped)
        elif path.suffix.lower() in {".parquet", ".pq"}:
            rows = _table(path, text_column, skipped)
        else:
            rows = _text_lines(path, skipped)
    return _numbered(rows)


def source_modality(spec: str) -> str:
    """"text" or "image": what `open_source` reads from `spec` (a folder other than a saved
    Hugging Face dataset is read as images)."""
    if spec.startswith("demo:"):
        return "image" if spec in IMAGE_DEMOS else "text"
    path = Path(spec).expanduser()
    if path.is_dir():
        is_dataset = (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        return "text" if is_dataset else "image"
    return "image" if path.suffix.lower() in IMAGE_SUFFIXES else "text"


def check_modality(spec: str, modality: str, model: str) -> None:
    """Refuse, before anything is read or written, a source whose kind the model cannot take
    (an image folder for a text model, a text file for a vision transformer)."""
    found = source_modality(spec)
    if found != modality:
        kinds = {"image": "images", "text": "text"}
        other = "an image" if found == "image" else "a text"
        raise SourceError(f"--data {spec} holds {kinds[found]} but --model {model} reads {kinds[modality]}; give "
                          f"it {SOURCES_OF[modality]} (or {other} model for this data)")


def _numbered(rows: Iterator[Sequence | None]) -> Iterator[Sequence]:
    """Give every row, skipped or not, its position; skipped rows arrive as None."""
    for row, item in enumerate(rows):
        if item is not None:
            item.row = row
            yield item


def _text_row(text, meta: dict, skipped: Counter) -> Sequence | None:
    if not isinstance(text, str):
        skipped["not_text"] += 1
        return None
    text = text.strip()
    if not text:
        skipped["empty"] += 1
        return None
    return Sequence(row=-1, text=text, meta=meta)


def _text_lines(path: Path, skipped: Counter) -> Iterator[Sequence | None]:
    with open(path, "rb") as handle:
        for raw in handle:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped["undecodable"] += 1
                yield None
                continue
            yield _text_row(line, {}, skipped)


def _jsonl(path: Path, text_column: str, skipped: Counter) -> Iterator[Sequence | None]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["undecodable"] += 1
                yield None
                continue
            except json.JSONDecodeError:
                if raw.strip():
                    skipped["bad_json"] += 1
                else:
                    skipped["empty"] += 1
                yield None
                continue
            if not isinstance(record, dict):
                skipped["bad_json"] += 1
                yield None
                continue
            if text_column not in record:
                raise SourceError(
                    f"{path}, line {number}: no column {text_column!r} (has: {', '.join(record)}); "
                    "set --text-column"
                )
            meta = {key: value for key, value in record.items() if key != text_column}
            yield _text_row(record[text_column], _scalar_meta(meta), skipped)


def _table(path: Path, text_column: str, skipped: Counter) -> Iterator[Sequence | None]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".csv":
            table = pacsv.read_csv(path)
            batches = table.to_batches(max_chunksize=4096)
            columns = table.column_names
        else:
            parquet = pq.ParquetFile(path)
            columns = parquet.schema_arrow.names
            batches = parquet.iter_batches(batch_size=4096)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise SourceError(f"cannot read {path}: {error}") from None
    if text_column not in columns:
        raise SourceError(f"{path}: no column {text_column!r} (has: {', '.join(columns)}); set --text-column")
    for batch in batches:
        for record in batch.to_pylist():
            text = record.pop(text_column)
            yield _text_row(text, _scalar_meta(record), skipped)


def _hf_dataset(path: Path, text_column: str, skipped: Counter) -> Iterator[Sequence | None]:
    try:
        import datasets
    except ImportError:
        raise SourceError(f"{path} is a saved Hugging Face dataset; install the 'datasets' package") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as error:
        raise SourceError(f"cannot read the saved Hugging Face dataset {path}: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    if text_column not in loaded.column_names:
        raise SourceError(
            f"{path}: no column {text_column!r} (has: {', '.join(loaded.column_names)}); set --text-column"
        )
    for record in loaded:
        record = dict(record)
        text = record.pop(text_column)
        yield _text_row(text, _scalar_meta(record), skipped)


def _scalar_meta(record: dict) -> dict:
    """Keep metadata that fits a Parquet column; nested values become JSON text."""
    meta = {}
    for key, value in record.items():
        if value is None or isinstance(value, (str, int, float, bool)):
            meta[key] = value
        else:
            meta[key] = json.dumps(value, default=str)
    return meta


def _image_folder(path: Path, skipped: Counter) -> Iterator[Sequence | None]:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}")
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError):  # PIL's UnidentifiedImageError is an OSError
            skipped["corrupt_image"] += 1
            yield None
            continue
        yield Sequence(row=-1, image=rgb, meta={"path": str(file.relative_to(path)), "label": file.parent.name})


# --- packaged demo corpora -------------------------------------------------------------

_WIKI_EMPHASIS = re.compile(r"'{2,}")
_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "St", "Prof", "Jr", "Sr", "vs", "No", "Gen", "Col", "Lt", "Inc", "Co")
_SENTENCE_END = re.compile("".join(rf"(?<!\b{word}\.)" for word in _ABBREVIATIONS)
                           + r"(?<![\s.][A-Z]\.)(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(paragraph: str, min_words: int = 4) -> list[str]:
    """Split prose at sentence ends; drop fragments shorter than `min_words`."""
    sentences = (part.strip() for part in _SENTENCE_END.split(" ".join(paragraph.split())))
    return [sentence for sentence in sentences if len(sentence.split()) >= min_words]


def _gensim_test_file(name: str) -> Path:
    try:
        root = resources.files("gensim") / "test" / "test_data"
    except ModuleNotFoundError:
        raise SourceError("demo text corpora need the 'gensim' package (pip install gensim)") from None
    path = Path(str(root / name))
    if not path.exists():
        raise SourceError(f"gensim's test data has no {name} (looked in {path.parent})")
    return path


def _demo_wiki() -> Iterator[Sequence]:
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _gensim_test_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    with bz2.open(path, "rb") as dump:
        for title, wiki_text, _page_id in extract_pages(dump):
            if not wiki_text or wiki_text.lstrip().lower().startswith("#redirect"):
                continue
            plain = _WIKI_EMPHASIS.sub("", filter_wiki(wiki_text))
            for paragraph in plain.split("\n"):
                paragraph = paragraph.strip()
                if paragraph.startswith(("|", "!", "*", "=", "{", ":")) or "=" in paragraph[:3]:
                    continue
                for sentence in split_sentences(paragraph, min_words=5):
                    yield Sequence(row=-1, text=sentence, meta={"article": title})


def _demo_lee() -> Iterator[Sequence]:
    path = _gensim_test_file("lee_background.cor")
    with open(path, encoding="utf-8", errors="replace") as handle:
        for paragraph_id, paragraph in enumerate(handle):
            for sentence in split_sentences(paragraph):
                yield Sequence(row=-1, text=sentence, meta={"paragraph": paragraph_id})


def _gray_to_rgb(pixels, scale: float):
    import numpy as np
    from PIL import Image

    gray = np.clip(np.asarray(pixels, dtype=np.float32) * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _demo_digits() -> Iterator[Sequence]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        yield Sequence(row=-1, image=_gray_to_rgb(pixels, 255 / 16),
                       meta={"path": f"digits/{index}", "label": int(label)})


def _demo_skimage() -> Iterator[Sequence]:
    try:
        import numpy as np
        import skimage.data
        from PIL import Image
    except ImportError:
        raise SourceError("demo:skimage needs scikit-image (pip install 'qkatlas[images]')") from None
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page",
             "horse", "text", "clock", "brick", "grass", "gravel", "colorwheel", "immunohistochemistry",
             "hubble_deep_field", "retina", "logo", "cat"]  # the ones bundled in the wheel, no download
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            pixels = np.asarray(loader())
        except Exception:  # a few skimage images are fetched on demand and fail offline
            continue
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        if pixels.dtype != np.uint8:
            pixels = (255 * (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-9)).astype(np.uint8)
        image = Image.fromarray(pixels[..., :3] if pixels.ndim == 3 else pixels).convert("RGB")
        yield Sequence(row=-1, image=image, meta={"path": f"skimage/{name}", "label": name})


FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]


def read_idx(path: Path):
    """Read an IDX file (MNIST's format), gzipped or not, into a NumPy array."""
    import gzip

    import numpy as np

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _demo_fashion_mnist() -> Iterator[Sequence]:
    roots = [Path("/usr/share/dataset-fashion-mnist"), Path("/usr/share/fashion-mnist"), Path("/usr/share/data")]
    found = [p for root in roots if root.exists() for p in root.rglob("t10k-images-idx3-ubyte*")]
    if not found:
        raise SourceError(
            "demo:fashion-mnist needs the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
        )
    images_path = found[0]
    labels_path = next(images_path.parent.glob("t10k-labels-idx1-ubyte*"))
    images, labels = read_idx(images_path), read_idx(labels_path)
    for index, (pixels, label) in enumerate(zip(images, labels)):
        yield Sequence(row=-1, image=_gray_to_rgb(pixels, 1.0),
                       meta={"path": f"fashion-mnist/t10k/{index}", "label": FASHION_MNIST_LABELS[int(label)]})

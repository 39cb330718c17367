"""PartWriter writes batch by batch on its own thread: the files are exactly those zarr writes
itself, the CRCs those of the stored chunks, and a failure on the writer thread fails the
extraction with nothing committed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.store import TOKEN_SCHEMA, PartWriter, RunDir, VectorSpec, committed_parts, open_run
from pipeline.store.writer import COMPRESSORS, crc

CHUNK_TOKENS = 64


def token_columns(seq_id: int, n: int) -> tuple[dict, dict]:
    tokens = {name: [None] * n for name in TOKEN_SCHEMA.names}
    tokens.update(seq_id=[seq_id] * n, pos=list(range(n)), token_id=list(range(n)), token=["t"] * n, seq_len=[n] * n,
                  pos_norm=[p / max(n - 1, 1) for p in range(n)], is_special=[False] * n, is_punct=[False] * n)
    sequences = {"seq_id": [seq_id], "token_start": [0], "n_tokens": [n], "truncated": [False], "text": ["x"],
                 "path": [None], "meta": [None]}
    return tokens, sequences


def files_below(root: str) -> dict[str, bytes]:
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = handle.read()
    return found


@pytest.mark.parametrize("dtype,compression", [("float16", "none"), ("float32", "none"), ("float16", "lz4")])
def test_part_files_are_the_bytes_zarr_writes_and_crcs_those_of_the_chunks(tmp_path, dtype, compression):
    """Batches of uneven sizes, written in place (`reserve`) or copied across a chunk boundary,
    end in a partial chunk: every file equals zarr's own writing of the whole array."""
    spec = VectorSpec(2, 3, 1, 8, dtype, CHUNK_TOKENS, compression)
    rng = np.random.default_rng(0)
    sizes = [int(n) for n in rng.integers(5, 40, 14)]
    queries = rng.standard_normal((2, 3, sum(sizes), 8)).astype(dtype)
    keys = rng.standard_normal((2, 1, sum(sizes), 8)).astype(dtype)
    run = RunDir(tmp_path / "run")
    writer = PartWriter(run, 0, spec)
    assert writer._rows_to_files == (compression == "none"), "the direct path is the one under test"
    start = 0
    for seq_id, n in enumerate(sizes):
        window = slice(start, start + n)
        reserved = writer.reserve(n)
        if reserved is not None:
            reserved["q"][...], reserved["k"][...] = queries[:, :, window], keys[:, :, window]
        vectors = reserved or {"q": queries[:, :, window], "k": keys[:, :, window]}
        writer.append(vectors, *token_columns(seq_id, n), reserved=reserved is not None)
        start += n
    record = writer.close()
    assert sum(sizes) % CHUNK_TOKENS, "the last chunk must be partial"

    reference = tmp_path / "zarr"
    for name, values in (("q", queries), ("k", keys)):
        array = zarr.create_array(str(reference / name), shape=values.shape, dtype=dtype,
                                  chunks=(1, 1, CHUNK_TOKENS, 8), compressors=COMPRESSORS[compression](),
                                  dimension_names=("layer", "head_index" if name == "q" else "kv_head_index",
                                                   "token", "d_head"))
        array[...] = values
        n_chunks = -(-values.shape[2] // CHUNK_TOKENS)
        assert record["arrays"][name]["crc"] == [
            [[crc(values[layer, head, c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]) for c in range(n_chunks)]
             for head in range(values.shape[1])] for layer in range(values.shape[0])]
    written = files_below(run.path(*run.part_vectors(writer.name, writer.token)))
    assert written == files_below(str(reference))
    assert len(written) == 2 + 2 * (3 + 1) * -(-sum(sizes) // CHUNK_TOKENS)
    assert record["chunk_files"] == {key: len(data) for key, data in written.items()}


@pytest.mark.parametrize("failing", ["_write_rows", "_write"])
def test_a_failure_on_the_writer_thread_fails_the_extraction_and_commits_nothing(tiny_models, text_file, tmp_path,
                                                                                 monkeypatch, failing):
    """`_write_rows`: a batch's rows into their chunk files; `_write`: the end of a chunk."""
    out = str(tmp_path / "run")
    config = ExtractConfig(model=tiny_models["bert"], data=text_file, out=out, batch_size=2, chunk_tokens=256)
    original = getattr(PartWriter, failing)
    calls = []

    def disk_full(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(*args)

    monkeypatch.setattr(PartWriter, failing, staticmethod(disk_full) if failing == "_write_rows" else disk_full)
    if failing == "_write":
        calls.extend([(), ()])  # the only chunk's write is the first call: fail that one
    with pytest.raises(OSError, match="No space left"):
        extract(config)
    assert len(calls) >= 3, "the failure must come from the writer thread"
    run = RunDir(out)
    assert committed_parts(run) == {}
    assert run.files_with_sizes("vectors.zarr") == {}
    assert run.listdir("tokens") == [] and run.listdir("sequences") == []

    monkeypatch.undo()
    extract(config)
    assert open_run(out).verify() == []

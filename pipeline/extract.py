"""Extraction: batched forward passes whose captured Q/K (and, asked for, V) stream into a run store.

`extract_part` writes the sequences of one range of source rows as one part; a single
process extracts the whole corpus as part 0, and `workflows/` shards rows over workers.
"""

from __future__ import annotations

import functools
import itertools
import json
import string
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from dask.system import cpu_count

from pipeline.config import ExtractConfig
from pipeline.models import LoadedModel, capturing, load_model
from pipeline.sources import Sequence, check_modality, open_source
from pipeline.errors import QkatlasError
from pipeline.hooks import hold
from pipeline.store import (TOKEN_SCHEMA, AttentionRules, Manifest, ModelInfo, PartWriter, RunDir, StoreError,
                            VectorSpec, collect_garbage, commit_part, committed_parts, create_run, is_run,
                            load_manifest, mark_extraction_complete, part_damage, part_name, recover, staging_for,
                            swap_in, writing)

WORD_PIECE_MARKS = ("##", "Ġ", "▁", "Ċ")


class ExtractError(QkatlasError, RuntimeError):
    """Extraction cannot start or continue; the message says why."""


@dataclass
class Batch:
    sequences: list[Sequence]
    inputs: dict  # model inputs, padded on the right
    lengths: list[int]  # real tokens per sequence
    truncated: list[bool]
    token_ids: list[list[int]]


@functools.lru_cache(maxsize=1 << 16)  # called per token; a vocabulary repeats its tokens
def is_punctuation(token: str) -> bool:
    stripped = token
    for mark in WORD_PIECE_MARKS:
        stripped = stripped.replace(mark, "")
    return bool(stripped) and all(unicodedata.category(ch).startswith("P") or ch in string.punctuation
                                  for ch in stripped)


# --- batching ------------------------------------------------------------------------------


def text_batches(loaded: LoadedModel, sequences: Iterable[Sequence], batch_size: int, max_length: int,
                 overlong: str, skipped: Counter, window_batches: int = 32) -> Iterator[Batch]:
    """Tokenize a window of `batch_size * window_batches` sequences at a time and batch them
    by length, so that padding (wasted compute) stays small; memory stays bounded by the window."""
    tokenizer = loaded.tokenizer
    for window in _chunks(sequences, batch_size * window_batches):
        encoded = tokenizer([item.text for item in window], add_special_tokens=True)["input_ids"]
        kept = []
        for item, token_ids in zip(window, encoded):
            too_long = len(token_ids) > max_length
            if too_long and overlong == "skip":
                skipped["overlong"] += 1
                continue
            if too_long:
                token_ids = tokenizer(item.text, truncation=True, max_length=max_length)["input_ids"]
            if not token_ids:
                skipped["no_tokens"] += 1
                continue
            kept.append((item, token_ids, too_long))
        kept.sort(key=lambda entry: len(entry[1]))
        for chunk in _chunks(kept, batch_size):
            items, ids, truncated = (list(column) for column in zip(*chunk))
            inputs = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
            yield Batch(items, dict(inputs), [len(t) for t in ids], truncated, ids)


def image_batches(loaded: LoadedModel, sequences: Iterable[Sequence], batch_size: int) -> Iterator[Batch]:
    n_tokens = loaded.max_positions
    for chunk in _chunks(sequences, batch_size):
        inputs = loaded.image_processor(images=[item.image for item in chunk], return_tensors="pt")
        ids = [list(range(n_tokens)) for _ in chunk]
        yield Batch(chunk, dict(inputs), [n_tokens] * len(chunk), [False] * len(chunk), ids)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# --- forward pass with capture -------------------------------------------------------------


def forward_vectors(loaded: LoadedModel, batch: Batch, layers: list[int], dtype: np.dtype, values: bool = False,
                    out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run one batch; return "q", queries [layer, head_index, token, d_head], "k", keys [layer,
    kv_head_index, token, d_head] and, with `values`, "v", values [layer, kv_head_index, token,
    d_head], of the real (unpadded) tokens, batch-major.

    `out` (views of the writer's chunk buffer) receives them directly, saving a copy."""
    layout = loaded.layout
    n_real = sum(batch.lengths)
    if out is None:
        heads = {"q": layout.n_heads, "k": layout.n_kv_heads} | ({"v": layout.n_kv_heads} if values else {})
        out = {name: np.empty((len(layers), n, n_real, layout.d_head), dtype=dtype) for name, n in heads.items()}
    slot_of_layer = {layer: slot for slot, layer in enumerate(layers)}
    last = max(layers)
    stop_early = last < layout.n_layers - 1  # nothing after the last stored layer is needed
    inputs = {name: tensor.to(loaded.device) for name, tensor in batch.inputs.items()}
    if "attention_mask" in inputs:
        real = inputs["attention_mask"].reshape(-1).nonzero().squeeze(1)
    else:
        real = None

    def sink(module, query, key, value, _kwargs):
        slot = slot_of_layer.get(loaded.layer_of_module[id(module)])
        if slot is None:
            return
        for name, states in (("q", query), ("k", key), ("v", value)):
            if name not in out:
                continue
            # [batch, head, pos, d_head] -> [head, batch * pos, d_head] -> real tokens only
            flat = states.detach().transpose(0, 1).reshape(states.shape[1], -1, states.shape[-1])
            if real is not None:
                flat = flat.index_select(1, real)
            torch.from_numpy(out[name][slot]).copy_(flat)  # one pass: gather, cast, device -> host
        if stop_early and loaded.layer_of_module[id(module)] == last:
            raise _LastLayerCaptured

    with torch.inference_mode(), capturing(sink):
        try:
            loaded.model(**inputs)
        except _LastLayerCaptured:
            pass
    return out


class _LastLayerCaptured(Exception):
    """Ends a forward pass once the last stored layer's Q/K are captured (`--layers 0,1` of a
    deep model then costs two layers, not all of them)."""


def token_columns(loaded: LoadedModel, batch: Batch) -> dict[str, list]:
    rows: dict[str, list] = {name: [] for name in TOKEN_SCHEMA.names}
    if loaded.modality == "text":
        special = set(loaded.tokenizer.all_special_ids)
        for item, ids in zip(batch.sequences, batch.token_ids):
            tokens = loaded.tokenizer.convert_ids_to_tokens(ids)
            n = len(ids)
            rows["seq_id"] += [item.row] * n
            rows["pos"] += list(range(n))
            rows["token_id"] += ids
            rows["token"] += tokens
            rows["seq_len"] += [n] * n
            rows["pos_norm"] += [p / max(n - 1, 1) for p in range(n)]
            rows["is_special"] += [i in special for i in ids]
            rows["is_punct"] += [is_punctuation(t) for t in tokens]
        for name in ("patch_row", "patch_col", "mean_r", "mean_g", "mean_b"):
            rows[name] = [None] * len(rows["seq_id"])
        return rows
    grid, prefix = loaded.patch_grid, loaded.prefix_tokens
    assert grid is not None, "an image model has a patch grid"
    side = int(loaded.model.config.image_size) // grid  # pixels per patch side, as the model sees them
    size = grid * side
    for item, ids in zip(batch.sequences, batch.token_ids):
        n = len(ids)
        pixels = np.asarray(item.image.convert("RGB").resize((size, size)), dtype=np.float32)
        patch_means = pixels.reshape(grid, side, grid, side, 3).mean(axis=(1, 3)).reshape(-1, 3)
        rows["seq_id"] += [item.row] * n
        rows["pos"] += list(range(n))
        rows["token_id"] += ids
        rows["seq_len"] += [n] * n
        rows["pos_norm"] += [p / max(n - 1, 1) for p in range(n)]
        for pos in range(n):
            is_patch = pos >= prefix
            patch = pos - prefix
            rows["token"].append(f"patch ({patch // grid},{patch % grid})" if is_patch else
                                 ("[CLS]" if pos == 0 else "[DIST]"))
            rows["is_special"].append(not is_patch)
            rows["is_punct"].append(False)
            rows["patch_row"].append(patch // grid if is_patch else -1)
            rows["patch_col"].append(patch % grid if is_patch else -1)
            colour = patch_means[patch] if is_patch else patch_means.mean(axis=0)
            for channel, value in zip(("mean_r", "mean_g", "mean_b"), colour):
                rows[channel].append(int(round(float(value))))
    return rows


def sequence_columns(batch: Batch) -> dict:
    starts = np.concatenate([[0], np.cumsum(batch.lengths)[:-1]]).tolist()
    return {
        "seq_id": [item.row for item in batch.sequences],
        "token_start": starts,
        "n_tokens": batch.lengths,
        "truncated": batch.truncated,
        "text": [item.text for item in batch.sequences],
        "path": [item.meta.get("path") for item in batch.sequences],
        "meta": [json.dumps(item.meta, default=str) if item.meta else None for item in batch.sequences],
    }


# --- the stage -----------------------------------------------------------------------------


def stored_layers(config: ExtractConfig, loaded: LoadedModel) -> list[int]:
    layers = config.layers or list(range(loaded.layout.n_layers))
    bad = [layer for layer in layers if layer >= loaded.layout.n_layers]
    if bad:
        raise ExtractError(f"--layers {bad} out of range: {config.model} has {loaded.layout.n_layers} layers")
    return layers


def run_manifest(config: ExtractConfig, loaded: LoadedModel) -> Manifest:
    layout = loaded.layout
    return Manifest(
        model=ModelInfo(**loaded.manifest_entry()), config=config, layers=stored_layers(config, loaded),
        dtype=config.dtype, chunk_tokens=config.chunk_tokens,
        attention=AttentionRules(
            n_layers=layout.n_layers, n_heads=layout.n_heads, n_kv_heads=layout.n_kv_heads, d_head=layout.d_head,
            scale=layout.scale, mask_rule=layout.mask_rule, sliding_window=layout.sliding_window,
            kv_head_of_q=layout.kv_head_of_q,
            captured="query/key states as passed to the attention function: after rotary embedding, bias included, "
                     "before the scale"))


def check_source(config: ExtractConfig, loaded: LoadedModel) -> None:
    """Check that the model can read the source and read its first usable sequence, so that a
    bad --data fails before anything is written."""
    check_modality(config.data, loaded.modality, config.model)
    for _ in open_source(config.data, config.text_column, Counter()):
        return
    raise ExtractError(f"no usable sequences in {config.data}")


def prepare_run(config: ExtractConfig, loaded: LoadedModel, run: RunDir | None = None) -> RunDir:
    """Create the run directory (default `config.out`), or check that the run already there was
    made with the same settings."""
    run = run or RunDir(config.out)
    manifest = run_manifest(config, loaded)
    if not run.is_empty_or_missing() and is_run(run):
        if load_manifest(run).config != manifest.config:
            raise ExtractError(f"{config.out} holds a run made with other settings; use another --out or --overwrite")
        return run
    create_run(run, manifest)
    return run


def configure_threads(threads: int | None = None) -> int:
    """torch's CPU threads: `threads`, else every core this process may use (dask's count, which
    respects CPU affinity and container limits); returns the number set."""
    threads = threads or cpu_count()
    torch.set_num_threads(threads)
    bound_heap_growth()
    return threads


def bound_heap_growth() -> None:
    """Two malloc arenas instead of one per thread (glibc), so that `store.trim_heap` can
    return what the writer threads freed; together they keep peak RSS flat."""
    import ctypes
    import ctypes.util

    if sys.platform.startswith("linux"):
        try:
            m_arena_max = -8
            ctypes.CDLL(ctypes.util.find_library("c")).mallopt(m_arena_max, 2)
        except (OSError, AttributeError):  # not glibc
            pass


def extract_part(loaded: LoadedModel, config: ExtractConfig, run: RunDir, index: int = 0,
                 rows: tuple[int, int | None] = (0, None), on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Extract source rows [start, stop) into part `index` and commit it. Returns its record."""
    skipped: Counter = Counter()
    layers = stored_layers(config, loaded)
    dtype = np.dtype(config.dtype)
    layout = loaded.layout
    sequences: Iterator[Sequence] = open_source(config.data, config.text_column, skipped)
    start, stop = rows
    earlier: Counter = Counter()  # rows skipped before `start` belong to earlier parts
    sequences = _from_row(sequences, start, skipped, earlier)
    if stop is not None:
        sequences = _stop_after_row(sequences, stop)
    if config.limit is not None:
        sequences = itertools.islice(sequences, config.limit)
    if loaded.modality == "text":
        max_length = config.max_length or loaded.max_positions
        batches = text_batches(loaded, sequences, config.batch_size, max_length, config.overlong, skipped)
    else:
        batches = image_batches(loaded, sequences, config.batch_size)
    spec = VectorSpec(len(layers), layout.n_heads, layout.n_kv_heads, layout.d_head, config.dtype, config.chunk_tokens,
                      config.compression, config.values)
    writer = PartWriter(run, index, spec)
    began = time.perf_counter()
    try:
        truncated = write_batches(loaded, batches, layers, dtype, writer, on_batch)
        counts = writer.close()
    except BaseException:
        writer.abort()
        raise
    if counts["n_sequences"] == 0:
        writer.abort()
        raise ExtractError(f"no usable sequences in {config.data} rows {start}..{stop if stop is not None else 'end'}"
                           f" (skipped: {dict(skipped) or 'none'})")
    record = dict(counts, rows=[start, stop], skipped=dict(skipped - earlier), truncated=truncated,
                  seconds=round(time.perf_counter() - began, 3))
    commit_part(run, index, record)
    return record


def write_batches(loaded: LoadedModel, batches: Iterable[Batch], layers: list[int], dtype: np.dtype,
                  writer: PartWriter, on_batch: Callable[[int, int], None] | None = None) -> int:
    """Forward every batch, its vectors going straight into the writer's buffer where they fit.
    Returns how many sequences were truncated."""
    truncated = 0
    for batch in batches:
        reserved = writer.reserve(sum(batch.lengths))
        vectors = forward_vectors(loaded, batch, layers, dtype, writer.spec.values, out=reserved)
        writer.append(vectors, token_columns(loaded, batch), sequence_columns(batch), reserved=reserved is not None)
        truncated += sum(batch.truncated)
        if on_batch is not None:
            on_batch(len(batch.sequences), sum(batch.lengths))
    return truncated


def _from_row(sequences: Iterator[Sequence], start: int, skipped: Counter, earlier: Counter) -> Iterator[Sequence]:
    """The sequences from row `start` on; `earlier` receives the skip counts of the rows before
    it (exact when `start` is 0 or the row of a kept sequence, as the workflow's shards are)."""
    seen = False
    for item in sequences:
        if item.row < start:
            continue
        if not seen and start > 0:
            earlier.update(skipped)
        seen = True
        yield item


def _stop_after_row(sequences: Iterator[Sequence], stop: int) -> Iterator[Sequence]:
    for item in sequences:
        if item.row >= stop:
            return
        yield item


def extract(config: ExtractConfig, overwrite: bool = False, progress: Callable | None = None,
            loaded: LoadedModel | None = None) -> dict:
    """Extract the whole source as one part. Skips work already committed; returns a summary.

    With `overwrite`, the new run is built beside the old one and swapped in only once it is
    committed: a bad model or source, or a crash, leaves the old run as it was."""
    configure_threads(config.threads)
    target = RunDir(config.out)
    with writing(target, "qkatlas extract"):
        hold("extract-locked")
        recover(target)
        loaded = loaded or load_model(config.model, config.device, config.max_length)
        check_source(config, loaded)
        replacing = overwrite and not target.is_empty_or_missing()
        if replacing and not is_run(target):
            raise StoreError(f"{config.out} is not a qkatlas run; --overwrite replaces only runs (choose a new --out)")
        run = prepare_run(config, loaded, staging_for(target) if replacing else target)
        try:
            summary = _extract_into(config, loaded, run, progress)
        except BaseException:
            if replacing:
                run.remove()
            raise
        if replacing:
            swap_in(run, target)
        return dict(summary, out=config.out)


PROBE = {"n_sequences": 64, "half_length": 24, "seed": 0}


def wants_probe(config: ExtractConfig, loaded: LoadedModel) -> bool:
    """Induction scores are defined for causal text models (TransformerLens's head detector)."""
    return config.probe and loaded.modality == "text" and loaded.layout.mask_rule == "causal"


def probe_batches(loaded: LoadedModel, batch_size: int) -> Iterator[Batch]:
    """[BOS] + R + R sequences of random token ids (`pipeline.heads.repeated_random_tokens`)."""
    from pipeline.heads import repeated_random_tokens

    tokenizer = loaded.tokenizer
    half = min(PROBE["half_length"], (loaded.max_positions - 1) // 2)
    token_ids = repeated_random_tokens(tokenizer.vocab_size, PROBE["n_sequences"], half, PROBE["seed"],
                                       bos_id=tokenizer.bos_token_id, exclude_ids=tokenizer.all_special_ids)
    for start in range(0, len(token_ids), batch_size):
        rows = token_ids[start:start + batch_size]
        items = [Sequence(row=start + index, text=tokenizer.decode(ids), meta={"probe": True})
                 for index, ids in enumerate(rows)]
        inputs = {"input_ids": torch.from_numpy(rows), "attention_mask": torch.ones_like(torch.from_numpy(rows))}
        yield Batch(items, inputs, [rows.shape[1]] * len(rows), [False] * len(rows), [list(map(int, r)) for r in rows])


def extract_probe(loaded: LoadedModel, config: ExtractConfig, run: RunDir) -> dict | None:
    """Extract the induction probe into the nested run RUN/probe (skipped when committed or not
    wanted). It never mixes with the corpus: its own manifest, parts and tokens."""
    if not wants_probe(config, loaded):
        return None
    probe = run.probe()
    if is_run(probe) and load_manifest(probe).extract.complete:
        return {"skipped_task": True}
    if not is_run(probe):
        create_run(probe, run_manifest(config, loaded).model_copy(update={"probe": PROBE}))
    layers = stored_layers(config, loaded)
    layout = loaded.layout
    spec = VectorSpec(len(layers), layout.n_heads, layout.n_kv_heads, layout.d_head, "float32",
                      config.chunk_tokens, config.compression)  # the induction probe needs no values
    writer = PartWriter(probe, 0, spec)
    try:
        write_batches(loaded, probe_batches(loaded, config.batch_size), layers, np.dtype("float32"), writer)
        record = writer.close()
    except BaseException:
        writer.abort()
        raise
    commit_part(probe, 0, dict(record, rows=[0, None], skipped={}, truncated=0))
    mark_extraction_complete(probe, parts=1)
    return {"n_tokens": record["n_tokens"]}


def _extract_into(config: ExtractConfig, loaded: LoadedModel, run: RunDir, progress: Callable | None) -> dict:
    state = load_manifest(run).extract
    if state.parts not in (None, 1):
        raise ExtractError(f"{config.out} is being extracted in {state.parts} shards by `qkatlas run`; rerun that "
                           "command to finish it")
    collect_garbage(run)
    done = committed_parts(run)
    began = time.perf_counter()
    if part_name(0) in done and part_damage(run, done[part_name(0)]) is None:
        record, resumed = done[part_name(0)], True
    else:
        record, resumed = extract_part(loaded, config, run, 0, on_batch=progress), False
    mark_extraction_complete(run, parts=1)
    extract_probe(loaded, config, run)
    summary = {key: value for key, value in record.items() if key not in ("arrays", "chunk_files", "files")}
    return dict(summary, already_done=resumed, n_layers=len(stored_layers(config, loaded)),
                n_heads=loaded.layout.n_heads, wall_seconds=round(time.perf_counter() - began, 3))

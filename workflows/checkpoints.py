"""`qkatlas demo-checkpoints`: a checkpoint series made offline, on the CPU, in about a minute.

A two-layer attention-only transformer (Llama blocks whose MLP output is fixed at zero: the
down-projection is zero and frozen, so every block adds only its attention) learns next-token
prediction on `demo:wiki` sentences mixed with repeated random-token sequences, [BOS] + R + R
(Olsson et al. 2022). The repeated half can only be predicted by copying, which takes an
induction head: a layer-0 head that attends to the previous token, composed with a layer-1
head that attends to the token after an earlier copy of the current one.

What makes it form within minutes on two cores (tried, see the training log): a character-
level BPE of 128 tokens (with byte-level BPE vocabularies of 300 to 2,048 tokens the repeated
half's loss did not move in 1,500 to 3,000 steps at learning rates 1e-3 to 1e-2), rotary
positions (Llama) rather than learned ones, three rows in four of a batch repeated, AdamW at
3e-3. The induction score of every head is measured every `eval_every` steps on the same probe
qkatlas extracts (`pipeline.extract.PROBE`: 64 sequences, half length 24), with the head
detector's "mul" score (`pipeline.heads`), from the model's own eager attention.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline.extract import PROBE
from pipeline.heads import repeated_random_tokens
from pipeline.sources import open_source

BOS, UNK = "<|bos|>", "<unk>"
FORMED = 0.2  # an induction score above this is about ten times a random head's (~0.02)


@dataclass
class TrainingSettings:
    steps: int = 2200
    checkpoints: int = 12
    learning_rate: float = 3e-3
    batch_size: int = 32
    seq_length: int = 64
    text_share: float = 0.25  # rows of a batch from demo:wiki; the rest repeated random tokens
    shortest_repeat: int = 8  # |R| of a repeated row is uniform in [this, (seq_length - 1) // 2]
    vocab_size: int = 128
    alphabet: int = 90  # characters the tokenizer keeps; rarer ones become <unk>
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_positions: int = 128
    eval_every: int = 50
    seed: int = 0
    threads: int = 1
    sentences: int | None = None  # demo:wiki sentences to learn from (None: all, ~19k)


# --- data -----------------------------------------------------------------------------------


def wiki_texts(limit: int | None = None) -> list[str]:

    return [item.text or "" for item in itertools.islice(open_source("demo:wiki"), limit)]


def train_tokenizer(texts: list[str], vocab_size: int, alphabet: int, max_positions: int):
    """A character-level BPE (`tokenizers`) as a transformers fast tokenizer: BOS before every
    sequence, offsets for character alignment, saved with `save_pretrained`."""
    from tokenizers import Tokenizer, models, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, UNK],
                                                       limit_alphabet=alphabet, show_progress=False))
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                        special_tokens=[(BOS, core.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=BOS, unk_token=UNK, pad_token=BOS,
                                   model_max_length=max_positions)


def text_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Every sentence's token ids, BOS first, one after another."""
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64)


def repeated_rows(rng: np.random.Generator, n_rows: int, length: int, token_ids: np.ndarray, bos_id: int,
                  shortest: int) -> np.ndarray:
    """[n_rows, length]: [BOS] + R + R with |R| uniform in [shortest, (length - 1) // 2], then
    random tokens to the end."""
    rows = rng.choice(token_ids, size=(n_rows, length))
    rows[:, 0] = bos_id
    for row, half in zip(rows, rng.integers(shortest, (length - 1) // 2 + 1, n_rows)):
        row[1 + half:1 + 2 * half] = row[1:1 + half]
    return rows


def training_batches(stream: np.ndarray, token_ids: np.ndarray, bos_id: int, settings: TrainingSettings,
                     rng: np.random.Generator) -> Iterator[torch.Tensor]:
    """[batch, seq_length] int64: windows of the text stream, then repeated random-token rows."""
    n_text = int(round(settings.batch_size * settings.text_share))
    length = settings.seq_length
    while True:
        starts = rng.integers(0, len(stream) - length, n_text)
        text = np.stack([stream[start:start + length] for start in starts]) if n_text else \
            np.zeros((0, length), np.int64)
        repeated = repeated_rows(rng, settings.batch_size - n_text, length, token_ids, bos_id,
                                 settings.shortest_repeat)
        yield torch.from_numpy(np.concatenate([text, repeated]))


def probe_tokens(tokenizer) -> torch.Tensor:
    """The induction probe `qkatlas` extracts for this tokenizer ([BOS] + R + R, `pipeline.extract.PROBE`)."""

    half = min(PROBE["half_length"], (tokenizer.model_max_length - 1) // 2)
    return torch.from_numpy(repeated_random_tokens(tokenizer.vocab_size, PROBE["n_sequences"], half, PROBE["seed"],
                                                   bos_id=tokenizer.bos_token_id,
                                                   exclude_ids=tokenizer.all_special_ids))


# --- model ----------------------------------------------------------------------------------


def attention_only_model(settings: TrainingSettings, vocab_size: int, bos_id: int):
    """A Llama decoder whose MLPs output zero (down-projection zero and frozen): attention only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=settings.d_model, num_hidden_layers=settings.n_layers,
                         num_attention_heads=settings.n_heads, num_key_value_heads=settings.n_heads,
                         intermediate_size=1, max_position_embeddings=settings.max_positions,
                         tie_word_embeddings=False, bos_token_id=bos_id, eos_token_id=bos_id, pad_token_id=bos_id)
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        for parameter in layer.mlp.parameters():
            torch.nn.init.zeros_(parameter)
            parameter.requires_grad_(False)
    model.set_attn_implementation("eager")
    return model


def induction_scores(model, probe: torch.Tensor) -> np.ndarray:
    """[layer, head]: share of each head's attention on the induction pattern (key j + 1 where
    token j equals the query's token, j < i), averaged over the probe's sequences; TransformerLens
    `detect_head(..., "mul")` as `pipeline.heads.probe_scores` computes it."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        attentions = model(probe, output_attentions=True).attentions  # per layer [batch, head, query, key]
    model.train(was_training)
    n = probe.shape[1]
    earlier_same = (probe[:, :, None] == probe[:, None, :]) & torch.ones(n, n, dtype=torch.bool).tril(-1)
    pattern = torch.zeros_like(earlier_same)
    pattern[:, :, 1:] = earlier_same[:, :, :-1]
    scores = [((weights.double() * pattern[:, None]).sum((2, 3)) / weights.double().sum((2, 3))).mean(0)
              for weights in attentions]
    return torch.stack(scores).numpy()


# --- training -------------------------------------------------------------------------------


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """`count` steps from 0 to `steps`, evenly spaced."""
    return sorted({int(round(step)) for step in np.linspace(0, steps, count)})


def checkpoint_name(step: int) -> str:
    return f"step-{step:05d}"


def train_checkpoints(out: Path, settings: TrainingSettings,
                      on_eval: Callable[[int, float, np.ndarray], None] | None = None) -> dict:
    """Train, saving `settings.checkpoints` checkpoints (model + tokenizer) in OUT/step-NNNNN and
    the training log in OUT/training.json. Returns the log: settings, evaluated steps, loss and
    induction score per head at each, checkpoint steps, seconds."""
    torch.set_num_threads(settings.threads)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    texts = wiki_texts(settings.sentences)
    tokenizer = train_tokenizer(texts, settings.vocab_size, settings.alphabet, settings.max_positions)
    stream = text_stream(tokenizer, texts)
    bos_id = tokenizer.bos_token_id
    token_ids = np.setdiff1d(np.arange(tokenizer.vocab_size), tokenizer.all_special_ids)
    model = attention_only_model(settings, tokenizer.vocab_size, bos_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=0.01)
    batches = training_batches(stream, token_ids, bos_id, settings, np.random.default_rng(settings.seed + 1))
    probe = probe_tokens(tokenizer)
    saves = set(checkpoint_steps(settings.steps, settings.checkpoints))
    log: dict[str, Any] = {"settings": asdict(settings), "steps": [], "loss": [], "induction": [],
                           "checkpoints": sorted(saves)}
    loss = float("nan")
    for step in range(settings.steps + 1):
        if step % settings.eval_every == 0 or step in saves:
            scores = induction_scores(model, probe)
            log["steps"].append(step)
            log["loss"].append(loss)
            log["induction"].append(scores.round(5).tolist())
            if on_eval is not None:
                on_eval(step, loss, scores)
        if step in saves:
            model.save_pretrained(out / checkpoint_name(step))
            tokenizer.save_pretrained(out / checkpoint_name(step))
        if step == settings.steps:
            break
        tokens = next(batches)
        output = model(tokens, labels=tokens)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        loss = float(output.loss.detach())
    log["seconds"] = round(time.perf_counter() - began, 1)
    (out / "training.json").write_text(json.dumps(log, indent=1))
    return log


def rise_steps(log: dict, formed: float = FORMED) -> dict[tuple[int, int], int | None]:
    """(layer, head) -> the first evaluated step at which the head's induction score reached half
    its final value, for heads whose final score exceeds `formed`; None for the others."""
    steps = np.asarray(log["steps"])
    scores = np.asarray(log["induction"])  # [evaluation, layer, head]
    rises = {}
    for layer, head in itertools.product(range(scores.shape[1]), range(scores.shape[2])):
        series = scores[:, layer, head]
        final = series[-1]
        rises[(layer, head)] = int(steps[np.argmax(series >= final / 2)]) if final > formed else None
    return rises


# --- the group file ----------------------------------------------------------------------


def group_file(checkpoints: Path, steps: list[int], group_out: str, limit: int = 100, max_length: int = 48) -> dict:
    """The group file that runs every checkpoint over the same `demo:wiki` sentences and aligns
    the UMAP layouts of layer 1 (where induction heads form) in step order."""
    return {
        "group": {"out": group_out, "ordered": True,
                  "members": [{"name": checkpoint_name(step), "model": str(checkpoints / checkpoint_name(step)),
                               "step": step} for step in steps],
                  "align": {"method": "umap", "dim": 2, "layers": [1], "epochs": 200}},
        "extract": {"data": "demo:wiki", "limit": limit, "max_length": max_length, "batch_size": 32},
        "reduce": {"methods": ["pca"], "dims": [2], "seed": 0},
        "cluster": {"kind": "local"},
        "workflow": {"thumbnails": True, "regions": False},
    }

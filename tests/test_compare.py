"""Groups of runs (issue 14): Procrustes, character-span alignment across tokenizers, the
checkpoint trainer's induction score against the head atlas's, a group run that records shared
token tables and aligned layouts, and a group run resumed after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import SENTENCES, minilm_tokenizer

QKATLAS = str(Path(sys.executable).parent / "qkatlas")
MORE = ["Queries and keys of one head sit in one picture.", "Ünïcode wörds, emoji-free; still fine.",
        "The capital of France is Paris, and Paris is large."]


# --- Procrustes -----------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_procrustes_recovers_a_known_similarity(dim):
    from scipy.spatial.transform import Rotation

    from pipeline.align import displacement, procrustes

    rng = np.random.default_rng(dim)
    layout = rng.normal(size=(400, dim))
    rotation = np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]]) if dim == 2 else \
        Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    rotation = rotation @ np.diag([1.0] * (dim - 1) + [-1.0])  # a reflection too: layouts may come mirrored
    target = 2.5 * layout @ rotation + rng.normal(size=dim)
    fitted = procrustes(layout, target)
    np.testing.assert_allclose(fitted.rotation, rotation, atol=1e-9)
    assert fitted.scale == pytest.approx(2.5, rel=1e-9)
    np.testing.assert_allclose(fitted.apply(layout), target, atol=1e-4)  # float32 output
    quality = displacement(fitted.apply(layout), target)
    assert quality["displacement"] < 1e-4 < 1.0 < quality["chance"]
    noisy = procrustes(layout, target + rng.normal(scale=0.3, size=target.shape))
    assert 0 < np.abs(noisy.rotation - rotation).max() < 0.05


def test_aligned_layouts_follow_a_slowly_changing_head():
    """Three members of one head: the second a little changed, the third the same points in
    another token order. Aligned, consecutive layouts barely move; matched by the given order."""
    from pipeline.align import aligned_layouts
    from pipeline.reduce import load_backend

    rng = np.random.default_rng(0)
    first = rng.normal(size=(600, 8)).astype(np.float32) * np.linspace(3, 0.5, 8).astype(np.float32)
    second = first + rng.normal(scale=0.05, size=first.shape).astype(np.float32)
    order = rng.permutation(600)
    third = second[order]  # point i of the third member is point order[i] of the second
    layouts, records = aligned_layouts([first, second, third], [None, np.arange(600), order], "pca", 2, {},
                                       load_backend("cpu"))
    for record in records[1:]:
        assert record["displacement"] < 0.05 * record["chance"] and record["shared_points"] == 600
    np.testing.assert_allclose(layouts[2], layouts[1][order], atol=1e-4)


# --- tokens across tokenizers ---------------------------------------------------------------


def plain(text: str) -> str:
    """Lower case without accents, as MiniLM's WordPiece normalizes."""
    import unicodedata

    return "".join(ch for ch in unicodedata.normalize("NFD", text.lower()) if not unicodedata.combining(ch))


def byte_level_bpe(texts: list[str], vocab_size: int = 320):
    """A GPT-2-style byte-level BPE trained offline on `texts` (a tiny vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=True)
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   model_max_length=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("compare-data") / "sentences.txt"
    path.write_text("\n".join(SENTENCES + MORE) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def bpe_gpt2(tmp_path_factory) -> str:
    """A tiny GPT-2 with its own byte-level BPE: tokens unlike MiniLM's WordPiece."""
    from transformers import GPT2Config, GPT2Model

    tokenizer = byte_level_bpe(SENTENCES + MORE)
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    path = tmp_path_factory.mktemp("bpe-gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def extracted(model: str, data: str, out: Path, **settings):
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract
    from pipeline.store import open_run

    extract(ExtractConfig(model=model, data=data, out=str(out), batch_size=8, probe=False, threads=1, **settings))
    return open_run(str(out))


def test_char_spans_match_wordpiece_to_byte_level_bpe(tiny_models, bpe_gpt2, corpus, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.align import AlignError, best_match, char_spans, match_by_spans

    wordpiece = extracted(tiny_models["bert"], corpus, tmp_path / "bert", max_length=12)  # some truncated
    bpe = extracted(bpe_gpt2, corpus, tmp_path / "bpe")
    assert wordpiece.sequences()["truncated"].any()
    spans_a = char_spans(wordpiece.tokens(), wordpiece.sequences(), minilm_tokenizer())
    spans_b = char_spans(bpe.tokens(), bpe.sequences(), AutoTokenizer.from_pretrained(bpe_gpt2))
    tokens_a, tokens_b = wordpiece.tokens(), bpe.tokens()
    texts = dict(zip(bpe.sequences()["seq_id"], bpe.sequences()["text"]))

    # every span holds its token's characters ([CLS] and [SEP] have none)
    for tokens, spans in ((tokens_a, spans_a), (tokens_b, spans_b)):
        for row in np.flatnonzero(spans["char_start"].to_numpy() >= 0):
            piece = texts[tokens["seq_id"].iat[row]][spans["char_start"].iat[row]:spans["char_end"].iat[row]]
            form = tokens["token"].iat[row].replace("##", "").replace("Ġ", "")
            if form.isascii():  # byte-level tokens of non-ASCII letters are bytes
                assert plain(piece) == form.lower(), (piece, form)
    assert (spans_a["char_start"].to_numpy()[tokens_a["is_special"].to_numpy()] == -1).all()

    pairs = match_by_spans(tokens_a, spans_a, tokens_b, spans_b)
    assert len(pairs) and (pairs["overlap"] > 0).all()
    assert (tokens_a["seq_id"].to_numpy()[pairs["row_a"]] == tokens_b["seq_id"].to_numpy()[pairs["row_b"]]).all()
    # the word "Paris" of sentence 5 is followed from WordPiece to the BPE tokens that spell it
    seq = 5
    row_a = tokens_a.index[(tokens_a["seq_id"] == seq) & (tokens_a["token"] == "paris")][0]
    matched = pairs.loc[pairs["row_a"] == row_a, "row_b"].to_numpy()
    spelled = "".join(tokens_b["token"].iloc[matched]).replace("Ġ", "")
    assert spelled == "Paris"
    # every character a WordPiece token covers is covered by the BPE tokens it is matched to
    match = best_match(pairs, len(tokens_a))
    covered = spans_a["char_start"].to_numpy() >= 0
    assert (match[covered] >= 0).all() and (match[~covered] == -1).all()

    with pytest.raises(AlignError, match="other tokens"):
        char_spans(bpe.tokens(), bpe.sequences(), minilm_tokenizer())


def test_token_fingerprint_tells_identical_tables(tiny_models, corpus, tmp_path):
    from pipeline.align import token_fingerprint

    a = extracted(tiny_models["bert"], corpus, tmp_path / "a")
    b = extracted(tiny_models["distilbert"], corpus, tmp_path / "b")  # another model, the same tokenizer
    c = extracted(tiny_models["bert"], corpus, tmp_path / "c", max_length=10)
    assert token_fingerprint(a.tokens()) == token_fingerprint(b.tokens()) != token_fingerprint(c.tokens())


# --- the checkpoint trainer -----------------------------------------------------------------

TINY = dict(steps=6, checkpoints=3, batch_size=8, seq_length=32, d_model=16, n_heads=2, eval_every=2,
            sentences=300, vocab_size=96, alphabet=70)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, dict]:
    from workflows.checkpoints import TrainingSettings, train_checkpoints

    out = tmp_path_factory.mktemp("checkpoints")
    return out, train_checkpoints(out, TrainingSettings(**TINY))


def test_trainer_saves_checkpoints_whose_induction_score_the_atlas_reproduces(checkpoints, tmp_path):
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract
    from pipeline.heads import probe_scores
    from pipeline.store import open_run
    from workflows.checkpoints import checkpoint_name, rise_steps

    out, log = checkpoints
    assert log["checkpoints"] == [0, 3, 6] and log["steps"] == [0, 2, 3, 4, 6]
    assert sorted(path.name for path in out.glob("step-*")) == [checkpoint_name(s) for s in (0, 3, 6)]
    scores = np.asarray(log["induction"])
    assert scores.shape == (5, 2, 2) and ((0 <= scores) & (scores < 0.5)).all()
    assert set(rise_steps(log)) == {(layer, head) for layer in range(2) for head in range(2)}
    # the trainer's own induction score is the one qkatlas measures from the extracted checkpoint
    run_dir = tmp_path / "run"
    extract(ExtractConfig(model=str(out / checkpoint_name(6)), data="demo:wiki", limit=4, out=str(run_dir),
                          dtype="float32", threads=1))
    probe = open_run(str(run_dir)).probe()
    for layer in range(2):
        for head in range(2):
            assert probe_scores(probe, layer, head)["induction_score"] == pytest.approx(scores[-1, layer, head],
                                                                                        abs=1e-4)


def test_rise_steps_finds_the_phase_change():
    from workflows.checkpoints import rise_steps

    flat, rising = [0.02] * 6, [0.02, 0.02, 0.03, 0.30, 0.45, 0.46]
    log = {"steps": [0, 100, 200, 300, 400, 500],
           "induction": np.stack([np.array([[a, b]]) for a, b in zip(flat, rising)]).tolist()}
    assert rise_steps(log) == {(0, 0): None, (0, 1): 300}


# --- groups ---------------------------------------------------------------------------------


def group_file(path: Path, out: Path, members: list[tuple[str, str, int]], data: str) -> Path:
    config = {"group": {"out": str(out), "ordered": True,
                        "members": [{"name": name, "model": model, "step": step} for name, model, step in members],
                        "align": {"method": "pca", "dim": 2}},
              "extract": {"data": data, "batch_size": 8, "chunk_tokens": 256, "threads": 1},
              "reduce": {"methods": ["pca"], "dims": [2], "seed": 0},
              "cluster": {"kind": "local", "n_workers": 1, "threads_per_worker": 1, "dashboard_address": ":0"},
              "workflow": {"shards": 2, "regions": False}}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def members(checkpoints, bpe_gpt2) -> list[tuple[str, str, int]]:
    out, _ = checkpoints
    return [("early", str(out / "step-00000"), 0), ("late", str(out / "step-00006"), 6), ("bpe", bpe_gpt2, 7)]


@pytest.fixture(scope="module")
def group(members, corpus, tmp_path_factory) -> tuple[str, Path]:
    """A group run in this process, uninterrupted: two checkpoints (one tokenizer) and a model with
    another tokenizer, over the same sentences."""
    from distributed import Client

    from pipeline.config import load_group_config
    from workflows.compare import run_group

    root = tmp_path_factory.mktemp("group")
    path = group_file(root / "group.yaml", root / "group", members, corpus)
    config = load_group_config(path)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        outcome = run_group(config, client, show_progress=False, say=lambda _: None)
    assert not outcome.errors, outcome.errors
    return str(root / "group"), path


def test_group_run_records_shared_token_tables_spans_and_aligned_layouts(group):
    from pipeline.config import load_group_config
    from pipeline.store.group import open_group
    from workflows.compare import group_todo

    url, path = group
    opened = open_group(url)
    assert opened.members == ["early", "late", "bpe"] and opened.steps() == [0, 6, 7]
    assert opened.shared_tokens() == [["early", "late"]]
    assert opened.same_tokens("early", "late") and not opened.same_tokens("late", "bpe")
    pd.testing.assert_frame_equal(opened.run("early").tokens(), opened.run("late").tokens())
    for name in opened.members:  # spans from each member's own tokenizer, one row per token
        assert len(opened.spans(name)) == opened.run(name).n_tokens
    heads = opened.aligned_heads()
    assert sorted(heads) == [("pca", 2, layer, head) for layer in range(2) for head in range(2)]
    record = heads[("pca", 2, 1, 0)]
    quality = {item["member"]: item for item in record["quality"]}
    assert quality["late"]["shared_points"] == 2 * opened.run("late").n_tokens  # identical tables: all shared
    assert 0 < quality["bpe"]["shared_points"] < 2 * opened.run("bpe").n_tokens  # matched by characters
    for name in ("late", "bpe"):
        assert 0 <= quality[name]["displacement"] and 0 < quality[name]["chance"]
    layouts = opened.aligned("pca", 2, 1, 0)
    assert [layouts[name].shape for name in opened.members] == [(2 * opened.run(n).n_tokens, 2)
                                                               for n in opened.members]
    assert group_todo(load_group_config(path)).done


def kill_at(config: Path, hold: str, marker: Path, timeout: float = 240) -> None:
    """Start `qkatlas compare-run`; once a task blocks at `hold`, SIGKILL its whole process group."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", QKATLAS_HOLD_AT=hold,
               QKATLAS_HOLD_MARKER=str(marker))
    process = subprocess.Popen([QKATLAS, "compare-run", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if process.poll() is not None:
                output = process.stdout.read().decode()
                pytest.fail(f"compare-run exited ({process.returncode}) before {hold}:\n{output}")
            if time.monotonic() > deadline:
                pytest.fail(f"compare-run did not reach {hold} within {timeout} s")
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL


def marker_times(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in sorted(folder.rglob("*.json"))}


@pytest.mark.timeout(420)
def test_group_run_resumes_after_kill_9(group, members, corpus, tmp_path):
    from pipeline.store.group import open_group

    url, _ = group
    out = tmp_path / "group"
    config = group_file(tmp_path / "group.yaml", out, members, corpus)

    kill_at(config, "group-member-late", tmp_path / "held-1")  # "early" done, "late" not started
    early = marker_times(out / "early")
    assert early and not (out / "late").exists()
    kill_at(config, "align-L001H000", tmp_path / "held-2")  # every member done, aligning
    assert marker_times(out / "early") == early, "a committed member was redone"
    members_done = {name: marker_times(out / name) for name in ("late", "bpe")}
    aligned_before = marker_times(out / "aligned") if (out / "aligned").exists() else {}
    assert "pca2d/L001H000.json" not in aligned_before

    finished = subprocess.run([QKATLAS, "compare-run", str(config)], capture_output=True, text=True, timeout=240,
                              env=dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"))
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert marker_times(out / "early") == early
    assert {name: marker_times(out / name) for name in ("late", "bpe")} == members_done
    aligned_after = marker_times(out / "aligned")
    assert {key: aligned_after[key] for key in aligned_before} == aligned_before, "an aligned head was redone"
    resumed, reference = open_group(str(out)), open_group(url)
    assert resumed.manifest.complete and resumed.shared_tokens() == reference.shared_tokens()
    for key in reference.aligned_heads():
        for name, layout in reference.aligned(*key).items():
            np.testing.assert_allclose(resumed.aligned(*key)[name], layout, atol=1e-5)
    again = subprocess.run([QKATLAS, "compare-run", str(config)], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"))
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_group_file_errors_name_the_key(tmp_path):
    from pipeline.config import ConfigError, load_config, load_group_config

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"group": {"out": "x", "members": [{"name": "a", "model": "m"},
                                                                       {"name": "a", "model": "n"}]},
                                    "extract": {"data": "demo:wiki"}}))
    with pytest.raises(ConfigError, match="member names repeat"):
        load_group_config(path)
    with pytest.raises(ConfigError, match="compare-run"):
        load_config(path)
    path.write_text(yaml.safe_dump({"group": {"out": "x", "members": [{"name": "a", "model": "m"},
                                                                       {"name": "b/..", "model": "n"}]},
                                    "extract": {"data": "demo:wiki", "model": "m"}}))
    with pytest.raises(ConfigError, match="belong to each member|member names"):
        load_group_config(path)


@pytest.mark.parametrize("name", ["checkpoints.yaml", "compare-models.yaml"])
def test_packaged_group_files_validate(name):
    from pipeline.config import load_group_config

    config = load_group_config(Path(__file__).parent.parent / "configs" / "groups" / name)
    assert len(config.group.members) >= 2


def test_packaged_checkpoints_file_is_what_demo_checkpoints_writes():
    from pipeline.config import load_group_config
    from workflows.checkpoints import TrainingSettings, checkpoint_steps, group_file

    settings = TrainingSettings()
    written = group_file(Path("runs/demo-checkpoints"), checkpoint_steps(settings.steps, settings.checkpoints),
                         "runs/checkpoints")
    packaged = load_group_config(Path(__file__).parent.parent / "configs" / "groups" / "checkpoints.yaml")
    assert packaged.model_dump() == type(packaged).model_validate(written).model_dump()


# --- the compare view's data (no browser) ----------------------------------------------------


def test_largest_change_marks_the_step_of_the_biggest_jump():
    from viz.compare_view import largest_change, measures

    table = pd.DataFrame({"step": [0, 100, 200, 300] * 2, "layer": 1, "head": [0] * 4 + [1] * 4,
                          "induction_score": [0.02, 0.03, 0.40, 0.45, 0.02, 0.02, 0.01, 0.02],
                          "n_queries": 10})
    changes = largest_change(table, "induction_score").set_index("head")
    assert changes.loc[0, "step"] == 200 and changes.loc[0, "change"] == pytest.approx(0.37)
    assert changes.loc[1, "step"] in (100, 200, 300) and abs(changes.loc[1, "change"]) <= 0.011
    assert measures(table) == ["induction_score"]


def test_compare_view_links_tokens_and_draws_every_member(group):
    from pipeline.store.group import open_group
    from viz.compare_view import CompareView, GroupData, member_layout, token_links, trajectories

    url, _ = group
    opened = open_group(url)
    layout, what = member_layout(opened, "bpe", 1, 0)
    assert what == "aligned pca" and layout.shape == (2 * opened.run("bpe").n_tokens, 2)
    identical = token_links(opened, "early", "late")
    assert (identical["row_a"] == identical["row_b"]).all() and len(identical) == opened.run("early").n_tokens
    across = token_links(opened, "late", "bpe")
    assert len(across) and across["row_b"].max() < opened.run("bpe").n_tokens
    table = trajectories(opened)
    assert sorted(table["step"].unique()) == [0, 6, 7] and "induction_score" in table

    view = CompareView(GroupData(opened))
    view.layer_w.value, view.head_w.value = 1, 0
    view.right.member_w.value = "bpe"
    tokens = view.data.run_data("late").tokens
    view.left.member_w.value = "late"
    row = int(np.flatnonzero(tokens["token"].str.contains("P"))[0])
    view.select(view.left, row)
    assert list(view.left.marked) == [row] and len(view.right.marked) >= 1
    assert set(view.right.marked) == set(across.loc[across["row_a"] == row, "row_b"])
    view.search_w.value = "the"
    assert "matches" in view.left.caption.object and "matches" in view.right.caption.object
    first = view._frame_element()
    view.frame_w.value = 1
    assert "late" in view.frame_caption.object and "moved" in view.frame_caption.object
    assert np.abs(np.asarray(view._frame_element().data, float) - np.asarray(first.data, float)).sum() > 0

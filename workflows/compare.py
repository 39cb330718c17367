"""`qkatlas compare-run`: a group of runs over one corpus, and what relates them.

    member 1 ─► member 2 ─► ... (each the `qkatlas run` workflow, `workflows.runner.execute`,
                                 into GROUP/NAME, on one cluster)
            └► token tables: fingerprints recorded; identical tables are shared
            └► character spans of every member, when tokenizers differ (`pipeline.align`)
            └► aligned layouts: one Dask task per head, over every member in order

Everything commits as it goes (member runs by their own markers, spans and aligned heads by
the group's), so a rerun after a crash redoes only what is missing, and a complete group is a
no-op that starts no cluster. The group lock is held by the driver throughout.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.align import aligned_layouts, best_match, char_spans, match_by_spans, point_match, token_fingerprint
from pipeline.config import AlignConfig, GroupConfig, ReduceConfig, RunConfig
from pipeline.hooks import hold
from pipeline.models import resolve_model_path
from pipeline.reduce import pick_backend
from pipeline.reduce.project import chosen_heads, head_points
from pipeline.store import open_run, writing
from pipeline.store.group import (
    GroupDir,
    GroupMemberInfo,
    aligned_damage,
    committed_aligned,
    load_group_manifest,
    mark_group_complete,
    open_group,
    prepare_group,
    record_token_tables,
    token_spans,
    write_aligned,
    write_token_spans,
)
from workflows.graph import pending
from workflows.runner import execute


@dataclass
class GroupTodo:
    """What a group still needs."""

    members: list[str] = field(default_factory=list)  # member runs with work left
    spans: bool = False  # character spans are missing for some member
    aligned: list[tuple[str, int, int, int]] = field(default_factory=list)  # heads to align
    complete: bool = False

    @property
    def done(self) -> bool:
        return self.complete and not self.members and not self.spans and not self.aligned


def member_configs(config: GroupConfig) -> list[tuple[str, RunConfig]]:
    group = GroupDir(config.group.out)
    return [(member.name, config.member_config(member, group.member_url(member.name)))
            for member in config.group.members]


def align_heads(align: AlignConfig, runs: list) -> list[tuple[str, int, int, int]]:
    """Every (method, dim, layer, head) to align: the asked-for layers and heads that every member has."""

    common_layers = sorted(set.intersection(*(set(run.layers) for run in runs)))
    n_heads = min(run.n_heads for run in runs)
    layers, heads = chosen_heads(align.layers, align.heads, common_layers, n_heads, "group.align",
                                 "every member")
    return [(align.method, align.dim, layer, head) for layer in layers for head in heads]


def group_todo(config: GroupConfig) -> GroupTodo:
    """Read the group directory and list what is not committed yet (no cluster needed)."""

    group = GroupDir(config.group.out)
    todo = GroupTodo()
    if group.is_empty_or_missing() or not group.exists(*group.manifest):
        todo.members = [member.name for member in config.group.members]
        return todo
    manifest = load_group_manifest(group)
    todo.complete = manifest.complete
    todo.members = [name for name, run_config in member_configs(config) if not pending(run_config).done]
    if todo.members:
        return todo

    names = [member.name for member in config.group.members]
    fingerprints = {manifest.token_tables.get(name) for name in names}
    todo.spans = len(fingerprints) > 1 and any(token_spans(group, name) is None for name in names)
    if config.group.align is not None:
        runs = [open_run(group.member_url(name)) for name in names]
        committed = {key: record for key, record in committed_aligned(group).items()
                     if aligned_damage(group, record) is None and record["members"] == names}
        todo.aligned = [task for task in align_heads(config.group.align, runs) if task not in committed]
    return todo


# --- tasks ----------------------------------------------------------------------------------


def member_spans(group_url: str, name: str, model: str) -> int:
    """Character spans of member `name`'s tokens, from its tokenizer, committed to the group."""
    from transformers import AutoTokenizer


    group = GroupDir(group_url)
    run = open_run(group.member_url(name))
    path, extra = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    spans = char_spans(run.tokens(), run.sequences(), tokenizer)
    write_token_spans(group, name, spans)
    return len(spans)


def head_matches(group, names: list[str]) -> list[np.ndarray | None]:
    """For each member after the first, the point of the previous member each of its points is:
    identity where their token tables are identical, else by character spans."""

    matches: list[np.ndarray | None] = [None]
    for previous, current in zip(names, names[1:]):
        n_previous, n_current = group.run(previous).n_tokens, group.run(current).n_tokens
        if group.same_tokens(previous, current):
            token_match = np.arange(n_current)
        else:
            pairs = match_by_spans(group.run(current).tokens(), group.spans(current), group.run(previous).tokens(),
                                   group.spans(previous))
            token_match = best_match(pairs, n_current)
        matches.append(point_match(token_match, n_previous))
    return matches


def align_head(group_url: str, align: AlignConfig, reduce: ReduceConfig, method: str, dim: int, layer: int,
               head: int) -> dict:
    """One head's aligned layouts over every member, in order, committed to the group."""

    hold(f"align-L{layer:03d}H{head:03d}")
    began = time.perf_counter()
    group = open_group(group_url)
    names = group.members
    points = [head_points(group.run(name).queries(layer, head), group.run(name).keys(layer, head), reduce)[0]
              for name in names]
    backend = pick_backend(reduce.backend)
    layouts, records = aligned_layouts(points, head_matches(group, names), method, dim, reduce.umap.model_dump(),
                                       backend, align.epochs, reduce.seed or 0, start_from_previous=group.ordered)
    quality = [dict(record, member=name) for name, record in zip(names, records)]
    record = write_aligned(group.dir, method, dim, layer, head, dict(zip(names, layouts)),
                           {"quality": quality, "backend": backend.name, "epochs": align.epochs,
                            "start": "previous member's layout" if group.ordered and method == "umap" else "own",
                            "seconds": round(time.perf_counter() - began, 3)})
    return {"seconds": record["seconds"], "pid": os.getpid()}


# --- the driver -----------------------------------------------------------------------------


@dataclass
class GroupOutcome:
    members: dict = field(default_factory=dict)  # name -> (todo before, outcome) of its run
    aligned: int = 0
    spans: int = 0
    errors: list[str] = field(default_factory=list)


def run_group(config: GroupConfig, client, show_progress: bool = True, say=print) -> GroupOutcome:
    """Run every member, then record token tables, spans and aligned layouts (see the module)."""

    outcome = GroupOutcome()
    members = [GroupMemberInfo(name=m.name, model=m.model, step=m.step) for m in config.group.members]
    with writing(GroupDir(config.group.out), "qkatlas compare-run") as directory:
        group = prepare_group(directory.url, config.group.ordered, members, config.model_dump(mode="json"))
        for name, run_config in member_configs(config):
            hold(f"group-member-{name}")
            say(f"member {name}: {run_config.extract.model}")
            before, result = execute(run_config, client, show_progress)
            outcome.members[name] = (before, result)
            outcome.errors += [f"{name}: {message}" for message in result.errors]
        if outcome.errors:
            return outcome
        names = [member.name for member in members]
        manifest = record_token_tables(group, {name: token_fingerprint(open_run(group.member_url(name)).tokens())
                                               for name in names})
        if len(set(manifest.token_tables.values())) > 1:
            futures = [client.submit(member_spans, group.url, member.name, member.model, pure=False,
                                     key=f"qkatlas_spans-{member.name}-{time.time_ns()}")
                       for member in members if token_spans(group, member.name) is None]
            for future in futures:
                future.result()
            outcome.spans = len(futures)
        todo = group_todo(config)
        futures = [client.submit(align_head, group.url, config.group.align, config.reduce, *task, pure=False,
                                 key=f"qkatlas_align-{'-'.join(map(str, task))}-{time.time_ns()}")
                   for task in todo.aligned]
        if futures:
            say(f"aligning {len(futures)} heads over {len(names)} members")
        for future, task in zip(futures, todo.aligned):
            try:
                future.result()
                outcome.aligned += 1
            except Exception as error:  # a failed head is reported; the others still commit
                outcome.errors.append(f"align {task}: {type(error).__name__}: {error}")
        if not outcome.errors:
            mark_group_complete(group)
    return outcome

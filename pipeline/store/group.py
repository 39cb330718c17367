"""A group of runs over one corpus (checkpoints of one model, or several models). This module
alone names a group's paths.

    GROUP/group.json                              GroupManifest: members in order, token tables
    GROUP/NAME/                                   member NAME's run (a whole run directory)
    GROUP/spans/NAME.json                         marker of member NAME's token character spans
    GROUP/spans/NAME-TOKEN.parquet                char_start, char_end of each token row (store order)
    GROUP/aligned/METHODDd/LlllHhhh.json          marker of one head's aligned layouts over the members
    GROUP/aligned/METHODDd/LlllHhhh-TOKEN.npz     one array per member: [2 * n_tokens, dim], queries then keys

As in a run, data goes under a fresh TOKEN, then the marker commits it (one atomic write), then
the version the old marker pointed at is removed; a marker records its file's size and CRC-32,
and a read checks them. The group lock lives beside the group (`writing(GroupDir(url))`)."""

from __future__ import annotations

import io
import time
import zlib
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, ValidationError

from pipeline.store.layout import RunDir, head_name, layout_name, new_token
from pipeline.store.manifest import StoreError, is_run
from pipeline.store.writer import committed_marker, read_marker

GROUP_FORMAT = "qkatlas-group/1"
GROUP_MANIFEST = "group.json"
RESERVED = ("spans", "aligned", "probe")  # group folders; a member may not take these names


class GroupMemberInfo(BaseModel):
    name: str
    model: str
    step: int | None = None


class GroupManifest(BaseModel):
    format: Literal["qkatlas-group/1"] = "qkatlas-group/1"
    created: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    ordered: bool
    members: list[GroupMemberInfo]
    config: dict = Field(default_factory=dict)  # the group file, as validated
    token_tables: dict[str, str] = Field(default_factory=dict)  # member -> fingerprint of its token table
    complete: bool = False

    def shared_tokens(self) -> list[list[str]]:
        """Members whose token tables are identical (same seq_id, pos, token_id, token in the same
        order), in member order; only groups of two or more."""
        by_fingerprint: dict[str, list[str]] = {}
        for member in self.members:
            if member.name in self.token_tables:
                by_fingerprint.setdefault(self.token_tables[member.name], []).append(member.name)
        return [names for names in by_fingerprint.values() if len(names) > 1]


class GroupDir(RunDir):
    """The paths of one group directory; every generic method of `RunDir` applies."""

    manifest = (GROUP_MANIFEST,)

    def member(self, name: str) -> RunDir:
        return RunDir(self.url_of(name))

    def member_url(self, name: str) -> str:
        return self.url_of(name)

    @staticmethod
    def spans_marker(name: str) -> tuple[str, str]:
        return "spans", f"{name}.json"

    @staticmethod
    def spans_table(name: str, token: str) -> tuple[str, str]:
        return "spans", f"{name}-{token}.parquet"

    @staticmethod
    def aligned_marker(method: str, dim: int, layer: int, head: int) -> tuple[str, str, str]:
        return "aligned", layout_name(method, dim), f"{head_name(layer, head)}.json"

    @staticmethod
    def aligned_arrays(method: str, dim: int, layer: int, head: int, token: str) -> tuple[str, str, str]:
        return "aligned", layout_name(method, dim), f"{head_name(layer, head)}-{token}.npz"


# --- the manifest ---------------------------------------------------------------------------


def load_group_manifest(group: GroupDir) -> GroupManifest:
    if not group.exists(*group.manifest):
        raise StoreError(f"{group.url} is not a qkatlas group (no {GROUP_MANIFEST}); make one with "
                         "`qkatlas compare-run GROUP.yaml`")
    try:
        return GroupManifest.model_validate(group.read_json(*group.manifest))
    except ValueError as error:  # pydantic's ValidationError included
        first = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
        raise StoreError(f"{group.url_of(*group.manifest)} is damaged or not a qkatlas group manifest ({first})") \
            from None


def prepare_group(url: str, ordered: bool, members: list[GroupMemberInfo], config: dict) -> GroupDir:
    """Create the group directory and its manifest, or check that the group already there has the
    same members in the same order (a rerun resumes it)."""
    group = GroupDir(url)
    reserved = [member.name for member in members if member.name in RESERVED or member.name == GROUP_MANIFEST]
    if reserved:
        raise StoreError(f"member names {reserved} are reserved for the group's own folders; rename them")
    if group.fs.exists(group.root) and not group.fs.isdir(group.root):
        raise StoreError(f"group.out {group.url} is a file; choose a new directory for the group")
    if group.exists(*group.manifest):
        existing = load_group_manifest(group)
        if [m.model_dump() for m in existing.members] != [m.model_dump() for m in members] \
                or existing.ordered != ordered:
            raise StoreError(f"{group.url} holds a group with other members (or another order); use another "
                             "group.out")
        return group
    if not group.is_empty_or_missing():
        if is_run(group):
            raise StoreError(f"{group.url} is a run, not a group; choose a new group.out")
        raise StoreError(f"{group.url} is not empty and is not a qkatlas group; choose a new or empty group.out")
    group.fs.makedirs(group.root, exist_ok=True)
    _save(group, GroupManifest(ordered=ordered, members=members, config=config))
    return group


def _save(group: GroupDir, manifest: GroupManifest) -> None:
    group.write_json(manifest.model_dump(mode="json"), *group.manifest)


def record_token_tables(group: GroupDir, fingerprints: dict[str, str]) -> GroupManifest:
    """Record each member's token-table fingerprint (`pipeline.align.token_fingerprint`)."""
    manifest = load_group_manifest(group)
    manifest = manifest.model_copy(update={"token_tables": {**manifest.token_tables, **fingerprints}})
    _save(group, manifest)
    return manifest


def mark_group_complete(group: GroupDir, complete: bool = True) -> None:
    _save(group, load_group_manifest(group).model_copy(update={"complete": complete}))


# --- committed files ------------------------------------------------------------------------


def _commit(group: GroupDir, data: bytes, path: tuple[str, ...], marker: tuple[str, ...], record: dict,
            token: str, old_path) -> dict:
    group.write_bytes(data, *path)
    record = dict(record, token=token, complete=True,
                  file={"path": "/".join(path), "bytes": len(data), "crc": zlib.crc32(data)})
    previous = read_marker(group, *marker)
    group.write_json(record, *marker)
    if previous and previous.get("token") not in (None, token):
        group.remove(*old_path(previous["token"]))
    return record


def _readcommitted_marker(group: GroupDir, record: dict, what: str) -> bytes:
    file = record["file"]
    try:
        data = group.read_bytes(*file["path"].split("/"))
    except FileNotFoundError:
        raise StoreError(f"{group.url}: {what} ({file['path']}) is missing; rerun `qkatlas compare-run` on the "
                         "group's file to redo it") from None
    if len(data) != file["bytes"] or zlib.crc32(data) != file["crc"]:
        raise StoreError(f"{group.url}: {what} ({file['path']}) is damaged (size or checksum differs from its "
                         "commit); rerun `qkatlas compare-run` to redo it")
    return data


def write_token_spans(group: GroupDir, name: str, spans: pd.DataFrame) -> dict:
    """Commit member `name`'s character spans: one row per token row of its run, columns
    `char_start`, `char_end` (-1 for a token with no characters, such as [CLS])."""
    frame = spans[["char_start", "char_end"]].astype(np.int32).reset_index(drop=True)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    token = new_token()
    return _commit(group, buffer.getvalue(), group.spans_table(name, token), group.spans_marker(name),
                   {"member": name, "n_tokens": len(frame)}, token, lambda old: group.spans_table(name, old))


def token_spans(group: GroupDir, name: str) -> pd.DataFrame | None:
    """Member `name`'s committed character spans, or None."""
    record = committed_marker(group, *group.spans_marker(name))
    if record is None:
        return None
    return pd.read_parquet(io.BytesIO(_readcommitted_marker(group, record, f"token spans of {name}")))


def write_aligned(group: GroupDir, method: str, dim: int, layer: int, head: int, layouts: dict[str, np.ndarray],
                  record: dict) -> dict:
    """Commit one head's aligned layouts, one [2 * n_tokens, dim] array per member, with `record`
    (alignment quality, timings)."""
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {name: np.ascontiguousarray(coords, dtype=np.float32) for name, coords in layouts.items()}
    np.savez(buffer, **arrays)
    token = new_token()
    record = dict(record, method=method, dim=dim, layer=layer, head=head, members=list(layouts))
    return _commit(group, buffer.getvalue(), group.aligned_arrays(method, dim, layer, head, token),
                   group.aligned_marker(method, dim, layer, head), record, token,
                   lambda old: group.aligned_arrays(method, dim, layer, head, old))


def committed_aligned(group: GroupDir) -> dict[tuple[str, int, int, int], dict]:
    """Markers of committed aligned heads, by (method, dim, layer, head)."""
    records = {}
    for folder in group.listdir("aligned"):
        for file in group.listdir("aligned", folder):
            if file.endswith(".json"):
                record = committed_marker(group, "aligned", folder, file)
                if record is not None:
                    records[(record["method"], record["dim"], record["layer"], record["head"])] = record
    return records


def aligned_damage(group: GroupDir, record: dict) -> str | None:
    """Cheap check (one listing): the committed file is there with its recorded size."""
    folder, name = record["file"]["path"].rsplit("/", 1)
    if group.files_with_sizes(folder).get(name) != record["file"]["bytes"]:
        return f"{record['file']['path']} is missing or has the wrong size"
    return None


# --- reading a group ------------------------------------------------------------------------


class Group:
    """Read access to a group directory: its members' runs in order, their token tables'
    relations, and the aligned layouts."""

    def __init__(self, url: str):
        self.dir = GroupDir(url)
        self.manifest = load_group_manifest(self.dir)
        self._runs: dict = {}

    def __repr__(self) -> str:
        return f"Group({self.dir.url!r}: {', '.join(self.members)})"

    @property
    def url(self) -> str:
        return self.dir.url

    @property
    def members(self) -> list[str]:
        return [member.name for member in self.manifest.members]

    @property
    def ordered(self) -> bool:
        return self.manifest.ordered

    def steps(self) -> list[int]:
        """Each member's training step, or its index where a member has none."""
        return [member.step if member.step is not None else index
                for index, member in enumerate(self.manifest.members)]

    def model_of(self, name: str) -> str:
        return next(member.model for member in self.manifest.members if member.name == name)

    def run(self, name: str):
        """Member `name`'s run (opened once)."""
        from pipeline.store.reader import Run

        if name not in self.members:
            raise KeyError(f"no member {name!r} in group {self.dir.url} (members: {', '.join(self.members)})")
        if name not in self._runs:
            self._runs[name] = Run(self.dir.member_url(name))
        return self._runs[name]

    def same_tokens(self, a: str, b: str) -> bool:
        tables = self.manifest.token_tables
        return a in tables and tables.get(a) == tables.get(b)

    def shared_tokens(self) -> list[list[str]]:
        return self.manifest.shared_tokens()

    def spans(self, name: str) -> pd.DataFrame | None:
        return token_spans(self.dir, name)

    @cached_property
    def _aligned(self) -> dict:
        return committed_aligned(self.dir)

    def aligned_heads(self) -> dict[tuple[str, int, int, int], dict]:
        """(method, dim, layer, head) -> marker (quality per consecutive pair, timings)."""
        return dict(self._aligned)

    def aligned(self, method: str, dim: int, layer: int, head: int) -> dict[str, np.ndarray] | None:
        """member -> [2 * n_tokens, dim] aligned layout of one head, or None when not computed."""
        record = self._aligned.get((method, dim, layer, head))
        if record is None:
            return None
        data = _readcommitted_marker(self.dir, record, f"aligned {layout_name(method, dim)} {head_name(layer, head)}")
        with np.load(io.BytesIO(data)) as arrays:
            return {name: arrays[name] for name in record["members"]}


def open_group(url: str) -> Group:
    return Group(url)

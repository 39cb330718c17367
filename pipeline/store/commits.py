"""What a run has committed, and when, read without opening the run (for `qkatlas status`).

Markers do not record a clock time; the time a marker (or a thumbnail, a regions file) was
committed is its file's modification time, which every fsspec store reports. The cheap checks
(`part_damage`, `projection_damage`, sizes of head tables) read listings only, no data."""

from __future__ import annotations

import datetime
import posixpath
import socket
from dataclasses import dataclass

from pipeline.store.layout import RunDir, layout_name
from pipeline.store.lock import _alive, _holder, lock_path
from pipeline.store.writer import part_damage, projection_damage, read_marker


@dataclass
class Commit:
    """One committed item: a part, a projection, a thumbnail, a regions file or a head layer."""

    name: str
    committed_at: float | None  # seconds since the epoch: the marker's (or file's) modification time
    seconds: float | None  # the task's own time, from its marker
    record: dict
    damage: str | None = None  # what a cheap check found wrong, or the flag `verify` left in the marker


def _epoch(info: dict) -> float | None:
    """Modification time from an fsspec `info` dict (local: mtime; S3: LastModified; GCS: updated)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=datetime.UTC)
            return value.timestamp()
    return None


def _files_with_times(run: RunDir, folder: str) -> dict[str, float | None]:
    """Every file below a folder of the run, relative to it, with its modification time."""
    base = run.path(folder)
    run._fresh()
    try:
        found = run.fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.relpath(path, base): _epoch(info) for path, info in found.items()}


def _marker(run: RunDir, folder: str, file: str, committed_at: float | None) -> Commit | None:
    record = read_marker(run, folder, *file.split("/"))
    if record is None:
        return Commit(file.removesuffix(".json"), committed_at, None, {}, "marker unreadable")
    if not record.get("complete"):
        return None
    return Commit(file.removesuffix(".json"), committed_at, record.get("seconds"), record, record.get("damaged"))


def part_commits(run: RunDir) -> list[Commit]:
    """Committed parts (damaged ones too, with `damage` set), by part name."""
    commits = []
    for file, committed_at in sorted(_files_with_times(run, "parts").items()):
        if file.endswith(".json") and "/" not in file:
            commit = _marker(run, "parts", file, committed_at)
            if commit is not None:
                if commit.damage is None:
                    commit.damage = part_damage(run, commit.record)
                commits.append(commit)
    return commits


def projection_commits(run: RunDir) -> list[Commit]:
    """Committed projections, named like `pca2d L0H3` (as `Run.verify` names them)."""
    commits = []
    for file, committed_at in sorted(_files_with_times(run, "projections").items()):
        if not file.endswith(".json"):
            continue
        commit = _marker(run, "projections", file, committed_at)
        if commit is None or (commit.damage is None and not commit.record.get("token")):
            continue
        record = commit.record
        if record:
            commit.name = f"{layout_name(record['method'], record['dim'])} L{record['layer']}H{record['head']}"
            if commit.damage is None:
                commit.damage = projection_damage(run, record)
        commits.append(commit)
    return commits


def derived_commits(run: RunDir, folder: str, projections: list[Commit]) -> list[Commit]:
    """The thumbnails (`folder` "thumbnails") or labelled regions ("regions") of the current
    version of each committed projection."""
    found = _files_with_times(run, folder)
    commits = []
    for projection in projections:
        record = projection.record
        if not record or projection.damage:
            continue
        place = (run.thumbnail if folder == "thumbnails" else run.regions)(
            record["method"], record["dim"], record["layer"], record["head"], record["token"])
        key = "/".join(place[1:])
        if key in found:
            commits.append(Commit(projection.name, found[key], None, record))
    return commits


def head_layer_commits(run: RunDir) -> list[Commit]:
    """Committed head-atlas layers, named like `layer 2`; a table whose size differs is damage."""
    found = _files_with_times(run, "heads")
    sizes = run.files_with_sizes("heads")
    commits = []
    for file, committed_at in sorted(found.items()):
        if file.endswith(".json"):
            commit = _marker(run, "heads", file, committed_at)
            if commit is None:
                continue
            if "layer" in commit.record:
                commit.name = f"layer {commit.record['layer']}"
            for table in commit.record.get("files", {}).values():
                if commit.damage is None and sizes.get(posixpath.basename(table["path"])) != table["bytes"]:
                    commit.damage = f"{table['path']} is missing or has the wrong size"
            commits.append(commit)
    return commits


def lock_holder(run: RunDir) -> dict | None:
    """Who holds the run's write lock: {pid, host, command, since, alive} (`alive` None when
    the holder is on another host and cannot be checked), or None when nobody does."""
    holder = _holder(run, lock_path(run))
    if holder is None:
        return None
    same_host = holder.get("host") == socket.gethostname()
    alive = _alive(int(holder.get("pid", 0) or 0)) if same_host and holder.get("pid") else None
    return dict(holder, alive=alive)

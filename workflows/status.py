"""What a run has committed, what is pending and what is damaged, per stage (`qkatlas status`);
when each stage ran and how long it took; for a running run, who holds it, the rate and the ETA.

Exit code (for cron and CI scripts):
    0  complete: nothing pending, nothing damaged
    1  incomplete: work pending (or no run there yet, or it is running)
    3  damaged: a committed item fails its check (`qkatlas run` redoes it)
    2  a user error (not a run, a run file made for another run)

What is pending is computed from the extraction settings in the run's manifest; a run does not
store `qkatlas run`'s reduce and workflow settings, so projections, thumbnails, regions and head
layers show only what is committed, unless `--config RUN.yaml` says what the run should hold
(computed by `workflows.graph.pending`, as `qkatlas run` does)."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import QkatlasError
from pipeline.store import RunDir, StoreError, is_run, load_manifest, open_run
from pipeline.store.commits import (derived_commits, head_layer_commits, lock_holder, part_commits,
                                    projection_commits)
from workflows.graph import heads_of, pending
from workflows.progress import duration_text
from workflows.runner import load_run_config

STAGES = ("parts", "probe", "projections", "thumbnails", "regions", "head_layers")
EXIT_CODES = {"complete": 0, "incomplete": 1, "no run": 1, "damaged": 3}


class StatusError(QkatlasError, ValueError):
    """A `--config` that does not describe the run asked about."""


@dataclass
class Stage:
    """One stage of a run: its commits (see `pipeline.store.commits.Commit`) and what is left."""

    name: str
    commits: list = field(default_factory=list)
    total: int | None = None  # items the run should hold; None: unknown
    pending: int | None = None  # None: unknown (pass --config)
    damage: dict[str, str] = field(default_factory=dict)  # item -> problem
    note: str = ""

    def summary(self, now: float, since: float | None) -> dict:
        """JSON-ready: counts, when the stage ran, how long it took, and (with `since`, the
        running writer's start) the rate of this attempt and the ETA."""
        timed = [commit for commit in self.commits if commit.committed_at is not None]
        task_seconds = [commit.seconds for commit in self.commits if commit.seconds is not None]
        report = {"committed": len(self.commits) - len(self.damage), "pending": self.pending, "total": self.total,
                  "damaged": [{"name": name, "problem": problem} for name, problem in sorted(self.damage.items())],
                  "first_commit": None, "last_commit": None, "wall_seconds": None,
                  "task_seconds": round(sum(task_seconds), 3) if task_seconds else None,
                  "rate_per_second": None, "eta_seconds": None, "note": self.note or None}
        if self.name == "parts":
            report["tokens"] = sum(commit.record.get("n_tokens", 0) for commit in self.commits
                                   if commit.name not in self.damage)
        if timed:
            first = min(commit.committed_at - (commit.seconds or 0) for commit in timed)
            last = max(commit.committed_at for commit in timed)
            report.update(first_commit=_iso(min(commit.committed_at for commit in timed)), last_commit=_iso(last),
                          wall_seconds=round(last - first, 3))
        recent = [commit for commit in timed if since is not None and commit.committed_at >= since]
        if recent and self.pending != 0:
            start = max(since, min(commit.committed_at - (commit.seconds or 0) for commit in recent))
            rate = len(recent) / max(now - start, 1e-9)
            report["rate_per_second"] = round(rate, 4)
            if self.pending is not None:
                report["eta_seconds"] = round(self.pending / rate, 1)
        return report


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(iso: str | None) -> float | None:
    try:
        return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None
    except ValueError:
        return None


def _todo(url: str, config_path: Path, manifest):
    """`workflows.graph.pending` for the run file, its extract.out set to RUN."""

    settings = load_run_config(config_path, out=url)
    if manifest is not None and manifest.config != settings.extract:
        differs = [name for name in type(settings.extract).model_fields
                   if getattr(manifest.config, name) != getattr(settings.extract, name)]
        if differs == ["out"] and _same_place(url, manifest.config.out):  # the run, spelt another way
            settings = settings.model_copy(update={"extract": manifest.config})
        else:
            raise StatusError(f"{config_path} does not describe the run at {url}: extract.{', extract.'.join(differs)} "
                              "differ from the run's manifest; pass the run file it was made with")
    try:
        return settings, pending(settings)
    except ValueError as error:  # reduce.layers / reduce.heads the run does not have
        raise StatusError(f"{config_path}: {error}") from None


def _same_place(left: str, right: str) -> bool:

    a, b = RunDir(left), RunDir(right)
    if a.is_local and b.is_local:
        return os.path.realpath(a.root) == os.path.realpath(b.root)
    return a.url == b.url


def collect(url: str, config_path: Path | None = None, verify: bool = False) -> dict:
    """The status of the run at `url` as a JSON-ready dict (see the module's docstring)."""

    now = time.time()
    run = RunDir(url)
    holder = lock_holder(run)
    since = _epoch(holder.get("since")) if holder and holder.get("alive") is not False else None
    report = {"run": url, "state": None, "exit_code": None, "checked_against": str(config_path or "manifest"),
              "running": holder, "verified": False, "notes": []}
    if run.is_empty_or_missing():
        if config_path is not None:
            _todo(url, config_path, None)  # the run file must at least be valid
        report.update(state="no run", exit_code=EXIT_CODES["no run"], stages={})
        report["notes"].append("nothing committed yet")
        return report
    manifest = load_manifest(run)  # a directory that is not a run: one-line StoreError
    settings, todo = _todo(url, config_path, manifest) if config_path is not None else (None, None)
    stages = {name: Stage(name) for name in STAGES}

    plan = manifest.extract
    parts = stages["parts"]
    parts.commits = part_commits(run)
    parts.total = plan.parts or 1  # no plan: `qkatlas extract` writes one part
    good_parts = [commit for commit in parts.commits if not commit.damage]
    parts.pending = len(todo.shards) if todo is not None and todo.prepared else max(parts.total - len(good_parts), 0)
    if parts.pending == 0 and not plan.complete:
        parts.note = "every part is committed; the extraction is not marked complete yet (its finishing task)"

    probe = stages["probe"]
    wanted = manifest.config.probe and manifest.model.modality == "text" and manifest.attention.mask_rule == "causal"
    probe.total = int(wanted)
    probe_dir = run.probe()
    if is_run(probe_dir) and load_manifest(probe_dir).extract.complete:
        probe.commits = part_commits(probe_dir)
    probe.pending = max(probe.total - len([c for c in probe.commits if not c.damage]), 0)
    if not wanted:
        probe.note = "not wanted (the induction probe is for causal text models, with extract.probe)"

    projections = stages["projections"]
    projections.commits = projection_commits(run)
    stages["thumbnails"].commits = derived_commits(run, "thumbnails", projections.commits)
    stages["regions"].commits = derived_commits(run, "regions", projections.commits)
    stages["head_layers"].commits = head_layer_commits(run)
    if todo is not None:

        heads = todo.heads or heads_of(manifest, settings.reduce)
        workflow = settings.workflow
        wanted = {"projections": (heads, todo.projections),
                  "thumbnails": (heads if workflow.thumbnails else [], todo.thumbnails),
                  "regions": ([task for task in heads if task[1] == 2] if workflow.regions else [], todo.regions),
                  "head_layers": (manifest.layers if workflow.measure_heads else [], todo.head_layers)}
        for name, (items, left) in wanted.items():
            stages[name].total = len(items)
            stages[name].pending = len(left) if todo.prepared else len(items)  # pending() lists them once planned
    else:
        for name in ("projections", "thumbnails", "regions", "head_layers"):
            stages[name].note = "pending unknown: the run does not store its reduce settings (pass --config)"

    for stage in stages.values():
        stage.damage = {commit.name: commit.damage for commit in stage.commits if commit.damage}
    if verify:
        _verify(url, stages, report)

    summaries = {name: stage.summary(now, since) for name, stage in stages.items()}
    report.update(model=manifest.model.id, architecture=manifest.model.architecture, layers=manifest.layers,
                  n_heads=manifest.attention.n_heads, created=manifest.created,
                  extraction_complete=plan.complete, tokens=summaries["parts"]["tokens"],
                  sequences=sum(commit.record.get("n_sequences", 0) for commit in parts.commits
                                if commit.name not in parts.damage),
                  points=sum(commit.record.get("n_points", 0) for commit in projections.commits
                             if commit.name not in projections.damage),
                  stages=summaries)
    if any(stage.damage for stage in stages.values()):
        state = "damaged"
    elif not plan.complete or any(stage.pending for stage in stages.values()):
        state = "incomplete"
    else:
        state = "complete"
    report.update(state=state, exit_code=EXIT_CODES[state])
    return report


def _verify(url: str, stages: dict[str, Stage], report: dict) -> None:
    """Add what `Run.verify()` (reading every committed byte) finds to the stages' damage."""

    try:
        damage = open_run(url).verify()
    except StoreError as error:
        report["notes"].append(f"--verify skipped: {error}")
        return
    stage_of = {"part": "parts", "projection": "projections", "heads": "head_layers"}
    for item in damage:
        stages[stage_of.get(item.kind, "parts")].damage.setdefault(item.name, item.problem)
    report["verified"] = True


# --- text ---------------------------------------------------------------------------------


def _clock(iso: str | None) -> str:
    return iso.replace("T", " ").removesuffix("Z") if iso else "-"


def _seconds(value: float | None) -> str:

    return "-" if value is None else (f"{value:.1f} s" if value < 60 else duration_text(value))


def render(report: dict) -> str:
    """The report as lines of text."""
    lines = [f"run       {report['run']}"]
    if report.get("model"):
        lines.append(f"model     {report['model']} ({report['architecture']}), layers {report['layers']}, "
                     f"{report['n_heads']} heads; created {_clock(report['created'])} UTC")
    code = report["exit_code"]
    checks = "" if not report.get("stages") else (
        "  [every committed byte verified]" if report["verified"] else "  [cheap checks; --verify reads every byte]")
    lines.append(f"state     {report['state']} (exit {code}){checks}")
    holder = report["running"]
    if holder:
        alive = {True: "running", False: "stale lock (its process is gone; the next run takes it over)",
                 None: "running on another host (not checked)"}[holder.get("alive")]
        lines.append(f"writer    {alive}: pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
                     f"{_clock(holder.get('since'))} UTC ({holder.get('command', '?')})")
    if report.get("stages"):
        lines.append(f"tokens    {report['tokens']:,} in {report['sequences']:,} sequences"
                     f"{'' if report['extraction_complete'] else ' so far'}; points projected {report['points']:,}")
        lines.append("")
        lines.append(f"{'stage':<12} {'committed':>9} {'pending':>8} {'damaged':>8}  {'first commit (UTC)':<19}  "
                     f"{'last commit':<19}  {'took':>9}  {'tasks':>9}  rate, ETA")
        for name, stage in report["stages"].items():
            if stage["total"] == 0 and not stage["committed"] and not stage["damaged"]:
                continue
            committed = f"{stage['committed']}" + (f"/{stage['total']}" if stage["total"] is not None else "")
            pending = "?" if stage["pending"] is None else str(stage["pending"])
            rate = ""
            if stage["rate_per_second"]:
                rate = f"{stage['rate_per_second']:.3g}/s"
                if stage["eta_seconds"] is not None:
                    rate += f", ETA {_seconds(stage['eta_seconds'])}"
            lines.append(f"{name.replace('_', ' '):<12} {committed:>9} {pending:>8} {len(stage['damaged']):>8}  "
                         f"{_clock(stage['first_commit']):<19}  {_clock(stage['last_commit']):<19}  "
                         f"{_seconds(stage['wall_seconds']):>9}  {_seconds(stage['task_seconds']):>9}  {rate}".rstrip())
            for item in stage["damaged"]:
                lines.append(f"  damaged {item['name']}: {item['problem']}")
        notes: dict[str, list[str]] = {}
        for name, stage in report["stages"].items():
            if stage["note"]:
                notes.setdefault(stage["note"], []).append(name.replace("_", " "))
        lines.extend(f"note: {', '.join(names)}: {note}" for note, names in notes.items())
    lines.extend(f"note: {note}" for note in report["notes"])
    return "\n".join(lines)

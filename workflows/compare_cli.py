"""`qkatlas demo-checkpoints`, `qkatlas compare-run`, `qkatlas serve-compare` and
`qkatlas bench compare`: groups of runs (checkpoints of one model, or several models)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this module's commands to the `qkatlas` command line."""

    @app.command("demo-checkpoints")
    def demo_checkpoints(
        out: Path = typer.Option(Path("runs/demo-checkpoints"), help="folder for the checkpoints (step-NNNNN) and "
                                                                     "training.json"),
        group_out: str = typer.Option("runs/checkpoints", help="group directory the written group file names"),
        steps: int = typer.Option(2200, help="training steps"),
        checkpoints: int = typer.Option(12, help="checkpoints to save, evenly spaced from step 0"),
        learning_rate: float = typer.Option(3e-3),
        seed: int = typer.Option(0),
        threads: int = typer.Option(1, help="torch CPU threads"),
        limit: int = typer.Option(100, help="demo:wiki sentences each checkpoint is run over (the group file)"),
    ) -> None:
        """Train a two-layer attention-only transformer on demo:wiki text plus repeated random tokens on
        the CPU, save checkpoints, report when each head's induction score rises, and write a group file
        (OUT/group.yaml) for `qkatlas compare-run`."""
        import numpy as np
        import yaml

        from pipeline.models import quiet_transformers
        from workflows.checkpoints import FORMED, TrainingSettings, group_file, rise_steps, train_checkpoints
        from workflows.progress import console, stage_bar

        quiet_transformers()
        settings = TrainingSettings(steps=steps, checkpoints=checkpoints, learning_rate=learning_rate, seed=seed,
                                    threads=threads)
        with stage_bar("training", steps + 1) as advance:
            last = [0]

            def on_eval(step, loss, scores):
                advance(step + 1 - last[0])
                last[0] = step + 1

            log = train_checkpoints(out, settings, on_eval)
        rises = rise_steps(log)
        scores = np.asarray(log["induction"])
        evaluated = log["steps"]
        console.print(f"[bold green]trained[/] {out}: {len(log['checkpoints'])} checkpoints in {log['seconds']:.0f} s "
                      f"(loss {log['loss'][1]:.2f} -> {log['loss'][-1]:.2f})", highlight=False)
        header = "  step   " + " ".join(f"L{layer}H{head}" for layer in range(scores.shape[1])
                                            for head in range(scores.shape[2]))
        console.print("induction score per head at each checkpoint (a random head: ~0.02; a perfect one ~0.49)\n"
                      + header, highlight=False)
        for step in log["checkpoints"]:
            row = scores[evaluated.index(step)].reshape(-1)
            console.print(f"  {step:>5}  " + " ".join(f"{value:4.2f}" for value in row), highlight=False)
        formed = {head: step for head, step in rises.items() if step is not None}
        if formed:
            for (layer, head), step in sorted(formed.items()):
                final = scores[-1, layer, head]
                console.print(f"  L{layer}H{head}: induction score rose at step {step} (half of its final {final:.2f})",
                              highlight=False)
        else:
            console.print(f"[bold yellow]no induction head formed[/] (no final score above {FORMED}); try more "
                          "--steps or another --seed", highlight=False)
        config = out / "group.yaml"
        config.write_text("# written by `qkatlas demo-checkpoints`; run it with: qkatlas compare-run "
                          f"{config}\n" + yaml.safe_dump(group_file(out, log["checkpoints"], group_out, limit),
                                                          sort_keys=False))
        console.print(f"group file: {config}  (qkatlas compare-run {config})", highlight=False)

    @app.command("compare-run")
    def compare_run(
        config: Path = typer.Argument(..., help="group file (configs/groups/*.yaml): group, extract, reduce, cluster"),
        out: Optional[str] = typer.Option(None, help="group directory (overrides group.out)"),
        address: Optional[str] = typer.Option(None, help="use the Dask scheduler at tcp://HOST:PORT"),
        workers: Optional[int] = typer.Option(None, help="LocalCluster workers (cluster.n_workers)"),
        threads_per_worker: Optional[int] = typer.Option(None, help="LocalCluster threads per worker"),
    ) -> None:
        """Run every member of a group (`qkatlas run` into GROUP/NAME), record which token tables are
        shared, align tokens across tokenizers by characters and, for ordered groups, align each
        head's layouts from member to member; resumable, and a complete group is a quick no-op."""
        import time

        from pipeline.config import ConfigError, LocalClusterConfig, SchedulerClusterConfig, load_group_config
        from pipeline.models import quiet_transformers
        from workflows.cli import _cache_numba
        from workflows.cluster import open_client
        from workflows.compare import group_todo, run_group
        from workflows.progress import console

        began = time.perf_counter()
        settings = load_group_config(config, out)
        if address is not None:
            settings.cluster = SchedulerClusterConfig(address=address)
        if workers is not None or threads_per_worker is not None:
            if not isinstance(settings.cluster, LocalClusterConfig):
                raise ConfigError("--workers / --threads-per-worker apply to cluster kind 'local'")
            settings.cluster = settings.cluster.model_copy(update={
                key: value for key, value in (("n_workers", workers), ("threads_per_worker", threads_per_worker))
                if value})
        todo = group_todo(settings)
        if todo.done:
            console.print(f"[bold green]complete[/] {settings.group.out}: {len(settings.group.members)} members, "
                          "nothing to do", highlight=False)
            return
        quiet_transformers()
        _cache_numba()
        with open_client(settings.cluster) as (client, description):
            console.print(f"[bold]cluster[/]    {description}\n[bold]dashboard[/]  {client.dashboard_link}",
                          highlight=False)
            outcome = run_group(settings, client, say=lambda text: console.print(f"[bold]{text}[/]", highlight=False))
        elapsed = time.perf_counter() - began
        lines = [f"  {name:<14} {before.parts - len(before.shards)} of {before.parts} shards and "
                 f"{len(before.heads) - len(before.projections)} of {len(before.heads)} projections were committed "
                 f"before" for name, (before, _) in outcome.members.items()]
        lines.append(f"  aligned heads {outcome.aligned} computed; spans {outcome.spans} members")
        lines.append(f"  time         {elapsed:.1f} s")
        if outcome.errors:
            console.print(f"[bold red]failed[/] {settings.group.out}\n" + "\n".join(lines), highlight=False)
            for message in outcome.errors[:10]:
                console.print(f"  [red]{message}[/]", highlight=False)
            console.print("committed work is kept; rerun the same command to redo what failed")
            raise typer.Exit(code=1)
        console.print(f"[bold green]done[/] {settings.group.out}\n" + "\n".join(lines), highlight=False)

    @app.command("serve-compare")
    def serve_compare(
        group: str = typer.Argument(..., help="group directory made by `qkatlas compare-run`"),
        port: int = typer.Option(5007, help="port to listen on"),
        address: str = typer.Option("127.0.0.1", help="address to bind (loopback unless you mean to expose it)"),
    ) -> None:
        """Serve the compare view: two members side by side on one head (linked search and selection),
        a slider over the members that animates a head's aligned layout, and head measurements as
        trajectories over training steps."""
        from viz.compare_view import make_compare_server
        from viz.server import exposure_warnings
        from workflows.progress import console

        server = make_compare_server(group, port=port, address=address)
        for warning in exposure_warnings(address, auth=False, tls=False):
            console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
        console.print(f"[bold green]serving[/] {group} at http://{address}:{port}/  (Ctrl+C stops)", highlight=False)
        server.start()
        try:
            server.io_loop.start()
        except KeyboardInterrupt:
            server.stop()

    @bench_app.command("compare")
    def bench_compare(
        group: Optional[str] = typer.Option(None, help="an ordered group with 8+ members [train the demo checkpoints "
                                                       "and run them into ~/.cache/qkatlas/bench-compare]"),
        layer: int = typer.Option(1),
        head: Optional[int] = typer.Option(None, help="head of --layer [the one with the highest final induction "
                                                      "score, else 0]"),
        members: int = typer.Option(8, help="members (checkpoints) to lay out, spread evenly over the group"),
        epochs: Optional[int] = typer.Option(None, help="UMAP epochs of a layout started from the previous one "
                                                        "[group.align.epochs' default]"),
    ) -> None:
        """One head over 8 checkpoints: UMAP of each started from the previous layout and carried onto it
        by Procrustes, vs 8 independent UMAPs; time ratio and mean displacement of shared points between
        consecutive checkpoints, measured in one run."""
        from pipeline.models import quiet_transformers
        from workflows.cli import _cache_numba
        from workflows.bench.compare import bench_compare as run_bench

        quiet_transformers()
        _cache_numba()
        run_bench(group, layer, head, members, epochs)

"""`qkatlas demo-checkpoints`: train a tiny model on the CPU until an induction head forms, saving
checkpoints and a group file for `qkatlas compare-run`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
import yaml

from workflows.cli.app import app
from workflows.progress import console, progress


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
    from pipeline.models import quiet_transformers  # torch, transformers: imported when used
    from workflows.checkpoints import FORMED, TrainingSettings, group_file, rise_steps, train_checkpoints

    quiet_transformers()
    settings = TrainingSettings(steps=steps, checkpoints=checkpoints, learning_rate=learning_rate, seed=seed,
                                threads=threads)
    with progress({"train": ("training", steps + 1)}) as advance:
        last = [0]

        def on_eval(step, loss, scores):
            advance("train", step + 1 - last[0], detail=f"loss {loss:.2f}")
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

"""The demo students' training budget, chosen for the student trained alone (issue 22's fair budget).

    python bench/student_budget.py                       # the grid below, seed 42
    python bench/student_budget.py --epochs 8 16 --lrs 5e-4 1e-3 2e-3 --seeds 42 1

Trains recipes/demo/student_nokd.yaml (no KD) at every (epochs, learning rate) of the grid and
prints its R@1 and mAP on the val split after the last epoch (the weights the demo tests): the
budget with the best val R@1 is the one both demo students get. The test split is never looked at,
and the KD student plays no part in the choice. Each run lands in runs/budget/e<E>-lr<LR>-s<S>; a
finished run is read back, not retrained. Needs no teacher.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from kd_trainer.recipe import load_recipe
from kd_trainer.runner import run

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "student_nokd.yaml"


def last_val(out: Path) -> dict[str, float]:
    """R@1 and mAP on the val split at the end of training, from the run's log history."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    last = [h for h in history if "eval_r1" in h][-1]
    return {"r1": last["eval_r1"], "mAP": last["eval_mAP"]}


def one_run(epochs: int, lr: float, seed: int, runs: Path, root: str) -> dict[str, float]:
    out = runs / f"e{epochs}-lr{lr:g}-s{seed}"
    if not (out / "test_results.json").is_file():
        recipe = load_recipe(RECIPE, [f"seed={seed}", f"training.output_dir={out}", f"data.root={root}",
                                      f"training.num_train_epochs={epochs}", f"training.learning_rate={lr}",
                                      "training.disable_tqdm=true"])
        start = time.time()
        run(recipe)
        print(f"epochs {epochs}, lr {lr:g}, seed {seed}: {time.time() - start:.0f} s", flush=True)
    return last_val(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[8, 16])
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--runs", type=Path, default=Path("runs/budget"))
    p.add_argument("--root", default="./data")
    ns = p.parse_args()
    rows = []
    for epochs in ns.epochs:
        for lr in ns.lrs:
            vals = [one_run(epochs, lr, s, ns.runs, ns.root) for s in ns.seeds]
            rows.append((epochs, lr, statistics.mean(v["r1"] for v in vals), statistics.mean(v["mAP"] for v in vals)))
    print(f"\nStudent trained alone (recipes/demo/student_nokd.yaml), val split after the last epoch, "
          f"mean over seeds {ns.seeds}:")
    print("| epochs | learning rate | val R@1 | val mAP |\n|---|---|---|---|")
    best = max(rows, key=lambda r: r[2])
    for epochs, lr, r1, m in rows:
        mark = " **best**" if (epochs, lr) == best[:2] else ""
        print(f"| {epochs} | {lr:g} | {r1:.2f}{mark} | {m:.2f} |")


if __name__ == "__main__":
    main()

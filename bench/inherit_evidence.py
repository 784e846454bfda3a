"""SynthPEDES evidence for weight inheritance and for the demo: one student architecture (the demo
teacher at half depth), five ways to start and train it, several seeds each.

    python bench/inherit_evidence.py --seeds 1 2            # every variant, seeds 1 and 2
    python bench/inherit_evidence.py --variants first first_nokd --seeds 1 2 3

Needs the demo teacher (runs/demo/teacher: `make demo`, or `kd-trainer demo --teacher-only`). Each run lands in runs/inherit/<variant>-s<seed>; a finished run is
read back, not retrained. Prints, per variant, the test metrics as mean ± sample std over the
seeds, and R@1 on the val split after 25% of the training steps (from the run's log history).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from kd_trainer.recipe import load_recipe
from kd_trainer.runner import run

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "synth" / "inherit"
VARIANTS = ("random_nokd", "random", "first_nokd", "first", "uniform")
METRICS = ("r1", "r5", "r10", "mAP", "mINP")


def one_run(variant: str, seed: int, runs: Path) -> dict[str, float]:
    out = runs / f"{variant}-s{seed}"
    results = out / "test_results.json"
    if not results.is_file():
        recipe = load_recipe(RECIPES / f"{variant}.yaml", [f"seed={seed}", f"training.output_dir={out}"])
        start = time.time()
        run(recipe)
        print(f"{variant} seed {seed}: {time.time() - start:.0f} s", flush=True)
    metrics = json.loads(results.read_text())
    history = json.loads((out / "trainer_state.json").read_text())
    evals = [h for h in history["log_history"] if "eval_r1" in h]
    total = history["max_steps"]
    early = [h for h in evals if h["step"] <= total // 4]
    row = {m: metrics[f"test_{m}"] for m in METRICS}
    row["r1_at_25pct"] = early[-1]["eval_r1"] if early else float("nan")
    return row


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs/inherit"))
    ns = parser.parse_args()
    rows = {v: [one_run(v, s, ns.runs) for s in ns.seeds] for v in ns.variants}
    cols = [*METRICS, "r1_at_25pct"]
    print(f"\nSynthPEDES test split, half-depth tiny-teacher student, seeds {ns.seeds} (mean ± std):")
    print("| variant | " + " | ".join(c.replace("_at_25pct", " @25% steps (val)") for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for v, runs in rows.items():
        print(f"| {v} | " + " | ".join(cell([r[c] for r in runs]) for c in cols) + " |")


if __name__ == "__main__":
    main()

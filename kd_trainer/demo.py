"""The SynthPEDES demo: the whole pipeline on a generated dataset, in minutes on a CPU.

1. generate SynthPEDES (seeded) under ``<root>/SynthPEDES``;
2. train a small teacher from scratch (task terms only: ``recipes/demo/teacher.yaml``);
3. cut a student out of the teacher (half its depth, weights inherited from its first layers)
   and train it without KD (``recipes/demo/student_nokd.yaml``);
4. distil the same student, from the same inherited weights and for the same steps, from the
   teacher (``recipes/demo/student_kd.yaml``);
5. print R@1/R@5/R@10/mAP/mINP of all three on the test split.

With ``seeds > 1`` steps 3 and 4 run once per seed (42, 1, 2, ...) against the one teacher, and
the table gives each student's mean ± sample standard deviation over the seeds, the number that
says whether the KD student's lead is larger than what the seed alone moves. A run whose folder
already holds the test results of this very recipe (its saved ``recipe.yaml`` equal) is read
back, not trained again, so ``make demo SEEDS=3`` after ``make demo`` trains only the new seeds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from kd_trainer.evaluation import format_metrics
from kd_trainer.recipe import dump_recipe, load_recipe
from kd_trainer.runner import run

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "demo"
METRICS = ("r1", "r5", "r10", "mAP", "mINP")
SEEDS = (42, 1, 2, 3, 4, 5, 6, 7)
# (row label, recipe): both students inherit their weights from the teacher; one also distils
STUDENTS = (("student, no KD", "student_nokd.yaml"), ("student, KD", "student_kd.yaml"))


def _test_metrics(recipe_file: str, out: Path, overrides: list[str]) -> dict[str, float]:
    recipe = load_recipe(RECIPE_DIR / recipe_file, [f"training.output_dir={out}", *overrides])
    saved, results = out / "recipe.yaml", out / "test_results.json"
    if results.is_file() and saved.is_file() and saved.read_text() == dump_recipe(recipe):
        print(f"{out}: already trained with this recipe; its test results are read back", flush=True)
        metrics = json.loads(results.read_text())
    else:
        metrics = run(recipe)
    return {m: metrics[f"test_{m}"] for m in METRICS}


def spread_table(runs: dict[str, list[dict[str, float]]]) -> str:
    """One row per model: ``mean ± std`` of each metric over its seeds (n in the last column)."""
    heads = ["R@1", "R@5", "R@10", "mAP", "mINP"]
    width = max(len("model"), *(len(k) for k in runs))
    lines = [f"| {'model':<{width}} | " + " | ".join(f"{h:>13}" for h in heads) + " | seeds |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * 15 for _ in heads) + "|-------|"]
    for name, rows in runs.items():
        cells = []
        for m in METRICS:
            values = [r[m] for r in rows]
            # one run has no spread: the cell says so by leaving it out, not by printing ± 0.00
            spread = f" ± {statistics.stdev(values):4.2f}" if len(values) > 1 else " " * 7
            cells.append(f"{statistics.mean(values):6.2f}{spread}")
        lines.append(f"| {name:<{width}} | " + " | ".join(cells) + f" | {len(rows):>5} |")
    return "\n".join(lines)


def run_demo(root: str = "./data", runs: str = "./runs/demo", overrides: list[str] | None = None,
             seeds: int = 1) -> dict[str, list[dict[str, float]]]:
    """Train the teacher once and both students at ``seeds`` seeds; print and save the tables."""
    if not 1 <= seeds <= len(SEEDS):
        raise ValueError(f"seeds must be 1..{len(SEEDS)}, got {seeds}")
    base = [f"data.root={root}", *(overrides or [])]
    out = Path(runs)
    teacher_dir = out / "teacher"
    results: dict[str, list[dict[str, float]]] = {"teacher": [_test_metrics("teacher.yaml", teacher_dir, base)]}
    for label, file in STUDENTS:
        results[label] = []
        for seed in SEEDS[:seeds]:
            run_dir = out / (Path(file).stem + ("" if seed == SEEDS[0] else f"_seed{seed}"))
            extra = [f"seed={seed}", f"teacher.checkpoint={teacher_dir}"]
            results[label].append(_test_metrics(file, run_dir, [*base, *extra]))
    first = {label: rows[0] for label, rows in results.items()}
    text = "SynthPEDES test split (text-to-image, %), seed 42:\n" + format_metrics(first)
    if seeds > 1:
        text += (f"\n\nStudents over seeds {list(SEEDS[:seeds])} (mean ± sample std; same teacher and data; "
                 "both students start from the teacher's weights; the seed sets data order, augmentation "
                 "and dropout):\n" + spread_table(results))
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    return results

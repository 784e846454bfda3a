"""The SynthPEDES demo: the whole pipeline on a generated dataset, in minutes on a CPU.

1. generate SynthPEDES (seeded) under ``<root>/SynthPEDES``;
2. train a small teacher from scratch (task terms only: ``recipes/demo/teacher.yaml``);
3. train a smaller student without KD (``recipes/demo/student_nokd.yaml``);
4. distil the same student from the teacher (``recipes/demo/student_kd.yaml``);
5. print R@1/R@5/R@10/mAP/mINP of all three on the test split.
"""

from __future__ import annotations

from pathlib import Path

from kd_trainer.evaluation import format_metrics
from kd_trainer.recipe import load_recipe
from kd_trainer.run import run

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "demo"


def run_demo(root: str = "./data", runs: str = "./runs/demo", overrides: list[str] | None = None) -> dict:
    overrides = list(overrides or [])
    rows: dict[str, dict[str, float]] = {}
    teacher_dir = str(Path(runs) / "teacher")
    plan = [
        ("teacher", "teacher.yaml", []),
        ("student, no KD", "student_nokd.yaml", []),
        ("student, KD", "student_kd.yaml", [f"teacher.checkpoint={teacher_dir}"]),
    ]
    for label, file, extra in plan:
        out = str(Path(runs) / Path(file).stem)
        recipe = load_recipe(RECIPE_DIR / file, [f"data.root={root}", f"training.output_dir={out}", *extra,
                                                 *overrides])
        metrics = run(recipe)
        rows[label] = {k.removeprefix("test_"): v for k, v in metrics.items()
                       if k.removeprefix("test_") in ("r1", "r5", "r10", "mAP", "mINP")}
    table = format_metrics(rows)
    print("\nSynthPEDES test split (text-to-image, %):\n" + table)
    Path(runs).mkdir(parents=True, exist_ok=True)
    (Path(runs) / "results.md").write_text(table + "\n")
    return rows

"""The SynthPEDES demo: the whole pipeline on generated data, in minutes on a CPU.

1. generate the target SynthPEDES (400 people, seed 0) under ``<root>/SynthPEDES`` and the
   teacher's pre-training corpus (3000 other people, seed 1, none of the target's) under
   ``<root>/corpus/SynthPEDES``;
2. pre-train the teacher on the corpus (``recipes/demo/teacher_pretrain.yaml``), then fine-tune
   it on the target train split (``recipes/demo/teacher.yaml``);
3. train a smaller student on the target train split alone, without KD
   (``recipes/demo/student_nokd.yaml``);
4. distil the same student, from the same initialisation and for the same steps, from the
   teacher (``recipes/demo/student_kd.yaml``);
5. print R@1/R@5/R@10/mAP/mINP of all three on the target test split, with what each model
   costs (the cost columns of ``kd-trainer report``: parameters, GFLOPs and CPU latency at batch
   1 per image and per caption, measured one after another in this process), and how much of the
   teacher's lead over the student trained alone the KD student closes.

With ``seeds > 1`` steps 3 and 4 run once per seed (42, 1, 2, ...) against the one teacher, and
the table gives each student's mean ± sample standard deviation over the seeds.

Nothing is trained twice: a run whose folder already holds the test results of this very recipe,
made from data of this generator version (and, for a student, against this very teacher), is read
back; ``make demo SEEDS=3`` after ``make demo`` trains only the new seeds. A run made by another
recipe, generator version or teacher is trained again, with a line that says which.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from kd_trainer.data.digest import file_digest
from kd_trainer.recipe import Recipe, RecipeError, dump_recipe, load_recipe
from kd_trainer.report.discovery import collect_runs
from kd_trainer.report.efficiency import Latency, machine
from kd_trainer.report.inference import run_models
from kd_trainer.report.tables import MISSING, TableCells, efficiency_cells, efficiency_columns
from kd_trainer.runner import run
from kd_trainer.synthetic.pedes import GENERATOR_VERSION

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "demo"
METRICS = ("r1", "r5", "r10", "mAP", "mINP")
METRIC_NAMES = ("R@1", "R@5", "R@10", "mAP", "mINP")
SEEDS = (42, 1, 2, 3, 4, 5, 6, 7)
# (row label, recipe, learns from the teacher): the same student, initialisation and steps; one distils
STUDENTS = (("student, no KD", "student_nokd.yaml", False), ("student, KD", "student_kd.yaml", True))
PROVENANCE = "demo_provenance.json"  # what a demo run was made from, checked before it is read back


def _same_recipe(saved: Path, recipe: Recipe) -> bool:
    """Whether the recipe a run saved is ``recipe``, both read by today's schema: a file written by an
    older layout of it (every task's keys, mostly null; old spellings) reads as the recipe it ran."""
    try:
        return dump_recipe(load_recipe(saved)) == dump_recipe(recipe)
    except RecipeError:  # not YAML, or a recipe this toolkit no longer runs
        return False


def _stale(out: Path, recipe: Recipe, provenance: dict[str, object]) -> str | None:
    """Why the finished run in ``out`` cannot be read back (None: it can; "": there is none)."""
    saved, results = out / "recipe.yaml", out / "test_results.json"
    if not results.is_file() or not saved.is_file():
        return ""
    if not _same_recipe(saved, recipe):
        return "it was trained by another recipe"
    made = json.loads((out / PROVENANCE).read_text()) if (out / PROVENANCE).is_file() else {}
    if made.get("generator_version") != provenance["generator_version"]:
        return (f"it was trained on SynthPEDES of generator version {made.get('generator_version')}, "
                f"this toolkit draws version {provenance['generator_version']}")
    if made.get("teacher") != provenance.get("teacher"):
        return "it learnt from another teacher than the one in this demo"
    return None


def made_from(teacher: Path | None) -> dict[str, object]:
    """What a demo run is made from (its ``demo_provenance.json``): the generator version of its
    data and, for a student that learns from a teacher, the digest of the teacher's weights (a
    student is only as current as the teacher it learnt from)."""
    provenance: dict[str, object] = {"generator_version": GENERATOR_VERSION}
    if teacher is not None:
        provenance["teacher"] = file_digest(teacher / "model.safetensors")
    return provenance


def _test_metrics(recipe_file: str, out: Path, overrides: list[str],
                  teacher: Path | None = None) -> dict[str, float]:
    recipe = load_recipe(RECIPE_DIR / recipe_file, [f"training.output_dir={out}", *overrides])
    provenance = made_from(teacher)
    why = _stale(out, recipe, provenance)
    if why is None:
        print(f"{out}: already trained with this recipe; its test results are read back", flush=True)
        metrics = json.loads((out / "test_results.json").read_text())
    else:
        if why:
            print(f"{out}: {why}: training it again", flush=True)
        # The demo owns its folders: what is there is stale (above) or an interrupted run. (Not as a
        # recipe key: the saved recipe stays the one compared above.)
        metrics = run(recipe, overwrite=True)
        (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return {m: metrics[f"test_{m}"] for m in METRICS}


def gap_closed(results: dict[str, list[dict[str, float]]], metric: str) -> tuple[float, float]:
    """The teacher's lead over the student trained alone, and the share of it the KD student closes
    (means over the seeds)."""
    teacher = statistics.mean(r[metric] for r in results["teacher"])
    alone = statistics.mean(r[metric] for r in results["student, no KD"])
    kd = statistics.mean(r[metric] for r in results["student, KD"])
    gap = teacher - alone
    return gap, (kd - alone) / gap if gap > 0 else float("nan")


def results_table(metrics: dict[str, dict[str, float]], folders: dict[str, Path],
                  latency: Latency | None = Latency()) -> str:
    """One row per model: its test metrics and, from its run folder, what it costs at inference, in
    the cost columns of ``kd-trainer report`` with their note (latency when ``latency`` is given;
    ``–`` for a run folder without weights)."""
    ran = run_models(collect_runs(folders[label] for label in metrics), latency=latency)
    costs = {label: ran.efficiency.get(folders[label]) for label in metrics}
    measured = [e for e in costs.values() if e is not None]
    columns, note = efficiency_columns(measured, machine() if latency else None) if measured else ([], "")
    body = [[label, *(f"{m[k]:.2f}" for k in METRICS),
             *(efficiency_cells(costs[label]) if costs[label] is not None else [MISSING] * len(columns))]
            for label, m in metrics.items()]
    return TableCells(head=["model", *METRIC_NAMES, *columns], body=body, notes=[note] if note else []).markdown()


def spread_table(runs: dict[str, list[dict[str, float]]]) -> str:
    """One row per model: ``mean ± std`` of each metric over its seeds (n in the last column)."""
    heads = list(METRIC_NAMES)
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


def _step(number: int, what: str) -> None:
    """Say which of the demo's four steps starts (the training logs alone do not tell)."""
    print(f"\n== demo step {number}/4: {what}", flush=True)


def train_teacher(root: str = "./data", runs: str = "./runs/demo",
                  overrides: list[str] | None = None) -> dict[str, float]:
    """Pre-train the teacher on the corpus, fine-tune it on the target set (each step only when its
    run is missing or stale), and return its test metrics on the target set."""
    out = Path(runs)
    pretrained = out / "teacher_pretrain"
    _step(1, f"the teacher, pre-trained on the generated corpus ({Path(root) / 'corpus'}, generated first when "
             f"missing) -> {pretrained}")
    _test_metrics("teacher_pretrain.yaml", pretrained, [f"data.root={Path(root) / 'corpus'}", *(overrides or [])])
    _step(2, f"the teacher, fine-tuned on the target set, SynthPEDES ({root}) -> {out / 'teacher'}")
    return _test_metrics("teacher.yaml", out / "teacher",
                         [f"data.root={root}", *(overrides or []), f"student.checkpoint={pretrained}"],
                         teacher=pretrained)


def run_demo(root: str = "./data", runs: str = "./runs/demo", overrides: list[str] | None = None,
             seeds: int = 1) -> dict[str, list[dict[str, float]]]:
    """Train the teacher once and both students at ``seeds`` seeds; print and save the tables."""
    if not 1 <= seeds <= len(SEEDS):
        raise ValueError(f"seeds must be 1..{len(SEEDS)}, got {seeds}")
    base = [f"data.root={root}", *(overrides or [])]
    out = Path(runs)
    teacher_dir = out / "teacher"
    results = {"teacher": [train_teacher(root, runs, overrides)]}
    first_dirs = {"teacher": teacher_dir}  # the run folder of each row of the seed-42 table
    for step, (label, file, distils) in enumerate(STUDENTS, start=3):
        results[label] = []
        for seed in SEEDS[:seeds]:
            run_dir = out / (Path(file).stem + ("" if seed == SEEDS[0] else f"_seed{seed}"))
            _step(step, f"the student {'distilled from the teacher' if distils else 'trained alone'}, "
                        f"seed {seed} -> {run_dir}")
            first_dirs.setdefault(label, run_dir)
            extra = [f"seed={seed}", *([f"teacher.checkpoint={teacher_dir}"] if distils else [])]
            results[label].append(_test_metrics(file, run_dir, [*base, *extra],
                                                teacher=teacher_dir if distils else None))
    first = {label: rows[0] for label, rows in results.items()}
    text = "SynthPEDES test split (text-to-image, %), seed 42:\n" + results_table(first, first_dirs)
    if seeds > 1:
        text += (f"\n\nStudents over seeds {list(SEEDS[:seeds])} (mean ± sample std; same teacher and data; "
                 "both students start from the same weights at each seed; the seed sets the initialisation, "
                 "data order, augmentation and dropout):\n" + spread_table(results))
    lines = []
    for metric, name in (("r1", "R@1"), ("mAP", "mAP")):
        gap, closed = gap_closed(results, metric)
        lines.append(f"{name}: the teacher leads the student trained alone by {gap:.2f}; "
                     f"the KD student closes {100 * closed:.0f}% of that gap")
    share = statistics.mean(r["r1"] for r in results["student, no KD"]) / results["teacher"][0]["r1"]
    lines.append(f"the student trained alone reaches {100 * share:.0f}% of the teacher's R@1")
    text += "\n\n" + "\n".join(lines)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    return results

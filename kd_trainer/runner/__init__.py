"""Run one recipe: check what can be checked, hold the output folder, train and evaluate.

    python -m kd_trainer recipes/finetune_itc.yaml training.num_train_epochs=1
    accelerate launch -m kd_trainer recipes/ours_3stage.yaml [key.sub=value ...]
    accelerate launch kd_trainer/run.py recipes/ours_3stage.yaml [key.sub=value ...]

The recipe is first resolved into one object that holds every decision of the run
(:mod:`kd_trainer.distill.resolved`); the task modules build data and models from it and hand it
to the trainer. One module per task (:mod:`.retrieval`, :mod:`.classification`,
:mod:`.detection`), and one per concern they share: :mod:`.preflight`, :mod:`.lock`, :mod:`.fit`,
:mod:`.export` (open_clip folder and push) and :mod:`.errors` (one-line errors).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from kd_trainer.distill.resolved import resolve_run
from kd_trainer.recipe import Recipe, load_recipe
from kd_trainer.runner.classification import run_classification
from kd_trainer.runner.detection import run_detection
from kd_trainer.runner.errors import one_line_errors
from kd_trainer.runner.lock import output_lock
from kd_trainer.runner.preflight import preflight
from kd_trainer.runner.retrieval import run_retrieval

__all__ = ["main", "run"]

TASKS = {"retrieval": run_retrieval, "classification": run_classification, "detection": run_detection}


def run(recipe: Recipe, *, overwrite: bool = False) -> dict[str, float]:
    """Resolve the run (every decision, once), check what can be checked, hold the output folder,
    train and evaluate; the test metrics. ``overwrite``: as ``training.overwrite_output_dir: true``
    (the run may replace a run already in its output folder) without writing it into the recipe."""
    resolved = resolve_run(recipe)
    if overwrite:
        resolved = dataclasses.replace(resolved, overwrite=True)
    preflight(resolved)
    with output_lock(resolved.output_dir):
        return TASKS[resolved.task](recipe, resolved)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="kd_trainer",
        description="Run a kd_trainer recipe. Overrides are key.sub=value (YAML values), e.g. "
                    "data.name=rstpreid data.root=./data training.num_train_epochs=1",
    )
    parser.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ns = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with one_line_errors():
        return run(load_recipe(ns.recipe, ns.overrides))

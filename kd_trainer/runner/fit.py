"""Training shared by every task: record the recipe, the resolved run and the run's setting, train
(resuming when asked), keep the selected evaluation, save the model and the log history."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from kd_trainer.distill.resolved import RESOLVED_RUN_FILE, ResolvedRun
from kd_trainer.recipe import Recipe
from kd_trainer.runner.resume import RESUMES_FILE, record_recipe, resume_changes

__all__ = ["fit", "log_test_metrics", "run_info"]

logger = logging.getLogger("kd_trainer")


def run_info(trainer: Trainer) -> dict[str, Any]:
    """Where and how the run ran: processes, device, precision (saved beside the results)."""
    acc, args = trainer.accelerator, trainer.args
    return {
        "world_size": args.world_size,
        "distributed_type": str(acc.distributed_type.value),
        "device": str(acc.device),
        "mixed_precision": acc.mixed_precision,
        "global_train_batch_size": args.per_device_train_batch_size * args.world_size
        * args.gradient_accumulation_steps,
        "torch": torch.__version__,
    }


def log_test_metrics(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Say the test metrics and where the run is (once, on the main process), as every task's run ends."""
    if trainer.is_world_process_zero():
        logger.info("test metrics: %s (the run: %s)", json.dumps(metrics), trainer.args.output_dir)


def fit(trainer: Trainer, recipe: Recipe, run: ResolvedRun) -> None:
    """Record the resolved recipe, what the run decided (``resolved_run.json``: ``run.describe()``,
    no Hub token) and where the run runs, train (resuming when the recipe says so), and save the
    final model and the whole log history (trainer_state.json) in output_dir."""
    out = trainer.args.output_dir
    # Checked on every process, so each refuses alike: a damaged or foreign checkpoint, a recipe
    # that changed what the run trains (runner/resume.py).
    checkpoint = trainer.resume_checkpoint(run.resume)
    changes = resume_changes(recipe, out, checkpoint) if checkpoint is not None else {}
    if checkpoint is not None and trainer.is_world_process_zero():
        step = json.loads(Path(checkpoint, "trainer_state.json").read_text()).get("global_step")
        logger.info("resuming from %s at step %s (recorded in %s)", checkpoint, step, Path(out, RESUMES_FILE))
    if trainer.is_world_process_zero():
        os.makedirs(out, exist_ok=True)
        record_recipe(recipe, out, checkpoint, changes)
        Path(out, RESOLVED_RUN_FILE).write_text(json.dumps(run.describe(), indent=2) + "\n")
        Path(out, "run_info.json").write_text(json.dumps(run_info(trainer), indent=2))
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.restore_selected()  # with `select:`, the best evaluation of the last stage is the result
    with trainer.disk_full_is_one_line(out):
        trainer.save_model(out)
        trainer.save_state()

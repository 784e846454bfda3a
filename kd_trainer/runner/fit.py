"""Training shared by every task: record the recipe and the run's setting, train (resuming when
asked), keep the selected evaluation, save the model and the log history."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from kd_trainer.recipe import Recipe, dump_recipe

__all__ = ["fit", "run_info"]


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


def fit(trainer: Trainer, recipe: Recipe) -> None:
    """Record the resolved recipe and where the run runs, train (resuming when the recipe says so),
    and save the final model and the whole log history (trainer_state.json) in output_dir."""
    out = trainer.args.output_dir
    if trainer.is_world_process_zero():
        os.makedirs(out, exist_ok=True)
        Path(out, "recipe.yaml").write_text(dump_recipe(recipe))
        Path(out, "run_info.json").write_text(json.dumps(run_info(trainer), indent=2))
    resume = recipe.training.get("resume_from_checkpoint") or None  # a path, or true for the latest complete
    trainer.train(resume_from_checkpoint=resume)
    trainer.restore_selected()  # with `select:`, the best evaluation of the last stage is the result
    trainer.save_model(out)
    trainer.save_state()

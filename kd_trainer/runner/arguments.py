"""The recipe's ``training:`` block as the ``TrainingArguments`` every task trains with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from kd_trainer.distill.grad_cache import exact_group_arguments
from kd_trainer.recipe import Recipe

__all__ = ["exact_steps", "training_arguments"]


def training_arguments(recipe: Recipe) -> TrainingArguments:
    defaults: dict[str, Any] = {
        "output_dir": str(Path("runs") / recipe.name),
        "seed": recipe.seed,
        "report_to": "none",
        "per_device_eval_batch_size": 256,
    }
    training = dict(recipe.training)
    if recipe.contrastive_accumulation == "exact":  # the DataLoader yields whole groups; the trainer splits them
        training, _ = exact_group_arguments(training)
    args = {**defaults, **training}
    args["remove_unused_columns"] = False  # transforms need the raw columns (validated in the recipe)
    if isinstance(args.get("resume_from_checkpoint"), bool):  # `true`: fit() passes it to train()
        args.pop("resume_from_checkpoint")
    # The Trainer's own push would upload checkpoints in our training layout and swap nothing for
    # open_clip users; export_student pushes the open_clip folder instead, once, at the end.
    args["push_to_hub"] = False
    return TrainingArguments(**args)


def exact_steps(recipe: Recipe) -> int:
    """How many micro-batches each group splits into under ``contrastive_accumulation: exact`` (else 1)."""
    if recipe.contrastive_accumulation != "exact":
        return 1
    return exact_group_arguments(recipe.training)[1]

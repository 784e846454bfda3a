"""``ClassificationTrainer``: a classifier distilled with UP/EOD mimic jobs beside its cross-entropy.

The classification example (SynthShapes, torchvision classifiers) runs on it: cross-entropy
plus ``kd`` on logits and ``l2`` on a backbone stage, from one or several teachers. It supplies
only its forwards, its task loss and its accuracy; the core runs the jobs, weighs and logs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_trainer.distill.core import DistillationTrainer
from kd_trainer.distill.plan import Stage
from kd_trainer.models.classifier import CLASSIFIER_CONFIG


class ClassificationTrainer(DistillationTrainer):
    """Trainer whose ``model`` is a classifier (with ``mimic_head`` holding its adapters)."""

    def student_outputs(self, model: nn.Module, inputs: dict[str, torch.Tensor], stage: Stage) -> Any:
        return model(pixel_values=inputs["pixel_values"])

    def term_values(self, inputs: dict[str, torch.Tensor], outputs: Any, teacher_embeds: dict[str, torch.Tensor],
                    stage: Stage) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(outputs["logits"], inputs["labels"])} if self.task_loss else {}

    def evaluate_split(self, split: Any, prefix: str) -> dict[str, float]:
        """Top-1 accuracy (%) over the whole split, gathered across processes without duplicates."""
        loader = self.get_eval_dataloader(split)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for batch in loader:
                logits = model(pixel_values=batch["pixel_values"].to(self.accelerator.device))["logits"]
                pred, labels = self.accelerator.gather_for_metrics((logits.argmax(-1),
                                                                    batch["labels"].to(logits.device)))
                correct += int((pred == labels).sum())
                seen += int(labels.numel())
        model.train(was_training)
        return {f"{prefix}_accuracy": 100.0 * correct / max(seen, 1), f"{prefix}_samples": seen}

    def saved_configs(self, model: nn.Module) -> dict[str, Any]:
        return {CLASSIFIER_CONFIG: model.to_config()}

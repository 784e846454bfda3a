"""``MimicTrainer``: a Trainer for any model whose loss is a task loss plus UP/EOD mimic jobs.

The classification example runs on it (cross-entropy + ``kd`` on logits + ``l2`` on a backbone
stage, from one or several teachers), which is what shows the mimic engine knows nothing about
retrieval. Per step: the student's forward and every mimic teacher's forward (``no_grad``, eval)
run inside one capture of the feature taps, the jobs turn the captured features into losses (with
adapters and warm-up on the global step), and the taps are emptied before backward.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from kd_trainer.distill.mimic import MimicEngine, MimicJob
from kd_trainer.distill.running_means import RunningMeans

ADAPTERS_FILE = "mimic_adapters.json"


class MimicTrainer(Trainer):
    """Trainer whose ``model`` is the student (with ``mimic_head`` holding its adapters)."""

    loss_is_scaled_for_ga = False  # compute_loss returns a micro-batch mean, as in DistillationTrainer

    def __init__(self, model: nn.Module, args: Any = None, *, teachers: dict[str, nn.Module] | None = None,
                 jobs: Sequence[MimicJob] = (), task_loss: bool = True, sample_inputs: torch.Tensor | None = None,
                 **kwargs: Any) -> None:
        self.engine: MimicEngine | None = None
        if jobs:
            self.engine = MimicEngine(model, teachers or {}, list(jobs))
            if sample_inputs is not None:  # adapters exist before the optimizer and any checkpoint load
                self.engine.build_adapters(student_forward=lambda m: m(pixel_values=sample_inputs),
                                           teacher_forward=lambda n, t: t(pixel_values=sample_inputs))
            model.mimic_head = self.engine.head
        elif not task_loss:
            raise ValueError("nothing to train: no mimic job and task_loss is false")
        self.task_loss = task_loss
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False
        if self.engine is not None:
            for teacher in self.engine.teachers.values():  # frozen by the engine; never prepared or saved
                teacher.to(self.accelerator.device)
        self._term_means = RunningMeans()

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.engine is not None:
            self.engine.head.lock()  # an adapter created after this would never be optimised
        return optimizer

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        x = inputs["pixel_values"]
        values: dict[str, torch.Tensor] = {}
        total = None
        if self.engine is not None:
            with self.engine.capture() as cap:
                out = model(pixel_values=x)
                self.engine.run_teachers(forward=lambda name, teacher: teacher(pixel_values=x))
                mimic = self.engine.losses(cap.student, cap.teachers, step=self.state.global_step)
            total = mimic["mimic/total"]
            values.update({k: v.detach() for k, v in mimic.items()})
        else:
            out = model(pixel_values=x)
        if self.task_loss:
            ce = F.cross_entropy(out["logits"], inputs["labels"])
            total = ce if total is None else total + ce
            values["loss_ce"] = ce.detach()
        if model.training:
            self._term_means.add(values)
        return (total, out) if return_outputs else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Every job, teacher and loss as ``mimic/<job>/<teacher>/<loss>``, averaged since the last log."""
        if "loss" in logs and self._term_means:
            logs.update(self._term_means.pop(self.accelerator))
        super().log(logs, start_time)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Top-1 accuracy (%) over the whole split, gathered across processes without duplicates."""
        loader = self.get_eval_dataloader(eval_dataset)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for batch in loader:
                logits = model(pixel_values=batch["pixel_values"].to(self.accelerator.device))["logits"]
                pred, labels = self.accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"].to(logits.device)))
                correct += int((pred == labels).sum())
                seen += int(labels.numel())
        model.train(was_training)
        metrics = {f"{metric_key_prefix}_accuracy": 100.0 * correct / max(seen, 1), f"{metric_key_prefix}_samples": seen}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Weights (adapters included, for resuming), the architecture, and which keys are adapters:
        those are training-only and can be dropped for inference."""
        from kd_trainer.models.classifier import CLASSIFIER_CONFIG

        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            with open(os.path.join(output_dir, CLASSIFIER_CONFIG), "w") as f:
                json.dump(model.to_config(), f, indent=2)
            if self.engine is not None:
                with open(os.path.join(output_dir, ADAPTERS_FILE), "w") as f:
                    json.dump({"training_only": self.engine.head.training_only_keys("mimic_head.")}, f, indent=2)

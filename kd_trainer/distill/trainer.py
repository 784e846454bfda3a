"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is a weighted sum of named terms.

One training step (see ``design/architecture.md``): the student embeds the batch, the frozen
teacher embeds it under ``torch.no_grad()`` (only the towers some term reads), every active
term computes its value from those embeddings, and the weighted sum is the Trainer's loss.
Every term is logged by name, unweighted (``loss_<term>``) and weighted (``loss_<term>_weighted``).

Gradient accumulation. Each term returns a *mean over the micro-batch*. We declare
``loss_is_scaled_for_ga = False`` and our model's ``forward`` takes no ``**kwargs``, so the
Trainer divides every micro-batch loss by the number of micro-batches in the accumulation
group (``current_gradient_accumulation_steps``, which also covers the short last group of an
epoch). For a per-sample term (``fd``) that makes k micro-batches of b the same update as one
batch of k*b, exactly, when the micro-batches have equal size. The trap we avoid on purpose:
when a model accepts loss kwargs and the batch carries ``labels``, the Trainer instead passes
``num_items_in_batch`` and skips the division, which would silently multiply our gradients by k.
Batch-dependent terms (every contrastive or relational term: itc, sdm, cross_kd, motis, the KL
and similarity-distance terms, icl, crd, affinity) compare each sample with the others of its
micro-batch, so accumulation changes *what they optimise* (k softmaxes over b instead of one
over k*b): raise ``per_device_train_batch_size``, or use more processes (their features are
gathered across processes), rather than accumulating, when the batch matters.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer

from kd_trainer.data.collator import collate_retrieval
from kd_trainer.losses import Features, TermSpec, compute_term, get_term
from kd_trainer.models.checkpoint import MODEL_CONFIG_NAME
from kd_trainer.models.factory import RetrievalModel
from kd_trainer.recipe import TermConfig

logger = logging.getLogger("kd_trainer")


@dataclass
class RetrievalSplit:
    """An evaluation split: the gallery images and the caption queries, transformed on the fly."""

    name: str
    gallery: Dataset
    queries: Dataset

    def __len__(self) -> int:  # the Trainer asks has_length() of eval datasets
        return len(self.queries)


@dataclass(frozen=True)
class ActiveTerm:
    """A term as the trainer runs it: its recipe entry and its registry spec."""

    config: TermConfig
    spec: TermSpec

    @property
    def key(self) -> str:
        return self.config.key


def resolve_terms(terms: Sequence[TermConfig]) -> list[ActiveTerm]:
    """Look every recipe term up in the registry, checking its side; errors name the term."""
    active = []
    for cfg in terms:
        spec = get_term(cfg.name)
        if cfg.side not in spec.sides:
            raise ValueError(f"loss term {cfg.name!r} has no side {cfg.side!r}; allowed: {list(spec.sides)}")
        active.append(ActiveTerm(cfg, spec))
    return active


class DistillationTrainer(Trainer):
    """Trainer for a student :class:`RetrievalModel`, with an optional frozen teacher beside it.

    The Trainer's ``model`` is the student (with its projections, if any); the teacher is
    *not* a submodule, so checkpoints and ``save_model`` never contain teacher weights.
    """

    # compute_loss returns a micro-batch mean: let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: RetrievalModel,
        args: Any = None,
        *,
        terms: Sequence[TermConfig],
        teacher: RetrievalModel | None = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        self.active_terms = resolve_terms(terms)
        needs_teacher = [t.key for t in self.active_terms if t.spec.needs_teacher]
        if needs_teacher and teacher is None:
            raise ValueError(f"loss terms {needs_teacher} need a teacher, but the recipe has no `teacher:`")
        super().__init__(model=model, args=args, data_collator=data_collator or collate_retrieval, **kwargs)
        # No ``**kwargs`` in RetrievalModel.forward already implies this; say it, so no refactor flips it.
        self.model_accepts_loss_kwargs = False
        self.teacher = self._place_teacher(teacher) if teacher is not None and needs_teacher else None
        self._towers = frozenset().union(*(t.spec.towers(t.config.side) for t in self.active_terms))
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0

    # --- teacher -------------------------------------------------------------------------------

    def _place_teacher(self, teacher: RetrievalModel) -> RetrievalModel:
        """Freeze the teacher and put it on this process's device.

        It is deliberately not passed through ``accelerator.prepare``: that would register it
        for ``save_state`` and, under DDP, wrap it for gradient sync it must never take part in.
        Mixed precision still reaches it: its forward runs inside ``compute_loss``, under the
        Trainer's autocast context.
        """
        teacher.requires_grad_(False)
        teacher.eval()
        return teacher.to(self.accelerator.device)

    def _teacher_features(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.teacher is not None
        self.teacher.eval()  # guard against a caller's .train() on everything
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if "teacher_image" in self._towers:
                out["teacher_image"] = self.teacher.clip.encode_image(inputs["pixel_values"])
            if "teacher_text" in self._towers:
                out["teacher_text"] = self.teacher.clip.encode_text(inputs["input_ids"])
        return out

    # --- loss ----------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        need_image = "student_image" in self._towers
        need_text = "student_text" in self._towers
        outputs = model(
            pixel_values=inputs["pixel_values"] if need_image else None,
            input_ids=inputs["input_ids"] if need_text else None,
        )
        teacher = self._teacher_features(inputs) if self.teacher is not None else {}
        pids = inputs.get("pids")
        plain = Features(
            student_image=outputs.get("image_embeds"), student_text=outputs.get("text_embeds"), pids=pids, **teacher
        )
        # Terms that compare student and teacher embeddings directly read the projected student
        # embeddings when the widths differ (the projection is trained with the student).
        projected = Features(
            student_image=outputs.get("image_embeds_proj", outputs.get("image_embeds")),
            student_text=outputs.get("text_embeds_proj", outputs.get("text_embeds")),
            pids=pids,
            **teacher,
        )
        total = None
        values: dict[str, torch.Tensor] = {}
        for term in self.active_terms:
            cfg = term.config
            feats = projected if term.spec.direct_compare else plain
            value = compute_term(cfg.name, feats, temperature=cfg.temperature, side=cfg.side, **cfg.kwargs)
            weighted = cfg.weight * value
            total = weighted if total is None else total + weighted
            values[term.key] = value.detach()
            values[f"{term.key}_weighted"] = weighted.detach()
        if model.training:
            self._record(values)
        assert total is not None
        return (total, outputs) if return_outputs else total

    def _record(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.float()
            self._term_sums[k] = self._term_sums[k] + v if k in self._term_sums else v.clone()
        self._term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the per-term means since the last log to a training log (averaged over processes)."""
        if "loss" in logs and self._term_count:
            keys = list(self._term_sums)
            stacked = torch.stack([self._term_sums[k] for k in keys]) / self._term_count
            stacked = self.accelerator.reduce(stacked, reduction="mean")
            logs.update({f"loss_{k}": round(float(v), 6) for k, v in zip(keys, stacked.tolist())})
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    # --- evaluation ----------------------------------------------------------------------------

    def evaluate(
        self,
        eval_dataset: RetrievalSplit | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Retrieval evaluation (R@1/5/10, mAP, mINP) of the student on a whole split.

        Not the Trainer's per-batch ``prediction_step``: ranking needs the full gallery.
        The metrics go to the Trainer's loggers as ``<prefix>_r1`` etc., so
        ``metric_for_best_model: r1`` selects on eval R@1.
        """
        split = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(split, RetrievalSplit):
            raise TypeError(f"DistillationTrainer.evaluate needs a RetrievalSplit, got {type(split).__name__}")
        from kd_trainer.evaluation import evaluate_retrieval

        self._memory_tracker.start()
        model = self.accelerator.unwrap_model(self.model)
        metrics = evaluate_retrieval(
            model,
            split.gallery,
            split.queries,
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            accelerator=self.accelerator,
            num_workers=self.args.dataloader_num_workers,
            progress=not self.args.disable_tqdm,
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    # --- saving --------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the student's weights, plus the architecture needed to rebuild it without the recipe."""
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            with open(os.path.join(output_dir, MODEL_CONFIG_NAME), "w") as f:
                json.dump(model_config(model), f, indent=2)


def model_config(model: RetrievalModel) -> dict[str, Any]:
    """What :func:`kd_trainer.models.checkpoint.load_model` needs to rebuild ``model``."""
    from kd_trainer.models.factory import get_architecture

    proj = model.image_proj.out_features if model.image_proj is not None else None
    return {
        "arch": get_architecture(model.arch) if model.arch is not None else None,
        "arch_name": model.arch if isinstance(model.arch, str) else None,
        "image_size": list(model.image_size),
        "context_length": model.context_length,
        "projection_dim": proj,
    }

"""``RetrievalTrainer``: CLIP dual-encoder distillation, the loss a weighted sum of named terms.

One step (``docs/architecture.md``): the frozen teacher embeds the batch under
``torch.inference_mode()`` (only the embeddings some term reads; or they come from the
teacher cache), the student embeds it, and every term of the current stage computes its value
from those embeddings; the core weighs and logs them.

Gradient accumulation: each term returns a mean over the micro-batch and the Trainer divides
by the number of micro-batches in the group, which makes a per-sample term (``fd``) exact.
Batch-dependent terms (every contrastive or relational term) compare each sample with the
others of its micro-batch, so plain accumulation changes what they optimise (k softmaxes over
b instead of one over k*b). Across processes they *are* exact: their features are gathered
into the global batch (:mod:`kd_trainer.distill.gather`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Sequence

import torch
from datasets import Dataset
from torch import nn

from kd_trainer.data.collator import collate_retrieval
from kd_trainer.distill.core import DistillationTrainer
from kd_trainer.distill.gather import gather_features
from kd_trainer.distill.grad_cache import ExactAccumulation
from kd_trainer.distill.plan import RunPlan, Stage
from kd_trainer.evaluation import evaluate_retrieval
from kd_trainer.log_keys import hybrid_key
from kd_trainer.losses import Features
from kd_trainer.losses.registry import STUDENT_EMBEDDINGS, TEACHER_EMBEDDINGS
from kd_trainer.models.factory import RetrievalModel
from kd_trainer.models.loading import MODEL_CONFIG_NAME, model_config
from kd_trainer.models.precision import float32_embeddings


@dataclass
class RetrievalSplit:
    """An evaluation split: the gallery images and the caption queries, transformed on the fly."""

    name: str
    gallery: Dataset
    queries: Dataset

    def __len__(self) -> int:  # the Trainer asks has_length() of eval datasets
        return len(self.queries)


class RetrievalTrainer(ExactAccumulation, DistillationTrainer):
    """Trainer for a student :class:`RetrievalModel`, with an optional frozen teacher beside it.

    It executes ``plan`` (the resolved run's: :func:`kd_trainer.distill.resolved.resolve_run`),
    each stage's teacher source included, and decides nothing itself. The teacher is not a
    submodule of the student, so checkpoints never contain its weights.
    ``exact_accumulation_steps=k`` computes every term over each DataLoader batch as one group
    of ``k`` micro-batches (:mod:`kd_trainer.distill.grad_cache`).
    """

    tower_inputs = MappingProxyType({"image": "pixel_values", "text": "input_ids"})

    def __init__(
        self,
        model: RetrievalModel,
        args: Any = None,
        *,
        plan: RunPlan,
        teacher: RetrievalModel | None = None,
        mimic_jobs: Sequence[Any] = (),
        mimic_teachers: dict[str, nn.Module] | None = None,
        teacher_cache: Any = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        # A mimic job on the main teacher reads its hooked layers: one live forward of both its
        # towers (never the cache) then feeds the terms and the taps (the plan's teacher source says so).
        if teacher is not None and any(s.teacher_source is not None and s.teacher_source.for_mimic
                                       for s in plan.stages):
            self.live_teachers = frozenset({"teacher"})
        teachers = {**({"teacher": teacher} if teacher is not None else {}), **(mimic_teachers or {})}
        super().__init__(model, args, plan=plan, teachers=teachers, mimic_jobs=mimic_jobs,
                         data_collator=data_collator or collate_retrieval, **kwargs)
        self.teacher = self.teachers.get("teacher")
        if self.teacher_cache is not None:
            self.teacher_cache = self.teacher_cache.to(self.accelerator.device)

    # --- the task's hooks ------------------------------------------------------------------------

    def teacher_outputs(self, inputs: dict[str, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        source = stage.teacher_source
        for_mimic = source is not None and source.for_mimic
        embeddings = TEACHER_EMBEDDINGS if for_mimic else stage.teacher_embeddings
        if not embeddings or self.teacher is None:
            return {}
        if source is not None and source.use_cache:
            return self.teacher_cache.lookup(inputs, embeddings)
        self.teacher.eval()  # guard against a caller's .train() on everything
        # Embeddings reach the losses in fp32 whatever the weights' precision (precision: irra_fp16).
        return float32_embeddings(teacher_embeddings(self.teacher, inputs, embeddings, inference_mode=not for_mimic))

    def teacher_tap_forward(self, name: str, teacher: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        device = next(teacher.parameters()).device
        return (teacher.clip.encode_image(inputs["pixel_values"].to(device)),
                teacher.clip.encode_text(inputs["input_ids"].to(device)))

    def student_outputs(self, model: nn.Module, inputs: dict[str, torch.Tensor], stage: Stage) -> Any:
        # Mimic taps may sit in either tower: then both run.
        embeddings = stage.embeddings | STUDENT_EMBEDDINGS if self.has_mimic else stage.embeddings
        return float32_embeddings(model(pixel_values=inputs["pixel_values"] if "student_image" in embeddings else None,
                                        input_ids=inputs["input_ids"] if "student_text" in embeddings else None,
                                        no_grad=stage.frozen_towers))

    def term_values(self, inputs: dict[str, torch.Tensor], outputs: Any, teacher_embeds: dict[str, torch.Tensor],
                    stage: Stage) -> dict[str, torch.Tensor]:
        pids = inputs.get("pids")
        plain = Features(student_image=outputs.get("image_embeds"), student_text=outputs.get("text_embeds"),
                         pids=pids, **teacher_embeds)
        # Terms that compare student and teacher directly read the projected student embeddings
        # when the widths differ (the projection trains with the student).
        projected = Features(student_image=outputs.get("image_embeds_proj", outputs.get("image_embeds")),
                             student_text=outputs.get("text_embeds_proj", outputs.get("text_embeds")),
                             pids=pids, **teacher_embeds)
        # Every term sees the global batch (every process's samples) and computes only this
        # process's rows of it; the gather's backward sums the gradient over processes, so N
        # processes optimise what one process on the concatenated batch does (distill/gather.py).
        if self.accelerator.num_processes > 1:
            plain_global = gather_features(plain)
            if projected.student_image is plain.student_image and projected.student_text is plain.student_text:
                projected_global = plain_global
            else:
                proj = gather_features(Features(student_image=projected.student_image,
                                                student_text=projected.student_text))
                projected_global = dataclasses.replace(plain_global, student_image=proj.student_image,
                                                       student_text=proj.student_text)
            plain, projected = plain_global, projected_global
        return {term.key: term(projected if term.spec.direct_compare else plain) for term in stage.terms}

    def evaluate_split(self, split: RetrievalSplit, prefix: str) -> dict[str, float]:
        """R@1/5/10, mAP and mINP of the student on a whole split (ranking needs the full gallery),
        plus the hybrid pairings of the stage the weights belong to."""
        if not isinstance(split, RetrievalSplit):
            raise TypeError(f"RetrievalTrainer.evaluate needs a RetrievalSplit, got {type(split).__name__}")
        model = self.accelerator.unwrap_model(self.model)
        common = dict(batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator,
                      accelerator=self.accelerator, num_workers=self.args.dataloader_num_workers,
                      progress=not self.args.disable_tqdm)
        metrics = {f"{prefix}_{k}": v for k, v in evaluate_retrieval(model, split.gallery, split.queries,
                                                                     **common).items()}
        # Hybrid pairings show whether the tower this stage trains has converged on its own.
        stage = self.plan.stage_done_at(self.state.global_step)
        for tower in stage.eval_hybrids if self.teacher is not None else []:
            image_model, text_model = (model, self.teacher) if tower == "image" else (self.teacher, model)
            hybrid = evaluate_retrieval(image_model, split.gallery, split.queries, text_model=text_model, **common)
            metrics.update({hybrid_key(tower, k, prefix=prefix): v for k, v in hybrid.items()})
        return metrics

    def saved_configs(self, model: nn.Module) -> dict[str, Any]:
        return {MODEL_CONFIG_NAME: model_config(model)}


def teacher_embeddings(
    teacher: RetrievalModel, inputs: dict[str, torch.Tensor], embeddings: frozenset[str], *, inference_mode: bool = True
) -> dict[str, torch.Tensor]:
    """A frozen teacher's embeddings named in ``embeddings`` (``teacher_image``, ``teacher_text``);
    a teacher tower whose embedding is not named does not run.

    No autograd: under ``torch.inference_mode()`` (no graph, no version counters), in whatever
    autocast the caller runs (the Trainer's mixed precision). The embeddings are then copied out
    of inference mode (a batch x dim copy) so that terms may save them for backward. With
    ``inference_mode=False`` it runs under ``torch.no_grad()`` instead, for mimic jobs whose
    hooks keep the teacher's intermediate features, which must stay ordinary tensors.
    """
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode() if inference_mode else torch.no_grad():
        if "teacher_image" in embeddings:
            out["teacher_image"] = teacher.clip.encode_image(inputs["pixel_values"])
        if "teacher_text" in embeddings:
            out["teacher_text"] = teacher.clip.encode_text(inputs["input_ids"])
    return {k: v.clone() for k, v in out.items()} if inference_mode else out

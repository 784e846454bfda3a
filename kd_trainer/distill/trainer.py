"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is a weighted sum of named terms.

One training step (see ``design/architecture.md``): the frozen teacher embeds the batch under
``torch.inference_mode()`` (only the towers some term reads), then the student embeds it, every
active term computes its value from those embeddings, and the weighted sum is the Trainer's loss.
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
over k*b): raise ``per_device_train_batch_size``, or use more processes, rather than
accumulating, when the batch matters. Across processes they *are* exact: their features are
gathered into the global batch (:mod:`kd_trainer.distill.gather`), so N processes of batch b
optimise what one process of batch N*b does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback

from kd_trainer.data.collator import collate_retrieval
from kd_trainer.data.pipeline import set_augmentation_epoch
from kd_trainer.distill.gather import gather_features
from kd_trainer.distill.running_means import RunningMeans
from kd_trainer.recipe.schedules import evaluate as schedule_value
from kd_trainer.distill.stages import (
    Stage,
    StagedOptimizer,
    StagedScheduler,
    StagePlan,
    StageScheduler,
    towers_of,
    trainable_names,
)
from kd_trainer.losses import Features, TermSpec, compute_term, get_term
from kd_trainer.models.checkpoint import MODEL_CONFIG_NAME
from kd_trainer.models.factory import RetrievalModel
from kd_trainer.recipe import LossConfig, StageConfig, TermConfig

STAGES_FILE = "stages.json"

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
    Give either ``terms`` (or a ``LossConfig``) for a plain run, or ``stages`` for a sequential
    method; the stage machinery is described in :mod:`kd_trainer.distill.stages`.
    """

    # compute_loss returns a micro-batch mean: let the Trainer divide by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: RetrievalModel,
        args: Any = None,
        *,
        terms: Sequence[TermConfig] | LossConfig | None = None,
        stages: Sequence[StageConfig] | None = None,
        teacher: RetrievalModel | None = None,
        mimic: Sequence[Any] = (),
        mimic_teachers: dict[str, RetrievalModel] | None = None,
        teacher_cache: Any = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        if (terms is None) == (stages is None):
            raise ValueError("give exactly one of `terms` (a single-stage run) or `stages`")
        if stages is not None:
            self.plan = StagePlan.from_configs(stages, has_teacher=teacher is not None)
        else:
            loss = terms if isinstance(terms, LossConfig) else LossConfig(terms=list(terms or []))
            self.plan = StagePlan.single(loss)
        self.stage_terms = {s.index: resolve_terms(s.loss.terms) for s in self.plan.stages}
        all_terms = [t for ts in self.stage_terms.values() for t in ts]
        needs_teacher = [t.key for t in all_terms if t.spec.needs_teacher]
        if needs_teacher and teacher is None:
            raise ValueError(f"loss terms {needs_teacher} need a teacher, but the recipe has no `teacher:`")
        self.stage_params = {s.index: frozenset(trainable_names(model, s.trainable)) for s in self.plan.stages}
        # Towers a stage trains nothing of run without autograd (RetrievalModel.forward(no_grad=...)).
        self.stage_frozen = {i: tuple(sorted({"image", "text"} - towers_of(p))) for i, p in self.stage_params.items()}
        self.mimic = self._mimic_engine(model, teacher, mimic, mimic_teachers or {}, kwargs.get("train_dataset"),
                                        data_collator or collate_retrieval)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not self.plan.is_single:
            callbacks.append(StageScheduler(self.plan))
        callbacks.append(_AugmentationEpoch(self))
        super().__init__(model=model, args=args, data_collator=data_collator or collate_retrieval,
                         callbacks=callbacks, **kwargs)
        if not self.plan.is_single and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError("multi-stage recipes need the staged optimizer, which DeepSpeed and FSDP replace with "
                             "their own; run each stage as its own recipe, chained with student.checkpoint")
        if self.args.dataloader_persistent_workers and set_augmentation_epoch(self.train_dataset, 0):
            raise ValueError("dataloader_persistent_workers keeps each worker's copy of the dataset from the first "
                             "epoch, so the seeded augmentation would repeat every epoch; leave it off")
        # No ``**kwargs`` in RetrievalModel.forward already implies this; say it, so no refactor flips it.
        self.model_accepts_loss_kwargs = False
        wants_teacher = needs_teacher or any(s.eval_hybrids for s in self.plan.stages)
        self.teacher = self._place_teacher(teacher) if teacher is not None and wants_teacher else None
        if self.mimic is not None:
            for t in self.mimic.teachers.values():
                self._place_teacher(t)
        # Teacher cache: embedding-level terms read it; a stage with any term that needs more
        # than final embeddings runs the online teacher instead (plan_teacher_source logs which).
        self.teacher_cache = teacher_cache.to(self.accelerator.device) if teacher_cache is not None else None
        from kd_trainer.distill.cache import plan_teacher_source

        self.teacher_plans = {s.index: plan_teacher_source(self.stage_terms[s.index], stage=s.name,
                                                           cache_available=teacher_cache is not None)
                              for s in self.plan.stages}
        self._term_means = RunningMeans()

    @property
    def active_terms(self) -> list[ActiveTerm]:
        """The terms of the stage the next training step belongs to."""
        return self.stage_terms[self.current_stage.index]

    @property
    def current_stage(self) -> Stage:
        return self.plan.stage_at(self.state.global_step)

    # --- stages: length, optimizer, schedule -----------------------------------------------------

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple:
        """Lay the stages out on the step axis once the epoch length is known; the run's length
        is their sum (a single-stage run keeps the Trainer's own length)."""
        epochs, per_epoch, examples, samples, total_bs, steps_in_epoch, max_steps = \
            super().set_initial_training_values(args, dataloader)
        total = self.plan.resolve(per_epoch, default_steps=max_steps)
        if total != max_steps:
            epochs = -(-total // per_epoch)
            samples = total * total_bs
        return epochs, per_epoch, examples, samples, total_bs, steps_in_epoch, total

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.plan.is_single or self.optimizer is not None:
            return super().create_optimizer(model)
        self.optimizer = StagedOptimizer(self._stage_optimizer, stage=self.current_stage.index)
        return self.optimizer

    def _stage_optimizer(self, index: int) -> torch.optim.Optimizer:
        """A fresh optimizer (the recipe's type and hyper-parameters) over one stage's parameters."""
        stage = self.plan.stages[index]
        chosen = self.stage_params[index]
        decay = set(self.get_decay_parameter_names(self.model))
        named = [(n, p) for n, p in self.model.named_parameters() if n in chosen]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        if stage.learning_rate is not None:
            kwargs = {**kwargs, "lr": stage.learning_rate}
        return cls([g for g in groups if g["params"]], **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        staged = optimizer if optimizer is not None else self.optimizer
        while staged is not None and not isinstance(staged, StagedOptimizer):
            staged = getattr(staged, "optimizer", None)
        if staged is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            from transformers import get_scheduler

            def build(index: int, inner: torch.optim.Optimizer) -> Any:
                n = self.plan.stages[index].num_steps
                return get_scheduler(self.args.lr_scheduler_type, optimizer=inner,
                                     num_warmup_steps=self.args.get_warmup_steps(n), num_training_steps=n,
                                     scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)

            self.lr_scheduler = StagedScheduler(staged, build)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """Clip only what this stage trains: parameters frozen by name inside a trained tower still
        get autograd gradients, which are dropped here so they neither count nor move."""
        if not self.plan.is_single:
            chosen = self.stage_params[self.current_stage.index]
            for n, p in self.model.named_parameters():
                if n not in chosen:
                    p.grad = None
        return super()._clip_grad_norm(model)

    # --- mimic jobs (UP/EOD feature distillation, any named module) ----------------------------

    @staticmethod
    def _mimic_engine(model: RetrievalModel, teacher: RetrievalModel | None, jobs: Sequence[Any],
                      named: dict[str, RetrievalModel], train_dataset: Any, collate: Any) -> Any:
        """The jobs' engine, with its adapters built from one real batch and attached to the student
        (``mimic_head``) so they train, checkpoint and resume with it; None without jobs."""
        if not jobs:
            return None
        from kd_trainer.distill.mimic import MimicEngine

        teachers = {**({"teacher": teacher} if teacher is not None else {}), **named}
        engine = MimicEngine(model, teachers, list(jobs))
        if train_dataset is None:
            raise ValueError("mimic jobs need a train_dataset to size their adapters")
        batch = collate([train_dataset[i] for i in range(min(2, len(train_dataset)))])
        engine.build_adapters(student_forward=lambda m: m(pixel_values=batch["pixel_values"],
                                                          input_ids=batch["input_ids"]),
                              teacher_forward=lambda n, t: _both_towers(t, batch))
        model.mimic_head = engine.head
        return engine

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

    def _teacher_features(
        self, inputs: dict[str, torch.Tensor], towers: frozenset[str], *, taps: bool = False
    ) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return {}
        self.teacher.eval()  # guard against a caller's .train() on everything
        return teacher_embeddings(self.teacher, inputs, towers, inference_mode=not taps)

    # --- loss ----------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        stage = self.current_stage
        active = self.stage_terms[stage.index]
        towers = frozenset().union(*(t.spec.towers(t.config.side) for t in active))
        capture = self.mimic.capture() if self.mimic is not None else contextlib.nullcontext()
        # A mimic job on the main teacher reads its hooked layers, which one live forward of both
        # of its towers (inside the capture, and never the cache) provides for the terms as well.
        mimic_main = self.mimic is not None and any(t is self.teacher for t in self.mimic.teachers.values())
        with capture as cap:
            if self.mimic is not None:  # hooked modules may sit in either tower: run both
                towers = towers | {"student_image", "student_text"}
            if mimic_main:
                towers = towers | {"teacher_image", "teacher_text"}
            # Teachers run before the student: their activations are freed before the student's
            # are made and kept for backward, which bench/bench_kd.py measures as the cheaper order.
            if self.teacher_cache is not None and self.teacher_plans[stage.index].use_cache and not mimic_main:
                teacher = self.teacher_cache.lookup(inputs, towers)
            else:
                teacher = self._teacher_features(inputs, towers, taps=mimic_main)
            if self.mimic is not None:  # the other named teachers; the main one has just run
                self.mimic.run_teachers(forward=lambda n, t: None if t is self.teacher else _both_towers(t, inputs))
            outputs = model(
                pixel_values=inputs["pixel_values"] if "student_image" in towers else None,
                input_ids=inputs["input_ids"] if "student_text" in towers else None,
                no_grad=self.stage_frozen[stage.index],
            )
            mimic = None
            if self.mimic is not None:
                mimic = self.mimic.losses(cap.student, cap.teachers, step=self.state.global_step)
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
        # Batch-dependent terms see the global batch (every process's samples); per-sample terms
        # keep the local mean, which DDP's gradient averaging turns into the global mean.
        if self.accelerator.num_processes > 1 and any(t.spec.batch_dependent for t in active):
            plain_global = gather_features(plain)
            proj = gather_features(Features(student_image=projected.student_image,
                                            student_text=projected.student_text))
            projected_global = Features(**{**vars(plain_global), "student_image": proj.student_image,
                                           "student_text": proj.student_text})
        else:
            plain_global, projected_global = plain, projected
        clock = self.plan.clock(self.state.global_step)
        alpha = schedule_value(stage.loss.alpha, clock) if stage.loss.alpha is not None else None
        total = None
        values: dict[str, torch.Tensor] = {}
        for term in active:
            cfg = term.config
            if term.spec.batch_dependent:
                feats = projected_global if term.spec.direct_compare else plain_global
            else:
                feats = projected if term.spec.direct_compare else plain
            value = compute_term(cfg.name, feats, temperature=cfg.temperature, side=cfg.side, **cfg.kwargs)
            coef = schedule_value(cfg.weight, clock)
            if alpha is not None:
                coef *= alpha if (cfg.group or term.spec.kind) == "distill" else 1.0 - alpha
            weighted = coef * value
            total = weighted if total is None else total + weighted
            values[term.key] = value.detach()
            values[f"{term.key}_weighted"] = weighted.detach()
        if mimic is not None:  # UP's mimic: its own weights and warm-up, added to the terms' total
            total = mimic["mimic/total"] if total is None else total + mimic["mimic/total"]
        if model.training:
            prefix = "" if self.plan.is_single else f"{stage.name}/"
            logged = {f"{prefix}loss_{k}": v for k, v in values.items()}
            if alpha is not None:
                logged[f"{prefix}alpha"] = torch.tensor(alpha, device=total.device)
            self._term_means.add({**logged, **(mimic or {})})  # mimic/<job>/<teacher>/<loss>, run-wide
        assert total is not None
        return (total, outputs) if return_outputs else total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the per-term means since the last log to a training log (averaged over processes).

        Term keys are ``loss_<term>`` and ``loss_<term>_weighted``; in a staged run they carry
        the stage's name (``image/loss_motis[image]``) and the log says which ``stage`` (1-based)
        the step belongs to. A window that spans a stage boundary averages each key over its own
        micro-batches only.
        """
        if "loss" in logs and self._term_means:
            logs.update(self._term_means.pop(self.accelerator))
            if not self.plan.is_single:
                logs["stage"] = self.plan.stage_done_at(self.state.global_step).index + 1
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
        common = dict(batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator,
                      accelerator=self.accelerator, num_workers=self.args.dataloader_num_workers,
                      progress=not self.args.disable_tqdm)
        metrics = {f"{metric_key_prefix}_{k}": v
                   for k, v in evaluate_retrieval(model, split.gallery, split.queries, **common).items()}
        # Hybrid pairings show whether the tower this stage trains has converged on its own.
        stage = self.plan.stage_done_at(self.state.global_step)
        for tower in stage.eval_hybrids if self.teacher is not None else []:
            image_model, text_model = (model, self.teacher) if tower == "image" else (self.teacher, model)
            hybrid = evaluate_retrieval(image_model, split.gallery, split.queries, text_model=text_model, **common)
            metrics.update({f"{metric_key_prefix}_hybrid_{tower}_{k}": v for k, v in hybrid.items()})
        if not self.plan.is_single:
            metrics[f"{metric_key_prefix}_stage"] = stage.index + 1
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
            if self.plan.steps_per_epoch is not None:  # laid out by a train() call
                with open(os.path.join(output_dir, STAGES_FILE), "w") as f:
                    json.dump(self.plan.to_json(), f, indent=2)


def teacher_embeddings(
    teacher: RetrievalModel, inputs: dict[str, torch.Tensor], towers: frozenset[str], *, inference_mode: bool = True
) -> dict[str, torch.Tensor]:
    """A frozen teacher's embeddings (``teacher_image``, ``teacher_text``) for the towers in ``towers``.

    No autograd: under ``torch.inference_mode()`` (no graph, no version counters), in whatever
    autocast the caller runs (the Trainer's mixed precision). The embeddings are then copied out
    of inference mode (a batch x dim copy) so that terms may save them for backward. With
    ``inference_mode=False`` it runs under ``torch.no_grad()`` instead, for mimic jobs whose
    hooks keep the teacher's intermediate features, which must stay ordinary tensors.
    """
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode() if inference_mode else torch.no_grad():
        if "teacher_image" in towers:
            out["teacher_image"] = teacher.clip.encode_image(inputs["pixel_values"])
        if "teacher_text" in towers:
            out["teacher_text"] = teacher.clip.encode_text(inputs["input_ids"])
    return {k: v.clone() for k, v in out.items()} if inference_mode else out


def _both_towers(model: RetrievalModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a CLIP's two towers (so hooks in either capture); a teacher's call, under the engine's no_grad."""
    device = next(model.parameters()).device
    return (model.clip.encode_image(batch["pixel_values"].to(device)),
            model.clip.encode_text(batch["input_ids"].to(device)))


class _AugmentationEpoch(TrainerCallback):
    """Tells a seeded train split which epoch begins, before the epoch's DataLoader iterator (and
    its worker processes) exists; counted from the global step, so a resumed run agrees."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        per_epoch = self.trainer.plan.steps_per_epoch or 1
        set_augmentation_epoch(self.trainer.train_dataset, state.global_step // per_epoch)


def model_config(model: RetrievalModel) -> dict[str, Any]:
    """What :func:`kd_trainer.models.checkpoint.load_model` needs to rebuild ``model``."""
    from kd_trainer.models.factory import get_architecture

    proj = model.image_proj.out_features if model.image_proj is not None else None
    conv = model.clip.visual.conv1
    # An IRRA teacher may stride its patches by less than their size; load_model rebuilds that.
    stride = {"stride_size": int(conv.stride[0])} if tuple(conv.stride) != tuple(conv.kernel_size) else {}
    return {
        **stride,
        "arch": get_architecture(model.arch) if model.arch is not None else None,
        "arch_name": model.arch if isinstance(model.arch, str) else None,
        "image_size": list(model.image_size),
        "context_length": model.context_length,
        "projection_dim": proj,
    }

"""``DistillationTrainer``: the one trainer core every task trainer derives from.

A ``transformers.Trainer`` whose ``model`` is the student. The core owns everything that is
the same whatever the task:

* the teachers: frozen, in eval mode, placed on this process's device, never wrapped for
  gradient sync nor saved (under DeepSpeed or FSDP they go through
  ``accelerator.prepare_model(..., evaluation_mode=True)`` so they are sharded, as TRL does);
* the resolved :class:`~kd_trainer.distill.plan.RunPlan`: stages, their fresh optimizer and
  LR schedule, their weights and alpha mix;
* the UP/EOD mimic engine, its adapters (``model.mimic_head``, trained and saved with the
  student, locked once the optimizer exists);
* the loss: teacher outputs first, then the student, then the task's raw term values, weighted
  by the plan; every term logged by name (``loss_<term>``, ``loss_<term>_weighted``,
  ``<stage>/...`` in staged runs, ``mimic/<job>/<teacher>/<loss>``);
* evaluation bookkeeping and what is saved beside the weights.

A task trainer supplies only its forwards, its raw loss values and its evaluation:
:meth:`teacher_outputs`, :meth:`student_outputs`, :meth:`teacher_tap_forward`,
:meth:`term_values`, :meth:`evaluate_split` and :meth:`saved_configs`.

Gradient accumulation: ``compute_loss`` returns a micro-batch mean, so
``loss_is_scaled_for_ga = False`` and no loss kwargs reach the model: the Trainer divides each
micro-batch loss by the number of micro-batches in the group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, default_data_collator, get_scheduler

from kd_trainer.data.pipeline import set_augmentation_epoch
from kd_trainer.distill.checkpoints import CheckpointSaveError, checkpoint_problem, disk_full, raise_if_not_resumable
from kd_trainer.distill.epochs import DatasetEpochCallback
from kd_trainer.distill.frozen_tower import FrozenGradients, decays_frozen, optimised_params
from kd_trainer.distill.mimic import MimicEngine
from kd_trainer.distill.optim import create_optimizer as original_optimizer
from kd_trainer.distill.optim import create_scheduler as original_scheduler
from kd_trainer.distill.plan import RunPlan, Stage
from kd_trainer.distill.running_means import RunningMeans
from kd_trainer.distill.stages import StageLRScheduler, StageOptimizer, StageSwitcher, find_wrapped
from kd_trainer.log_keys import MIMIC_TOTAL_KEY, stage_key, term_key
from kd_trainer.recipe import RecipeError

STAGES_FILE = "stages.json"
ADAPTERS_FILE = "mimic_adapters.json"
# Written last into a checkpoint folder, once every process has saved its part: a folder without
# it is a save that was interrupted, and `resume_from_checkpoint: true` never picks it.
COMPLETE_MARKER = "checkpoint_complete"


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the terms and the step."""

logger = logging.getLogger("kd_trainer")


class DistillationTrainer(Trainer):
    """The trainer core; see the module docstring. Subclasses implement the task hooks."""

    loss_is_scaled_for_ga = False  # compute_loss returns a micro-batch mean
    # Mimic teachers whose forward teacher_outputs() already runs inside the step's capture.
    live_teachers: frozenset[str] = frozenset()

    def __init__(
        self,
        model: nn.Module,
        args: Any = None,
        *,
        plan: RunPlan | None = None,
        teachers: Mapping[str, nn.Module] | None = None,
        mimic_jobs: Sequence[Any] = (),
        task_loss: bool = True,
        callbacks: Sequence[TrainerCallback] | None = None,
        max_nonfinite_skips: int = 0,
        **kwargs: Any,
    ) -> None:
        plan = plan if plan is not None else RunPlan.single(None)  # a task loss (and mimic jobs) only
        if not (plan.terms or mimic_jobs or task_loss):
            raise ValueError("nothing to train: no loss term, no mimic job and task_loss is false")
        self.plan = plan
        self.task_loss = task_loss  # the task's own loss (cross-entropy, the detector's losses) is on
        # Non-finite losses stop the run (0), or up to this many micro-batches are skipped first.
        self.max_nonfinite_skips = max_nonfinite_skips
        self.nonfinite_skipped = 0
        self.teachers = {name: t for name, t in (teachers or {}).items() if t is not None}
        collator = kwargs.get("data_collator") or default_data_collator
        self.has_mimic = bool(mimic_jobs)  # the task's forwards read it while the engine is built
        self.mimic = self._mimic_engine(model, mimic_jobs, kwargs.get("train_dataset"), collator)
        plan.bind(model, always=("mimic_head.",))  # after the adapters exist: they train in every stage
        callbacks = list(callbacks or [])
        if plan.uses_stage_optimizer:
            callbacks.append(StageSwitcher(plan))
        callbacks.append(DatasetEpochCallback())  # seeded augmentation and cache draws follow the epoch
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        # The student's forward takes no **kwargs already; say it, so no refactor flips it.
        self.model_accepts_loss_kwargs = False
        if plan.uses_stage_optimizer and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError("multi-stage recipes need the staged optimizer, which DeepSpeed and FSDP replace with "
                             "their own; run each stage as its own recipe, chained with student.checkpoint")
        if self.args.dataloader_persistent_workers and set_augmentation_epoch(self.train_dataset, 0):
            raise ValueError("dataloader_persistent_workers keeps each worker's copy of the dataset from the first "
                             "epoch, so the seeded augmentation would repeat every epoch; leave it off")
        self.teachers = {name: self._place_teacher(t) for name, t in self.teachers.items()}
        if self.mimic is not None:
            self.mimic.teachers.update({n: t for n, t in self.teachers.items() if n in self.mimic.teachers})
        self._logged = RunningMeans()
        self.selected: dict[str, Any] | None = None  # the kept evaluation (plan.select), and its weights
        self._selected_weights: dict[str, torch.Tensor] | None = None
        # The newest complete checkpoint this run saved or resumed from: what a stop can point to.
        self.last_checkpoint: str | None = None

    # --- the task's hooks ------------------------------------------------------------------------

    def teacher_outputs(self, inputs: dict[str, torch.Tensor], stage: Stage) -> dict[str, torch.Tensor]:
        """What the stage's terms read from the teacher(s); runs before the student."""
        return {}

    def teacher_tap_forward(self, name: str, teacher: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        """One forward of a mimic teacher, in eval mode, so its taps capture: by default an image
        model's ``teacher(pixel_values=...)``."""
        return teacher(pixel_values=inputs["pixel_values"].to(next(teacher.parameters()).device))

    def student_outputs(self, model: nn.Module, inputs: dict[str, torch.Tensor], stage: Stage) -> Any:
        raise NotImplementedError

    def term_values(self, inputs: dict[str, torch.Tensor], outputs: Any, teacher_embeds: dict[str, torch.Tensor],
                    stage: Stage) -> dict[str, torch.Tensor]:
        """Unweighted loss values by term key; the plan weighs them (keys outside it weigh 1).
        ``teacher_embeds``: what :meth:`teacher_outputs` returned (teacher embeddings by name)."""
        raise NotImplementedError

    def evaluate_split(self, split: Any, prefix: str) -> dict[str, float]:
        raise NotImplementedError

    def saved_configs(self, model: nn.Module) -> dict[str, Any]:
        """JSON files saved beside the weights (file name -> content): what rebuilds the model."""
        return {}

    # --- plan and stages -------------------------------------------------------------------------

    @property
    def current_stage(self) -> Stage:
        """The stage the next training step belongs to."""
        return self.plan.stage_at(self.state.global_step)

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
        if self.optimizer is None and self.plan.uses_stage_optimizer:
            # optim.frozen_tower: optimise_by_decay keeps the frozen tensors' zeroed gradients (the original).
            gradients = FrozenGradients(self.model, self.plan.stages) \
                if any(decays_frozen(s) for s in self.plan.stages) else None
            self.optimizer = StageOptimizer(self._stage_optimizer, stage=self.current_stage.index,
                                            gradients=gradients)
        optimizer = super().create_optimizer(model) if self.optimizer is None else self.optimizer
        if self.mimic is not None:
            self.mimic.head.lock()  # an adapter created after this would never be optimised
        return optimizer

    def _stage_optimizer(self, index: int) -> torch.optim.Optimizer:
        """A fresh optimizer (the recipe's type and hyper-parameters) over one stage's parameters
        (every student tensor under ``optim.frozen_tower: optimise_by_decay``)."""
        stage = self.plan.stages[index]
        decay = set(self.get_decay_parameter_names(self.model))
        named = optimised_params(stage, self.model.named_parameters())
        if stage.optim is not None:  # the seed code's Adam and parameter groups
            return original_optimizer(named, stage.optim)
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        if stage.learning_rate is not None:
            kwargs = {**kwargs, "lr": stage.learning_rate}
        return cls([g for g in groups if g["params"]], **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        staged = find_wrapped(optimizer if optimizer is not None else self.optimizer, StageOptimizer)
        if staged is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            def build(index: int, inner: torch.optim.Optimizer) -> Any:
                stage, per = self.plan.stages[index], self.plan.steps_per_epoch or 1
                n = stage.num_steps
                if stage.optim is not None:  # per-epoch warm-up + cosine over the stage's own epochs
                    return original_scheduler(inner, stage.optim, steps_per_epoch=per, num_epochs=-(-n // per))
                return get_scheduler(self.args.lr_scheduler_type, optimizer=inner,
                                     num_warmup_steps=self.args.get_warmup_steps(n), num_training_steps=n,
                                     scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)

            self.lr_scheduler = StageLRScheduler(staged, build)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """Clip only what this stage trains: parameters frozen by name inside a trained tower still
        get autograd gradients, which are dropped here so they neither count nor move."""
        if self.plan.uses_stage_optimizer:
            chosen = self.current_stage.params
            for n, p in self.model.named_parameters():
                if n not in chosen:
                    p.grad = None
        return super()._clip_grad_norm(model)

    # --- teachers and mimic ----------------------------------------------------------------------

    def _place_teacher(self, teacher: nn.Module) -> nn.Module:
        """Freeze a teacher and put it where this process computes.

        Not ``accelerator.prepare``: that would register it for ``save_state`` and, under DDP,
        wrap it for a gradient sync it must never join. Mixed precision still reaches it: its
        forward runs inside ``compute_loss``, under the Trainer's autocast. DeepSpeed and FSDP
        shard models themselves, so there it is prepared in evaluation mode (untested here: no
        such hardware).
        """
        teacher.requires_grad_(False)
        teacher.eval()
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return self.accelerator.prepare_model(teacher, evaluation_mode=True)
        return teacher.to(self.accelerator.device)

    def _mimic_engine(self, model: nn.Module, jobs: Sequence[Any], train_dataset: Any, collate: Any) -> Any:
        """The jobs' engine, its adapters sized from one real batch and attached to the student
        (``mimic_head``) so they train, checkpoint and resume with it; None without jobs."""
        if not jobs:
            return None
        if train_dataset is None:
            raise ValueError("mimic jobs need a train_dataset to size their adapters")
        batch = collate([train_dataset[i] for i in range(min(2, len(train_dataset)))])
        try:  # the taps run once here, on a real batch: a bad name, key or width is the recipe's, named now
            engine = MimicEngine(model, self.teachers, list(jobs))
            engine.build_adapters(student_forward=lambda m: self.student_outputs(m, batch, self.plan.stages[0]),
                                  teacher_forward=lambda n, t: self.teacher_tap_forward(n, t, batch))
        except ValueError as e:
            if type(e) is not ValueError:  # a subclass (a checkpoint or data error) says what it is itself
                raise
            raise RecipeError(f"mimic: {e}") from None
        model.mimic_head = engine.head
        return engine

    @contextlib.contextmanager
    def _taps(self) -> Iterator[Any]:
        """The mimic engine's capture for one step (None without mimic jobs)."""
        if self.mimic is None:
            yield None
            return
        with self.mimic.capture() as captured:
            yield captured

    # --- loss ------------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        stage = self.current_stage
        mimic_losses: dict[str, torch.Tensor] = {}
        with self._taps() as tapped:
            # Teachers before the student: their activations are freed before the student's are
            # made and kept for backward (bench/bench_kd.py measures this order as the cheaper one).
            teacher_embeds = self.teacher_outputs(inputs, stage)
            if tapped is not None:
                self.mimic.run_teachers(forward=lambda name, t: None if name in self.live_teachers
                                        else self.teacher_tap_forward(name, t, inputs))
            outputs = self.student_outputs(model, inputs, stage)
            if tapped is not None:
                mimic_losses = self.mimic.losses(tapped.student, tapped.teachers, step=self.state.global_step)
        values = self.term_values(inputs, outputs, teacher_embeds, stage)
        total = self._weighted_total(values, mimic_losses, stage, record=model.training)
        if model.training and not torch.isfinite(total.detach()):
            total = self._non_finite(total, {**values, **mimic_losses})
        return (total, outputs) if return_outputs else total

    def _non_finite(self, total: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stop at a non-finite loss, saying which checkpoint (if any) holds weights from before it,
        or skip the micro-batch while ``max_nonfinite_skips`` allows: a zero loss, so no gradient."""
        bad = [k for k, v in values.items() if not torch.isfinite(v.detach()).all()]
        where = f"at step {self.state.global_step} (stage {self.current_stage.name!r})"
        if self.nonfinite_skipped < self.max_nonfinite_skips:
            self.nonfinite_skipped += 1
            logger.warning("non-finite loss %s in %s: micro-batch skipped (%d of at most %d)", where, bad,
                           self.nonfinite_skipped, self.max_nonfinite_skips)
            return total.new_zeros(()).requires_grad_()
        if self.last_checkpoint is not None:
            kept = (f"its newest complete checkpoint, {self.last_checkpoint}, holds the weights saved before the loss "
                    "became non-finite (resume from it with training.resume_from_checkpoint)")
        else:
            kept = "no checkpoint of this run was saved before it, so no trained weights were kept"
        raise NonFiniteLossError(
            f"the loss became non-finite {where}: terms {bad or ['(the weighted total)']} are NaN or infinite. "
            f"The run stopped; {kept}. Lower the learning rate, check the terms' temperatures, or let the recipe "
            "skip up to N such micro-batches (nonfinite_skips: N)")

    def _weighted_total(self, values: dict[str, torch.Tensor], mimic_losses: dict[str, torch.Tensor], stage: Stage,
                        *, record: bool) -> torch.Tensor:
        coefs, alpha = stage.coefficients(self.plan.clock(self.state.global_step))
        weighted = {key: coefs.get(key, 1.0) * v for key, v in values.items()}
        parts = list(weighted.values()) + ([mimic_losses[MIMIC_TOTAL_KEY]] if mimic_losses else [])
        if not parts:
            raise ValueError(f"stage {stage.name!r} has no loss: no term, no task loss and no mimic job")
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        if record:
            name = None if self.plan.is_single else stage.name
            logged = {term_key(k, stage=name): v for k, v in values.items()}
            logged.update({term_key(k, weighted=True, stage=name): v for k, v in weighted.items()})
            if alpha is not None:
                logged[stage_key("alpha", name)] = torch.tensor(alpha, device=total.device)
            self._logged.add({**logged, **mimic_losses})
        return total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add every term's mean since the last log to a training log (averaged over processes);
        in a staged run the log also says which ``stage`` (1-based) its last step belongs to."""
        if "loss" in logs and self._logged:
            logs.update(self._logged.pop(self.accelerator))
            if not self.plan.is_single:
                logs["stage"] = self.plan.stage_done_at(self.state.global_step).index + 1
        super().log(logs, start_time)

    # --- evaluation and saving -------------------------------------------------------------------

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """The task's whole-split evaluation (not the Trainer's per-batch prediction loop),
        logged as ``<prefix>_<metric>`` so ``metric_for_best_model`` can select on it."""
        self._memory_tracker.start()
        split = eval_dataset if eval_dataset is not None else self.eval_dataset
        metrics = self.evaluate_split(split, metric_key_prefix)
        if metric_key_prefix == "eval":
            self._keep_if_best(metrics, getattr(split, "name", "eval"))
        if not self.plan.is_single:
            metrics[f"{metric_key_prefix}_stage"] = self.plan.stage_done_at(self.state.global_step).index + 1
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def resume_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint folder a resume starts from, checked: ``True`` is the newest complete one
        whose files all read; a path with an unreadable file or another architecture's weights is
        refused (:class:`~kd_trainer.models.loading.CheckpointError`, one line naming it)."""
        if not resume_from_checkpoint:
            return None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        path = str(resume_from_checkpoint)
        if path != self.last_checkpoint:  # checked once, however often it is asked
            model = self.accelerator.unwrap_model(self.model)
            raise_if_not_resumable(path, model, self.saved_configs(model))
            self.last_checkpoint = path
        return path

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """Resume from a checked checkpoint (see :meth:`resume_checkpoint`; ``True``: the newest intact one)."""
        return super().train(resume_from_checkpoint=self.resume_checkpoint(resume_from_checkpoint), **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        with self.disk_full_is_one_line(folder):
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every process's RNG state is on disk
            if self.args.should_save:
                with open(os.path.join(folder, COMPLETE_MARKER), "w") as f:
                    f.write(f"{self.state.global_step}\n")
        self.last_checkpoint = folder

    @contextlib.contextmanager
    def disk_full_is_one_line(self, folder: str) -> Iterator[None]:
        """A write into ``folder`` that fails on a full disk raises :class:`CheckpointSaveError`,
        saying which complete checkpoint is kept and how to go on; other failures pass unchanged."""
        try:
            yield
        except Exception as e:
            where = folder if os.path.isdir(folder) else self.args.output_dir
            if not disk_full(e, where):
                raise
            reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
            kept = (f"{self.last_checkpoint} is the newest complete checkpoint" if self.last_checkpoint is not None
                    else "no checkpoint of this run was complete yet")
            raise CheckpointSaveError(
                f"the disk is full: writing {folder} failed ({reason}). Nothing complete was lost: {kept}. Free some "
                f"space (an incomplete checkpoint-N folder can be deleted) and run again with "
                f"training.resume_from_checkpoint=true") from None

    def _keep_if_best(self, metrics: dict[str, float], split: str) -> None:
        """With ``plan.select``: remember the weights of the best evaluation of the last stage (the
        original keeps best.pth of its last stage; earlier stages always hand on their final weights)."""
        select, step = self.plan.select, self.state.global_step
        last = self.plan.stages[-1]
        value = metrics.get(f"eval_{select.metric}") if select is not None else None
        if value is None or self.plan.stage_done_at(step) is not last or step <= last.start_step:
            return
        if self.selected is None or value > self.selected["value"]:
            model = self.accelerator.unwrap_model(self.model)
            self._selected_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            per_epoch = self.plan.steps_per_epoch or 1
            self.selected = {"metric": select.metric, "split": split, "value": value, "step": step,
                             "epoch": round((step - last.start_step) / per_epoch, 3), "stage": last.name}

    def restore_selected(self) -> dict[str, Any] | None:
        """Put the kept evaluation's weights back into the student (before it is saved and tested);
        returns what was kept, or None when nothing is selected."""
        if self._selected_weights is None:
            return None
        self.accelerator.unwrap_model(self.model).load_state_dict(self._selected_weights)
        logger.info("keeping the student of stage %r epoch %s: best %s %.2f on %s", self.selected["stage"],
                    self.selected["epoch"], self.selected["metric"], self.selected["value"], self.selected["split"])
        return self.selected

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The weights (adapters included, for resuming), plus what rebuilds the model without the
        recipe, the stage layout, and which keys are training-only adapters."""
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        files = dict(self.saved_configs(self.accelerator.unwrap_model(self.model)))
        if self.plan.steps_per_epoch is not None:  # laid out by a train() call
            files[STAGES_FILE] = {**self.plan.to_json(), **({"selected": self.selected} if self.selected else {})}
        if self.mimic is not None:
            files[ADAPTERS_FILE] = {"training_only": self.mimic.head.training_only_keys("mimic_head.")}
        for name, content in files.items():
            with open(os.path.join(output_dir, name), "w") as f:
                json.dump(content, f, indent=2)


def checkpoint_folders(output_dir: str | os.PathLike) -> list[str]:
    """The names of the ``checkpoint-N`` folders in ``output_dir``, oldest step first (none when it is
    not a folder)."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        step = name.removeprefix("checkpoint-")
        if name.startswith("checkpoint-") and step.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(step), name))
    return [name for _, name in sorted(found)]


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest ``checkpoint-N`` folder in ``output_dir`` whose save finished (it holds
    :data:`COMPLETE_MARKER`); a folder left by a save that was killed is skipped, with a warning."""
    for name in reversed(checkpoint_folders(output_dir)):
        path = os.path.join(output_dir, name)
        if not os.path.isfile(os.path.join(path, COMPLETE_MARKER)):
            logger.warning("skipping %s: its save did not finish (no %s); resuming from an earlier checkpoint",
                           path, COMPLETE_MARKER)
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("%s; resuming from an earlier checkpoint", problem)
    raise RecipeError(f"training.resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-N folder "
                            "(a run saves one every save_steps / epoch); start without resuming, or give a path")

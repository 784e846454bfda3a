"""The original run's optimiser and learning-rate schedule, built from an ``optim:`` block.

What the numbers mean is documented with the schema (:mod:`kd_trainer.recipe.optim`); this module
turns them into torch objects:

- :func:`param_groups` sorts parameters by name into the original's groups (base, bias, head,
  head bias), each with its LR, its weight decay and its parameter names;
- :func:`create_optimizer` builds Adam (coupled L2 decay, the original) or AdamW over them;
- :func:`original_lr_factor` is the original's per-epoch LR factor, and :func:`create_scheduler`
  a ``LambdaLR`` stepped once per *optimizer step* (as ``transformers.Trainer`` steps it) whose
  factor changes only when an epoch begins.

Why a per-step scheduler with a per-epoch factor, rather than stepping once per epoch as the
original does: the Trainer steps its scheduler after every optimizer step, saves it in every
checkpoint, and restores it on resume. The factor is a pure function of the scheduler's own step
count ``k`` (``f(floor(k / steps_per_epoch))``), so a resumed schedule continues from the restored
count exactly, even mid-epoch, and a stage's scheduler counts its own steps from 0, i.e. stage-local
epochs. The original builds its scheduler (factor ``f(0)``), trains epoch 0, then calls
``scheduler.step()`` at the end of every epoch, so during epoch ``e`` its factor is ``f(e)``: the
same LR at every optimizer step as here.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from kd_trainer.recipe.optim import OptimSettings

# Group kinds, in the order the groups are listed.
KINDS = ("base", "bias", "head", "head_bias")


def param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    lr: float,
    weight_decay: float,
    bias_lr_factor: float = 2.0,
    head_lr_factor: float = 5.0,
    head_keywords: Sequence[str] = ("cross", "classifier", "mlm_head"),
    bias_weight_decay: float = 0.0,
    heads_before_bias: Sequence[str] = ("cross",),
) -> list[dict[str, Any]]:
    """The original's parameter groups (IRRA ``solver/build.py``), one group per kind.

    Rules, by substring of the parameter name, applied as the original applies them:

    - every tensor: LR ``lr``, weight decay ``weight_decay`` (LayerNorm gains included);
    - a name containing ``bias``: LR ``lr * bias_lr_factor``, weight decay ``bias_weight_decay``;
    - a name containing a head keyword: LR ``lr * head_lr_factor``. The original tests ``cross``
      before ``bias`` and ``classifier``/``mlm_head`` after it, each test overwriting the LR, so a
      bias of a head listed in ``heads_before_bias`` keeps the bias LR, a bias of any other head
      takes the head LR; its weight decay is the bias one either way.

    Only parameters with ``requires_grad`` are grouped (the original skips the others). The
    original gives every tensor a group of its own; Adam is elementwise, so one group per
    (LR, weight decay) pair optimises identically. Each group carries ``param_names`` (torch's own
    key for names, saved in the optimizer's state dict) and ``kind`` (one of :data:`KINDS`).
    Empty groups are left out.
    """
    unknown = sorted(set(heads_before_bias) - set(head_keywords))
    if unknown:
        raise ValueError(f"heads_before_bias {unknown} are not head keywords {list(head_keywords)}")
    lrs = {"base": lr, "bias": lr * bias_lr_factor, "head": lr * head_lr_factor, "head_bias": lr * head_lr_factor}
    decays = {"base": weight_decay, "bias": bias_weight_decay, "head": weight_decay, "head_bias": bias_weight_decay}
    members: dict[str, list[tuple[str, torch.nn.Parameter]]] = {k: [] for k in KINDS}
    seen: set[int] = set()
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if id(param) in seen:
            raise ValueError(f"parameter {name!r} is listed twice (shared weights?); give each tensor once")
        seen.add(id(param))
        heads = [k for k in head_keywords if k in name]
        if "bias" in name:
            kind = "head_bias" if any(k not in heads_before_bias for k in heads) else "bias"
        else:
            kind = "head" if heads else "base"
        members[kind].append((name, param))
    if not seen:
        raise ValueError("no parameter requires a gradient: the optimiser would have nothing to train")
    return [{"params": [p for _, p in members[k]], "param_names": [n for n, _ in members[k]], "kind": k,
             "lr": lrs[k], "weight_decay": decays[k]} for k in KINDS if members[k]]


def settings_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                    settings: OptimSettings) -> list[dict[str, Any]]:
    """:func:`param_groups` with the numbers of an ``optim:`` block."""
    return param_groups(named_params, lr=settings.lr, weight_decay=settings.weight_decay,
                        bias_lr_factor=settings.bias_lr_factor, head_lr_factor=settings.head_lr_factor,
                        head_keywords=settings.head_keywords, bias_weight_decay=settings.bias_weight_decay,
                        heads_before_bias=settings.heads_before_bias)


def create_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                     settings: OptimSettings) -> torch.optim.Optimizer:
    """The optimiser of an ``optim:`` block over ``named_params`` (pass a stage's optimised tensors:
    :func:`kd_trainer.distill.frozen_tower.optimised_params`).

    ``adam`` is ``torch.optim.Adam``, whose ``weight_decay`` adds ``wd * p`` to the gradient before
    the moments (coupled L2, the original); ``adamw`` is ``torch.optim.AdamW`` (decoupled decay).
    """
    groups = settings_groups(named_params, settings)
    cls = torch.optim.Adam if settings.type == "adam" else torch.optim.AdamW
    return cls(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)


def original_lr_factor(epoch_index: float, num_epochs: int, warmup_epochs: int = 5,
                       warmup_factor: float = 0.1) -> float:
    """The original's LR factor during epoch ``epoch_index`` (0-based) of a stage of ``num_epochs``.

    ``e < w``: ``warmup_factor * (1 - e/w) + e/w``; then ``0.5 * (1 + cos(pi * (e - w) / (N - w)))``,
    reaching 0 at ``e = N`` and staying there (the value after the last epoch). IRRA's
    ``LRSchedulerWithWarmup`` with ``mode='cosine'``, ``target_lr=0``, ``warmup_method='linear'``.
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be at least 1, got {num_epochs}")
    if warmup_epochs < 0 or not 0.0 <= warmup_factor <= 1.0:
        raise ValueError(f"need warmup_epochs >= 0 and warmup_factor in [0, 1], got {warmup_epochs}, {warmup_factor}")
    if epoch_index < 0:
        raise ValueError(f"epoch_index must be >= 0, got {epoch_index}")
    if epoch_index < warmup_epochs:
        alpha = epoch_index / warmup_epochs
        return warmup_factor * (1.0 - alpha) + alpha
    ratio = min(1.0, (epoch_index - warmup_epochs) / (num_epochs - warmup_epochs)) if num_epochs > warmup_epochs \
        else 1.0
    return 0.5 * (1.0 + math.cos(math.pi * ratio))


class EpochLRFactor:
    """The LR factor of optimizer step ``k`` (steps taken so far in this schedule).

    A class, not a closure: ``LambdaLR.state_dict`` saves a callable object's attributes, so a
    checkpoint records the schedule's shape with its step, and a resumed schedule keeps both.
    """

    def __init__(self, steps_per_epoch: int, num_epochs: int, warmup_epochs: int = 5, warmup_factor: float = 0.1,
                 step_unit: str = "epoch"):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        if step_unit not in ("epoch", "step"):
            raise ValueError(f"step_unit must be 'epoch' or 'step', got {step_unit!r}")
        original_lr_factor(0, num_epochs, warmup_epochs, warmup_factor)  # validates the shape now, not mid-run
        self.steps_per_epoch = steps_per_epoch
        self.num_epochs = num_epochs
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        self.step_unit = step_unit

    def epoch_of(self, step: int) -> float:
        """The (stage-local) epoch the schedule reads at ``step``: whole epochs, or fractional ones."""
        if self.step_unit == "epoch":
            return step // self.steps_per_epoch
        return step / self.steps_per_epoch

    def __call__(self, step: int) -> float:
        return original_lr_factor(self.epoch_of(step), self.num_epochs, self.warmup_epochs, self.warmup_factor)


def create_scheduler(optimizer: torch.optim.Optimizer, settings: OptimSettings, *, steps_per_epoch: int,
                     num_epochs: int) -> LambdaLR:
    """The schedule of an ``optim:`` block for one stage of ``num_epochs`` epochs.

    Step it after every optimizer step (the Trainer does); each group's LR is its own base LR
    (:func:`param_groups`) times the factor, as the original scales each group. Build it right
    after the optimiser: construction sets every group's LR to the factor of step 0.
    """
    return LambdaLR(optimizer, EpochLRFactor(steps_per_epoch, num_epochs, settings.warmup_epochs,
                                             settings.warmup_factor, settings.step_unit))


def lr_per_epoch(settings: OptimSettings, num_epochs: int) -> list[float]:
    """The base LR during each epoch of a stage (group LRs are this times their factor); for plans."""
    return [settings.lr * original_lr_factor(e, num_epochs, settings.warmup_epochs, settings.warmup_factor)
            for e in range(num_epochs)]


def describe_groups(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group (kind, tensor and element counts, LR, weight decay, names); for plans."""
    return [{"kind": g.get("kind"), "tensors": len(g["params"]), "elements": sum(p.numel() for p in g["params"]),
             "lr": g["lr"], "weight_decay": g["weight_decay"], "names": list(g.get("param_names", []))}
            for g in groups]

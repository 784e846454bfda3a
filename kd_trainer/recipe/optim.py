"""The ``optim:`` block of a recipe: which optimiser and learning-rate schedule a run (or a stage) uses.

Two presets. ``trainer`` keeps ``transformers.Trainer``'s own optimiser and schedule, configured in
the ``training:`` block (``optim``, ``learning_rate``, ``weight_decay``, ``lr_scheduler_type`` ...).
``irra`` is the optimiser and schedule of the research code the seed commands ran (IRRA's
``solver/build.py`` and ``solver/lr_scheduler.py``), which produced the published table::

    optim: {preset: irra}                            # exactly the original run's
    optim: {preset: irra, lr: 2.0e-5}                # every number can be overridden
    optim: {preset: irra, type: adamw}               # decoupled decay (an improvement, not the original)

``preset: original``, this preset's earlier name, is still read as ``irra``, with a FutureWarning.

What ``irra`` means, setting by setting (:data:`IRRA`):

- Adam, betas (0.9, 0.999), eps 1e-3 (the original trains fp16 weights; a smaller eps underflows),
  base LR 1e-5, weight decay 4e-5 *coupled* (the L2 term of ``torch.optim.Adam``, not AdamW's
  decoupled decay) on every trainable tensor whose name lacks ``bias``, LayerNorm gains included.
- Parameter groups by name: ``bias`` -> LR x 2, weight decay 0; ``cross``/``classifier``/``mlm_head``
  (randomly initialised heads) -> LR x 5. Where a name has both, the original's rule order decides:
  ``cross`` is tested *before* ``bias`` (so ``...cross...bias`` gets LR x 2), ``classifier`` and
  ``mlm_head`` *after* it (so their biases get LR x 5); every bias gets weight decay 0
  (``heads_before_bias`` lists the head keywords that a bias overrides).
- Every stage's optimiser holds every student tensor (``frozen_tower: optimise_by_decay``): the
  original never sets ``requires_grad=False`` on the student, it only runs a stage's frozen tower
  under ``torch.no_grad()``, and its PyTorch 1.11 ``zero_grad()`` zeroes gradients instead of
  freeing them. So a tensor the stage does not train keeps a zero gradient once it has had one,
  and the coupled decay (``g + wd * p``) still moves it: by about ``lr * wd * p / eps`` per step
  (0.04 x lr x p), visible in fp32 tensors (LayerNorm gains, class and positional embeddings),
  rounded away in fp16 ones. A tensor that never had a gradient (the text tower during an image
  stage that comes first) stays untouched, as Adam skips it. ``frozen_tower: exclude`` gives each
  stage's optimiser only the tensors it trains, so frozen ones stay exactly unchanged (what the
  ``trainer`` preset always does). No gradient clipping (set ``training.max_grad_norm: 0``).
- LR factor per epoch ``e`` (0-based) of a stage of ``N`` epochs: a linear warm-up from 0.1 over
  5 epochs, ``0.1 * (1 - e/5) + e/5``, then a cosine to 0, ``0.5 * (1 + cos(pi * (e - 5) / (N - 5)))``.
  The original steps its scheduler once, at the end of each epoch, so during epoch ``e`` the factor
  is ``f(e)``. Each stage of a sequential method starts a fresh optimiser and schedule over its own
  ``N`` epochs.

This module is schema only (numbers, names, validation); the optimiser and the schedule are built
by :mod:`kd_trainer.distill.optim`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class OptimSettings:
    """Every number of an ``optim:`` block, resolved against its preset (what the builders take)."""

    type: Literal["adam", "adamw"]
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    bias_weight_decay: float
    bias_lr_factor: float
    head_lr_factor: float
    head_keywords: tuple[str, ...]
    heads_before_bias: tuple[str, ...]
    warmup_epochs: int
    warmup_factor: float
    schedule: Literal["cosine"]
    step_unit: Literal["epoch", "step"]
    frozen_tower: Literal["optimise_by_decay", "exclude"]


# The ``irra`` preset's values (IRRA's defaults, as the seed commands ran them).
IRRA = OptimSettings(
    type="adam", lr=1e-5, betas=(0.9, 0.999), eps=1e-3, weight_decay=4e-5, bias_weight_decay=0.0,
    bias_lr_factor=2.0, head_lr_factor=5.0, head_keywords=("cross", "classifier", "mlm_head"),
    heads_before_bias=("cross",), warmup_epochs=5, warmup_factor=0.1, schedule="cosine", step_unit="epoch",
    frozen_tower="optimise_by_decay",
)

_NUMBERS = tuple(f.name for f in fields(OptimSettings))


def renamed(key: str, old: str, new: str) -> BeforeValidator:
    """A validator that reads a value's earlier spelling ``old`` as ``new``, with a one-line
    FutureWarning naming the new spelling: a recipe, or a run's saved recipe.yaml, written with the
    old name still parses, to the same recipe as one written with the new name."""

    def read(value: Any) -> Any:
        if value == old:
            warnings.warn(f"`{key}: {old}` is now spelled `{key}: {new}` (read as {new}); write {new}, as the old "
                          f"name will stop being read", FutureWarning, stacklevel=2)
            return new
        return value

    return BeforeValidator(read)


class OptimConfig(BaseModel):
    """A recipe's (or a stage's) ``optim:`` block. Fields left out take the preset's value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Annotated[Literal["irra", "trainer"], renamed("optim.preset", "original", "irra")] = Field(
        description="irra: the Adam, parameter groups and per-epoch warm-up + cosine schedule of IRRA's code, "
                    "which the seed commands ran (every field below overridable; `original`, its earlier name, "
                    "is still read as irra); trainer: transformers.Trainer's optimiser and schedule from the "
                    "`training:` block (no other field may be set).")
    type: Literal["adam", "adamw"] | None = Field(
        None, description="adam: weight decay coupled as an L2 term in the gradient (the original); "
                          "adamw: decoupled weight decay.")
    lr: float | None = Field(None, gt=0, description="Base learning rate (groups scale it by their factors).")
    betas: tuple[float, float] | None = Field(None, description="Adam's (beta1, beta2), each in [0, 1).")
    eps: float | None = Field(None, gt=0, description="Adam's epsilon (the original: 1e-3, for fp16 weights).")
    weight_decay: float | None = Field(None, ge=0, description="Weight decay of every tensor whose name lacks "
                                                               "`bias`, LayerNorm gains included.")
    bias_weight_decay: float | None = Field(None, ge=0, description="Weight decay of names containing `bias`.")
    bias_lr_factor: float | None = Field(None, gt=0, description="LR factor of names containing `bias`.")
    head_lr_factor: float | None = Field(None, gt=0, description="LR factor of names containing a head keyword.")
    head_keywords: tuple[str, ...] | None = Field(
        None, description="Name fragments of randomly initialised heads (LR x head_lr_factor).")
    heads_before_bias: tuple[str, ...] | None = Field(
        None, description="Head keywords whose biases take the bias LR instead of the head LR (the original "
                          "tests `cross` before `bias`, `classifier`/`mlm_head` after it).")
    warmup_epochs: int | None = Field(None, ge=0, description="Epochs of linear warm-up at the start of each stage.")
    warmup_factor: float | None = Field(None, ge=0, le=1, description="LR factor of the first warm-up epoch.")
    schedule: Literal["cosine"] | None = Field(
        None, description="After the warm-up: cosine from 1 to 0 over the stage's remaining epochs.")
    step_unit: Literal["epoch", "step"] | None = Field(
        None, description="epoch: the factor changes only when an epoch starts (the original); step: the "
                          "same curve evaluated at the fractional epoch of every optimizer step.")
    frozen_tower: Literal["optimise_by_decay", "exclude"] | None = Field(
        None, description="What a stage's optimiser does with the student tensors the stage does not train. "
                          "optimise_by_decay (the original): every student tensor is in every stage's optimiser; "
                          "a frozen one runs without autograd and keeps a zero gradient once it has had one, so "
                          "weight decay alone moves it (tensors that never had a gradient stay untouched). "
                          "exclude: only the stage's trained tensors are optimised; frozen ones stay unchanged.")

    @model_validator(mode="after")
    def _consistent(self) -> "OptimConfig":
        given = sorted(n for n in _NUMBERS if getattr(self, n) is not None)
        if self.preset == "trainer" and self.frozen_tower is not None:
            raise ValueError("optim.frozen_tower applies to preset 'irra' only: preset 'trainer' (the Trainer's "
                             "optimiser) always holds just the tensors a stage trains; drop the key or use preset "
                             "'irra'")
        if self.preset == "trainer" and given:
            raise ValueError(f"optim: preset 'trainer' takes its optimiser and schedule from the `training:` block "
                             f"(optim, learning_rate, weight_decay, adam_beta1/2, adam_epsilon, lr_scheduler_type); "
                             f"move {given} there or use preset 'irra'")
        if self.betas is not None and not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must both lie in [0, 1), got {list(self.betas)}")
        for name in ("head_keywords", "heads_before_bias"):
            words = getattr(self, name)
            if words is not None and any(not w for w in words):
                raise ValueError(f"optim.{name} contains an empty string, which would match every parameter name")
        return self

    @property
    def uses_trainer(self) -> bool:
        """True when the Trainer's own optimiser and schedule (the `training:` block) apply."""
        return self.preset == "trainer"

    def resolve(self) -> OptimSettings:
        """Every number of this block, with the preset's value where the block gives none."""
        if self.uses_trainer:
            raise ValueError("optim: preset 'trainer' has no settings of its own; the Trainer reads `training:`")
        given = {n: getattr(self, n) for n in _NUMBERS if getattr(self, n) is not None}
        if "head_keywords" in given and "heads_before_bias" not in given:
            # New head names: keep the original's precedence only for the keywords that remain.
            given["heads_before_bias"] = tuple(k for k in IRRA.heads_before_bias if k in given["head_keywords"])
        settings = OptimSettings(**{**{n: getattr(IRRA, n) for n in _NUMBERS}, **given})
        unknown = sorted(set(settings.heads_before_bias) - set(settings.head_keywords))
        if unknown:
            raise ValueError(f"optim.heads_before_bias names {unknown}, which are not in optim.head_keywords "
                             f"{list(settings.head_keywords)}")
        return settings

    def merged(self, override: "OptimConfig | None") -> "OptimConfig":
        """This block with ``override``'s explicitly written fields on top (a stage's ``optim:`` over the
        recipe's). A different preset replaces this block whole, as presets do not mix."""
        if override is None:
            return self
        if override.preset != self.preset:
            return override
        mine: dict[str, Any] = self.model_dump(exclude_unset=True)
        return OptimConfig.model_validate({**mine, **override.model_dump(exclude_unset=True)})

"""What a stage's optimiser does with the student tensors the stage does not train (``optim.frozen_tower``).

The original (``optim: {preset: irra}``) never sets ``requires_grad=False`` on the student: every
stage's ``build_optimizer`` receives every student tensor, and a stage's frozen tower is frozen only
because its forward runs under ``torch.no_grad()``. It ran PyTorch 1.11, whose ``zero_grad()``
*zeroes* existing gradients instead of freeing them. So a tensor a stage does not train keeps a zero
gradient once an earlier step gave it one, Adam's coupled decay turns that into ``wd * p``, and the
tensor moves by decay alone; a tensor that never had a gradient has ``.grad is None`` and Adam skips it.

``optimise_by_decay`` reproduces that here, where the Trainer frees every gradient after each step
(``model.zero_grad()``, ``set_to_none=True``): the stage's optimiser holds every student tensor
(:func:`optimised_params`), and right before each optimizer step :class:`FrozenGradients` gives
every tensor the stage does not train a zero gradient if it has had a gradient earlier in the run,
and none otherwise. The frozen tower still runs under ``torch.no_grad()`` (no autograd through it);
a tensor frozen by name inside a trained tower, which autograd does reach, has that gradient
replaced the same way, since the stage does not train it. Which tensors have had a gradient is part
of the training state: it is saved with the optimizer (:class:`~kd_trainer.distill.stages.StageOptimizer`),
so a resumed run decays exactly the tensors an uninterrupted one does.

``exclude`` (and the Trainer's own optimiser, preset ``trainer``) gives each stage's optimiser only
the tensors it trains: frozen ones hold no optimizer state and stay exactly unchanged.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from kd_trainer.distill.optim import settings_groups
from kd_trainer.distill.plan import Stage

DECAY = "optimise_by_decay"


def decays_frozen(stage: Stage) -> bool:
    """True when ``stage``'s optimiser holds the tensors it does not train (``frozen_tower: optimise_by_decay``)."""
    return stage.optim is not None and stage.optim.frozen_tower == DECAY


def optimised_params(stage: Stage, named_params: Iterable[tuple[str, torch.nn.Parameter]]
                     ) -> list[tuple[str, torch.nn.Parameter]]:
    """The tensors in ``stage``'s optimiser: every student tensor under ``optimise_by_decay``, else
    only the ones the stage trains (``stage.params``, bound by :meth:`RunPlan.bind`)."""
    if decays_frozen(stage):
        return list(named_params)
    return [(n, p) for n, p in named_params if n in stage.params]


class FrozenGradients:
    """The gradients of the tensors a stage does not train, under ``optimise_by_decay``.

    Call :meth:`before_step` after the step's backward passes and before the optimizer step. It
    records which trained tensors have a gradient now, and gives each tensor the stage does not
    train a zero gradient if it has had one earlier, ``None`` otherwise (what PyTorch 1.11's
    ``zero_grad()`` leaves, since it zeroes rather than frees). Stages whose setting is ``exclude``
    only record: their optimiser does not hold the frozen tensors.
    """

    def __init__(self, model: torch.nn.Module, stages: Sequence[Stage]):
        self._params = dict(model.named_parameters())
        self._stages = list(stages)
        self.had_gradient: set[str] = set()

    def before_step(self, stage_index: int) -> None:
        stage = self._stages[stage_index]
        decay = decays_frozen(stage)
        for name, param in self._params.items():
            if name in stage.params:
                if param.grad is not None:
                    self.had_gradient.add(name)
            elif decay:
                param.grad = torch.zeros_like(param) if name in self.had_gradient else None

    def state_dict(self) -> dict[str, Any]:
        return {"had_gradient": sorted(self.had_gradient)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state["had_gradient"]) - set(self._params))
        if unknown:
            raise ValueError(f"the checkpoint's optimizer names student tensors this student lacks ({unknown[:3]}...); "
                             "resume with the recipe (and student) it was trained with")
        self.had_gradient = set(state["had_gradient"])


def frozen_tower_plan(stages: Sequence[Stage], index: int, student: torch.nn.Module) -> dict[str, Any] | None:
    """What ``kd-trainer plan`` shows for stage ``index`` of a plan bound to ``student``: which tensors
    its optimiser holds and, of those it does not train, which move by weight decay alone.

    A tensor moves by decay alone when it is in the optimiser, is not trained by this stage, was
    trained by an earlier stage (so it has had a gradient) and has a weight decay. The others that
    the stage does not train stay exactly as they are: no weight decay (biases), or no gradient yet
    (Adam skips a tensor whose gradient is None). fp16 ones are counted apart: at the original's
    numbers (LR 1e-5, eps 1e-3) their decay step is below fp16 resolution and rounds back.
    None for the Trainer's own optimiser (preset ``trainer``), which holds only the trained tensors.
    """
    stage = stages[index]
    if stage.optim is None:
        return None
    named = optimised_params(stage, student.named_parameters())
    total = sum(1 for _ in student.parameters())
    if not decays_frozen(stage):
        return {"setting": stage.optim.frozen_tower, "optimised_tensors": len(named),
                "unchanged_tensors": total - len(named)}
    decay = {n: g["weight_decay"] for g in settings_groups(named, stage.optim) for n in g["param_names"]}
    earlier = frozenset().union(*(s.params for s in stages[:index]))
    frozen = [(n, p) for n, p in named if n not in stage.params]
    moves = [(n, p) for n, p in frozen if n in earlier and decay.get(n, 0.0) > 0]
    return {"setting": DECAY, "optimised_tensors": len(named), "not_trained": len(frozen),
            "decay_only": [n for n, _ in moves],
            "decay_only_fp32": sum(p.dtype == torch.float32 for _, p in moves),
            "decay_only_fp16": sum(p.dtype == torch.float16 for _, p in moves),
            "no_weight_decay": [n for n, _ in frozen if n in earlier and decay.get(n, 0.0) == 0],
            "no_gradient_yet": [n for n, _ in frozen if n not in earlier]}


def format_frozen_tower(row: dict[str, Any]) -> str:
    """One line of ``kd-trainer plan`` from a :func:`frozen_tower_plan` row."""
    head = f"frozen tower (optim.frozen_tower: {row['setting']}): "
    if row["setting"] != DECAY:
        return head + (f"only the {row['optimised_tensors']} trained tensors in the optimiser; "
                       f"the other {row['unchanged_tensors']} stay unchanged")
    line = head + f"all {row['optimised_tensors']} student tensors in the optimiser"
    if not row["not_trained"]:
        return line + ", all trained"
    parts = [f"{len(row['decay_only'])} move by weight decay only (trained earlier; {row['decay_only_fp32']} fp32, "
             f"{row['decay_only_fp16']} fp16)" if row["decay_only"] else "",
             f"{len(row['no_weight_decay'])} stay (no weight decay)" if row["no_weight_decay"] else "",
             f"{len(row['no_gradient_yet'])} stay (no gradient yet)" if row["no_gradient_yet"] else ""]
    return line + f"; of the {row['not_trained']} not trained here, " + ", ".join(p for p in parts if p)

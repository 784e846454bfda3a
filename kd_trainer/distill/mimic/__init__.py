"""UP/EOD feature mimic at training time: the engine (:mod:`.engine`) and its adapters (:mod:`.adapters`).

The pieces it is built from live in the layers below: the loss maths in
:mod:`kd_trainer.losses.mimic`, the taps on named modules in :mod:`kd_trainer.models.taps`, and
the ``mimic:`` block of a recipe, parsed once into jobs, in :mod:`kd_trainer.recipe.mimic`.
"""

from kd_trainer.distill.mimic.adapters import MimicHead, make_adapter, plan_adapter
from kd_trainer.distill.mimic.engine import ADAPTED_KEY, Captured, MimicEngine, MimicStep

__all__ = ["ADAPTED_KEY", "Captured", "MimicEngine", "MimicHead", "MimicStep", "make_adapter", "plan_adapter"]

"""Does a model hold only finite weights? Asked before evaluating or exporting it: a NaN or infinite
weight makes every embedding it touches NaN, so the numbers (or the graphs) would be silently wrong."""

from __future__ import annotations

import torch
from torch import nn

from kd_trainer.models.loading import CheckpointError

__all__ = ["NonFiniteWeightsError", "non_finite_tensors", "require_finite_weights"]

SHOWN = 8  # tensor names a message lists before "..."


class NonFiniteWeightsError(CheckpointError):
    """A model with NaN or infinite weights; the message names the tensors."""


def non_finite_tensors(module: nn.Module) -> list[str]:
    """The names (``state_dict`` keys) of ``module``'s floating-point tensors holding a NaN or an inf."""
    return [name for name, t in module.state_dict().items()
            if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]


def require_finite_weights(module: nn.Module, *, name: str, refused: str) -> None:
    """Raise :class:`NonFiniteWeightsError` when ``module`` has non-finite weights: ``name`` says which
    model, ``refused`` what is therefore not done (``"evaluated"``, ``"exported"``)."""
    bad = non_finite_tensors(module)
    if bad:
        shown = ", ".join(bad[:SHOWN]) + (f", ... ({len(bad) - SHOWN} more)" if len(bad) > SHOWN else "")
        raise NonFiniteWeightsError(f"{name} has NaN or infinite weights in {len(bad)} tensor"
                                    f"{'s' if len(bad) > 1 else ''} ({shown}); it was not {refused}")

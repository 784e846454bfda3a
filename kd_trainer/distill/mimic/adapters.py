"""Mimic adapters: the trainable maps that bring a student output to its teacher's width.

FitNets' regressor, as UP/EOD's mimic jobs use it: where a student output and the teacher
output it is compared with differ only in channel width, a ``nn.Linear`` (token outputs
``... x C``) or a 1x1 ``nn.Conv2d`` (maps ``N x C x H x W``) learns the projection. Every
adapter trains the student only: :class:`MimicHead` holds them all, is attached to the student
so the Trainer's optimizer, checkpoints and DDP see it, and lists their keys as training-only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MimicHead", "make_adapter", "plan_adapter"]


def plan_adapter(mode: str, s_shape: Sequence[int], t_shape: Sequence[int]) -> tuple[str, int, int] | None:
    """Which adapter maps a student output of ``s_shape`` onto ``t_shape``: ``None`` (shapes
    already match) or ``(kind, c_student, c_teacher)`` with kind ``linear`` (last dim, token
    outputs ``... x C``) or ``conv1x1`` (dim 1 of ``N x C x H x W`` maps).

    Anything but the channel width must already agree: a spatial or sequence-length mismatch
    raises ``ValueError`` (no silent interpolation, which would change what is distilled).
    """
    s, t = tuple(s_shape), tuple(t_shape)
    if mode == "none":
        if s != t:
            raise ValueError("shapes differ and adapter is 'none'; set adapter: auto (or linear/conv1x1) to learn a "
                             "projection of the student output")
        return None
    if len(s) != len(t):
        raise ValueError(f"tapped outputs have different ranks ({len(s)} vs {len(t)}); no adapter can bridge that")
    if mode == "auto":
        if s == t:
            return None
        mode = "conv1x1" if len(s) == 4 else "linear"
    if mode == "conv1x1":
        if len(s) != 4:
            raise ValueError(f"a conv1x1 adapter needs N x C x H x W feature maps, got rank {len(s)}")
        if (s[0], *s[2:]) != (t[0], *t[2:]):
            raise ValueError("feature maps differ in batch or spatial size (H x W); only the channel width can be "
                             "adapted: tap layers of the same stride or feed inputs of the same size")
        return ("conv1x1", s[1], t[1])
    if mode == "linear":
        if s[:-1] != t[:-1]:
            raise ValueError("token outputs differ in a dimension other than the last (batch or sequence length); "
                             "only the width can be adapted")
        return ("linear", s[-1], t[-1])
    raise ValueError(f"unknown adapter mode {mode!r}; valid: auto, none, linear, conv1x1")


def make_adapter(kind: str, c_in: int, c_out: int) -> nn.Module:
    """A fresh trainable adapter (FitNets' regressor): ``nn.Linear`` or a 1x1 ``nn.Conv2d``."""
    if kind == "linear":
        return nn.Linear(c_in, c_out)
    if kind == "conv1x1":
        return nn.Conv2d(c_in, c_out, kernel_size=1)
    raise ValueError(f"unknown adapter kind {kind!r}")


class MimicHead(nn.Module):
    """The trainable adapters of all mimic jobs, one per (job, teacher, tap pair).

    Attach it to the student (``student.mimic_head = engine.head``) so the Trainer's optimizer,
    checkpoints and DDP see it. Every adapter exists only to train the student and is dropped
    for inference: :meth:`training_only_keys` lists their state-dict keys. Once the optimizer
    exists, :meth:`lock` makes a late (lazily built) adapter an error instead of a parameter
    that would silently never be optimised.
    """

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.locked = False

    @staticmethod
    def key(job: str, teacher: str, index: int) -> str:
        """ModuleDict key of an adapter (no dots allowed in module names)."""
        return f"{job}__{teacher}__{index}".replace(".", "_")

    def lock(self) -> None:
        """Refuse new adapters from now on (call once the optimizer exists)."""
        self.locked = True

    def training_only_keys(self, prefix: str = "") -> list[str]:
        """State-dict keys of every adapter (``prefix`` = where the head is attached, e.g.
        ``"mimic_head."``): all of them are training-only."""
        return [prefix + k for k in self.state_dict()]

    def forward(self, key: str, x: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[key] if key in self.adapters else None
        if adapter is None:
            return x
        weight = next(adapter.parameters())
        return adapter(x.to(weight.dtype))

"""Which student layer is distilled from which teacher layer, and the tap names that pair them.

A student with fewer layers than its teacher needs a mapping (TinyBERT's uniform one, or only
the last layer, as the original's ``last_layer``); :func:`mapped_names` turns one into the
paired ``mimic_name`` lists of a mimic job, and :func:`num_children` reads the layer counts off
the models themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["layer_map", "mapped_names", "num_children"]


def num_children(model: nn.Module, path: str) -> int:
    """How many children the container at ``path`` has (e.g. the blocks of a transformer),
    so layer mappings can be computed from the models themselves."""
    return len(list(model.get_submodule(path).children()))


def layer_map(
    n_student: int, n_teacher: int, mode: str | Sequence[int | None] | Sequence[Sequence[int]]
) -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)`` to distil, 0-based.

    - ``"last"``: ``[(L_s - 1, L_t - 1)]`` (the original's ``last_layer``).
    - ``"uniform"``: student layer ``i`` <- teacher layer ``i * k + k - 1``, ``k = L_t // L_s``
      (TinyBERT's mapping; every student layer, the last one meets the teacher's last). When
      ``L_t`` is not a multiple of ``L_s`` this raises instead of silently rounding, because a
      rounded mapping would no longer end at the teacher's last layer.
    - a list of ``L_s`` teacher indices (student layer ``i`` <- ``mode[i]``, ``None``/-1 skips
      ``i``), or a list of explicit ``(student, teacher)`` pairs. Negative teacher indices count
      from the end, as in Python.
    """
    if n_student <= 0 or n_teacher <= 0:
        raise ValueError(f"layer counts must be positive, got student {n_student}, teacher {n_teacher}")
    if isinstance(mode, str):
        if mode in ("last", "last_layer"):
            return [(n_student - 1, n_teacher - 1)]
        if mode == "uniform":
            if n_teacher % n_student:
                raise ValueError(f"uniform layer mapping needs the teacher's {n_teacher} layers to be a multiple of "
                                 f"the student's {n_student}; give an explicit list instead")
            k = n_teacher // n_student
            return [(i, i * k + k - 1) for i in range(n_student)]
        raise ValueError(f"unknown layer mapping {mode!r}; valid: 'last', 'uniform', or an explicit list")
    items = list(mode)
    pairs: list[tuple[int, int]] = []
    if items and all(isinstance(p, (list, tuple)) for p in items):
        pairs = [(int(s), int(t)) for s, t in items]
    else:
        if len(items) != n_student:
            raise ValueError(f"explicit layer mapping has {len(items)} entries for {n_student} student layers")
        pairs = [(i, int(t)) for i, t in enumerate(items) if t is not None and t != -1]
    out = []
    for s, t in pairs:
        t = t + n_teacher if t < 0 else t
        if not (0 <= s < n_student and 0 <= t < n_teacher):
            raise ValueError(f"layer pair ({s}, {t}) is out of range for {n_student} student / "
                             f"{n_teacher} teacher layers")
        out.append((s, t))
    return out


def mapped_names(
    student_fmt: str, teacher_fmt: str, n_student: int, n_teacher: int, mode: str | Sequence[Any] = "uniform"
) -> tuple[list[str], list[str]]:
    """Paired tap-name lists (``mimic_name``) from templates, e.g.
    ``mapped_names("clip.transformer.resblocks.{}@attn", "clip.transformer.resblocks.{}@attn", 4, 12)``."""
    pairs = layer_map(n_student, n_teacher, mode)
    return [student_fmt.format(s) for s, _ in pairs], [teacher_fmt.format(t) for _, t in pairs]

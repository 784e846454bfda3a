"""Which student parameters belong to which tower, and which a stage's ``trainable`` names.

A :class:`~kd_trainer.models.factory.RetrievalModel` wraps an open_clip CLIP; its parameter
names say their tower. Stages train one tower, both, or named modules (dotted prefixes).
"""

from __future__ import annotations

import difflib
from typing import Sequence, Union

from torch import nn

# Parameter-name prefixes of each student tower (RetrievalModel around an open_clip CLIP).
TOWER_PREFIXES = {
    "image": ("clip.visual.", "image_proj."),
    "text": ("clip.token_embedding.", "clip.positional_embedding", "clip.transformer.", "clip.ln_final.",
             "clip.text_projection", "text_proj."),
}

Selection = Union[str, Sequence[str]]


def trainable_names(model: nn.Module, trainable: Selection) -> list[str]:
    """Names of the parameters a stage trains (``all``, ``image``, ``text`` or a list of dotted
    prefixes); an unknown prefix is an error listing the closest module names."""
    names = [n for n, _ in model.named_parameters()]
    if trainable == "all":
        return names
    if isinstance(trainable, str):
        return [n for n in names if n.startswith(TOWER_PREFIXES[trainable])]
    chosen: list[str] = []
    for prefix in trainable:
        hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            modules = sorted({n.rsplit(".", 1)[0] for n in names} | set(names))
            close = difflib.get_close_matches(prefix, modules, n=5, cutoff=0.5)
            raise ValueError(f"trainable entry {prefix!r} matches no parameter of the student. "
                             f"Closest names: {close or modules[:5]}. Names are dotted module paths of the "
                             "student, e.g. clip.visual.transformer.resblocks.0")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def towers_of(names: Sequence[str]) -> frozenset[str]:
    """``image``/``text``: the student towers that own at least one of these parameter names."""
    return frozenset(t for t, prefixes in TOWER_PREFIXES.items() if any(n.startswith(prefixes) for n in names))

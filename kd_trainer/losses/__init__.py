"""Loss terms of ``docs/losses.md``, registered by the names users type (``kd-trainer terms`` lists them).

Importing this package registers every term: task terms in :mod:`.task`, distillation terms in
:mod:`.contrastive`, :mod:`.relational` and :mod:`.feature`. Which rows of a gathered batch a
process computes, and their share of the global mean: :mod:`.rows`.
"""

from kd_trainer.losses.registry import (
    KINDS,
    SIDES,
    STUDENT_EMBEDDINGS,
    TEACHER_EMBEDDINGS,
    TERMS,
    Features,
    LocalRows,
    TermSpec,
    UnknownTermError,
    available_terms,
    compute_term,
    get_term,
    register_term,
)

# Imported for their side effect: each module registers its terms.
from kd_trainer.losses import task, contrastive, relational, feature  # noqa: E402,F401  isort: skip

__all__ = [
    "Features",
    "LocalRows",
    "TermSpec",
    "UnknownTermError",
    "register_term",
    "get_term",
    "available_terms",
    "compute_term",
    "TERMS",
    "KINDS",
    "SIDES",
    "STUDENT_EMBEDDINGS",
    "TEACHER_EMBEDDINGS",
]

"""How a dataset is named in a report: the canonical key of a recipe's ``data.name``, its
published name, and its column position."""

from __future__ import annotations

from functools import lru_cache

from kd_trainer.data.formats import DATASETS, canonical_dataset_name

__all__ = ["dataset_key", "dataset_display_name", "dataset_rank"]


@lru_cache(maxsize=None)
def dataset_key(name: str) -> str:
    """The canonical key of a recipe's ``data.name`` (recipes accept "CUHK-PEDES", "cuhk-pedes" ...).

    An unknown name is kept as written, so a dataset this version does not know still gets its
    own column instead of an error.
    """
    try:
        return canonical_dataset_name(name)
    except ValueError:
        return name


def dataset_display_name(key: str) -> str:
    """The published name of a dataset key (``cuhk_pedes`` -> ``CUHK-PEDES``); unknown keys as is."""
    spec = DATASETS.get(key)
    return spec.display_name if spec is not None else key


def dataset_rank(key: str) -> int:
    """Column position: the order of ``kd_trainer.data.formats.DATASETS``, unknown datasets last."""
    keys = list(DATASETS)
    return keys.index(key) if key in keys else len(keys)

"""What each run's model retrieves for sample test captions, which role it plays (teacher, student
without KD, student with KD), and where distillation changed the rank-1 answer.

The ranking is the one ``kd-trainer eval`` scores: the test split loaded by
:func:`kd_trainer.data.load_pedes` and seen at the model's own input size
(:func:`~kd_trainer.data.with_retrieval_transforms`, no augmentation), gallery and captions embedded by
:func:`kd_trainer.evaluation.embed_dataset`, ranked by :func:`kd_trainer.evaluation.top_k` (cosine,
ties by gallery order: the order :func:`~kd_trainer.evaluation.rank_metrics` scores). A gallery
item is correct for a query when it shows the query's person (same pid), as in R@K.

Roles, read from the recipes of the retrieval runs in the report (detection and classification
runs have no retrieval gallery, so they get no role and name no teacher here):

* **teacher**: a run whose folder another run in the report names as its teacher checkpoint
  (``teacher.checkpoint`` or one of ``teachers:``; a relative checkpoint path matches the folder
  whose path ends with it, since it was relative to where that run was launched);
* **KD**: a run with a loss term that reads a teacher (``needs_teacher`` in the term registry);
* **no KD**: every other run (its terms read no teacher, even when the recipe loads one for
  weight inheritance).

Each KD run is compared with one no-KD run on the same dataset: the one with the same seed when
there is one, else the first.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kd_trainer.data import canonical_dataset_name, collate_retrieval, load_pedes, with_retrieval_transforms
from kd_trainer.evaluation import embed_dataset, top_k
from kd_trainer.losses import get_term
from kd_trainer.recipe import RecipeError, parse_recipe
from kd_trainer.report.discovery import RunSummary
from kd_trainer.report.seeds import run_seed

__all__ = ["TEACHER", "NO_KD", "KD", "ROLE_ORDER", "GalleryOptions", "TestSplit", "Ranking", "KdChange",
           "run_roles", "load_test_split", "rank_split", "sample_queries", "kd_pairs", "kd_change"]

TEACHER, NO_KD, KD = "teacher", "no KD", "KD"
ROLE_ORDER = (TEACHER, NO_KD, KD)


@dataclass(frozen=True)
class GalleryOptions:
    """How many test captions each gallery shows (a seeded sample), and how many images per caption."""

    queries: int = 8
    k: int = 5
    seed: int = 0
    changed: int = 4  # example captions shown per direction of "where distillation changed the answer"
    data_root: str | None = None  # overrides each recipe's data.root
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("queries", "k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"gallery {name} must be at least 1, got {getattr(self, name)}")
        if self.changed < 0:
            raise ValueError(f"gallery changed examples must be >= 0, got {self.changed}")


@dataclass(frozen=True)
class TestSplit:
    """A dataset's test gallery and captions, as loaded (``raw``: a DatasetDict of the two splits)."""

    dataset: str  # canonical name
    root: Path
    raw: Any
    image_paths: list[str]
    gallery_pids: torch.Tensor
    captions: list[str]
    query_pids: torch.Tensor


@dataclass(frozen=True)
class Ranking:
    """One model's top-``k`` gallery indices for every test caption, and which of them are correct."""

    top: torch.Tensor  # (Q, k) gallery indices, rank 1 first
    correct: torch.Tensor  # (Q, k) bool: same pid as the query

    @property
    def hit1(self) -> torch.Tensor:
        return self.correct[:, 0]


@dataclass(frozen=True)
class KdChange:
    """Captions one run gets right at rank 1 and the other wrong, both ways."""

    kd_only: list[int]  # KD run right, no-KD run wrong
    nokd_only: list[int]


def _checkpoints(recipe: Mapping[str, Any]) -> list[str]:
    """The teacher checkpoints a recipe names."""
    out = []
    for t in [recipe.get("teacher"), *((recipe.get("teachers") or {}).values())]:
        if isinstance(t, Mapping) and t.get("checkpoint"):
            out.append(str(t["checkpoint"]))
    return out


def _same_folder(path: str, folder: Path) -> bool:
    """Whether a recipe's checkpoint ``path`` is ``folder``. A relative path was relative to where that
    run was launched, which need not be where the report runs: it matches a folder whose path ends
    with it (``runs/demo/teacher`` matches ``/home/me/kd/runs/demo/teacher``)."""
    p, f = Path(path), folder.resolve()
    if p.resolve() == f:
        return True
    parts = [x for x in p.parts if x not in (".", "")]
    return not p.is_absolute() and ".." not in parts and len(parts) > 0 and list(f.parts[-len(parts):]) == parts


def _reads_teacher(recipe: Mapping[str, Any]) -> bool:
    """Whether a retrieval recipe has a loss term that reads a teacher (a recipe of another task, which
    has no such terms, reads as False)."""
    try:
        parsed = parse_recipe(dict(recipe))
    except RecipeError:  # a recipe today's schema refuses: read the term names as written
        stages = recipe.get("stages") or [{"loss": recipe.get("loss") or {}}]
        terms = [t for s in stages if isinstance(s, Mapping)
                 for t in ((s.get("loss") or {}).get("terms") or [])]
        return any(get_term(t["name"]).needs_teacher for t in terms if isinstance(t, Mapping) and "name" in t)
    terms = getattr(parsed, "all_terms", None)  # only a RetrievalRecipe has loss terms
    return terms is not None and any(get_term(t.name).needs_teacher for t in terms)


def run_roles(runs: Sequence[RunSummary]) -> dict[Path, str]:
    """``{run folder: role}`` of every retrieval run: teacher, no KD or KD (see the module docstring).
    Detection and classification runs are left out: they have no retrieval gallery."""
    runs = [r for r in runs if r.task == "retrieval"]
    named = [c for r in runs for c in _checkpoints(r.recipe)]
    roles = {}
    for r in runs:
        if any(_same_folder(c, r.folder) for c in named):
            roles[r.folder] = TEACHER
        else:
            roles[r.folder] = KD if _reads_teacher(r.recipe) else NO_KD
    return roles


def load_test_split(dataset: str, root: str | os.PathLike) -> TestSplit:
    """The test gallery and captions of ``dataset`` under ``root`` (what ``kd-trainer eval`` reads)."""
    name = canonical_dataset_name(dataset)
    raw = load_pedes(name, root, splits=["test"])
    if "test_gallery" not in raw:
        raise ValueError(f"{name} under {root} has no test split (it has {sorted(raw)})")
    gallery, queries = raw["test_gallery"], raw["test_queries"]
    return TestSplit(dataset=name, root=Path(root), raw=raw, image_paths=list(gallery["image_path"]),
                     gallery_pids=torch.as_tensor(gallery["pid"]), captions=list(queries["caption"]),
                     query_pids=torch.as_tensor(queries["pid"]))


@torch.no_grad()
def rank_split(model: Any, split: TestSplit, *, k: int, batch_size: int = 64) -> Ranking:
    """``model``'s top-``k`` for every test caption of ``split``, embedded as ``kd-trainer eval`` does."""
    views = with_retrieval_transforms(split.raw, image_size=model.image_size, augment=False,
                                      context_length=model.context_length, dataset_name=split.dataset)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        g_feats, _ = embed_dataset(model.encode_image, views["test_gallery"], "pixel_values", device=device,
                                   batch_size=batch_size, collate_fn=collate_retrieval, progress=False)
        q_feats, _ = embed_dataset(model.encode_text, views["test_queries"], "input_ids", device=device,
                                   batch_size=batch_size, collate_fn=collate_retrieval, progress=False)
    finally:
        model.train(was_training)
    top, _ = top_k(q_feats, g_feats, k)
    return Ranking(top=top, correct=split.gallery_pids[top] == split.query_pids[:, None])


def sample_queries(num_queries: int, n: int, seed: int) -> list[int]:
    """``n`` caption indices (all when fewer), drawn with ``seed``, in split order: the same for every
    run on one dataset, so their galleries sit side by side."""
    return sorted(random.Random(seed).sample(range(num_queries), min(n, num_queries)))


def kd_pairs(runs: Sequence[RunSummary], roles: Mapping[Path, str]) -> list[tuple[RunSummary, RunSummary]]:
    """``(KD run, no-KD run)`` on one dataset: the no-KD run with the KD run's seed, else the first."""
    pairs = []
    for r in runs:
        if roles.get(r.folder) != KD:
            continue
        others = [b for b in runs if roles.get(b.folder) == NO_KD and b.dataset == r.dataset]
        if others:
            same_seed = [b for b in others if run_seed(b) is not None and run_seed(b) == run_seed(r)]
            pairs.append((r, (same_seed or others)[0]))
    return pairs


def kd_change(kd: Ranking, nokd: Ranking) -> KdChange:
    """The captions where the two runs' rank-1 answers differ in correctness."""
    a, b = kd.hit1, nokd.hit1
    return KdChange(kd_only=(a & ~b).nonzero().flatten().tolist(), nokd_only=(~a & b).nonzero().flatten().tolist())

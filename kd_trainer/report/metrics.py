"""Which metrics a run's table shows: one metric set per task, chosen from what the run records.

A retrieval run records R@K / mAP / mINP, a detection run COCO box AP, a classification run
accuracy; putting them in one table would stack numbers that mean different things in one column.
So every run is assigned the :class:`MetricSet` whose columns its ``test_results.json`` holds, and
the report writes one table per metric set present (a folder of retrieval runs keeps its one
retrieval table exactly as before).

Names a run recorded before a metric was renamed are read through :data:`METRIC_ALIASES`, the one
place that knows them: detection runs before the AP/AP50/AP75 naming (detectron2's) wrote
``test_map``, ``test_map_50``, ``test_map_75`` for the same COCOeval numbers.

Numbers the run records that are neither a metric of its set, nor bookkeeping
(:data:`BOOKKEEPING`: epoch, the stage of a staged run, sample count, timing), nor a hybrid pairing are not dropped:
:func:`unlisted_metrics` names them so the report can say they are in no table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kd_trainer.det_metrics import STAT_NAMES
from kd_trainer.log_keys import parse_hybrid_key
from kd_trainer.report.errors import ReportError

__all__ = ["MetricSet", "RETRIEVAL", "DETECTION", "CLASSIFICATION", "METRIC_SETS", "METRIC_ALIASES", "BOOKKEEPING",
           "ALL_METRIC_NAMES", "task_metrics", "canonical_metrics", "metric_set_of", "unlisted_metrics"]


@dataclass(frozen=True)
class MetricSet:
    """The metrics one task's table shows, in its column order, and how the report names them."""

    task: str  # the recipe's `task` value the runs were trained with
    columns: tuple[str, ...]  # the metrics of each cell, in order (keys without "test_")
    names: Mapping[str, str]  # key -> printed name, for every metric of the task
    headline: str  # the metric the seed-spread check compares and the loss plots draw as evaluations
    description: str  # the sentence above the table in results.md
    optional: tuple[str, ...] = ()  # appended to each cell on request (``with_minp``)
    others: tuple[str, ...] = ()  # recognised metrics of the task shown per run but in no table column
    ranked: tuple[str, ...] = ()  # metrics whose separated pairs the table lists (the headline when empty)

    @property
    def known(self) -> tuple[str, ...]:
        return (*self.columns, *self.optional, *self.others)

    def cell_keys(self, with_optional: bool) -> list[str]:
        return [*self.columns, *(self.optional if with_optional else ())]

    def heading(self, with_optional: bool) -> str:
        """``R@1 / R@5 / R@10 / mAP``: what a cell holds."""
        return " / ".join(self.names[k] for k in self.cell_keys(with_optional))


RETRIEVAL = MetricSet(
    task="retrieval",
    columns=("r1", "r5", "r10", "mAP"),
    optional=("mINP",),
    names={"r1": "R@1", "r5": "R@5", "r10": "R@10", "mAP": "mAP", "mINP": "mINP"},
    headline="r1",
    ranked=("r1", "mAP"),
    description="Text-to-image retrieval on each run's test split, in %.",
)
# The columns are what DetectionTrainer.evaluate_split records; the per-size APs/APm/APl (the rest of
# det_metrics.STAT_NAMES) are recognised, so a run that records them lists them instead of "unknown".
DETECTION = MetricSet(
    task="detection",
    columns=("AP", "AP50", "AP75"),
    others=tuple(k for k in STAT_NAMES if k not in ("AP", "AP50", "AP75")),
    names={k: k for k in STAT_NAMES},
    headline="AP",
    description=("Object detection on each run's test split, COCO box AP in %: AP = AP@[.5:.95] (COCO's mAP), "
                 "AP50 and AP75 at IoU .50 and .75."),
)
CLASSIFICATION = MetricSet(
    task="classification",
    columns=("accuracy",),
    names={"accuracy": "accuracy"},
    headline="accuracy",
    description="Classification on each run's test split, top-1 accuracy in %.",
)
METRIC_SETS: tuple[MetricSet, ...] = (RETRIEVAL, DETECTION, CLASSIFICATION)  # also the order of the tables

# old name -> current name, keys without "test_"/"eval_". Detection runs trained before commit 8848909
# recorded COCOeval's AP@[.5:.95], AP@.5 and AP@.75 as map / map_50 / map_75.
METRIC_ALIASES: Mapping[str, str] = {"map": "AP", "map_50": "AP50", "map_75": "AP75"}

# What Trainer.evaluate records next to the metrics: not results, so never "unknown".
BOOKKEEPING = frozenset({"epoch", "stage", "samples", "runtime", "samples_per_second", "steps_per_second"})

ALL_METRIC_NAMES: Mapping[str, str] = {k: v for s in METRIC_SETS for k, v in s.names.items()}


def task_metrics(task: str) -> MetricSet:
    """The metric set of ``task`` (``"retrieval"``, ``"detection"``, ``"classification"``)."""
    for s in METRIC_SETS:
        if s.task == task:
            return s
    raise ValueError(f"no metric set for task {task!r}; known: {[s.task for s in METRIC_SETS]}")


def canonical_metrics(metrics: Mapping[str, float], source: Path) -> dict[str, float]:
    """``metrics`` (keys without ``test_``) with old names replaced by :data:`METRIC_ALIASES`.

    A file holding both an old and a new name of one metric is an error: which one is the run's
    number cannot be told.
    """
    out: dict[str, float] = {}
    written_as: dict[str, str] = {}  # current name -> the key the file used
    for k, v in metrics.items():
        new = METRIC_ALIASES.get(k, k)
        if new in out:
            raise ReportError(f"{source} records both test_{written_as[new]} and test_{k}, the old and the current "
                              "name of one metric; keep one")
        written_as[new] = k
        out[new] = v
    return out


def metric_set_of(metrics: Mapping[str, float], source: Path, recipe_task: object = None) -> MetricSet:
    """The metric set whose columns ``metrics`` (canonical keys) hold, checked against the recipe's ``task``.

    A results file with no table metric, or with those of two tasks, is a :class:`ReportError`
    naming it: the run would otherwise land in no table, or in one whose columns it half fills.
    """
    found = [s for s in METRIC_SETS if any(k in metrics for k in s.columns)]
    if not found:
        shown = ", ".join(sorted(metrics)) or "no numbers"
        expected = "; ".join(f"{s.task}: {', '.join('test_' + k for k in s.columns)}" for s in METRIC_SETS)
        aliases = ", ".join(f"test_{o} for test_{n}" for o, n in METRIC_ALIASES.items())
        raise ReportError(f"{source} records none of the metrics a results table shows (it has {shown}); "
                          f"expected those of one task ({expected}; also read: {aliases})")
    if len(found) > 1:
        raise ReportError(f"{source} records metrics of several tasks ("
                          + "; ".join(f"{s.task}: {', '.join(k for k in s.columns if k in metrics)}" for s in found)
                          + "); a run has one task, so its table cannot be chosen")
    chosen = found[0]
    if recipe_task is not None and recipe_task != chosen.task:
        have = ", ".join(k for k in chosen.columns if k in metrics)
        raise ReportError(f"{source} records {chosen.task} metrics ({have}) "
                          f"but the run's recipe says task: {recipe_task}")
    return chosen


def unlisted_metrics(metrics: Mapping[str, float], mset: MetricSet) -> dict[str, float]:
    """The numbers of a run that the report knows nothing about: not a metric of ``mset``, not
    :data:`BOOKKEEPING`, not a hybrid pairing. Listed per run so nothing recorded goes unmentioned."""
    return {k: v for k, v in metrics.items()
            if k not in mset.known and k not in BOOKKEEPING and parse_hybrid_key(k, prefix="") is None}

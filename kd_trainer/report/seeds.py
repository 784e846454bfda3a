"""Which runs are seeds of one configuration, and their mean ± standard deviation.

Two runs are the same configuration when their ``recipe.yaml`` files are equal once the keys in
:data:`IGNORED_KEYS` are removed: the seeds, and what only names or places the run. Such runs,
when each records a different seed, form one :class:`SeedGroup`, reported as one table cell.
Runs of one configuration that record the same seed (a re-run) or no seed at all are not
aggregated: averaging them would count one seed twice, so they stay apart and clash in the table.

A checkpoint that is itself a run folder (``student.checkpoint: runs/synth/seed1/motis_2stage``)
counts by that run's configuration, not its path: each seed of a chained method (MoTIS, then
Ours from MoTIS) continues from its own seed's upstream run, and those are one configuration.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kd_trainer.report.discovery import RunSummary, Selection, with_current_defaults
from kd_trainer.report.folder import RECIPE_FILE, read_yaml

__all__ = ["SEED_KEYS", "IGNORED_KEYS", "MetricStats", "SeedGroup", "Seeds", "run_seed", "configuration_key",
           "recipe_differences", "group_seeds"]

SEED_KEYS: tuple[tuple[str, ...], ...] = (("seed",), ("training", "seed"), ("training", "data_seed"))
IGNORED_KEYS: tuple[tuple[str, ...], ...] = (
    *SEED_KEYS,
    ("name",),  # what the run is called and where it writes: no effect on its numbers
    ("training", "output_dir"),
    ("training", "run_name"),
    ("training", "logging_dir"),
    ("training", "resume_from_checkpoint"),  # a resumed run ends as an uninterrupted one (tested)
)

Seeds = Literal["mean", "split"]


def _get(recipe: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = recipe
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


def _without(recipe: Mapping[str, Any], paths: Sequence[tuple[str, ...]]) -> dict[str, Any]:
    out = json.loads(json.dumps(recipe, default=str))  # a deep copy of plain data
    for path in paths:
        node = out
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


CHECKPOINT_KEYS = ("checkpoint", "source")  # model sources: student/teacher(s).checkpoint, student.inherit.source
_UPSTREAM_DEPTH = 4  # a chain of runs deeper than this is compared by path


def _upstream_runs_by_configuration(node: Any, depth: int = 0) -> Any:
    """``node`` with every checkpoint path that names a run folder replaced by that run's configuration."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            folder = Path(v) if k in CHECKPOINT_KEYS and isinstance(v, str) and v else None
            if folder is not None and depth < _UPSTREAM_DEPTH and (folder / RECIPE_FILE).is_file():
                upstream = read_yaml(folder / RECIPE_FILE)
                if isinstance(upstream, dict):
                    out[k] = {"run": _comparable(with_current_defaults(upstream), depth + 1)}
                    continue
            out[k] = _upstream_runs_by_configuration(v, depth)
        return out
    if isinstance(node, list):
        return [_upstream_runs_by_configuration(v, depth) for v in node]
    return node


def _comparable(recipe: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    """The recipe without :data:`IGNORED_KEYS`, run-folder checkpoints by their configuration."""
    return _upstream_runs_by_configuration(_without(recipe, IGNORED_KEYS), depth)


def run_seed(run: RunSummary) -> str | None:
    """The run's seed as recorded: ``"42"`` when every seed key set agrees, else each by name
    (``"seed=1, training.seed=7"``); None when the recipe records none."""
    found = [(".".join(p), _get(run.recipe, p)) for p in SEED_KEYS]
    found = [(k, v) for k, v in found if v is not None]
    if not found:
        return None
    if len({str(v) for _, v in found}) == 1:
        return str(found[0][1])
    return ", ".join(f"{k}={v}" for k, v in found)


def configuration_key(run: RunSummary) -> str:
    """The run's recipe without :data:`IGNORED_KEYS`, as canonical JSON: equal keys, one configuration."""
    return json.dumps(_comparable(run.recipe), sort_keys=True)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def recipe_differences(a: RunSummary, b: RunSummary) -> list[str]:
    """Dotted recipe keys (outside :data:`IGNORED_KEYS`) whose values differ between two runs."""
    fa = _flatten(_comparable(a.recipe))
    fb = _flatten(_comparable(b.recipe))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, ...) != fb.get(k, ...))


@dataclass(frozen=True)
class MetricStats:
    """One metric over a group's seeds: mean, sample standard deviation (n - 1), and how many seeds had it."""

    mean: float
    std: float | None  # None for a single value: one seed has no spread
    n: int


@dataclass(frozen=True)
class SeedGroup:
    """Runs of one configuration on one dataset, one per seed (a single run is a group of one)."""

    runs: tuple[RunSummary, ...]

    @property
    def label(self) -> str:
        return self.runs[0].label

    @property
    def dataset(self) -> str:
        return self.runs[0].dataset

    @property
    def n(self) -> int:
        return len(self.runs)

    def stats(self, metric: str) -> MetricStats | None:
        """``metric`` over the runs that report it (None when none does)."""
        values = [r.metrics[metric] for r in self.runs if metric in r.metrics]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return MetricStats(mean=math.fsum(values) / len(values), std=std, n=len(values))

    @property
    def selections(self) -> list[Selection | None]:
        return [r.selected for r in self.runs]


def group_seeds(runs: Sequence[RunSummary], seeds: Seeds = "mean") -> list[SeedGroup]:
    """The runs as groups, in the order their first run comes.

    ``seeds="mean"`` puts runs with the same label, dataset and configuration in one group when
    each records a distinct seed; ``seeds="split"`` keeps every run in a group of its own.
    """
    if seeds not in ("mean", "split"):
        raise ValueError(f"seeds must be 'mean' or 'split', got {seeds!r}")
    if seeds == "split":
        return [SeedGroup((r,)) for r in runs]
    by_config: dict[tuple[str, str, str], list[RunSummary]] = {}
    for r in runs:
        by_config.setdefault((r.label, r.dataset, configuration_key(r)), []).append(r)
    groups: list[SeedGroup] = []
    placed: set[int] = set()
    for r in runs:
        if id(r) in placed:
            continue
        members = by_config[(r.label, r.dataset, configuration_key(r))]
        recorded = [run_seed(m) for m in members]
        distinct = None not in recorded and len(set(recorded)) == len(recorded)
        for m in members if distinct else [r]:
            placed.add(id(m))
        groups.append(SeedGroup(tuple(members) if distinct else (r,)))
    return groups

"""Which run folders a report covers: finding finished runs under the given paths and reading
each into a :class:`RunSummary`.

Only a folder holding ``test_results.json`` counts as finished. A folder with a ``recipe.yaml`` but
no test results (still training, crashed, or ``data.test_split: null``) is skipped with a
:class:`SkippedRunWarning` naming it, so a missing row is always explained.

Each run's task is read off the metrics it records (:func:`kd_trainer.report.metrics.metric_set_of`,
old metric names renamed first), so it lands in the table with its metrics' columns.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kd_trainer.log_keys import parse_hybrid_key
from kd_trainer.recipe import RecipeError, parse_recipe
from kd_trainer.report.dataset_names import dataset_display_name, dataset_key
from kd_trainer.report.errors import ReportError, SkippedRunWarning
from kd_trainer.report.folder import RECIPE_FILE, RESULTS_FILE, RUN_FILES, STAGES_FILE, is_number, read_json, read_yaml
from kd_trainer.report.metrics import MetricSet, canonical_metrics, metric_set_of, task_metrics

__all__ = ["Selection", "RunSummary", "collect_runs", "find_runs", "warn_skipped", "display_folder"]

SELECTED_KEYS = ("selected", "test_selected")  # Trainer.save_metrics("test", ...) may prefix it
SPLITS = ("val", "test")


@dataclass(frozen=True)
class Selection:
    """Which epoch a run kept as its final student, chosen by ``metric`` on ``split``.

    ``epoch`` is the Trainer's count into the last stage (steps / steps per epoch, rounded to 3
    places): a fraction for a run shorter than an epoch or a stage counted in steps (0.056), an
    int when whole (3), None when not recorded."""

    metric: str  # "r1", "mAP" ...
    split: Literal["val", "test"]
    epoch: int | float | None
    source: Path  # the file that recorded it (for messages)


@dataclass(frozen=True)
class RunSummary:
    """One finished run: what a results table needs, and where it came from (for error messages)."""

    label: str  # row label: the recipe's `method`, else its `name`
    name: str  # the recipe's `name` (file names of plots)
    dataset: str  # canonical dataset key, e.g. "rstpreid"
    metrics: Mapping[str, float]  # test_results.json, numeric values, "test_" prefix removed, old names renamed
    folder: Path
    recipe: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # recipe.yaml as read
    selected: Selection | None = None  # None when the run does not record its checkpoint choice
    task: str = "retrieval"  # whose metrics it records, so which table it goes in (report.metrics)

    @property
    def metric_set(self) -> MetricSet:
        return task_metrics(self.task)

    @property
    def dataset_name(self) -> str:
        return dataset_display_name(self.dataset)

    @property
    def hybrid(self) -> dict[str, dict[str, float]]:
        """Test metrics of the hybrid pairings, ``{"image": {"r1": ...}, "text": {...}}`` (may be empty)."""
        out: dict[str, dict[str, float]] = {}
        for k, v in self.metrics.items():
            parsed = parse_hybrid_key(k, prefix="")
            if parsed:
                out.setdefault(parsed[0], {})[parsed[1]] = v
        return out


def _parse_selection(raw: Any, path: Path) -> Selection:
    if not isinstance(raw, dict):
        raise ReportError(f"{path}: `selected` must be a mapping like "
                          f'{{"metric": "r1", "split": "val", "epoch": 12}}, got {raw!r}')
    metric, split, epoch = raw.get("metric"), raw.get("split"), raw.get("epoch")
    if not isinstance(metric, str) or not metric:
        raise ReportError(f"{path}: `selected.metric` must name a metric (e.g. \"r1\"), got {metric!r}")
    if split not in SPLITS:
        raise ReportError(f"{path}: `selected.split` must be one of {list(SPLITS)}, got {split!r}")
    if epoch is not None and not (is_number(epoch) and math.isfinite(epoch) and epoch >= 0):
        raise ReportError(f"{path}: `selected.epoch` must be a number of epochs, 0 or more (a fraction for a "
                          f"run shorter than an epoch), got {epoch!r}")
    if epoch is not None and float(epoch).is_integer():
        epoch = int(epoch)  # 3.0 is shown as epoch 3; a fraction (0.056) as recorded
    return Selection(metric=metric, split=split, epoch=epoch, source=path)


def _selection_in_results(results: Mapping[str, Any], path: Path) -> Selection | None:
    found = [k for k in SELECTED_KEYS if k in results]
    if len(found) > 1:
        raise ReportError(f"{path} has both {found[0]!r} and {found[1]!r}; a run keeps one checkpoint")
    return _parse_selection(results[found[0]], path) if found else None


def _selection_in_stages(folder: Path) -> Selection | None:
    """``selected`` at the top of stages.json, else in its last stage that records one: a run's
    final student is the one its last stage kept."""
    path = folder / STAGES_FILE
    if not path.is_file():
        return None
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise ReportError(f"{path} is not a JSON object")
    if "selected" in doc:
        return _parse_selection(doc["selected"], path)
    stages = doc.get("stages")
    for stage in reversed(stages if isinstance(stages, list) else []):
        if isinstance(stage, dict) and "selected" in stage:
            return _parse_selection(stage["selected"], path)
    return None


def _same_choice(a: Selection, b: Selection) -> bool:
    return (a.metric, a.split, a.epoch) == (b.metric, b.split, b.epoch)


def with_current_defaults(recipe: dict[str, Any]) -> dict[str, Any]:
    """The saved recipe as today's schema reads it, every default filled in.

    A run saved before a recipe key existed does not record it; one saved after records its
    default. Both are the same configuration, and seeds of it must share a cell. A recipe the
    schema no longer accepts is kept as saved (it is compared as written).
    """
    try:
        return parse_recipe(recipe).model_dump(mode="json")
    except RecipeError:
        return recipe


def _load_run(folder: Path) -> RunSummary:
    recipe = read_yaml(folder / RECIPE_FILE)
    if not isinstance(recipe, dict):
        raise ReportError(f"{folder / RECIPE_FILE} is not a YAML mapping")
    recipe = with_current_defaults(recipe)
    data = recipe.get("data")
    if not isinstance(data, dict) or not data.get("name"):
        raise ReportError(f"{folder / RECIPE_FILE} has no data.name: cannot tell which dataset the run is on")
    name = str(recipe.get("name") or folder.name)
    label = str(recipe.get("method") or name)
    results = read_json(folder / RESULTS_FILE)
    if not isinstance(results, dict):
        raise ReportError(f"{folder / RESULTS_FILE} is not a JSON object")
    metrics = canonical_metrics({k.removeprefix("test_"): float(v) for k, v in results.items() if is_number(v)},
                                folder / RESULTS_FILE)
    task = metric_set_of(metrics, folder / RESULTS_FILE, recipe.get("task")).task
    selected = _selection_in_results(results, folder / RESULTS_FILE)
    in_stages = _selection_in_stages(folder)
    if selected is not None and in_stages is not None and not _same_choice(selected, in_stages):
        raise ReportError(f"{folder}: {RESULTS_FILE} and {STAGES_FILE} record different checkpoint choices "
                          f"({selected.metric} on {selected.split}, epoch {selected.epoch} vs "
                          f"{in_stages.metric} on {in_stages.split}, epoch {in_stages.epoch})")
    return RunSummary(label=label, name=name, dataset=dataset_key(str(data["name"])), metrics=metrics,
                      folder=folder, recipe=recipe, selected=selected or in_stages, task=task)


def _find(path: Path, found: list[Path], skipped: list[tuple[Path, str]]) -> None:
    """Run folders under ``path``: a folder with test results is a run (not searched further)."""
    if (path / RESULTS_FILE).is_file():
        if (path / RECIPE_FILE).is_file():
            found.append(path)
        else:
            skipped.append((path, f"has {RESULTS_FILE} but no {RECIPE_FILE}, so its method and dataset "
                                  "are unknown"))
        return
    if (path / RECIPE_FILE).is_file():
        skipped.append((path, f"unfinished run: {RECIPE_FILE} but no {RESULTS_FILE} (still training, "
                              "stopped, or trained with data.test_split: null)"))
        return
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if re.fullmatch(r"checkpoint-\d+", child.name):  # Trainer checkpoints hold no results
            continue
        _find(child, found, skipped)


def find_runs(paths: Iterable[str | os.PathLike]) -> tuple[list[RunSummary], list[tuple[Path, str]]]:
    """Finished runs and ``(folder, reason)`` of the skipped ones, in the order the paths give.

    No warning is issued here, so a caller can check everything before writing (see
    :func:`warn_skipped`).
    """
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for p in paths:
        path = Path(p)
        if path.is_file() and path.name in RUN_FILES:
            path = path.parent  # `report runs/x/test_results.json` means the run folder
        if not path.exists():
            raise ReportError(f"{path}: no such file or folder")
        if not path.is_dir():
            skipped.append((path, "not a folder"))
            continue
        _find(path, found, skipped)
    seen: set[Path] = set()
    runs: list[RunSummary] = []
    for folder in found:  # `report runs runs/x` names runs/x twice; it is one run, not a duplicate
        key = folder.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(_load_run(folder))
    return runs, skipped


def warn_skipped(skipped: Sequence[tuple[Path, str]], stacklevel: int = 3) -> None:
    """One :class:`SkippedRunWarning` per skipped folder, naming it and why."""
    for folder, reason in skipped:
        warnings.warn(f"skipped {folder}: {reason}", SkippedRunWarning, stacklevel=stacklevel)


def collect_runs(paths: Iterable[str | os.PathLike]) -> list[RunSummary]:
    """The finished runs in ``paths`` (run folders, or folders searched recursively for them).

    Unfinished runs are skipped with a :class:`SkippedRunWarning` naming the folder; a missing
    path or a malformed recipe/JSON file is a :class:`ReportError` naming the file, because a
    table with a run quietly missing would read as a complete comparison.
    """
    runs, skipped = find_runs(paths)
    warn_skipped(skipped)
    return runs


def display_folder(folder: Path) -> str:
    """``folder`` relative to the working directory when it is under it (shorter in tables), else as given."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)

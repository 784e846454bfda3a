"""What the report learns by running each run's model: its inference cost, and its ranking of the
test split for the galleries. Each model is loaded once, on the CPU, one at a time.

Only retrieval runs whose folder holds weights (``kd_trainer_model.json`` beside them) are run; a
run without weights, or whose test split cannot be loaded, gets ``–`` cost cells or no gallery,
with a :class:`SkippedRunWarning` and a line in the page's "Not shown" list saying why.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kd_trainer.models.loading import CheckpointError, is_run_folder, model_from_checkpoint
from kd_trainer.report.discovery import RunSummary, display_folder
from kd_trainer.report.efficiency import Efficiency, Latency, efficiency_key, model_efficiency
from kd_trainer.report.errors import SkippedRunWarning
from kd_trainer.report.galleries import GalleryOptions, Ranking, TestSplit, load_test_split, rank_split

__all__ = ["ModelResults", "run_models"]


@dataclass
class ModelResults:
    efficiency: dict[Path, Efficiency] = field(default_factory=dict)  # run folder -> cost
    rankings: dict[Path, Ranking] = field(default_factory=dict)  # run folder -> its test ranking
    splits: dict[str, TestSplit] = field(default_factory=dict)  # canonical dataset -> test split
    notes: list[str] = field(default_factory=list)  # what is missing and why


def _skip(results: ModelResults, text: str) -> None:
    results.notes.append(text)
    warnings.warn(text, SkippedRunWarning, stacklevel=3)


def _split_for(run: RunSummary, options: GalleryOptions, results: ModelResults,
               failed: dict[str, str]) -> TestSplit | None:
    data = run.recipe.get("data") or {}
    name = run.dataset  # the canonical key
    if name in results.splits:
        return results.splits[name]
    if name in failed:
        return None
    root = options.data_root or data.get("root") or "./data"
    try:
        results.splits[name] = load_test_split(name, root)
    except (OSError, ValueError) as e:  # a missing folder or file, a malformed dataset
        failed[name] = str(e)
        _skip(results, f"no {name} gallery: its test split does not load from {root} ({e}); "
                       "give the data folder with --data-root")
        return None
    return results.splits[name]


def run_models(runs: Sequence[RunSummary], *, cost: bool = True, latency: Latency | None = None,
               galleries: GalleryOptions | None = None) -> ModelResults:
    """Cost (``cost``; with CPU latency when ``latency`` is given) and, with ``galleries``, the test
    ranking of every retrieval run with weights. Runs sharing an architecture and input size are
    measured once (:func:`efficiency_key`)."""
    results = ModelResults()
    if not cost and galleries is None:
        return results
    measured: dict[tuple, Efficiency] = {}
    failed: dict[str, str] = {}
    for run in runs:
        if run.task != "retrieval":
            continue
        if not is_run_folder(run.folder):
            results.notes.append(f"{display_folder(run.folder)}: no model weights (kd_trainer_model.json), so no "
                                 "cost figures and no gallery")
            continue
        try:
            model = model_from_checkpoint(run.folder).to("cpu").eval()
        except (CheckpointError, OSError, ValueError) as e:
            _skip(results, f"{display_folder(run.folder)}: its model does not load ({e}); no cost figures, no gallery")
            continue
        if cost:
            key = efficiency_key(model)
            if key not in measured:
                measured[key] = model_efficiency(model, latency=latency)
            results.efficiency[run.folder] = measured[key]
        if galleries is not None:
            split = _split_for(run, galleries, results, failed)
            if split is not None:
                results.rankings[run.folder] = rank_split(model, split, k=galleries.k,
                                                          batch_size=galleries.batch_size)
        del model
    return results


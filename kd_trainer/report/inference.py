"""What the report learns by running each run's model: its inference cost, and its ranking of the
test split for the galleries. Each model is loaded once, on the CPU, one at a time.

Only runs whose folder holds weights are run: a retrieval run's ``kd_trainer_model.json``, a
detection run's ``kd_trainer_detector.json``, a classification run's ``kd_trainer_classifier.json``
beside ``model.safetensors`` (detection and classification runs get cost figures, no gallery). A
run without weights, or whose test split cannot be loaded, gets ``–`` cost cells or no gallery,
with a :class:`SkippedRunWarning` and a line in the page's "Not shown" list saying why.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from kd_trainer.models.classifier import CLASSIFIER_CONFIG, load_classifier
from kd_trainer.models.detector import DETECTOR_CONFIG, load_detector
from kd_trainer.models.loading import CheckpointError, is_run_folder, model_from_checkpoint
from kd_trainer.recipe import ShapesConfig
from kd_trainer.report.discovery import RunSummary, display_folder
from kd_trainer.report.efficiency import (
    Efficiency,
    Latency,
    efficiency_key,
    image_model_efficiency,
    image_model_key,
    model_efficiency,
)
from kd_trainer.report.errors import SkippedRunWarning
from kd_trainer.report.galleries import GalleryOptions, Ranking, TestSplit, load_test_split, rank_split

__all__ = ["IMAGE_MODEL_CONFIGS", "ModelResults", "load_image_model", "run_models"]

IMAGE_MODEL_CONFIGS = {"detection": DETECTOR_CONFIG, "classification": CLASSIFIER_CONFIG}  # task -> what rebuilds it


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


def load_image_model(run: RunSummary) -> tuple[nn.Module, tuple[int, int]]:
    """The detector or classifier of a detection or classification run folder, on the CPU in eval
    mode, and the (H, W) of its input: a detector's from its config (the images it was built for), a
    classifier's from the recipe's ``data.shapes.image_size``. Mimic adapters are not loaded."""
    config = run.folder / IMAGE_MODEL_CONFIGS[run.task]
    try:
        cfg = json.loads(config.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config} is not JSON ({e})") from None
    if run.task == "detection":
        arch = {k: v for k, v in cfg.items() if k not in ("num_classes", "min_size", "max_size")}
        size = int(cfg["min_size"])
        model: nn.Module = load_detector(arch, num_classes=int(cfg["num_classes"]), image_size=size,
                                         checkpoint=str(run.folder))
    else:
        shapes = (run.recipe.get("data") or {}).get("shapes") or {}
        size = int(shapes.get("image_size", ShapesConfig.model_fields["image_size"].default))
        model = load_classifier(str(cfg["arch"]), int(cfg["num_classes"]), str(run.folder))
    return model.to("cpu").eval(), (size, size)


def _image_model_cost(run: RunSummary, results: ModelResults, measured: dict[tuple, Efficiency],
                      latency: Latency | None) -> None:
    """The cost of a detection or classification run's model, into ``results.efficiency``."""
    if not (run.folder / IMAGE_MODEL_CONFIGS[run.task]).is_file():
        results.notes.append(f"{display_folder(run.folder)}: no model weights ({IMAGE_MODEL_CONFIGS[run.task]}), "
                             "so no cost figures")
        return
    try:
        model, size = load_image_model(run)
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        _skip(results, f"{display_folder(run.folder)}: its model does not load ({type(e).__name__}: {e}); "
                       "no cost figures")
        return
    key = image_model_key(model, size)
    if key not in measured:
        measured[key] = image_model_efficiency(model, size, latency=latency)
    results.efficiency[run.folder] = measured[key]


def run_models(runs: Sequence[RunSummary], *, cost: bool = True, latency: Latency | None = None,
               galleries: GalleryOptions | None = None) -> ModelResults:
    """Cost (``cost``; with CPU latency when ``latency`` is given) of every run with weights and, with
    ``galleries``, the test ranking of every retrieval run with weights. Runs sharing an architecture
    and input size are measured once (:func:`efficiency_key`, :func:`image_model_key`)."""
    results = ModelResults()
    if not cost and galleries is None:
        return results
    measured: dict[tuple, Efficiency] = {}
    failed: dict[str, str] = {}
    for run in runs:
        if run.task in IMAGE_MODEL_CONFIGS:
            if cost:
                _image_model_cost(run, results, measured, latency)
            continue
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

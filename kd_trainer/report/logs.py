"""What a run's training log says: per-term loss series, the total loss, evaluations and the
stage layout, read from ``trainer_state.json`` (and ``stages.json``) with the keys of
:mod:`kd_trainer.log_keys`."""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_trainer.log_keys import parse_hybrid_key, parse_mimic_key, parse_term_key
from kd_trainer.report.errors import ReportError
from kd_trainer.report.folder import STAGES_FILE, STATE_FILE, is_number, read_json
from kd_trainer.report.metrics import METRIC_ALIASES, METRIC_SETS

__all__ = ["EVAL_HEADLINES", "Series", "StageSpan", "LossCurves", "log_history", "read_stages", "read_curves",
           "loss_series", "hybrid_during_training"]

Series = tuple[list[int], list[float]]

# The evaluation drawn over training: each task's headline metric (eval_r1, eval_AP, eval_accuracy;
# an old run's eval_map read as eval_AP), so a detection run's evaluations are plotted like R@1.
EVAL_HEADLINES = tuple(s.headline for s in METRIC_SETS)


@dataclass(frozen=True)
class StageSpan:
    """One stage's steps, ``[start_step, end_step)`` in global optimizer steps."""

    index: int  # 1-based
    name: str
    start_step: int
    end_step: int
    trainable: Any = None
    inferred: bool = False  # True when read off the log because stages.json is missing


@dataclass
class LossCurves:
    """What a loss plot draws, read from one run's ``trainer_state.json`` (and ``stages.json``)."""

    terms: dict[str, Series]  # term name (no stage prefix, no "loss_") or mimic series -> (steps, values)
    total: Series  # the logged total `loss`
    evals: dict[str, Series]  # "r1" (or "AP", "accuracy"), "hybrid_image_r1", "hybrid_text_r1" -> (steps, values)
    stages: list[StageSpan]
    weighted: bool = False
    # term -> index among training log entries of each point, to break a line across a stage without it
    _train_index: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def boundaries(self) -> list[int]:
        """Global steps where stages 2.. begin: where the vertical lines go."""
        return [s.start_step for s in self.stages[1:]]


def log_history(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of ``trainer_state.json``'s ``log_history`` that carry a step."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise ReportError(f"{run_dir}: no {STATE_FILE}, so there is no training log to plot")
    state = read_json(path)
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ReportError(f"{path} has no log_history list")
    return [h for h in history if isinstance(h, dict) and is_number(h.get("step"))]


def _series_name(key: str, weighted: bool) -> tuple[str | None, str] | None:
    """``(stage, series name)`` of a log key drawn as a loss curve, or None.

    Loss terms (``[<stage>/]loss_<term>[_weighted]``) are named by their term; mimic jobs by
    ``mimic/<job>/<teacher>/<loss>`` (unweighted) or ``mimic/<job>`` (weighted, all teachers).
    Per-pair mimic values and ``mimic/total`` (already in the total loss) are not drawn.
    """
    mimic = parse_mimic_key(key)
    if mimic is not None:
        if mimic.is_total or mimic.pair is not None or mimic.weighted != weighted:
            return None
        return None, key if not weighted else f"mimic/{mimic.job}"
    term = parse_term_key(key)
    if term is None or term.weighted != weighted:
        return None
    return term.stage, term.term


def _infer_stages(history: list[dict[str, Any]]) -> list[StageSpan]:
    """Stage layout from the log alone (runs saved without stages.json).

    Entries carry ``stage`` (the stage whose weights the model has after ``step``); a stage is
    taken to end at its last logged step, which is exact when ``logging_steps`` divides the
    stage lengths and otherwise early by less than one logging interval. Names come from the
    term keys' prefixes in order of first appearance. A log without stages gives no layout.
    """
    train = [h for h in history if "loss" in h]
    last: dict[int, int] = {}
    for h in train:
        if is_number(h.get("stage")):
            last[int(h["stage"])] = max(last.get(int(h["stage"]), 0), int(h["step"]))
    if not last:
        return []
    prefixes: list[str] = []
    for h in train:
        for k in h:
            parsed = parse_term_key(k)
            if parsed and parsed.stage and parsed.stage not in prefixes:
                prefixes.append(parsed.stage)
    spans, start = [], 0
    for i, idx in enumerate(sorted(last)):
        name = prefixes[i] if i < len(prefixes) else f"stage {idx}"
        spans.append(StageSpan(idx, name, start, last[idx], inferred=True))
        start = last[idx]
    return spans


def read_stages(run_dir: str | os.PathLike, history: list[dict[str, Any]] | None = None) -> list[StageSpan]:
    """The run's stages from ``stages.json``, else inferred from the log (empty for a plain run)."""
    run_dir = Path(run_dir)
    path = run_dir / STAGES_FILE
    if path.is_file():
        doc = read_json(path)
        stages = doc.get("stages") if isinstance(doc, dict) else None
        if not isinstance(stages, list):
            raise ReportError(f"{path} has no `stages` list")
        try:
            return [StageSpan(int(s["index"]), str(s["name"]), int(s["start_step"]), int(s["end_step"]),
                              s.get("trainable")) for s in stages]
        except (KeyError, TypeError, ValueError) as e:
            raise ReportError(f"{path}: a stage lacks index/name/start_step/end_step ({e!r})") from None
    return _infer_stages(log_history(run_dir) if history is None else history)


def read_curves(run_dir: str | os.PathLike, *, weighted: bool = False) -> LossCurves:
    """Per-term losses, the total loss, evaluations (R@1, or the task's headline: AP for detection)
    and the stage layout of one run.

    Term keys (a detector's ``loss_classifier``, ``loss_box_reg`` ... are terms like any other) lose
    their stage prefix, so a term trained in several stages (``ss_itc`` in the text and joint
    stages) is one series over global steps. A log entry whose window spans a
    stage boundary can hold the term under both stages' prefixes; both points are kept, the
    earlier stage's first. ``weighted`` picks ``loss_<term>_weighted`` instead of ``loss_<term>``
    (and ``mimic/<job>/weighted`` instead of ``mimic/<job>/<teacher>/<loss>``).
    """
    run_dir = Path(run_dir)
    history = log_history(run_dir)
    stages = read_stages(run_dir, history)
    stage_rank = {s.name: i for i, s in enumerate(stages)}
    terms: dict[str, Series] = {}
    train_index: dict[str, list[int]] = {}
    total: Series = ([], [])
    evals: dict[str, Series] = {}
    n_train = 0
    for h in history:
        step = int(h["step"])
        if "loss" in h and is_number(h["loss"]):
            total[0].append(step)
            total[1].append(float(h["loss"]))
        points = []
        for k, v in h.items():
            named = _series_name(k, weighted)
            if named is not None and is_number(v):
                stage, name = named
                points.append((stage_rank.get(stage, len(stage_rank)), name, float(v)))
        for _, term, v in sorted(points, key=lambda p: p[0]):  # stable: first-seen order within a stage
            steps, values = terms.setdefault(term, ([], []))
            steps.append(step)
            values.append(v)
            train_index.setdefault(term, []).append(n_train)
        if "loss" in h or points:
            n_train += 1
        for k, v in h.items():
            hybrid = parse_hybrid_key(k, prefix="eval")
            metric = METRIC_ALIASES.get(k.removeprefix("eval_"), k.removeprefix("eval_"))
            if k.startswith("eval_") and metric in EVAL_HEADLINES:
                name = metric
            elif hybrid is not None and hybrid[1] == "r1":
                name = f"hybrid_{hybrid[0]}_r1"
            else:
                continue
            if is_number(v):
                s = evals.setdefault(name, ([], []))
                s[0].append(step)
                s[1].append(float(v))
    return LossCurves(terms=terms, total=total, evals=evals, stages=stages, weighted=weighted,
                      _train_index=train_index)


def loss_series(run_dir: str | os.PathLike, *, weighted: bool = False) -> dict[str, Series]:
    """``{term: (steps, values)}`` exactly as the loss plot draws them (see :func:`read_curves`)."""
    return read_curves(run_dir, weighted=weighted).terms


def hybrid_during_training(run_dir: Path, metrics: Collection[str]) -> dict[str, tuple[int, dict[str, float]]]:
    """Per tower, the last evaluation that ran the hybrid pairing: ``{tower: (step, metrics)}``,
    keeping only the metric names in ``metrics``; empty for a run without a training log."""
    if not (run_dir / STATE_FILE).is_file():
        return {}
    out: dict[str, tuple[int, dict[str, float]]] = {}
    for h in log_history(run_dir):
        found: dict[str, dict[str, float]] = {}
        for k, v in h.items():
            parsed = parse_hybrid_key(k, prefix="eval")
            if parsed and parsed[1] in metrics and is_number(v):
                found.setdefault(parsed[0], {})[parsed[1]] = float(v)
        for tower, values in found.items():
            out[tower] = (int(h["step"]), values)
    return out

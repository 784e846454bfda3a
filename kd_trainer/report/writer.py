"""``results.md`` and the loss plots of a set of run folders: the one call behind ``kd-trainer report``."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kd_trainer.report.discovery import RunSummary, display_folder, find_runs, warn_skipped
from kd_trainer.report.errors import ReportError, SkippedRunWarning
from kd_trainer.report.folder import RECIPE_FILE, RESULTS_FILE, STATE_FILE
from kd_trainer.report.logs import hybrid_during_training
from kd_trainer.report.plots import plot_loss_curves, require_matplotlib
from kd_trainer.report.seeds import Seeds, group_seeds, run_seed
from kd_trainer.report.tables import METRIC_NAMES, MISSING, Duplicates, results_table

__all__ = ["HYBRID_TOWERS", "write_report"]

HYBRID_TOWERS = {"image": "student image + teacher text", "text": "teacher image + student text"}


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _metric_line(m: Mapping[str, float]) -> str:
    return ", ".join(f"{METRIC_NAMES[k]} {m[k]:.2f}" for k in METRIC_NAMES if k in m) or MISSING


def _run_section(run: RunSummary, plot: Path | None, in_group: bool) -> list[str]:
    """One run's heading, metrics, checkpoint choice, hybrids and plot; ``in_group``: one of several seeds."""
    seed = run_seed(run)
    lines = [f"### {run.label} on {run.dataset_name}" + (f", seed {seed}" if in_group else ""), "",
             f"- run `{run.name}`, folder `{display_folder(run.folder)}`"
             + (f", seed {seed}" if seed is not None else ", no seed recorded"),
             f"- test: {_metric_line(run.metrics)}"]
    if run.selected is not None:
        s = run.selected
        epoch = f"epoch {s.epoch}" if s.epoch is not None else "the epoch"
        lines.append(f"- checkpoint: {epoch} with the best {METRIC_NAMES.get(s.metric, s.metric)} on the "
                     f"{s.split} split (recorded in {s.source.name})")
    for tower, m in run.hybrid.items():
        lines.append(f"- test, hybrid {tower} ({HYBRID_TOWERS.get(tower, tower)}): {_metric_line(m)}")
    for tower, (step, m) in hybrid_during_training(run.folder, METRIC_NAMES.keys()).items():
        lines.append(f"- last evaluation with hybrid {tower} ({HYBRID_TOWERS.get(tower, tower)}), "
                     f"step {step}: {_metric_line(m)}")
    if plot is not None:
        lines += ["", f"![loss curves of {run.name}]({plot.name})"]
    return lines + [""]


def write_report(
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    with_minp: bool = False,
    order: Sequence[str] | None = None,
    duplicates: Duplicates = "error",
    seeds: Seeds = "mean",
    plots: bool = True,
    weighted: bool = False,
) -> dict[str, Any]:
    """Write ``results.md`` (the table, skipped runs, one section per run) and ``<run name>_losses.png``.

    Seeds of one configuration share a table cell (``seeds="mean"``) or get a row each
    (``seeds="split"``); either way every run has its own section, with its seed and metrics.
    Returns ``{"results": Path, "plots": {run folder (str): Path}, "table": str}`` (the table, with
    its notes, so a caller printing it does not read the runs twice). Runs without a
    ``trainer_state.json`` get no plot (a :class:`SkippedRunWarning` says so). The runs are read,
    the table built and matplotlib imported before anything is written, so a duplicate or a
    malformed results file leaves no half-written report; ``results.md`` is written last.
    """
    paths = list(paths)
    runs, skipped = find_runs(paths)
    warn_skipped(skipped)
    if not runs:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise ReportError(f"no finished run (a folder with {RESULTS_FILE} and {RECIPE_FILE}) under {where}")
    table = results_table(runs, with_minp=with_minp, order=order, duplicates=duplicates, seeds=seeds)
    if plots:
        require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    written: dict[str, Path] = {}
    used: set[str] = set()
    for run in runs:
        if not plots:
            continue
        if not (run.folder / STATE_FILE).is_file():
            warnings.warn(f"no loss plot for {run.folder}: it has no {STATE_FILE}", SkippedRunWarning, stacklevel=2)
            continue
        stem = _safe_stem(run.name)
        if stem in used:  # two runs with one name (re-runs): tell the files apart by folder
            stem = _safe_stem(f"{run.name}__{display_folder(run.folder)}")
        base, i = stem, 2
        while stem in used:
            stem, i = f"{base}_{i}", i + 1
        used.add(stem)
        written[str(run.folder)] = plot_loss_curves(run.folder, out / f"{stem}_losses.png", weighted=weighted)

    cells = "R@1 / R@5 / R@10 / mAP" + (" / mINP" if with_minp else "")
    doc = ["# Results", "", f"Text-to-image retrieval on each run's test split, in %. Cells: {cells}; "
                            f"{MISSING} = no run.", "", table, ""]
    if skipped:
        doc += ["Skipped:", "", *(f"- `{f}`: {why}" for f, why in skipped), ""]
    doc += ["## Runs", ""]
    grouped = {id(r) for g in group_seeds(runs, seeds) if g.n > 1 for r in g.runs}
    for run in runs:
        doc += _run_section(run, written.get(str(run.folder)), id(run) in grouped)
    results = out / "results.md"
    results.write_text("\n".join(doc).rstrip("\n") + "\n", encoding="utf-8")
    return {"results": results, "plots": written, "table": table}

"""``results.md`` and the loss plots of a set of run folders: the one call behind ``kd-trainer report``.

``results.md`` holds one table per task the runs record (retrieval, detection; see
:mod:`kd_trainer.report.metrics`), the skipped folders, and a section per run with every number it
recorded: a number the report knows no meaning for is listed there and warned about
(:class:`UnknownMetricWarning`), never dropped.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kd_trainer.report.discovery import RunSummary, display_folder, find_runs, warn_skipped
from kd_trainer.report.efficiency import Latency, machine
from kd_trainer.report.errors import ReportError, SkippedRunWarning, UnknownMetricWarning
from kd_trainer.report.folder import RECIPE_FILE, RESULTS_FILE, STATE_FILE
from kd_trainer.report.galleries import GalleryOptions, kd_change, kd_pairs, run_roles, sample_queries
from kd_trainer.report.html_page import ChangedAnswers, DatasetGalleries, RunGallery, order_by_role, write_html
from kd_trainer.report.inference import ModelResults, run_models
from kd_trainer.report.logs import hybrid_during_training
from kd_trainer.report.metrics import ALL_METRIC_NAMES, RETRIEVAL, task_metrics, unlisted_metrics
from kd_trainer.report.plots import plot_loss_curves, require_matplotlib
from kd_trainer.report.seeds import Seeds, group_seeds, run_seed
from kd_trainer.report.tables import MISSING, Duplicates, results_table_cells

__all__ = ["HYBRID_TOWERS", "write_report"]

HYBRID_TOWERS = {"image": "student image + teacher text", "text": "teacher image + student text"}


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _metric_line(m: Mapping[str, float], names: Mapping[str, str]) -> str:
    return ", ".join(f"{names[k]} {m[k]:.2f}" for k in names if k in m) or MISSING


def _run_section(run: RunSummary, plot: Path | None, in_group: bool, unknown: Mapping[str, float]) -> list[str]:
    """One run's heading, metrics, numbers in no table (``unknown``), checkpoint choice, hybrids and
    plot; ``in_group``: one of several seeds."""
    seed = run_seed(run)
    names = run.metric_set.names
    lines = [f"### {run.label} on {run.dataset_name}" + (f", seed {seed}" if in_group else ""), "",
             f"- run `{run.name}`, folder `{display_folder(run.folder)}`"
             + (f", seed {seed}" if seed is not None else ", no seed recorded"),
             f"- test: {_metric_line(run.metrics, names)}"]
    if unknown:
        lines.append("- also recorded, in no table (not a metric this report knows): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in unknown.items()))
    if run.selected is not None:
        s = run.selected
        epoch = f"epoch {s.epoch}" if s.epoch is not None else "the epoch"
        lines.append(f"- checkpoint: {epoch} with the best {ALL_METRIC_NAMES.get(s.metric, s.metric)} on the "
                     f"{s.split} split (recorded in {s.source.name})")
    for tower, m in run.hybrid.items():
        lines.append(f"- test, hybrid {tower} ({HYBRID_TOWERS.get(tower, tower)}): {_metric_line(m, names)}")
    for tower, (step, m) in hybrid_during_training(run.folder, RETRIEVAL.names.keys()).items():
        lines.append(f"- last evaluation with hybrid {tower} ({HYBRID_TOWERS.get(tower, tower)}), "
                     f"step {step}: {_metric_line(m, RETRIEVAL.names)}")
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
    html: bool = True,
    cost: bool = True,
    latency: Latency | None = Latency(),
    galleries: GalleryOptions | None = GalleryOptions(),
) -> dict[str, Any]:
    """Write ``results.md`` (a table per task, skipped runs, one section per run), ``<run name>_losses.png``
    and, with ``html``, ``index.html`` (:mod:`kd_trainer.report.html_page`).

    ``cost`` adds each model's parameters and FLOPs to the tables (per tower for retrieval, per image
    for a detector or classifier), and its CPU latency when ``latency`` is given
    (:mod:`kd_trainer.report.efficiency`; runs without weights get ``–``).
    ``galleries`` (with ``html``) ranks each retrieval run's test split with its model for the
    page's galleries (:mod:`kd_trainer.report.galleries`); None leaves them out.

    Retrieval runs get the R@1 / R@5 / R@10 / mAP table, detection runs the AP / AP50 / AP75 one;
    a folder of one task's runs has one table, with no task heading. Seeds of one configuration
    share a table cell (``seeds="mean"``) or get a row each (``seeds="split"``); either way every run
    has its own section, with its seed and metrics.
    Returns ``{"results": Path, "html": Path | None, "plots": {run folder (str): Path}, "table": str,
    "tables": {task: str}}``
    (``table``: the tables with their notes, under a ``## <Task>`` heading each when there are
    several, so a caller printing it does not read the runs twice). Runs without a
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
    table_args = dict(with_minp=with_minp, order=order, duplicates=duplicates, seeds=seeds)
    results_table_cells(runs, **table_args)  # a clash or bad option fails here, before any model is run
    unknown = {id(run): unlisted_metrics(run.metrics, run.metric_set) for run in runs}
    for run in runs:
        if unknown[id(run)]:
            warnings.warn(f"{run.folder / RESULTS_FILE} records {', '.join('test_' + k for k in unknown[id(run)])}, "
                          f"not a {run.task} metric this report knows: listed in its section of results.md, "
                          "in no table", UnknownMetricWarning, stacklevel=2)
    if plots:
        require_matplotlib()
    ran = run_models(runs, cost=cost, latency=latency, galleries=galleries if html else None)
    cells = results_table_cells(runs, **table_args, efficiency=ran.efficiency,
                                machine=machine() if latency is not None else None)
    tables = {task: c.markdown() for task, c in cells.items()}
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

    doc = ["# Results", ""]
    shown: list[str] = []
    for task, table in tables.items():
        mset = task_metrics(task)
        heading = [f"## {task.capitalize()}", ""] if len(tables) > 1 else []
        doc += [*heading, f"{mset.description} Cells: {mset.heading(with_minp)}; {MISSING} = no run.", "", table, ""]
        shown.append("\n".join([*heading, table]))
    if skipped:
        doc += ["Skipped:", "", *(f"- `{f}`: {why}" for f, why in skipped), ""]
    doc += ["## Runs", ""]
    grouped = {id(r) for g in group_seeds(runs, seeds) if g.n > 1 for r in g.runs}
    for run in runs:
        doc += _run_section(run, written.get(str(run.folder)), id(run) in grouped, unknown[id(run)])
    page = None
    if html:
        page = write_html(out, tables=cells, plots=written, runs=runs,
                          galleries=_galleries(runs, ran, galleries) if galleries is not None else [],
                          options=galleries, notes=ran.notes)
    results = out / "results.md"
    results.write_text("\n".join(doc).rstrip("\n") + "\n", encoding="utf-8")
    return {"results": results, "html": page, "plots": written, "table": "\n\n".join(shown), "tables": tables}


def _galleries(runs: Sequence[RunSummary], ran: ModelResults, options: GalleryOptions) -> list[DatasetGalleries]:
    """Per dataset with a loaded test split: every ranked run (teacher, no KD, KD) on the same sampled
    captions, and each KD run's comparison with its no-KD run."""
    roles = run_roles(runs)
    ranked = [r for r in runs if r.folder in ran.rankings]
    out = []
    for dataset, split in ran.splits.items():
        mine = [r for r in ranked if r.dataset == dataset]
        if not mine:
            continue
        by_folder = {r.folder: RunGallery(run=r, role=roles[r.folder], ranking=ran.rankings[r.folder]) for r in mine}
        changed = []
        for kd, nokd in kd_pairs(mine, roles):
            change = kd_change(by_folder[kd.folder].ranking, by_folder[nokd.folder].ranking)
            pick = [sorted(ids[i] for i in sample_queries(len(ids), options.changed, options.seed))
                    for ids in (change.kd_only, change.nokd_only)]
            changed.append(ChangedAnswers(kd=by_folder[kd.folder], nokd=by_folder[nokd.folder], change=change,
                                          shown_kd_only=pick[0], shown_nokd_only=pick[1]))
        out.append(DatasetGalleries(split=split, queries=sample_queries(len(split.captions), options.queries,
                                                                        options.seed),
                                    runs=order_by_role(list(by_folder.values())), changed=changed))
    return out

"""The results tables: methods x datasets like the published comparison, one configuration per cell,
one table per task.

Each run goes in the table of the metrics it records (:mod:`kd_trainer.report.metrics`): retrieval
cells read ``R@1 / R@5 / R@10 / mAP``, detection cells ``AP / AP50 / AP75``; a folder holding both
gets two tables (:func:`results_tables`), never one column mixing two metrics. A cell reads the
run's numbers for one run and ``m ± s / ... (n=k)`` over ``k`` seeds of one configuration (mean and
sample standard deviation; see :mod:`kd_trainer.report.seeds`).

Two cells with the same label on the same dataset that are not seeds of one configuration (their
recipes differ, or they record the same seed or none) are an error by default
(``duplicates="error"``): a cell holds one configuration, and picking one silently would hide the
other. ``duplicates="split"`` keeps both, each in its own row labelled ``<label> [<run name>]``
(or ``[<folder>]`` when the names agree too). ``seeds="split"`` lists every run on its own instead
of averaging seeds.

Under the table, only when they apply:

* ``≈`` marks cells whose headline mean (R@1, AP) is closer to another method's on the same dataset
  than their seed spread (the sum of the two standard deviations; a single run adds none), each
  pair listed;
* a ``Checkpoint`` column says on which split (and by which metric) each run kept its best epoch,
  ``—`` for runs that do not record it, with a note when the test split chose it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kd_trainer.distill.resolved import GENERATED
from kd_trainer.report.dataset_names import dataset_display_name, dataset_key, dataset_rank
from kd_trainer.report.discovery import RunSummary, Selection, display_folder
from kd_trainer.report.efficiency import Efficiency
from kd_trainer.report.errors import ReportError
from kd_trainer.report.metrics import ALL_METRIC_NAMES, METRIC_SETS, MetricSet, task_metrics
from kd_trainer.report.seeds import (
    MetricStats,
    SeedGroup,
    Seeds,
    configuration_key,
    group_seeds,
    recipe_differences,
    run_seed,
)

__all__ = ["MISSING", "NOT_RECORDED", "SPREAD_MARK", "Duplicates", "TableCells", "runs_by_task", "results_table",
           "results_tables", "table_cells", "results_table_cells", "efficiency_columns", "efficiency_cells",
           "selection_text", "stats_text"]

MISSING = "–"  # en dash: the published tables' "no result"
NOT_RECORDED = "—"  # em dash: a run that does not say how its checkpoint was chosen
SPREAD_MARK = "≈"

Duplicates = Literal["error", "split"]


def _why_clash(groups: Sequence[SeedGroup]) -> str:
    """Why runs sharing a label and dataset were not averaged as seeds of one configuration."""
    runs = [r for g in groups for r in g.runs]
    if len({configuration_key(r) for r in runs}) == 1:
        seeds = [run_seed(r) for r in runs]
        if None in seeds:
            return "same configuration, but a recipe records no seed, so they cannot be averaged as seeds"
        repeated = sorted(s for s, c in Counter(seeds).items() if c > 1)
        return f"same configuration and the same seed ({', '.join(repeated)}): re-runs would count one seed twice"
    first = runs[0]
    diffs = sorted({k for r in runs[1:] for k in recipe_differences(first, r)})
    shown = ", ".join(diffs[:6]) + (", ..." if len(diffs) > 6 else "")
    return f"different configurations: their recipes differ in {shown}"


def _row_labels(groups: Sequence[SeedGroup], duplicates: Duplicates) -> list[str]:
    """The row label of each group; groups sharing (label, dataset) raise or get distinguishing suffixes."""
    if duplicates not in ("error", "split"):
        raise ValueError(f"duplicates must be 'error' or 'split', got {duplicates!r}")
    clashing: dict[tuple[str, str], list[int]] = {}
    for i, g in enumerate(groups):
        clashing.setdefault((g.label, g.dataset), []).append(i)
    labels = [g.label for g in groups]
    clashes = {k: v for k, v in clashing.items() if len(v) > 1}
    if clashes and duplicates == "error":
        lines = [f"  {label!r} on {dataset_display_name(ds)}: "
                 + ", ".join(str(r.folder) for i in idx for r in groups[i].runs)
                 + f"\n    ({_why_clash([groups[i] for i in idx])})"
                 for (label, ds), idx in clashes.items()]
        raise ReportError("several runs share a method label and dataset, and a table cell holds one "
                          "configuration (seeds of one configuration are averaged):\n" + "\n".join(lines)
                          + "\nGive them distinct `method:` labels in their recipes, report fewer folders, "
                          "or keep all of them as separate rows (--duplicates split).")
    for idx in clashes.values():
        # seeds of one configuration usually share their recipe name: "x", not "x+x"
        names = ["+".join(dict.fromkeys(r.name for r in groups[i].runs)) for i in idx]
        by_name = len(set(names)) == len(names)
        for i, name in zip(idx, names):
            tag = name if by_name else "+".join(display_folder(r.folder) for r in groups[i].runs)
            labels[i] = f"{groups[i].label} [{tag}]"
    return labels


def stats_text(stats: MetricStats, of: int) -> str:
    """``50.20``, ``50.20 ± 0.85``, plus ``(n=k)`` when only ``k`` of the group's ``of`` runs have the metric."""
    text = f"{stats.mean:.2f}" if stats.std is None else f"{stats.mean:.2f} ± {stats.std:.2f}"
    return text + (f" (n={stats.n})" if stats.n != of else "")


def _cell(group: SeedGroup | None, keys: Sequence[str]) -> str:
    if group is None:
        return MISSING
    parts = []
    for k in keys:
        stats = group.stats(k)
        parts.append(MISSING if stats is None else stats_text(stats, group.n))
    return " / ".join(parts) + (f" (n={group.n})" if group.n > 1 else "")


def selection_text(selected: Selection | None) -> str:
    """``val, best R@1`` / ``test, best R@1``, or ``—`` when the run does not record its choice."""
    if selected is None:
        return NOT_RECORDED
    return f"{selected.split}, best {ALL_METRIC_NAMES.get(selected.metric, selected.metric)}"


def _group_selection(group: SeedGroup) -> str:
    texts = Counter(selection_text(s) for s in group.selections)
    if len(texts) == 1:
        return next(iter(texts))
    return "mixed: " + ", ".join(f"{t} ×{c}" for t, c in sorted(texts.items()))


def _row_selection(cells: dict[str, SeedGroup]) -> str:
    texts = {d: _group_selection(g) for d, g in cells.items()}
    if len(set(texts.values())) <= 1:
        return next(iter(texts.values()), NOT_RECORDED)
    return "; ".join(f"{dataset_display_name(d)}: {t}" for d, t in texts.items())


def _pairs(rows: Sequence[str], cols: Sequence[str], cells: dict[tuple[str, str], SeedGroup], metric: str
           ) -> Iterable[tuple[str, tuple[str, MetricStats], tuple[str, MetricStats]]]:
    """Every pair of rows that both hold ``metric`` on one dataset: (dataset, (row, stats), (row, stats))."""
    for d in cols:
        have = [(r, s) for r in rows if (r, d) in cells and (s := cells[(r, d)].stats(metric)) is not None]
        for i, a in enumerate(have):
            for b in have[i + 1:]:
                yield d, a, b


def _spread_notes(rows: Sequence[str], cols: Sequence[str], cells: dict[tuple[str, str], SeedGroup],
                  mset: MetricSet) -> tuple[set[tuple[str, str]], list[str]]:
    """Pairs of rows whose headline means (R@1, AP) on one dataset differ by less than their seed spread."""
    flagged: set[tuple[str, str]] = set()
    notes: list[str] = []
    name = mset.names[mset.headline]
    for d, (ra, sa), (rb, sb) in _pairs(rows, cols, cells, mset.headline):
        if sa.std is None and sb.std is None:
            continue  # no spread known: nothing to compare the difference with
        spread = (sa.std or 0.0) + (sb.std or 0.0)
        diff = abs(sa.mean - sb.mean)
        if diff < spread:
            flagged |= {(ra, d), (rb, d)}
            notes.append(f"- {dataset_display_name(d)}: {ra} ({stats_text(sa, sa.n)}, n={sa.n}) and {rb} "
                         f"({stats_text(sb, sb.n)}, n={sb.n}): {name} means differ by {diff:.2f}, "
                         f"less than their seed spread {spread:.2f}")
    if notes:
        notes.insert(0, f"{SPREAD_MARK} {name} means closer than their seed spread (the sum of the two sample "
                        "standard deviations; a single run adds none), so the seeds run so far cannot rank them:")
    return flagged, notes


def _separation_notes(rows: Sequence[str], cols: Sequence[str], cells: dict[tuple[str, str], SeedGroup],
                      mset: MetricSet) -> list[str]:
    """Pairs of rows over several seeds whose means on one dataset differ by more than their seed
    spread (the sum of the two sample standard deviations): the pairs the seeds run so far can rank."""
    notes: list[str] = []
    for metric in mset.ranked or (mset.headline,):
        for d, (ra, sa), (rb, sb) in _pairs(rows, cols, cells, metric):
            if sa.std is None or sb.std is None:
                continue  # one run has no spread: its seeds cannot rank it yet
            spread, diff = sa.std + sb.std, sa.mean - sb.mean
            if abs(diff) > spread:
                hi, lo = (ra, rb) if diff > 0 else (rb, ra)
                notes.append(f"- {dataset_display_name(d)}, {mset.names[metric]}: {hi} above {lo} by "
                             f"{abs(diff):.2f}, more than their seed spread {spread:.2f}")
    if notes:
        notes.insert(0, "Pairs that separate: means further apart than their seed spread (the sum of the two "
                        "sample standard deviations), both over several seeds:")
    return notes


COST_COLUMNS = ("Params M (image / text)", "GFLOPs (image / caption)", "CPU ms b1 (image / caption)")
IMAGE_COST_COLUMNS = ("Params M", "GFLOPs per image", "CPU ms b1 per image")  # a classifier, a detector


def _draw_notes(runs: Sequence[RunSummary], cols: Sequence[str]) -> list[str]:
    """One note per dataset column whose runs generated their data with different settings (a 30-person
    and a 400-person SynthPEDES share the column name but not the test set). Runs that read data from
    disk (no generator block in their recipe) are left out of the comparison."""
    notes = []
    for d in cols:
        draws: dict[str, list[RunSummary]] = {}
        for r in runs:
            data = r.recipe.get("data") if isinstance(r.recipe, Mapping) else None
            # the recipe block of generator arguments of this data set (distill.resolved.GENERATED)
            block = data.get(GENERATED[d][0]) if d in GENERATED and isinstance(data, Mapping) else None
            if r.dataset == d and block is not None:
                draws.setdefault(json.dumps(block, sort_keys=True, default=str), []).append(r)
        if len(draws) < 2:
            continue
        settings = [json.loads(k) for k in draws]
        differ = sorted({k for a in settings for k in a if any(b.get(k) != a.get(k) for b in settings)})
        parts = []
        for setting, rs in zip(settings, draws.values()):
            shown = ", ".join(display_folder(r.folder) for r in rs[:3]) + (f" and {len(rs) - 3} more" if len(rs) > 3 else "")
            parts.append(", ".join(f"{k} {setting.get(k)}" for k in differ) + f": {shown}")
        notes.append(f"Data: the {dataset_display_name(d)} runs generated their data with {len(draws)} different "
                     f"settings, so they were not tested on one test set and their cells do not compare: "
                     + "; ".join(parts) + ".")
    return notes


def _sig(x: float) -> str:
    """Three significant figures, never an exponent: 0.000332, 0.00265, 17.6, 4350."""
    if x <= 0:
        return f"{x:g}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}"


def efficiency_cells(e: Efficiency) -> list[str]:
    """The cost cells of one model: parameters (millions), GFLOPs and CPU ms, one value per tower
    (``image / text`` for a dual encoder, one for a classifier or detector)."""
    cells = [" / ".join(f"{e.params[t] / 1e6:.2f}" for t in e.towers),
             " / ".join(_sig(e.gflops[t]) for t in e.towers)]
    if e.latency_ms is not None:
        cells.append(" / ".join(f"{e.latency_ms[t]:.2f}" for t in e.towers))
    return cells


def _size(e: Efficiency) -> str:
    text = f"{e.image_size[0]}x{e.image_size[1]} images"
    return text if e.context_length is None else f"{text}, {e.context_length}-token captions"


# Above this ratio of a row's 90th-percentile call to its median, the latency note says the timings were noisy.
NOISY_SPREAD = 1.5


def efficiency_columns(measured: Iterable[Efficiency], machine: str | None) -> tuple[list[str], str]:
    """The cost column headings and the note that says how they were measured. The models of one
    table have the same towers (a table is one task's)."""
    measured = list(measured)
    towers = {e.towers for e in measured}
    if len(towers) != 1:
        raise ValueError(f"one table's cost columns need models with the same towers, got {sorted(towers)}")
    dual = next(iter(towers)) == ("image", "text")
    timed = all(e.latency_ms is not None for e in measured)
    sizes = ", ".join(sorted({_size(e) for e in measured}))
    counter = "counted by torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add"
    if dual:
        note = (f"Cost: Params M = millions of parameters of each tower of the deployed dual encoder (the text "
                "tower's include its token-embedding table, a lookup that costs no FLOPs); GFLOPs = one image / "
                f"one caption at the run's input size ({sizes}), {counter})")
    else:
        note = ("Cost: Params M = millions of parameters of the model (a distilled student's mimic adapters, used "
                "only in training, left out; batch-norm statistics are buffers, not parameters); GFLOPs = one "
                f"image at the run's input size ({sizes}), {counter}: convolutions and matrix products)")
        proposals = sorted({e.proposals for e in measured if e.proposals is not None})
        if proposals:
            note += (f"; a detector's box head is counted and timed on {' or '.join(map(str, proposals))} "
                     "proposals per image, its test-time cap with NMS keeping every proposal: NMS keeps fewer on "
                     "most images, so this is the most one image costs (RoIAlign, NMS and box decoding do no "
                     "matrix products and are not counted)")
    if timed:
        what = "one image / one caption" if dual else "one image"
        note += (f"; CPU ms b1 = median latency of {what} (batch 1), every row measured one "
                 f"after another in one process on {machine or 'this machine'}")
        worst = max((s for e in measured for s in (e.latency_spread or {}).values()), default=1.0)
        if worst > NOISY_SPREAD:
            note += (f" (the timings were noisy: the slowest tenth of one row's calls took {worst:.1f}x its median, "
                     "so other work was probably using the CPU; compare latencies from an idle machine)")
    columns = COST_COLUMNS if dual else IMAGE_COST_COLUMNS
    return list(columns[:3 if timed else 2]), note + f"; {MISSING} = no model weights in the run folder."


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def runs_by_task(runs: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
    """The runs per task (``RunSummary.task``), tasks in the order of ``report.metrics.METRIC_SETS``."""
    out: dict[str, list[RunSummary]] = {s.task: [] for s in METRIC_SETS}
    for r in runs:
        out.setdefault(r.task, []).append(r)
    return {t: rs for t, rs in out.items() if rs}


@dataclass(frozen=True)
class TableCells:
    """One results table before it is written out: the same cells make ``results.md``'s Markdown
    table (:meth:`markdown`) and the HTML report's table."""

    head: list[str]
    body: list[list[str]]  # one row per method label, cells as text (spread marks included)
    notes: list[str]  # Markdown paragraphs under the table

    def markdown(self) -> str:
        rows = [self.head, *([_md(c) for c in row] for row in self.body)]
        widths = [max(len(row[j]) for row in rows) for j in range(len(self.head))]

        def line(row: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

        rule = "|" + "|".join(("-" * (w + 2)) if j == 0 else (":" + "-" * w + ":") for j, w in enumerate(widths)) + "|"
        return "\n\n".join(["\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])]), *self.notes])


def results_table(runs: Sequence[RunSummary], **options: Any) -> str:
    """The Markdown table of :func:`table_cells` (same arguments), its notes under it."""
    return table_cells(runs, **options).markdown()


def table_cells(
    runs: Sequence[RunSummary],
    *,
    task: str | None = None,
    with_minp: bool = False,
    order: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    duplicates: Duplicates = "error",
    seeds: Seeds = "mean",
    efficiency: Mapping[Path, Efficiency] | None = None,
    machine: str | None = None,
) -> TableCells:
    """The cells of a results table like the published comparison: methods x datasets,
    ``R@1 / R@5 / R@10 / mAP`` for retrieval runs, ``AP / AP50 / AP75`` for detection runs
    (:meth:`TableCells.markdown` writes it; :func:`results_table` returns that text).

    ``task`` picks the runs of one task; without it the runs must all be of one task (a mix is a
    :class:`ReportError`: see :func:`results_tables`). Rows are method labels in the order first
    seen, or ``order`` first (labels given there without a run get an all-``–`` row, so a fixed
    layout stays fixed) followed by the others. Columns are the datasets present, in the order of
    ``kd_trainer.data.formats.DATASETS`` (or ``datasets`` first). ``with_minp`` appends the task's
    optional metrics (mINP for retrieval; detection has none) to each cell; ``–`` marks a method
    without a run on a dataset. Runs that are seeds of one configuration share a cell
    (``seeds="mean"``) or get a row each (``seeds="split"``); see the module docstring for
    ``duplicates``, the spread marks and the checkpoint column. Notes, when any, follow the table
    after a blank line. ``efficiency`` (run folder -> :class:`Efficiency`) adds the inference-cost
    columns (:func:`efficiency_columns`), ``machine`` naming where latency was measured.
    """
    runs = list(runs)
    if not runs:
        raise ReportError("no finished runs to tabulate")
    by_task = runs_by_task(runs)
    if task is None:
        if len(by_task) > 1:
            counts = ", ".join(f"{len(rs)} {t}" for t, rs in by_task.items())
            raise ReportError(f"the runs are of several tasks ({counts}) and a table holds one task's metrics: "
                              "pass task=... or build one table per task with results_tables()")
        task = next(iter(by_task))
    try:
        mset = task_metrics(task)
    except ValueError as e:
        raise ReportError(str(e)) from None
    runs = by_task.get(task, [])
    if not runs:
        raise ReportError(f"no finished {task} runs to tabulate (the runs are {', '.join(by_task)})")
    keys = mset.cell_keys(with_minp)
    groups = group_seeds(runs, seeds)
    labels = _row_labels(groups, duplicates)

    base_of: dict[str, str] = {}  # row label -> method label, so `order` also places split rows
    for lab, g in zip(labels, groups):
        base_of.setdefault(lab, g.label)
    rows: list[str] = []
    for want in order or []:
        rows += [lab for lab in dict.fromkeys(labels) if base_of[lab] == want and lab not in rows]
        if want not in base_of.values() and want not in rows:
            rows.append(want)
    rows += [lab for lab in dict.fromkeys(labels) if lab not in rows]

    given = [dataset_key(d) for d in datasets or []]
    present = sorted(dict.fromkeys(g.dataset for g in groups), key=dataset_rank)
    cols = list(dict.fromkeys([*given, *present]))

    cells = {(lab, g.dataset): g for lab, g in zip(labels, groups)}
    flagged, spread_notes = _spread_notes(rows, cols, cells, mset)
    with_selection = any(r.selected is not None for r in runs)

    head = [f"Method ({mset.heading(with_minp)})", *(dataset_display_name(d) for d in cols)]
    body = [[lab, *(_cell(cells.get((lab, d)), keys) + (f" {SPREAD_MARK}" if (lab, d) in flagged else "")
                    for d in cols)] for lab in rows]
    if with_selection:
        head.append("Checkpoint")
        for lab, row in zip(rows, body):
            row.append(_row_selection({d: cells[(lab, d)] for d in cols if (lab, d) in cells}))
    measured = {r.folder: efficiency[r.folder] for r in runs if efficiency and r.folder in efficiency}
    if measured:
        columns, cost_note = efficiency_columns(measured.values(), machine)
        head += columns
        for lab, row in zip(rows, body):
            per_dataset = {d: [measured.get(r.folder) for r in cells[(lab, d)].runs] for d in cols if (lab, d) in cells}
            row += _efficiency_row(per_dataset, len(columns))

    notes: list[str] = []  # Markdown paragraphs
    if any(g.n > 1 for g in groups):
        notes.append("Cells over several seeds: mean ± sample standard deviation (n - 1), n = number of seeds.")
    if spread_notes:
        notes.append("\n".join(spread_notes))
    if separated := _separation_notes(rows, cols, cells, mset):
        notes.append("\n".join(separated))
    if with_selection:
        text = (f"Checkpoint: the split and metric that chose each run's kept epoch; {NOT_RECORDED} = not "
                "recorded by the run.")
        if any(r.selected is not None and r.selected.split == "test" for r in runs):
            text += (" A checkpoint chosen on the test split is test-set selection (as the original code does): "
                     "optimistic next to val-selected numbers.")
        notes.append(text)
    if measured:
        notes.append(cost_note)
    notes += _draw_notes(runs, cols)
    return TableCells(head=head, body=body, notes=notes)


def _efficiency_row(per_dataset: Mapping[str, list[Efficiency | None]], width: int) -> list[str]:
    """A row's cost cells: one text when every run of the row costs the same (seeds of one model),
    else the text per dataset; ``–`` for runs without weights."""
    texts = {d: {tuple(efficiency_cells(e)[:width]) if e is not None else (MISSING,) * width for e in effs}
             for d, effs in per_dataset.items()}
    distinct = {t for ts in texts.values() for t in ts}
    if len(distinct) == 1:
        return list(next(iter(distinct)))
    return ["; ".join(f"{dataset_display_name(d)}: {' or '.join(t[j] for t in sorted(ts))}" for d, ts in texts.items())
            for j in range(width)]


def results_tables(runs: Sequence[RunSummary], **options: Any) -> dict[str, str]:
    """``{task: Markdown table}`` of :func:`results_table_cells` (same arguments)."""
    return {task: cells.markdown() for task, cells in results_table_cells(runs, **options).items()}


def results_table_cells(runs: Sequence[RunSummary], *, order: Sequence[str] | None = None,
                        datasets: Sequence[str] | None = None, **options: Any) -> dict[str, TableCells]:
    """``{task: table}``, one :func:`table_cells` per task the runs record, in the order of
    ``report.metrics.METRIC_SETS`` (retrieval, detection, classification); ``options`` are the other
    keywords of :func:`table_cells` but ``task``.

    ``order`` and ``datasets`` apply to every table, except that a label or dataset whose runs are
    all in another task's table is not added to this one as an empty row or column (a label
    without a run anywhere still gets its all-``–`` row, in each table).
    """
    by_task = runs_by_task(list(runs))
    if not by_task:
        raise ReportError("no finished runs to tabulate")
    out: dict[str, TableCells] = {}
    for task, mine in by_task.items():
        elsewhere = [r for t, rs in by_task.items() if t != task for r in rs]
        foreign_labels = {r.label for r in elsewhere} - {r.label for r in mine}
        foreign_datasets = {r.dataset for r in elsewhere} - {r.dataset for r in mine}
        out[task] = table_cells(mine, task=task, order=[o for o in order or [] if o not in foreign_labels],
                                datasets=[d for d in datasets or [] if dataset_key(d) not in foreign_datasets],
                                **options)
    return out

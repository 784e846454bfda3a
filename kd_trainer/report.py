"""Results tables and loss-curve plots from finished run folders.

    runs = collect_runs(["runs/"])                  # every folder under runs/ with test_results.json
    print(results_table(runs))                      # methods x datasets, R@1 / R@5 / R@10 / mAP
    plot_loss_curves("runs/motis_2stage", "motis.png")
    write_report(["runs/"], "reports/")             # results.md + one <run name>_losses.png per run

A run folder is a Trainer ``output_dir`` written by ``kd_trainer.run``; the files read are

* ``recipe.yaml``        ``name``, optional ``method`` (the row label), ``data.name`` (the column);
* ``test_results.json``  ``test_r1``, ``test_r5``, ``test_r10``, ``test_mAP``, ``test_mINP`` (%), and
  ``test_hybrid_<tower>_<metric>`` when the last stage evaluates hybrids; other keys are kept but unused;
* ``trainer_state.json`` ``log_history``: training entries with ``step``, ``loss`` and the term keys
  ``[<stage>/]loss_<term>[_weighted]`` (plus ``stage`` in multi-stage runs), evaluation entries with
  ``step`` and ``eval_r1`` ... ``eval_hybrid_<tower>_r1``;
* ``stages.json``        ``{"stages": [{"index", "name", "start_step", "end_step", "trainable"}, ...]}``,
  ``end_step`` exclusive. Optional: without it the stage layout is inferred from the log.

Only a folder holding ``test_results.json`` counts as finished. A folder with a ``recipe.yaml`` but
no test results (still training, crashed, or ``data.test_split: null``) is skipped with a
:class:`SkippedRunWarning` naming it, so a missing row is always explained.

Two runs with the same label on the same dataset (a re-run, another seed) are an error by default
(``duplicates="error"``): a table cell holds one number, and picking one run silently would hide
the other. ``duplicates="split"`` keeps both, each in its own row labelled ``<label> [<run name>]``
(or ``[<folder>]`` when the names agree too).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ReportError",
    "PlotDependencyError",
    "SkippedRunWarning",
    "RunSummary",
    "StageSpan",
    "LossCurves",
    "collect_runs",
    "results_table",
    "read_stages",
    "read_curves",
    "loss_series",
    "loss_figure",
    "plot_loss_curves",
    "write_report",
]

RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "test_results.json"
STATE_FILE = "trainer_state.json"
STAGES_FILE = "stages.json"

TABLE_METRICS = ("r1", "r5", "r10", "mAP")
METRIC_NAMES = {"r1": "R@1", "r5": "R@5", "r10": "R@10", "mAP": "mAP", "mINP": "mINP"}
MISSING = "–"  # en dash: the published tables' "no result"
HYBRID_TOWERS = {"image": "student image + teacher text", "text": "teacher image + student text"}

Duplicates = Literal["error", "split"]


class ReportError(ValueError):
    """Run folders that cannot be reported; the message names the folder or file at fault."""


class PlotDependencyError(ImportError):
    """matplotlib is missing: plotting is an optional extra (``pip install 'kd_trainer[plot]'``)."""


class SkippedRunWarning(UserWarning):
    """A run folder left out of a report (unfinished, or missing a file); the message names it."""


# ----------------------------------------------------------------------------- reading files


def _read_json(path: Path) -> Any:
    """JSON from ``path``; a malformed file is a :class:`ReportError` naming it and the position."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def _read_yaml(path: Path) -> Any:
    """YAML from ``path``; a malformed file is a :class:`ReportError` naming it."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ReportError(f"{path} is not valid YAML: {e}") from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@lru_cache(maxsize=None)
def _dataset_key(name: str) -> str:
    """The canonical key of a recipe's ``data.name`` (recipes accept "CUHK-PEDES", "cuhk-pedes" ...).

    Imported lazily: ``kd_trainer.data`` pulls in torch and datasets, which listing a few JSON
    files does not need until a table is built. An unknown name is kept as written, so a dataset
    this version does not know still gets its own column instead of an error.
    """
    from kd_trainer.data.formats import canonical_dataset_name

    try:
        return canonical_dataset_name(name)
    except ValueError:
        return name


@lru_cache(maxsize=None)
def dataset_display_name(key: str) -> str:
    """The published name of a dataset key (``cuhk_pedes`` -> ``CUHK-PEDES``); unknown keys as is."""
    from kd_trainer.data.formats import DATASETS

    spec = DATASETS.get(key)
    return spec.display_name if spec is not None else key


def _dataset_rank(key: str) -> int:
    from kd_trainer.data.formats import DATASETS

    keys = list(DATASETS)
    return keys.index(key) if key in keys else len(keys)


# ----------------------------------------------------------------------------- collecting runs


@dataclass(frozen=True)
class RunSummary:
    """One finished run: what a results table needs, and where it came from (for error messages)."""

    label: str  # row label: the recipe's `method`, else its `name`
    name: str  # the recipe's `name` (file names of plots)
    dataset: str  # canonical dataset key, e.g. "rstpreid"
    metrics: Mapping[str, float]  # test_results.json, numeric values, "test_" prefix removed
    folder: Path

    @property
    def dataset_name(self) -> str:
        return dataset_display_name(self.dataset)

    @property
    def hybrid(self) -> dict[str, dict[str, float]]:
        """Test metrics of the hybrid pairings, ``{"image": {"r1": ...}, "text": {...}}`` (may be empty)."""
        out: dict[str, dict[str, float]] = {}
        for k, v in self.metrics.items():
            m = re.fullmatch(r"hybrid_([A-Za-z0-9]+)_(.+)", k)
            if m:
                out.setdefault(m.group(1), {})[m.group(2)] = v
        return out


def _load_run(folder: Path) -> RunSummary:
    recipe = _read_yaml(folder / RECIPE_FILE)
    if not isinstance(recipe, dict):
        raise ReportError(f"{folder / RECIPE_FILE} is not a YAML mapping")
    data = recipe.get("data")
    if not isinstance(data, dict) or not data.get("name"):
        raise ReportError(f"{folder / RECIPE_FILE} has no data.name: cannot tell which dataset the run is on")
    name = str(recipe.get("name") or folder.name)
    label = str(recipe.get("method") or name)
    results = _read_json(folder / RESULTS_FILE)
    if not isinstance(results, dict):
        raise ReportError(f"{folder / RESULTS_FILE} is not a JSON object")
    metrics = {k.removeprefix("test_"): float(v) for k, v in results.items() if _number(v)}
    return RunSummary(label=label, name=name, dataset=_dataset_key(str(data["name"])), metrics=metrics,
                      folder=folder)


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


def _collect(paths: Iterable[str | os.PathLike]) -> tuple[list[RunSummary], list[tuple[Path, str]]]:
    """Finished runs and ``(folder, reason)`` of the skipped ones, in the order the paths give."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for p in paths:
        path = Path(p)
        if path.is_file() and path.name in (RESULTS_FILE, RECIPE_FILE, STATE_FILE, STAGES_FILE):
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


def _warn_skipped(skipped: Sequence[tuple[Path, str]]) -> None:
    for folder, reason in skipped:
        warnings.warn(f"skipped {folder}: {reason}", SkippedRunWarning, stacklevel=3)


def collect_runs(paths: Iterable[str | os.PathLike]) -> list[RunSummary]:
    """The finished runs in ``paths`` (run folders, or folders searched recursively for them).

    Unfinished runs are skipped with a :class:`SkippedRunWarning` naming the folder; a missing
    path or a malformed recipe/JSON file is a :class:`ReportError` naming the file, because a
    table with a run quietly missing would read as a complete comparison.
    """
    runs, skipped = _collect(paths)
    _warn_skipped(skipped)
    return runs


# ----------------------------------------------------------------------------- results table


def _display_folder(folder: Path) -> str:
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def _row_labels(runs: Sequence[RunSummary], duplicates: Duplicates) -> list[str]:
    """The row label of each run; runs sharing (label, dataset) raise or get distinguishing suffixes."""
    if duplicates not in ("error", "split"):
        raise ValueError(f"duplicates must be 'error' or 'split', got {duplicates!r}")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault((r.label, r.dataset), []).append(i)
    labels = [r.label for r in runs]
    clashes = {k: v for k, v in groups.items() if len(v) > 1}
    if clashes and duplicates == "error":
        lines = [f"  {label!r} on {dataset_display_name(ds)}: " + ", ".join(str(runs[i].folder) for i in idx)
                 for (label, ds), idx in clashes.items()]
        raise ReportError("several runs share a method label and dataset, and a table cell holds one run:\n"
                          + "\n".join(lines) + "\nGive them distinct `method:` labels in their recipes, "
                          "report fewer folders, or keep all of them as separate rows (--duplicates split).")
    for idx in clashes.values():
        names = [runs[i].name for i in idx]
        by_name = len(set(names)) == len(names)
        for i in idx:
            tag = runs[i].name if by_name else _display_folder(runs[i].folder)
            labels[i] = f"{runs[i].label} [{tag}]"
    return labels


def _cell(metrics: Mapping[str, float] | None, keys: Sequence[str]) -> str:
    if metrics is None:
        return MISSING
    return " / ".join(f"{metrics[k]:.2f}" if k in metrics else MISSING for k in keys)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def results_table(
    runs: Sequence[RunSummary],
    *,
    with_minp: bool = False,
    order: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    duplicates: Duplicates = "error",
) -> str:
    """A Markdown table like the published comparison: methods x datasets, ``R@1 / R@5 / R@10 / mAP``.

    Rows are method labels in the order first seen, or ``order`` first (labels given there
    without a run get an all-``–`` row, so a fixed layout stays fixed) followed by the others.
    Columns are the datasets present, in the order of ``kd_trainer.data.formats.DATASETS``
    (or ``datasets`` first). ``with_minp`` appends mINP to each cell; ``–`` marks a method
    without a run on a dataset. See the module docstring for ``duplicates``.
    """
    runs = list(runs)
    if not runs:
        raise ReportError("no finished runs to tabulate")
    keys = [*TABLE_METRICS, *(["mINP"] if with_minp else [])]
    labels = _row_labels(runs, duplicates)

    base_of: dict[str, str] = {}  # row label -> method label, so `order` also places split rows
    for lab, r in zip(labels, runs):
        base_of.setdefault(lab, r.label)
    rows: list[str] = []
    for want in order or []:
        rows += [lab for lab in dict.fromkeys(labels) if base_of[lab] == want and lab not in rows]
        if want not in base_of.values() and want not in rows:
            rows.append(want)
    rows += [lab for lab in dict.fromkeys(labels) if lab not in rows]

    given = [_dataset_key(d) for d in datasets or []]
    present = sorted(dict.fromkeys(r.dataset for r in runs), key=_dataset_rank)
    cols = list(dict.fromkeys([*given, *present]))

    cells = {(lab, r.dataset): r.metrics for lab, r in zip(labels, runs)}
    head = [f"Method ({' / '.join(METRIC_NAMES[k] for k in keys)})", *(dataset_display_name(d) for d in cols)]
    body = [[_md(lab), *(_cell(cells.get((lab, d)), keys) for d in cols)] for lab in rows]
    widths = [max(len(row[j]) for row in [head, *body]) for j in range(len(head))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join(("-" * (w + 2)) if j == 0 else (":" + "-" * w + ":") for j, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule, *(line(b) for b in body)])


# ----------------------------------------------------------------------------- loss curves


@dataclass(frozen=True)
class StageSpan:
    """One stage's steps, ``[start_step, end_step)`` in global optimizer steps."""

    index: int  # 1-based
    name: str
    start_step: int
    end_step: int
    trainable: Any = None
    inferred: bool = False  # True when read off the log because stages.json is missing


Series = tuple[list[int], list[float]]


@dataclass
class LossCurves:
    """What a loss plot draws, read from one run's ``trainer_state.json`` (and ``stages.json``)."""

    terms: dict[str, Series]  # term name (no stage prefix, no "loss_") -> (steps, values)
    total: Series  # the logged total `loss`
    evals: dict[str, Series]  # "r1", "hybrid_image_r1", "hybrid_text_r1" -> (steps, values)
    stages: list[StageSpan]
    weighted: bool = False
    # term -> index among training log entries of each point, to break a line across a stage without it
    _train_index: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def boundaries(self) -> list[int]:
        """Global steps where stages 2.. begin: where the vertical lines go."""
        return [s.start_step for s in self.stages[1:]]


def _log_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise ReportError(f"{run_dir}: no {STATE_FILE}, so there is no training log to plot")
    state = _read_json(path)
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ReportError(f"{path} has no log_history list")
    return [h for h in history if isinstance(h, dict) and _number(h.get("step"))]


def _parse_term_key(key: str) -> tuple[str, str, bool] | None:
    """``"image/loss_motis[image]_weighted"`` -> ``("image", "motis[image]", True)``; None if not a term."""
    prefix, _, last = key.rpartition("/")
    if not last.startswith("loss_"):
        return None
    term = last[len("loss_"):]
    weighted = term.endswith("_weighted")
    if weighted:
        term = term[: -len("_weighted")]
    return (prefix, term, weighted) if term else None


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
        if _number(h.get("stage")):
            last[int(h["stage"])] = max(last.get(int(h["stage"]), 0), int(h["step"]))
    if not last:
        return []
    prefixes: list[str] = []
    for h in train:
        for k in h:
            parsed = _parse_term_key(k)
            if parsed and parsed[0] and parsed[0] not in prefixes:
                prefixes.append(parsed[0])
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
        doc = _read_json(path)
        stages = doc.get("stages") if isinstance(doc, dict) else None
        if not isinstance(stages, list):
            raise ReportError(f"{path} has no `stages` list")
        try:
            return [StageSpan(int(s["index"]), str(s["name"]), int(s["start_step"]), int(s["end_step"]),
                              s.get("trainable")) for s in stages]
        except (KeyError, TypeError, ValueError) as e:
            raise ReportError(f"{path}: a stage lacks index/name/start_step/end_step ({e!r})") from None
    return _infer_stages(_log_history(run_dir) if history is None else history)


def read_curves(run_dir: str | os.PathLike, *, weighted: bool = False) -> LossCurves:
    """Per-term losses, the total loss, eval R@1 and the stage layout of one run.

    Term keys lose their stage prefix, so a term trained in several stages (``ss_itc`` in the
    text and joint stages) is one series over global steps. A log entry whose window spans a
    stage boundary can hold the term under both stages' prefixes; both points are kept, the
    earlier stage's first. ``weighted`` picks ``loss_<term>_weighted`` instead of ``loss_<term>``.
    """
    run_dir = Path(run_dir)
    history = _log_history(run_dir)
    stages = read_stages(run_dir, history)
    stage_rank = {s.name: i for i, s in enumerate(stages)}
    terms: dict[str, Series] = {}
    train_index: dict[str, list[int]] = {}
    total: Series = ([], [])
    evals: dict[str, Series] = {}
    n_train = 0
    for h in history:
        step = int(h["step"])
        if "loss" in h and _number(h["loss"]):
            total[0].append(step)
            total[1].append(float(h["loss"]))
        points = []
        for k, v in h.items():
            parsed = _parse_term_key(k)
            if parsed is not None and parsed[2] == weighted and _number(v):
                points.append((stage_rank.get(parsed[0], len(stage_rank)), parsed[1], float(v)))
        for _, term, v in sorted(points, key=lambda p: p[0]):  # stable: first-seen order within a stage
            steps, values = terms.setdefault(term, ([], []))
            steps.append(step)
            values.append(v)
            train_index.setdefault(term, []).append(n_train)
        if "loss" in h or points:
            n_train += 1
        for k, v in h.items():
            m = re.fullmatch(r"eval_((?:hybrid_[A-Za-z0-9]+_)?r1)", k)
            if m and _number(v):
                s = evals.setdefault(m.group(1), ([], []))
                s[0].append(step)
                s[1].append(float(v))
    return LossCurves(terms=terms, total=total, evals=evals, stages=stages, weighted=weighted,
                      _train_index=train_index)


def loss_series(run_dir: str | os.PathLike, *, weighted: bool = False) -> dict[str, Series]:
    """``{term: (steps, values)}`` exactly as :func:`plot_loss_curves` draws them (see :func:`read_curves`)."""
    return read_curves(run_dir, weighted=weighted).terms


def _matplotlib() -> tuple[Any, Any, Any]:
    """``(Figure, FigureCanvasAgg, colormaps)``, imported here so nothing else needs matplotlib.

    The figure is drawn on an explicit Agg canvas instead of through pyplot: no GUI backend is
    ever chosen (headless machines, CI), and no global figure state leaks between plots.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotDependencyError("plotting loss curves needs matplotlib, an optional extra: "
                                  "pip install 'kd_trainer[plot]'") from e
    return Figure, FigureCanvasAgg, colormaps


def _with_gaps(steps: list[int], values: list[float], index: list[int]) -> tuple[list[float], list[float]]:
    """NaN between points that are not on consecutive log entries: a term absent from a stage in
    between would otherwise be drawn as a straight line through that stage."""
    xs: list[float] = []
    ys: list[float] = []
    for j, (s, v, i) in enumerate(zip(steps, values, index)):
        if j and i - index[j - 1] > 1:
            xs.append(math.nan)
            ys.append(math.nan)
        xs.append(float(s))
        ys.append(v)
    return xs, ys


def _title(run_dir: Path) -> str:
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        return run_dir.name
    recipe = _read_yaml(path)
    if not isinstance(recipe, dict):
        return run_dir.name
    name = str(recipe.get("name") or run_dir.name)
    label = str(recipe.get("method") or name)
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    ds = dataset_display_name(_dataset_key(str(data["name"]))) if data.get("name") else None
    head = label if label == name else f"{label} ({name})"
    return f"{head} on {ds}" if ds else head


def loss_figure(run_dir: str | os.PathLike, *, weighted: bool = False, total: bool = True,
                evals: bool = True) -> Any:
    """The loss-curve figure (a ``matplotlib.figure.Figure`` on the Agg canvas, no pyplot state).

    Returned rather than only saved so callers and tests can read the drawn data back:
    ``fig.axes[0]`` holds one line per term (label = term name), the total loss (label
    ``"loss (total)"``, thicker) and the stage boundaries (vertical lines, gid ``"stage-boundary"``);
    ``fig.axes[1]``, when the log has evaluations, eval R@1 (and hybrid R@1) in %.
    """
    Figure, FigureCanvasAgg, colormaps = _matplotlib()
    run_dir = Path(run_dir)
    curves = read_curves(run_dir, weighted=weighted)
    fig = Figure(figsize=(10, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = len(curves.terms)
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    colors = [cmap(i % cmap.N) for i in range(n)]
    for color, (term, (steps, values)) in zip(colors, curves.terms.items()):
        xs, ys = _with_gaps(steps, values, curves._train_index[term])
        ax.plot(xs, ys, label=term + (" (weighted)" if weighted else ""), color=color, linewidth=1.3)
    if total and curves.total[0]:
        ax.plot(curves.total[0], curves.total[1], label="loss (total)", color="black", linewidth=2.6, alpha=0.8)
    ax.set_xlabel("global step")
    ax.set_ylabel("weighted loss" if weighted else "loss (unweighted terms)")
    ax.grid(True, alpha=0.3)

    last = max([*(s.end_step for s in curves.stages), *curves.total[0],
                *(x for st, _ in curves.terms.values() for x in st), 1])
    ax.set_xlim(0, last)
    trans = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for s in curves.stages[1:]:
        ax.axvline(s.start_step, color="0.35", linestyle="--", linewidth=1.0, gid="stage-boundary")
    if len(curves.stages) > 1 or (curves.stages and not curves.stages[0].inferred):
        for s in curves.stages:
            what = f", {s.trainable}" if isinstance(s.trainable, str) else ""
            ax.text(s.start_step, 0.99, f" {s.index}: {s.name}{what}", transform=trans, ha="left", va="top",
                    fontsize=8, color="0.25", gid="stage-label")

    handles, labels = ax.get_legend_handles_labels()
    if evals and curves.evals:
        ax2 = ax.twinx()
        styles = {"r1": ("o-", "eval R@1"), "hybrid_image_r1": ("s--", "eval R@1, student image + teacher text"),
                  "hybrid_text_r1": ("^--", "eval R@1, teacher image + student text")}
        for key, (steps, values) in curves.evals.items():
            marker, label = styles.get(key, ("d:", f"eval {key}"))
            ax2.plot(steps, values, marker, label=label, color="0.3" if key == "r1" else "0.6",
                     markersize=4, linewidth=1.0)  # greys: the colours belong to the loss terms
        ax2.set_ylabel("eval R@1 (%)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:  # below the plot: inside it, a legend of 5-10 terms hides curves and stage labels
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8,
                  frameon=False)
    ax.set_title(_title(run_dir), fontsize=11)
    fig.tight_layout()
    return fig


def plot_loss_curves(run_dir: str | os.PathLike, out_png: str | os.PathLike, *, weighted: bool = False,
                     total: bool = True, evals: bool = True) -> Path:
    """Save the per-term loss curves of one run (see :func:`loss_figure`) as a PNG; returns its path."""
    fig = loss_figure(run_dir, weighted=weighted, total=total, evals=evals)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# ----------------------------------------------------------------------------- the report


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _metric_line(m: Mapping[str, float]) -> str:
    return ", ".join(f"{METRIC_NAMES[k]} {m[k]:.2f}" for k in METRIC_NAMES if k in m) or MISSING


def _hybrid_during_training(run_dir: Path) -> dict[str, tuple[int, dict[str, float]]]:
    """Per tower, the last evaluation that ran the hybrid pairing: ``{tower: (step, metrics)}``."""
    if not (run_dir / STATE_FILE).is_file():
        return {}
    out: dict[str, tuple[int, dict[str, float]]] = {}
    for h in _log_history(run_dir):
        found: dict[str, dict[str, float]] = {}
        for k, v in h.items():
            m = re.fullmatch(r"eval_hybrid_([A-Za-z0-9]+)_(.+)", k)
            if m and m.group(2) in METRIC_NAMES and _number(v):
                found.setdefault(m.group(1), {})[m.group(2)] = float(v)
        for tower, metrics in found.items():
            out[tower] = (int(h["step"]), metrics)
    return out


def _run_section(run: RunSummary, plot: Path | None) -> list[str]:
    lines = [f"### {run.label} on {run.dataset_name}", "",
             f"- run `{run.name}`, folder `{_display_folder(run.folder)}`",
             f"- test: {_metric_line(run.metrics)}"]
    hybrid = run.hybrid
    for tower, m in hybrid.items():
        lines.append(f"- test, hybrid {tower} ({HYBRID_TOWERS.get(tower, tower)}): {_metric_line(m)}")
    for tower, (step, m) in _hybrid_during_training(run.folder).items():
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
    plots: bool = True,
    weighted: bool = False,
) -> dict[str, Any]:
    """Write ``results.md`` (the table, skipped runs, one section per run) and ``<run name>_losses.png``.

    Returns ``{"results": Path, "plots": {run folder (str): Path}, "table": str}`` (the table
    too, so a caller printing it does not read the runs twice). Runs without a
    ``trainer_state.json`` get no plot (a :class:`SkippedRunWarning` says so). The runs are read,
    the table built and matplotlib imported before anything is written, so a duplicate or a
    malformed results file leaves no half-written report; ``results.md`` is written last.
    """
    paths = list(paths)
    runs, skipped = _collect(paths)
    _warn_skipped(skipped)
    if not runs:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise ReportError(f"no finished run (a folder with {RESULTS_FILE} and {RECIPE_FILE}) under {where}")
    table = results_table(runs, with_minp=with_minp, order=order, duplicates=duplicates)
    if plots:
        _matplotlib()
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
            stem = _safe_stem(f"{run.name}__{_display_folder(run.folder)}")
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
    for run in runs:
        doc += _run_section(run, written.get(str(run.folder)))
    results = out / "results.md"
    results.write_text("\n".join(doc).rstrip("\n") + "\n", encoding="utf-8")
    return {"results": results, "plots": written, "table": table}

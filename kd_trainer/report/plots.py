"""Loss-curve plots of one run: every term, the total loss, stage boundaries and the evaluations
(R@1 for retrieval, AP for detection).

matplotlib is an optional extra, imported only by :func:`require_matplotlib`; a missing one is a
:class:`PlotDependencyError` that says what to install.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from kd_trainer.report.dataset_names import dataset_display_name, dataset_key
from kd_trainer.report.errors import PlotDependencyError
from kd_trainer.report.folder import RECIPE_FILE, read_yaml
from kd_trainer.report.logs import EVAL_HEADLINES, read_curves
from kd_trainer.report.metrics import ALL_METRIC_NAMES

__all__ = ["require_matplotlib", "loss_figure", "plot_loss_curves"]


def require_matplotlib() -> tuple[Any, Any, Any]:
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
    recipe = read_yaml(path)
    if not isinstance(recipe, dict):
        return run_dir.name
    name = str(recipe.get("name") or run_dir.name)
    label = str(recipe.get("method") or name)
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    ds = dataset_display_name(dataset_key(str(data["name"]))) if data.get("name") else None
    head = label if label == name else f"{label} ({name})"
    return f"{head} on {ds}" if ds else head


def loss_figure(run_dir: str | os.PathLike, *, weighted: bool = False, total: bool = True,
                evals: bool = True) -> Any:
    """The loss-curve figure (a ``matplotlib.figure.Figure`` on the Agg canvas, no pyplot state).

    Returned rather than only saved so callers and tests can read the drawn data back:
    ``fig.axes[0]`` holds one line per term (label = term name), the total loss (label
    ``"loss (total)"``, thicker) and the stage boundaries (vertical lines, gid ``"stage-boundary"``);
    ``fig.axes[1]``, when the log has evaluations, eval R@1 (and hybrid R@1) in %, or the task's
    headline metric (eval AP for a detection run).
    """
    Figure, FigureCanvasAgg, colormaps = require_matplotlib()
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
        styles = {**{k: ("o-", f"eval {ALL_METRIC_NAMES[k]}") for k in EVAL_HEADLINES},
                  "hybrid_image_r1": ("s--", "eval R@1, student image + teacher text"),
                  "hybrid_text_r1": ("^--", "eval R@1, teacher image + student text")}
        for key, (steps, values) in curves.evals.items():
            marker, label = styles.get(key, ("d:", f"eval {key}"))
            ax2.plot(steps, values, marker, label=label, color="0.3" if key in EVAL_HEADLINES else "0.6",
                     markersize=4, linewidth=1.0)  # greys: the colours belong to the loss terms
        drawn = [ALL_METRIC_NAMES[k] for k in curves.evals if k in EVAL_HEADLINES] or ["R@1"]  # hybrids: R@1
        ax2.set_ylabel(f"eval {' / '.join(drawn)} (%)")
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

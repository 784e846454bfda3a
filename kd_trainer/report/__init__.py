"""Results tables and loss-curve plots from finished run folders.

    runs = collect_runs(["runs/"])                  # every folder under runs/ with test_results.json
    print(results_table(runs))                      # methods x datasets, R@1 / R@5 / R@10 / mAP
    tables = results_tables(runs)                   # {"retrieval": ..., "detection": AP / AP50 / AP75}
    plot_loss_curves("runs/motis_2stage", "motis.png")
    write_report(["runs/"], "reports/")             # results.md, <run name>_losses.png per run, index.html

One module per job:

* :mod:`~kd_trainer.report.folder`      what a run folder holds, and reading its files;
* :mod:`~kd_trainer.report.discovery`   finding finished runs (:func:`collect_runs`, :class:`RunSummary`);
* :mod:`~kd_trainer.report.metrics`     which metrics a run's table shows (one set per task), old names;
* :mod:`~kd_trainer.report.seeds`       which runs are seeds of one configuration, mean ± std;
* :mod:`~kd_trainer.report.tables`      the results tables (:func:`results_table`, one per task:
  :func:`results_tables`);
* :mod:`~kd_trainer.report.logs`        the training log: loss series, evaluations, stages;
* :mod:`~kd_trainer.report.plots`       loss-curve figures (matplotlib, an optional extra);
* :mod:`~kd_trainer.report.efficiency`  a model's parameters per tower, FLOPs, CPU latency, the machine;
* :mod:`~kd_trainer.report.galleries`   run roles (teacher / no KD / KD), test rankings, KD-changed answers;
* :mod:`~kd_trainer.report.inference`   running each run's model once for its cost and its ranking;
* :mod:`~kd_trainer.report.html_page`   ``index.html``: tables, loss curves, galleries;
* :mod:`~kd_trainer.report.writer`      ``results.md``, the plots and the page (:func:`write_report`).

Log keys are read through :mod:`kd_trainer.log_keys`, the module the trainers write them with.
"""

from kd_trainer.report.discovery import RunSummary, Selection, collect_runs
from kd_trainer.report.efficiency import Efficiency, Latency, machine, model_efficiency
from kd_trainer.report.errors import PlotDependencyError, ReportError, SkippedRunWarning, UnknownMetricWarning
from kd_trainer.report.galleries import GalleryOptions, run_roles
from kd_trainer.report.logs import LossCurves, StageSpan, loss_series, read_curves, read_stages
from kd_trainer.report.metrics import DETECTION, METRIC_ALIASES, METRIC_SETS, RETRIEVAL, MetricSet
from kd_trainer.report.plots import loss_figure, plot_loss_curves
from kd_trainer.report.seeds import SeedGroup, group_seeds
from kd_trainer.report.tables import results_table, results_tables
from kd_trainer.report.writer import write_report

__all__ = [
    "ReportError",
    "PlotDependencyError",
    "SkippedRunWarning",
    "UnknownMetricWarning",
    "MetricSet",
    "METRIC_SETS",
    "RETRIEVAL",
    "DETECTION",
    "METRIC_ALIASES",
    "RunSummary",
    "Selection",
    "SeedGroup",
    "StageSpan",
    "LossCurves",
    "collect_runs",
    "group_seeds",
    "results_table",
    "results_tables",
    "read_stages",
    "read_curves",
    "loss_series",
    "loss_figure",
    "plot_loss_curves",
    "write_report",
    "Efficiency",
    "Latency",
    "machine",
    "model_efficiency",
    "GalleryOptions",
    "run_roles",
]

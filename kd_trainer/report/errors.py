"""What goes wrong when reporting run folders: the report's exception and warning classes."""

from __future__ import annotations

__all__ = ["ReportError", "PlotDependencyError", "SkippedRunWarning", "UnknownMetricWarning"]


class ReportError(ValueError):
    """Run folders that cannot be reported; the message names the folder or file at fault."""


class PlotDependencyError(ImportError):
    """matplotlib is missing: plotting is an optional extra (``pip install 'kd_trainer[plot]'``)."""


class SkippedRunWarning(UserWarning):
    """A run folder left out of a report (unfinished, or missing a file); the message names it."""


class UnknownMetricWarning(UserWarning):
    """A run records a number that is no metric of its task's table (nor bookkeeping such as epoch
    or timing): the report lists it in the run's section instead of dropping it; the message names it."""

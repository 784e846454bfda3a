"""What a run folder holds and how its files are read: every malformed file is a ReportError naming it.

A run folder is a Trainer ``output_dir`` written by :mod:`kd_trainer.runner`; the files read are

* ``recipe.yaml``        the fully resolved recipe: ``name``, ``seed``, optional ``method`` (the row
  label), ``data.name`` (the column), and everything that decides which runs are seeds of one
  configuration (see :mod:`kd_trainer.report.seeds`);
* ``test_results.json``  a retrieval run: ``test_r1``, ``test_r5``, ``test_r10``, ``test_mAP``, ``test_mINP``
  (%), and ``test_hybrid_<tower>_<metric>`` when the last stage evaluates hybrids; a detection run:
  ``test_AP``, ``test_AP50``, ``test_AP75`` (COCO box AP, %; older runs ``test_map``, ``test_map_50``,
  ``test_map_75``, see :mod:`kd_trainer.report.metrics`); optionally ``selected`` (which epoch was
  kept, on which split); other numbers are listed per run as unknown;
* ``trainer_state.json`` ``log_history``: training entries with ``step``, ``loss`` and the keys of
  :mod:`kd_trainer.log_keys` (plus ``stage`` in multi-stage runs), evaluation entries with
  ``step`` and ``eval_r1`` ... ``eval_hybrid_<tower>_r1``;
* ``stages.json``        ``{"stages": [{"index", "name", "start_step", "end_step", "trainable"}, ...]}``,
  ``end_step`` exclusive, optionally ``selected``. Optional: without it the stage layout is
  inferred from the log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kd_trainer.report.errors import ReportError

__all__ = ["RECIPE_FILE", "RESULTS_FILE", "STATE_FILE", "STAGES_FILE", "RUN_FILES", "read_json", "read_yaml",
           "is_number"]

RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "test_results.json"
STATE_FILE = "trainer_state.json"
STAGES_FILE = "stages.json"
RUN_FILES = (RESULTS_FILE, RECIPE_FILE, STATE_FILE, STAGES_FILE)


def read_json(path: Path) -> Any:
    """JSON from ``path``; a malformed file is a :class:`ReportError` naming it and the position."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def read_yaml(path: Path) -> Any:
    """YAML from ``path``; a malformed file is a :class:`ReportError` naming it."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ReportError(f"{path} is not valid YAML: {e}") from None


def is_number(v: Any) -> bool:
    """A JSON number (not a bool, which Python counts as an int)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)

"""Transitional: names other modules still import from here (run.py, distill/retrieval.py,
models/inherit.py, models/onnx_export.py, tests/test_end_to_end.py, tests/test_inherit.py).

Everything lives in :mod:`kd_trainer.models.loading`; delete this file once they import from there.
"""

import logging

from kd_trainer.models.loading import (
    MODEL_CONFIG_NAME,
    PROJECTION_PREFIXES,
    CheckpointError,
    load_model,
    load_weights,
    read_state_dict,
)

logger = logging.getLogger("kd_trainer")

__all__ = ["MODEL_CONFIG_NAME", "PROJECTION_PREFIXES", "CheckpointError", "load_model", "load_weights", "logger",
           "read_state_dict"]

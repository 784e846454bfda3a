"""Transitional: names other modules still import from here (cli.py, models/inherit.py,
models/onnx_export.py).

Everything lives in :mod:`kd_trainer.models.loading`; delete this file once they import from there.
"""

from kd_trainer.models.loading import model_from_checkpoint, resize_text_positions, resize_visual_positions

__all__ = ["model_from_checkpoint", "resize_text_positions", "resize_visual_positions"]

"""What an exported folder holds: the file names, the format of ``preprocess.json``, the errors a folder
raises, and the ``deploy`` extra every ONNX step needs.

The export (:mod:`.export`), the runtime (:mod:`.runtime`) and the verification (:mod:`.verify`) all read
and write the same folder; its layout is decided here, once.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from kd_trainer.models.loading import CheckpointError

__all__ = [
    "IMAGE_ENCODER",
    "TEXT_ENCODER",
    "PREPROCESS_FILE",
    "REPORT_FILE",
    "VARIANTS",
    "TOWERS",
    "SPEC_FORMAT",
    "DeployDependencyError",
    "OnnxFolderError",
    "graph_file_name",
    "read_spec",
    "require_deploy",
]

IMAGE_ENCODER = "image_encoder.onnx"
TEXT_ENCODER = "text_encoder.onnx"
PREPROCESS_FILE = "preprocess.json"
REPORT_FILE = "export_report.json"
VARIANTS = ("fp32", "int8", "fp16")
TOWERS = ("image", "text")
IMAGE_INPUT, TEXT_INPUT = "pixel_values", "input_ids"
IMAGE_OUTPUT, TEXT_OUTPUT = "image_embeds", "text_embeds"
PAD_TOKEN_ID = 0
SPEC_FORMAT = "kd_trainer-onnx/1"
EXTRA_HINT = "pip install 'kd_trainer[deploy]'"


class DeployDependencyError(ImportError):
    """The ``deploy`` extra (onnx, onnxruntime, onnxscript) is not installed."""


class OnnxFolderError(CheckpointError):
    """An ONNX export folder that cannot be used as asked: a file missing, or graphs that disagree with
    ``preprocess.json`` (the message names both values)."""


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # sys.modules[name] is None: the package is blocked, as good as absent
        return False


def require_deploy() -> None:
    """Raise :class:`DeployDependencyError` naming what of the ``deploy`` extra is missing."""
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if not _installed(name)]
    if missing:
        raise DeployDependencyError(f"ONNX export needs {', '.join(missing)} (not installed): {EXTRA_HINT}")


def graph_file_name(tower: str, variant: str) -> str:
    """``image_encoder.onnx``, ``text_encoder.int8.onnx``, ...: the file of one tower of one variant."""
    base = IMAGE_ENCODER if tower == "image" else TEXT_ENCODER
    return base if variant == "fp32" else base.replace(".onnx", f".{variant}.onnx")


def read_spec(folder: Path) -> dict[str, Any]:
    """``folder``'s ``preprocess.json``, refused unless it is one :mod:`.export` wrote."""
    path = folder / PREPROCESS_FILE
    if not path.is_file():
        raise OnnxFolderError(f"{str(folder)!r} has no {PREPROCESS_FILE}: not a folder written by "
                              "`kd-trainer export-onnx`")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OnnxFolderError(f"{str(path)!r} is not valid JSON ({e})") from e
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise OnnxFolderError(f"{str(path)!r} has format {found!r}, expected {SPEC_FORMAT!r}")
    return spec

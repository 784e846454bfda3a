"""What an exported folder holds, and whether it is whole: the file names, the format of
``preprocess.json``, how an export is put in place, the errors a folder raises, and the ``deploy`` extra
every ONNX step needs.

The export (:mod:`.export`), the runtime (:mod:`.runtime`) and the verification (:mod:`.verify`) all read
and write the same folder; its layout is decided here, once.

Whole or refused. An export is written into a hidden sibling folder (``.NAME.partial-PID``) and only
then moved in (:func:`install_export`): the old ``preprocess.json`` and ``export_report.json`` are removed
first, the new graphs moved in, and the new ``preprocess.json`` last. A process killed while writing
leaves the old export untouched; one killed while moving leaves a folder without ``preprocess.json``,
which is refused as unfinished. ``preprocess.json`` records the SHA-256 of every graph it lists, and
``export_report.json`` the same checksums, so a graph truncated, swapped or left from another export
(and a report of other graphs) is refused by :func:`check_graphs`, naming the file, instead of scored.
Other files in the folder (a run folder's checkpoints, eval results) are never touched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

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
    "OnnxExportError",
    "OnnxFolderError",
    "check_graphs",
    "check_output_folder",
    "file_sha256",
    "graph_file_name",
    "install_export",
    "new_stage",
    "read_report",
    "read_spec",
    "require_deploy",
    "write_json",
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
SPEC_FORMAT = "kd_trainer-onnx/2"
# Earlier formats, and why a folder written in one is not read: export it again.
OLD_FORMATS = {"kd_trainer-onnx/1": "it records no checksums of its graphs, so a mixed or truncated folder "
                                    "cannot be told from a whole one"}
EXTRA_HINT = "pip install 'kd_trainer[deploy]'"


class DeployDependencyError(ImportError):
    """The ``deploy`` extra (onnx, onnxruntime, onnxscript) is not installed."""


class OnnxFolderError(CheckpointError):
    """An ONNX export folder that cannot be used as asked: a file missing, unfinished, damaged or from
    another export, or graphs that disagree with ``preprocess.json`` (the message names both values)."""


class OnnxExportError(CheckpointError):
    """An export that cannot be made as asked (an image size the model cannot take, an output path
    under a file); the message says what was asked and what is possible."""


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


def graph_files() -> tuple[str, ...]:
    """Every graph file name an export may write."""
    return tuple(graph_file_name(t, v) for v in VARIANTS for t in TOWERS)


def file_sha256(path: Path) -> str:
    """The file's SHA-256 (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so a reader sees the old file
    or the whole new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_spec(folder: Path) -> dict[str, Any]:
    """``folder``'s ``preprocess.json``, refused unless it is a whole one :mod:`.export` wrote."""
    path = folder / PREPROCESS_FILE
    if not path.is_file():
        if folder.is_dir() and any((folder / name).exists() for name in graph_files()):
            raise OnnxFolderError(f"{str(folder)!r} holds ONNX graphs but no {PREPROCESS_FILE}: an export that "
                                  "did not finish; run `kd-trainer export-onnx` again")
        raise OnnxFolderError(f"{str(folder)!r} has no {PREPROCESS_FILE}: not a folder written by "
                              "`kd-trainer export-onnx`")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OnnxFolderError(f"{str(path)!r} is not valid JSON ({e})") from e
    found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
    if found in OLD_FORMATS:
        raise OnnxFolderError(f"{str(path)!r} has the earlier format {found!r}: {OLD_FORMATS[found]}; "
                              "run `kd-trainer export-onnx` again")
    if not isinstance(spec, dict) or found != SPEC_FORMAT:
        raise OnnxFolderError(f"{str(path)!r} has format {found!r}, expected {SPEC_FORMAT!r}")
    if not isinstance(spec.get("sha256"), dict):
        raise OnnxFolderError(f"{str(path)!r} records no checksums of its graphs (its 'sha256' is missing); "
                              "run `kd-trainer export-onnx` again")
    return spec


def read_report(folder: Path) -> dict[str, Any] | None:
    """``folder``'s ``export_report.json``, or None when the graphs were never verified."""
    path = folder / REPORT_FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OnnxFolderError(f"{str(path)!r} is not valid JSON ({e}); run `kd-trainer export-onnx` again") from e
    if not isinstance(report, dict):
        raise OnnxFolderError(f"{str(path)!r} holds a {type(report).__name__}, not an export report")
    return report


def check_graphs(folder: Path, spec: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Path]:
    """The paths of ``names`` (tower -> file name, one variant of ``spec``), each checked against the
    checksum ``preprocess.json`` records for it; and ``export_report.json``, when there is one, must
    have been written for the graphs ``preprocess.json`` lists. Raises :class:`OnnxFolderError` naming
    the file that is missing, damaged or from another export."""
    recorded = spec["sha256"]
    paths = {}
    for tower, name in names.items():
        path = folder / name
        if not path.is_file():
            raise OnnxFolderError(f"{str(path)!r} is listed in {PREPROCESS_FILE} but missing")
        if name not in recorded:
            raise OnnxFolderError(f"{folder / PREPROCESS_FILE} records no checksum for {name}; "
                                  "run `kd-trainer export-onnx` again")
        if file_sha256(path) != recorded[name]:
            raise OnnxFolderError(f"{str(path)!r} does not match the checksum {PREPROCESS_FILE} records for it "
                                  f"({path.stat().st_size} bytes): the graph is truncated, damaged or from "
                                  "another export; run `kd-trainer export-onnx` again")
        paths[tower] = path
    report = read_report(folder)
    if report is not None and report.get("sha256") != dict(recorded):
        raise OnnxFolderError(f"{folder / REPORT_FILE} was not written for the graphs {PREPROCESS_FILE} lists "
                              "(a report left from another export); run `kd-trainer export-onnx` again")
    return paths


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def check_output_folder(out: Path) -> None:
    """Raise :class:`OnnxExportError` unless ``out`` is a folder or can be made one (missing folders
    are created): not a file, and not under one."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else f"is under {str(path)!r}, which is a file"
                raise OnnxExportError(f"the output folder {str(out)!r} {where}")
            return


def new_stage(out: Path) -> Path:
    """An empty hidden sibling of ``out`` to write an export into (same file system, so moving the
    files in is a rename). Stages left by killed exports into ``out`` are removed first."""
    check_output_folder(out)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.partial-"
    for old in parent.glob(prefix + "*"):
        suffix = old.name[len(prefix):]
        if suffix.isdigit() and not _alive(int(suffix)):
            shutil.rmtree(old, ignore_errors=True)
    stage = parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def install_export(stage: Path, out: Path) -> None:
    """Move a finished export from ``stage`` into ``out`` (see the module's docstring for the order
    and why), then remove ``stage``. Files in ``out`` that no export writes are left alone."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (PREPROCESS_FILE, REPORT_FILE, *graph_files()):  # preprocess.json first: unfinished from here
        (out / name).unlink(missing_ok=True)
    for path in sorted(stage.iterdir()):
        if path.name != PREPROCESS_FILE:
            os.replace(path, out / path.name)
    os.replace(stage / PREPROCESS_FILE, out / PREPROCESS_FILE)
    stage.rmdir()

"""Proof that an exported folder still is the model: its graphs against the PyTorch module on one batch,
and, given a dataset, every variant's retrieval metrics against the model's; written to
``export_report.json`` and shown as markdown.

    report = verify_onnx_export("exports/student", model, dataset="rstpreid", root="./data")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from kd_trainer.data import (
    DatasetFormatError,
    canonical_dataset_name,
    collate_retrieval,
    load_pedes,
    open_image,
    with_retrieval_transforms,
)
from kd_trainer.evaluation import evaluate_retrieval, format_metrics, rank_metrics
from kd_trainer.models.factory import RetrievalModel
from kd_trainer.models.onnx.export import PROBE_CAPTIONS, arch_label, at_image_size
from kd_trainer.models.finite import require_finite_weights
from kd_trainer.models.onnx.folder import (
    PREPROCESS_FILE,
    REPORT_FILE,
    VARIANTS,
    OnnxExportError,
    OnnxFolderError,
    read_spec,
    write_json,
)
from kd_trainer.models.onnx.quantize import CALIBRATED_INT8_SCHEMES
from kd_trainer.models.onnx.runtime import OnnxDualEncoder

__all__ = [
    "ExportVerificationError",
    "check_limits",
    "compare_embeddings",
    "evaluate_onnx",
    "verify_onnx_export",
    "format_export_report",
]


class ExportVerificationError(RuntimeError):
    """The exported graphs are not the model: embeddings differ beyond ``atol`` or a retrieval metric
    dropped beyond ``tolerance``. ``report`` holds every measurement (also written to export_report.json)."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report



def compare_embeddings(model: RetrievalModel, encoder: OnnxDualEncoder, pixel_values: torch.Tensor,
                       input_ids: torch.Tensor) -> dict[str, float]:
    """Max abs difference between the PyTorch model's and the graphs' normalised embeddings of one
    batch (the same input tensors on both sides), per tower."""
    model.eval()
    with torch.no_grad():
        ref_img = model.encode_image(pixel_values, normalize=True).float()
        ref_txt = model.encode_text(input_ids, normalize=True).float()
    return {"image": float((encoder.encode_image(pixel_values) - ref_img).abs().max()),
            "text": float((encoder.encode_text(input_ids) - ref_txt).abs().max())}


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def evaluate_onnx(encoder: OnnxDualEncoder, gallery: Any, queries: Any, *, dataset_name: str = "",
                  batch_size: int = 64) -> dict[str, float]:
    """Text-to-image metrics of an exported folder on one raw split (``load_pedes`` rows: gallery with
    ``image_path``/``pid``, queries with ``caption``/``pid``), preprocessed from ``preprocess.json`` and
    ranked by :func:`kd_trainer.evaluation.rank_metrics`, the code every PyTorch evaluation uses."""
    paths, captions = list(gallery["image_path"]), list(queries["caption"])
    g = torch.cat([encoder.encode_image(encoder.preprocess_images(open_image(p, dataset_name) for p in chunk))
                   for chunk in _batches(paths, batch_size)])
    q = torch.cat([encoder.encode_text(encoder.tokenize(chunk)) for chunk in _batches(captions, batch_size)])
    return rank_metrics(q, g, torch.as_tensor(list(queries["pid"])), torch.as_tensor(list(gallery["pid"])))


def _probe_batch(encoder: OnnxDualEncoder, raw: Any, split: str, dataset_name: str, n: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs for the numerical check: the split's first ``n`` images and captions when a dataset is
    given (preprocessed from the spec), otherwise seeded noise images and :data:`PROBE_CAPTIONS`."""
    if raw is not None:
        gallery, queries = raw[f"{split}_gallery"], raw[f"{split}_queries"]
        paths = list(gallery["image_path"])[:n]
        images = encoder.preprocess_images(open_image(p, dataset_name) for p in paths)
        captions = list(queries["caption"])[:n]
    else:
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(n, 3, *encoder.image_size, generator=gen).numpy()
        captions = [PROBE_CAPTIONS[i % len(PROBE_CAPTIONS)] for i in range(n)]
    return torch.from_numpy(images), torch.from_numpy(encoder.tokenize(captions))


def _reference_metrics(model: RetrievalModel, raw: Any, split: str, dataset_name: str,
                       batch_size: int) -> dict[str, float]:
    views = with_retrieval_transforms(raw, image_size=model.image_size, augment=False,
                                      context_length=model.context_length, dataset_name=dataset_name)
    return evaluate_retrieval(model, views[f"{split}_gallery"], views[f"{split}_queries"], batch_size=batch_size,
                              collate_fn=collate_retrieval, progress=False)


def _file_sizes(folder: Path, files: Mapping[str, str]) -> dict[str, int]:
    return {tower: (folder / name).stat().st_size for tower, name in files.items()}


def check_limits(*, tolerance: float, atol: float) -> None:
    """Raise :class:`OnnxExportError` for limits no export can meet: a negative (or NaN) tolerance or
    atol would fail every export."""
    if not (tolerance >= 0 and atol >= 0):
        raise OnnxExportError(f"tolerance and atol must be >= 0, got {tolerance} and {atol}")


def verify_onnx_export(
    folder: str | os.PathLike,
    model: RetrievalModel,
    *,
    dataset: str | None = None,
    root: str | os.PathLike | None = None,
    split: str = "test",
    tolerance: float = 0.5,
    atol: float = 1e-4,
    batch_size: int = 64,
    probe_size: int = 8,
) -> dict[str, Any]:
    """Check every variant in ``folder`` against ``model`` (the PyTorch model, at its own size) and write
    ``export_report.json``; raise :class:`ExportVerificationError` listing every failed check.

    1. Numerics: each variant's embeddings of one batch vs the PyTorch module the graphs were traced from
       (``model`` at the export size); fp32 must agree to ``atol`` (int8/fp16 are reported, and judged by 2).
    2. With ``dataset`` and ``root``: R@1, R@5, R@10, mAP, mINP of each variant on ``split``
       (:func:`evaluate_onnx`) vs ``model``'s (:func:`kd_trainer.evaluation.evaluate_retrieval`); a drop of
       R@1 or mAP by more than ``tolerance`` points fails.
    """
    folder = Path(folder)
    if (dataset is None) != (root is None):
        raise ValueError("give both dataset and root to check retrieval, or neither")
    check_limits(tolerance=tolerance, atol=atol)
    require_finite_weights(model.clip, name="the model", refused="compared with its export")
    spec = read_spec(folder)
    name = canonical_dataset_name(dataset) if dataset is not None else None
    raw = load_pedes(name, root, splits=[split]) if name is not None else None
    if raw is not None and f"{split}_gallery" not in raw:
        raise DatasetFormatError(f"{dataset} has no {split!r} split (it has {sorted(raw)})")
    if int(spec["text"]["context_length"]) != model.context_length:
        raise OnnxFolderError(f"{PREPROCESS_FILE} says context_length {spec['text']['context_length']}, the "
                              f"model has {model.context_length}: this folder is not an export of this model")
    traced = at_image_size(model, spec["image"]["size"])
    report: dict[str, Any] = {
        "folder": str(folder),
        "model": {"arch": arch_label(model), "image_size": list(model.image_size),
                  "context_length": model.context_length, "embed_dim": model.embed_dim,
                  "parameters": sum(p.numel() for p in model.clip.parameters())},
        "export_image_size": list(spec["image"]["size"]),
        "tolerance": tolerance, "atol": atol,
        "dataset": {"name": name, "root": str(root), "split": split} if name else None,
        "reference": None, "variants": {}, "failures": [],
        "sha256": spec["sha256"],  # what was verified: runtime.check_graphs refuses a report of other graphs
    }
    failures: list[str] = report["failures"]
    if raw is not None:
        report["reference"] = _reference_metrics(model, raw, split, name or "", batch_size)
    for variant in [v for v in VARIANTS if v in spec.get("variants", {})]:
        encoder = OnnxDualEncoder(folder, variant)
        pixels, ids = _probe_batch(encoder, raw, split, name or "", probe_size)
        diff = compare_embeddings(traced, encoder, pixels, ids)
        entry: dict[str, Any] = {"files": spec["variants"][variant],
                                 "bytes": _file_sizes(folder, spec["variants"][variant]), "max_abs_diff": diff}
        if variant == "fp32":
            for tower, d in diff.items():
                if not d <= atol:
                    failures.append(f"fp32 {tower} embeddings differ from PyTorch by {d:.3g} > atol {atol:g}")
        if raw is not None:
            metrics = evaluate_onnx(encoder, raw[f"{split}_gallery"], raw[f"{split}_queries"],
                                    dataset_name=name or "", batch_size=batch_size)
            drop = {k: report["reference"][k] - metrics[k] for k in ("r1", "mAP")}
            entry.update(metrics=metrics, drop=drop)
            for k, d in drop.items():
                if d > tolerance:
                    failures.append(f"{variant}: {'R@1' if k == 'r1' else k} {metrics[k]:.2f} vs PyTorch "
                                    f"{report['reference'][k]:.2f} (drop {d:.2f} > tolerance {tolerance:g} points)")
        report["variants"][variant] = entry
    report["passed"] = not failures
    write_json(folder / REPORT_FILE, report)
    if failures:
        size_note = ""
        if report["export_image_size"] != report["model"]["image_size"]:
            size_note = (f" (the graphs take {tuple(report['export_image_size'])} images, the model was "
                         f"trained at {tuple(report['model']['image_size'])})")
        hint = ""
        if any(f.startswith("int8:") for f in failures) and spec.get("int8_scheme") not in CALIBRATED_INT8_SCHEMES:
            hint = (f" The INT8 graphs were made by the {spec.get('int8_scheme', 'dynamic')!r} scheme: "
                    "--int8-scheme calibrated keeps the fp32 ranking closest (docs/deployment.md, 'The INT8 scheme').")
        raise ExportVerificationError(f"the ONNX export in {str(folder)!r} is not the model{size_note}: "
                                      + "; ".join(failures) + f". Details: {folder / REPORT_FILE}.{hint}", report)
    return report


# ----------------------------------------------------------------------------------------------
# Reporting


def format_export_report(report: Mapping[str, Any]) -> str:
    """Markdown: one row per variant (file sizes, max abs diff) and, with a dataset, the metric table."""
    lines = [f"ONNX export at {report['export_image_size'][0]}x{report['export_image_size'][1]} "
             f"of {report['model']['arch']} ({report['model']['parameters'] / 1e6:.1f}M parameters):", "",
             "| variant | image MB | text MB | max abs diff image | max abs diff text |",
             "|---------|---------:|--------:|-------------------:|------------------:|"]
    for v, e in report["variants"].items():
        lines.append(f"| {v} | {e['bytes']['image'] / 2**20:.1f} | {e['bytes']['text'] / 2**20:.1f} | "
                     f"{e['max_abs_diff']['image']:.2e} | {e['max_abs_diff']['text']:.2e} |")
    if report.get("reference") is not None:
        d = report["dataset"]
        rows = {"PyTorch fp32": report["reference"]}
        rows.update({f"ONNX {v}": e["metrics"] for v, e in report["variants"].items()})
        lines += ["", f"{d['name']}/{d['split']}, text-to-image (%), tolerance {report['tolerance']:g} points "
                  "on R@1 and mAP:", "", format_metrics(rows)]
    else:
        lines += ["", "retrieval not checked: no dataset given (--dataset NAME --root DIR checks R@1 and mAP)"]
    lines += ["", "verification: " + ("passed" if report["passed"] else "FAILED: " + "; ".join(report["failures"]))]
    return "\n".join(lines)


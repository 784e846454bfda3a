"""Fingerprints: was a teacher cache built for this teacher, this train split and this transform?

A cache is only valid for the exact teacher weights and architecture, the exact annotation rows
and the exact augmentation it replayed. Each is summarised by a sha256 digest plus the details
:func:`explain_change` needs to say, in one sentence, what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import nn

from kd_trainer.data.replay import ReplayConfig, TrainRows
from kd_trainer.models.factory import get_architecture

__all__ = ["FINGERPRINT_PARTS", "dataset_fingerprint", "explain_change", "fingerprints", "teacher_fingerprint",
           "transform_fingerprint"]

FINGERPRINT_PARTS = ("teacher", "dataset", "transform")


def _sha(data: bytes | Any) -> str:
    return hashlib.sha256(data if isinstance(data, (bytes, bytearray)) else
                          json.dumps(data, sort_keys=True).encode()).hexdigest()


def _teacher_architecture(teacher: nn.Module) -> dict[str, Any]:
    """What, besides the weights, changes the teacher's outputs (activation, sizes, patch stride)."""
    arch = getattr(teacher, "arch", None)
    clip = getattr(teacher, "clip", teacher)
    conv = getattr(getattr(clip, "visual", None), "conv1", None)
    return {
        "arch": get_architecture(arch) if arch is not None else None,
        "image_size": list(getattr(teacher, "image_size", ()) or ()),
        "context_length": getattr(teacher, "context_length", None),
        "patch_stride": list(conv.stride) if conv is not None else None,
    }


def teacher_fingerprint(teacher: nn.Module) -> dict[str, Any]:
    """sha256 over every state-dict tensor (name, dtype, shape, bytes, in name order), and the
    architecture. Sound, and cheap: ~1 s for a ViT-B/16 (600 MB) on one core."""
    h = hashlib.sha256()
    state = teacher.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    arch = _teacher_architecture(teacher)
    weights = h.hexdigest()
    return {"digest": _sha({"weights": weights, "architecture": arch}), "weights": weights,
            "architecture": arch, "num_tensors": len(state)}


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def dataset_fingerprint(rows: TrainRows) -> dict[str, Any]:
    """A digest per annotation column, in row order. Image paths count relative to their common
    folder, so a dataset moved or mounted elsewhere keeps its cache; image content is guarded
    by file sizes (hashing every image's bytes would cost a full read of the dataset)."""
    root = os.path.commonpath(rows.image_paths) if rows.image_paths else ""
    if len(rows.image_paths) == 1:
        root = os.path.dirname(root)
    columns = {
        "image_path": _sha([p[len(root):] if p.startswith(root) else p for p in rows.image_path]),
        "caption": _sha(rows.caption),
        "pid": _sha(rows.pid),
        "image_id": _sha(rows.image_id),
        "image_file_size": _sha([_file_size(p) for p in rows.image_paths]),
    }
    return {"digest": _sha(columns), "columns": columns, "rows": len(rows), "images": rows.num_images}


def transform_fingerprint(config: ReplayConfig) -> dict[str, Any]:
    """The transform config, and its digest."""
    cfg = config.fingerprint_dict()
    return {"digest": _sha(cfg), "config": cfg}


def fingerprints(teacher: nn.Module, rows: TrainRows, config: ReplayConfig) -> dict[str, dict[str, Any]]:
    """The three fingerprints a cache is built for and checked against, by part."""
    return {"teacher": teacher_fingerprint(teacher), "dataset": dataset_fingerprint(rows),
            "transform": transform_fingerprint(config)}


def explain_change(part: str, cached: dict[str, Any], current: dict[str, Any]) -> str:
    """One human sentence on what changed in one fingerprint part."""
    if part == "teacher":
        what = [w for w in ("weights", "architecture") if cached.get(w) != current.get(w)]
        return (f"teacher {' and '.join(what) or 'fingerprint'} changed (cached weights sha256 "
                f"{str(cached.get('weights'))[:12]}, current {str(current.get('weights'))[:12]})")
    if part == "dataset":
        cols = [c for c in current["columns"] if cached.get("columns", {}).get(c) != current["columns"][c]]
        return (f"dataset changed: {', '.join(cols) or 'annotations'} differ (cached {cached.get('rows')} rows / "
                f"{cached.get('images')} images, current {current['rows']} rows / {current['images']} images)")
    old, new = cached.get("config", {}), current["config"]
    diffs = [f"{k}: cached {old.get(k)!r}, current {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    return f"transform config changed: {'; '.join(diffs) or 'digest differs'}"

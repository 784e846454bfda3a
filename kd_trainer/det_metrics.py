"""COCO-style detection metrics: AP@[.5:.95] (COCO's mAP) and AP@.5, computed by pycocotools.

Why pycocotools: it *is* the definition of the COCO numbers (``COCOeval``: greedy matching by
score, IoU thresholds .50:.05:.95, 101-point interpolated precision, up to 100 detections per
image), it is maintained, small, and what torchvision's detection references report with.
faster-coco-eval re-implements the same algorithm for speed, which a few hundred small images do
not need; torchmetrics' ``MeanAveragePrecision`` wraps one of those two behind a heavier
dependency. pycocotools is an optional dependency (the ``det`` extra, also in ``dev``), imported
where it is used so the rest of the package works without it.

Layer 1: plain tensors and dicts in, floats out; nothing from the rest of kd_trainer.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["coco_detection_metrics", "to_coco_detections"]

# Keys of the returned dict, in COCOeval.stats order, named as detectron2 names them: AP is
# AP@[.5:.95] (COCO's "mAP"), AP50 and AP75 at one IoU threshold, APs/APm/APl by object size.
# Not "mAP": that is the retrieval metric's name in this project.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_detections(image_id: int, boxes: torch.Tensor, scores: torch.Tensor,
                       labels: torch.Tensor) -> list[dict[str, Any]]:
    """One image's detections (``x0, y0, x1, y1`` boxes) as COCO result entries (``bbox`` is
    ``x, y, width, height``)."""
    out = []
    for (x0, y0, x1, y1), s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        out.append({"image_id": int(image_id), "category_id": int(c), "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(s)})
    return out


def coco_detection_metrics(ground_truth: Mapping[str, Any],
                           detections: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """COCO box metrics of ``detections`` (result entries, see :func:`to_coco_detections`) against
    ``ground_truth`` (a COCO annotation dict: ``images``, ``annotations``, ``categories``).

    Returns ``AP`` (AP@[.5:.95]), ``AP50``, ``AP75`` and the per-size ``APs``/``APm``/``APl``, as
    fractions in [0, 1]; an area range without ground truth gives -1, as COCOeval reports it. No detection at
    all is 0 everywhere (pycocotools refuses an empty result list). A detection on an image the
    ground truth does not list is an error, not dropped.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("detection metrics need pycocotools: pip install 'kd_trainer[det]' "
                          "(or pip install pycocotools)") from None
    images = {im["id"] for im in ground_truth["images"]}
    unknown = sorted({d["image_id"] for d in detections} - images)
    if unknown:
        raise ValueError(f"detections name images {unknown[:10]} that the ground truth does not list")
    if not detections:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print progress
        gt = COCO()
        gt.dataset = {"info": {}, **ground_truth}
        gt.createIndex()
        dt = gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}

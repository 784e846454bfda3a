"""``DetectionTrainer``: a Faster R-CNN distilled with UP/EOD mimic jobs beside its own losses.

The detection example (SynthDet, :class:`~kd_trainer.models.detector.Detector`) runs on it: the
task loss is the detector's own loss dict, each entry a term logged by name (``loss_classifier``,
``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``), plus mimic jobs on FPN levels
(``backbone.fpn:0`` ... ``backbone.fpn:pool``), backbone stages or RPN outputs from one or
several teachers. It supplies only its forwards, its task loss and its mAP; the core runs the
jobs, weighs and logs.

Teachers run in eval mode (the core freezes them), so they take no targets. What that changes:

- backbone, FPN and ``rpn.head`` outputs are the same function of the image in either mode
  (batch norm uses its running statistics, as UP's ``teacher_bn_mode: eval`` does), so they are
  what a mimic job should read;
- the RPN's *proposals* follow the eval-time counts (``rpn_pre/post_nms_top_n_test``) instead of
  the training ones, and the ROI heads run on those proposals, not on the student's sampled
  ones (``box_batch_size_per_image`` per image); so ``roi_heads.*`` outputs of a teacher and a
  student hold different boxes in different numbers and cannot be paired (their shapes differ,
  and the adapter check refuses them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd_trainer.det_metrics import coco_detection_metrics, to_coco_detections
from kd_trainer.distill.core import DistillationTrainer
from kd_trainer.distill.mimic import ADAPTED_KEY
from kd_trainer.distill.plan import Stage
from kd_trainer.models.detector import DETECTOR_CONFIG

LOSS_PREFIX = "loss_"  # torchvision's loss-dict keys; the core logs term <name> as loss_<name>


class DetectionTrainer(DistillationTrainer):
    """Trainer whose ``model`` is a :class:`~kd_trainer.models.detector.Detector` (with
    ``mimic_head`` holding its adapters). Batches come from
    :func:`kd_trainer.data.detection.collate_detection`; an eval split must carry its COCO ground
    truth as ``.coco`` (as :class:`~kd_trainer.data.detection.SynthDetDataset` does)."""

    def student_outputs(self, model: nn.Module, inputs: dict[str, Any], stage: Stage) -> Any:
        # Training: the loss dict. Eval (the adapters' dry run): detections, no targets needed.
        targets = inputs["targets"] if model.training else None
        return model(pixel_values=inputs["pixel_values"], targets=targets)

    def term_values(self, inputs: dict[str, Any], outputs: Any, teacher_embeds: dict[str, torch.Tensor],
                    stage: Stage) -> dict[str, torch.Tensor]:
        """Every entry of the detector's loss dict, by its name without ``loss_`` (the core adds it
        back when logging); none when the recipe trains on the mimic jobs alone."""
        if not self.task_loss:
            return {}
        return {k.removeprefix(LOSS_PREFIX): v for k, v in outputs.items() if k != ADAPTED_KEY}

    def evaluate_split(self, split: Any, prefix: str) -> dict[str, float]:
        """COCO box AP@[.5:.95] (``<prefix>_AP``, COCO's mAP), ``<prefix>_AP50`` and ``<prefix>_AP75``
        in percent, over the whole split: each process detects on its shard, detections are gathered
        (without the duplicates an uneven split pads with) and scored once against the split's
        ground truth."""
        loader = self.get_eval_dataloader(split)
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        per_image: list[dict[str, Any]] = []
        with torch.no_grad():
            for batch in loader:
                found = model(pixel_values=batch["pixel_values"].to(self.accelerator.device))
                mine = [{"image_id": int(i), **{k: d[k].cpu() for k in ("boxes", "scores", "labels")}}
                        for i, d in zip(batch["image_ids"], found)]
                per_image += self.accelerator.gather_for_metrics(mine, use_gather_object=True)
        model.train(was_training)
        if len(per_image) != len(split):
            raise RuntimeError(f"evaluation gathered detections for {len(per_image)} images; the split has "
                               f"{len(split)}")
        results = [r for d in per_image
                   for r in to_coco_detections(d["image_id"], d["boxes"], d["scores"], d["labels"])]
        stats = coco_detection_metrics(split.coco, results)
        metrics = {f"{prefix}_{k}": 100.0 * stats[k] for k in ("AP", "AP50", "AP75")}
        return {**metrics, f"{prefix}_samples": len(per_image)}

    def saved_configs(self, model: nn.Module) -> dict[str, Any]:
        return {DETECTOR_CONFIG: model.to_config()}

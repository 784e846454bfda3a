"""Run a detection recipe: SynthDet -> Faster R-CNN teachers and student -> mimic distillation -> mAP.

The detection example of UP/EOD's distillation config (``faster_rcnn_r152_50_1x_feature_mimic``):
a Faster R-CNN teacher's FPN features (and, optionally, RPN outputs of a second teacher) are
mimicked by a smaller Faster R-CNN student, beside the student's own detection losses.

1. generate SynthDet (once; every process waits for the first to write it);
2. build the named teachers and the student (:func:`kd_trainer.models.detector.load_detector`),
   each with its checkpoint;
3. train with the detector's losses plus the recipe's mimic jobs (:class:`DetectionTrainer`);
4. evaluate COCO AP@[.5:.95] and AP@.5 on the test split and save the metrics.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import PartialState
from transformers import set_seed

from kd_trainer.data.detection import SynthDetDataset, collate_detection
from kd_trainer.distill.detection import DetectionTrainer
from kd_trainer.distill.resolved import ResolvedRun
from kd_trainer.models.detector import Detector, load_detector
from kd_trainer.recipe import ModelConfig, Recipe, RecipeError
from kd_trainer.runner.fit import fit
from kd_trainer.synthetic.detection import make_synth_det

__all__ = ["build_detector", "run_detection"]


def build_detector(cfg: ModelConfig, recipe: Recipe, role: str) -> Detector:
    """A detector of ``cfg.arch`` for the recipe's SynthDet classes and image size; an architecture
    the detector cannot build is a recipe error naming ``role`` (``student``, ``teachers.teacher0``)."""
    det = recipe.data.det
    try:
        return load_detector(cfg.arch, num_classes=det.num_classes, image_size=det.image_size,
                             checkpoint=cfg.checkpoint)
    except ValueError as e:
        if type(e) is not ValueError:  # a CheckpointError says what it is itself
            raise
        raise RecipeError(f"{role}.arch: {e}") from None


def run_detection(recipe: Recipe, run: ResolvedRun) -> dict[str, float]:
    """Train and evaluate a ``task: detection`` recipe; returns the test metrics
    (``test_AP`` = COCO AP@[.5:.95], ``test_AP50``, ``test_AP75`` in percent, ``test_samples``)."""
    set_seed(recipe.seed)
    folder = Path(recipe.data.root) / "SynthDet"
    with PartialState().main_process_first():  # one process writes, the others wait and reuse
        make_synth_det(folder, **recipe.data.det.model_dump())
    train, test = SynthDetDataset(folder, "train", train=True), SynthDetDataset(folder, "test", train=False)
    teachers = {name: build_detector(cfg, recipe, f"teachers.{name}")
                for name, cfg in (recipe.teachers or {}).items()}
    student = build_detector(recipe.student, recipe, "student")
    mimic = recipe.mimic
    try:  # the mimic jobs' taps run once here, on a real batch: bad names, keys or widths surface now
        trainer = DetectionTrainer(model=student, args=run.args, teachers=teachers,
                                   mimic_jobs=mimic.jobs if mimic else (), task_loss=mimic.task_loss if mimic else True,
                                   max_nonfinite_skips=run.nonfinite_skips, data_collator=collate_detection,
                                   train_dataset=train, eval_dataset=test)
    except ValueError as e:
        if type(e) is not ValueError:
            raise
        raise RecipeError(str(e)) from None  # one line from the command line, like every recipe error
    fit(trainer, recipe, run)
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    trainer.save_metrics("test", metrics)
    return metrics

"""Run a detection recipe: SynthDet -> Faster R-CNN teachers and student -> mimic distillation -> mAP.

The detection example of UP/EOD's distillation config (``faster_rcnn_r152_50_1x_feature_mimic``):
a Faster R-CNN teacher's FPN features (and, optionally, RPN outputs of a second teacher) are
mimicked by a smaller Faster R-CNN student, beside the student's own detection losses.

1. generate SynthDet (once; every process waits for the first to write it);
2. build the named teachers and the student (:func:`kd_trainer.models.detector.load_detector`),
   each with its checkpoint, as the resolved run names them;
3. train with the detector's losses plus the recipe's mimic jobs (:class:`DetectionTrainer`);
4. evaluate COCO AP@[.5:.95] and AP@.5 on the test split and save the metrics.
"""

from __future__ import annotations

from accelerate import PartialState
from transformers import set_seed

from kd_trainer.data.detection import SynthDetDataset, collate_detection
from kd_trainer.distill.detection import DetectionTrainer
from kd_trainer.distill.resolved import ModelSpec, ResolvedRun
from kd_trainer.models.detector import Detector, load_detector
from kd_trainer.recipe import Recipe, RecipeError
from kd_trainer.runner.fit import fit, log_test_metrics
from kd_trainer.synthetic.detection import make_synth_det

__all__ = ["build_detector", "run_detection"]


def build_detector(spec: ModelSpec, run: ResolvedRun, role: str) -> Detector:
    """A detector of ``spec``'s architecture for the run's SynthDet classes and image size; an
    architecture the detector cannot build is a recipe error naming ``role`` (``student``,
    ``teachers.teacher0``)."""
    try:
        return load_detector(spec.arch, num_classes=run.data.num_classes, image_size=run.data.image_size,
                             checkpoint=spec.checkpoint)
    except ValueError as e:
        if type(e) is not ValueError:  # a CheckpointError says what it is itself
            raise
        raise RecipeError(f"{role}.arch: {e}") from None


def run_detection(recipe: Recipe, run: ResolvedRun) -> dict[str, float]:
    """Train and evaluate a ``task: detection`` run; returns the test metrics (``test_AP`` = COCO
    AP@[.5:.95], ``test_AP50``, ``test_AP75`` in percent, ``test_samples``). Everything is built
    from ``run``; ``recipe`` is only recorded beside the run (:func:`fit`)."""
    set_seed(run.seed)
    folder = run.data.generated
    with PartialState().main_process_first():  # one process writes, the others wait and reuse
        make_synth_det(folder, **run.data.generator)
    train, test = SynthDetDataset(folder, "train", train=True), SynthDetDataset(folder, "test", train=False)
    teachers = {name: build_detector(spec, run, f"teachers.{name}") for name, spec in run.teachers.items()}
    student = build_detector(run.student, run, "student")
    try:  # the mimic jobs' taps run once here, on a real batch: bad names, keys or widths surface now
        trainer = DetectionTrainer(model=student, args=run.args, teachers=teachers, mimic_jobs=run.mimic_jobs,
                                   task_loss=run.task_loss, max_nonfinite_skips=run.nonfinite_skips,
                                   data_collator=collate_detection, train_dataset=train, eval_dataset=test)
    except ValueError as e:
        if type(e) is not ValueError:
            raise
        raise RecipeError(str(e)) from None  # one line from the command line, like every recipe error
    fit(trainer, recipe, run)
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    trainer.save_metrics("test", metrics)
    log_test_metrics(trainer, metrics)
    return metrics

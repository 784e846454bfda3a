"""The classification example: SynthShapes, torchvision classifiers, cross-entropy plus the recipe's
mimic jobs from its named teachers, all read from the resolved run."""

from __future__ import annotations

from accelerate import PartialState
from transformers import set_seed

from kd_trainer.data.shapes import ShapesDataset
from kd_trainer.distill.classification import ClassificationTrainer
from kd_trainer.distill.resolved import ModelSpec, ResolvedRun
from kd_trainer.models.classifier import Classifier, load_classifier
from kd_trainer.recipe import Recipe
from kd_trainer.runner.fit import fit, log_test_metrics
from kd_trainer.synthetic.shapes import make_synth_shapes

__all__ = ["build_classifier", "run_classification"]


def build_classifier(spec: ModelSpec, run: ResolvedRun) -> Classifier:
    """A classifier of ``spec``'s architecture for the run's classes, with its checkpoint."""
    return load_classifier(str(spec.arch), run.data.num_classes, spec.checkpoint)


def run_classification(recipe: Recipe, run: ResolvedRun) -> dict[str, float]:
    """The classification example: SynthShapes, torchvision classifiers, cross-entropy plus the
    recipe's UP/EOD mimic jobs from its named teachers. Same recipe, trainer core and logging.
    Everything is built from ``run``; ``recipe`` is only recorded beside the run (:func:`fit`)."""
    set_seed(run.seed)
    with PartialState().main_process_first():
        make_synth_shapes(run.data.generated, **run.data.generator)
    folder = run.data.generated
    train, test = ShapesDataset(folder, "train", train=True), ShapesDataset(folder, "test", train=False)
    teachers = {name: build_classifier(spec, run) for name, spec in run.teachers.items()}
    student = build_classifier(run.student, run)
    trainer = ClassificationTrainer(model=student, args=run.args, teachers=teachers, mimic_jobs=run.mimic_jobs,
                                    task_loss=run.task_loss, max_nonfinite_skips=run.nonfinite_skips,
                                    train_dataset=train, eval_dataset=test)
    fit(trainer, recipe, run)
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    trainer.save_metrics("test", metrics)
    log_test_metrics(trainer, metrics)
    return metrics

"""Run one recipe: data -> teacher -> student -> distillation -> metrics.

    accelerate launch kd_trainer/run.py recipes/ours_3stage.yaml [key.sub=value ...]
    python -m kd_trainer recipes/finetune_itc.yaml training.num_train_epochs=1

Reads top to bottom like the method section of a paper: load the data, build the
student (and the frozen teacher if a term needs one), train with the recipe's terms (or
its stages), evaluate on the test split, save the student, its metrics and the resolved
recipe, and export it in open_clip's Hub layout (pushed when the recipe asks).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a file (accelerate launch kd_trainer/run.py): Python put kd_trainer/ itself on
    # sys.path, where our subpackages (data, models, losses) would shadow same-named modules.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import json
import logging
from pathlib import Path
from typing import Any

from kd_trainer.recipe import ModelConfig, Recipe, dump_recipe, load_recipe

logger = logging.getLogger("kd_trainer")


def prepare_data(recipe: Recipe) -> Any:
    """The dataset as a DatasetDict with on-the-fly IRRA transforms and tokenised captions."""
    from accelerate import PartialState

    from kd_trainer.data import canonical_dataset_name, load_pedes, with_retrieval_transforms

    cfg = recipe.data
    name = canonical_dataset_name(cfg.name)
    if cfg.synth is not None:
        if name != "synth_pedes":
            raise ValueError(f"data.synth is only for synth_pedes, but data.name is {cfg.name!r}")
        from kd_trainer.data.synth import make_synth_pedes

        with PartialState().main_process_first():  # one process writes, the others wait and reuse
            make_synth_pedes(Path(cfg.root) / "SynthPEDES", **cfg.synth.model_dump())
    raw = load_pedes(name, cfg.root, skip_unreadable=cfg.skip_unreadable)
    # Seeded augmentation: the images depend only on (seed, epoch, row), so resuming is exact.
    dsd = with_retrieval_transforms(raw, image_size=tuple(cfg.image_size), augment=cfg.augment,
                                    context_length=cfg.context_length, dataset_name=name, seed=recipe.seed)
    dsd.raw_train = raw["train"]  # what a teacher cache is fingerprinted against and replays
    return dsd


def replay_config(recipe: Recipe) -> Any:
    """The augmentation a teacher cache replays (its image size, augmentation, caption length, K)."""
    from kd_trainer.data.replay import ReplayConfig

    assert recipe.teacher is not None
    return ReplayConfig(image_size=tuple(recipe.data.image_size), augment=recipe.data.augment,
                        context_length=recipe.data.context_length, num_draws=recipe.teacher.cache_draws,
                        seed=recipe.teacher.cache_seed)


def open_teacher_cache(recipe: Recipe, teacher: Any, raw_train: Any) -> tuple[Any, Any, list]:
    """The verified cache, the training set that replays its draws, and the callback that tells
    that set which epoch runs. A cache made for another teacher, dataset or transform is refused."""
    from kd_trainer.data import canonical_dataset_name
    from kd_trainer.data.replay import ReplayDataset, ReplayEpochCallback
    from kd_trainer.distill.cache import TeacherCache

    assert recipe.teacher is not None and recipe.teacher.cache is not None
    cfg = replay_config(recipe)
    cache = TeacherCache.open(recipe.teacher.cache, teacher=teacher, dataset_raw=raw_train, transform_cfg=cfg)
    train = ReplayDataset(raw_train, cfg, canonical_dataset_name(recipe.data.name))
    return cache, train, [ReplayEpochCallback()]


def build_model(cfg: ModelConfig, recipe: Recipe, *, projection_dim: int | None = None) -> Any:
    """A model of the recipe's image size and caption length, with its checkpoint loaded."""
    from kd_trainer.models.checkpoint import load_weights
    from kd_trainer.models.factory import create_model

    model = create_model(cfg.arch, image_size=tuple(recipe.data.image_size),
                         context_length=recipe.data.context_length, projection_dim=projection_dim)
    if cfg.checkpoint:
        # Any known format: a kd_trainer run (continue-from), open_clip/OpenAI/TinyCLIP weights
        # (position embeddings resized to this image size), a HF CLIPModel folder, IRRA's best.pth.
        load_weights(model, cfg.checkpoint, irra_config=cfg.config)
    elif cfg.config:
        raise ValueError("`config:` (IRRA's configs.yaml) is given without the `checkpoint:` it describes")
    return model


def split(dsd: Any, which: str) -> Any:
    """The gallery/query pair of ``which`` (val or test); datasets without val fall back to test."""
    from kd_trainer.distill.trainer import RetrievalSplit

    if f"{which}_gallery" not in dsd:
        if which == "val" and "test_gallery" in dsd:
            logger.warning("The dataset has no val split; evaluating on test during training (as IRRA does).")
            which = "test"
        else:
            raise ValueError(f"The dataset has no {which!r} split; it has {sorted(dsd)}")
    return RetrievalSplit(which, dsd[f"{which}_gallery"], dsd[f"{which}_queries"])


def training_arguments(recipe: Recipe) -> Any:
    from transformers import TrainingArguments

    defaults: dict[str, Any] = {
        "output_dir": str(Path("runs") / recipe.name),
        "seed": recipe.seed,
        "report_to": "none",
        "per_device_eval_batch_size": 256,
    }
    args = {**defaults, **recipe.training}
    args["remove_unused_columns"] = False  # transforms need the raw columns (validated in recipe.py)
    if isinstance(args.get("resume_from_checkpoint"), bool):  # `true`: run() passes it to train()
        args.pop("resume_from_checkpoint")
    # The Trainer's own push would upload checkpoints in our training layout and swap nothing for
    # open_clip users; export_student pushes the open_clip folder instead, once, at the end.
    args["push_to_hub"] = False
    return TrainingArguments(**args)


def export_student(trainer: Any, recipe: Recipe) -> list[Path]:
    """Write the student into ``output_dir`` in open_clip's Hub layout (config, safetensors, model
    card) and push that folder when the recipe's ``training.push_to_hub`` asks for it."""
    from kd_trainer.models.export import ModelCardInfo, export_open_clip, push_export_to_hub

    out = trainer.args.output_dir
    teacher = None
    if recipe.teacher is not None:
        teacher = recipe.teacher.arch if isinstance(recipe.teacher.arch, str) else "custom architecture"
        if recipe.teacher.checkpoint:
            teacher += f" ({recipe.teacher.checkpoint})"
    repo_id = recipe.training.get("hub_model_id")
    card = ModelCardInfo.from_run_dir(out, teacher=teacher, repo_id=repo_id)
    files = export_open_clip(trainer.accelerator.unwrap_model(trainer.model), out, card=card)
    if recipe.training.get("push_to_hub"):
        url = push_export_to_hub(out, repo_id, token=recipe.training.get("hub_token"),
                                 private=recipe.training.get("hub_private_repo"),
                                 revision=recipe.training.get("hub_revision"))
        logger.info("pushed %s to %s", out, url)
    return files


def run_info(trainer: Any) -> dict[str, Any]:
    """Where and how the run ran: processes, device, precision (saved beside the results)."""
    import torch

    acc = trainer.accelerator
    return {
        "world_size": trainer.args.world_size,
        "distributed_type": str(acc.distributed_type.value),
        "device": str(acc.device),
        "mixed_precision": acc.mixed_precision,
        "global_train_batch_size": trainer.args.per_device_train_batch_size * trainer.args.world_size
        * trainer.args.gradient_accumulation_steps,
        "torch": torch.__version__,
    }


def fit(trainer: Any, recipe: Recipe) -> None:
    """Record the resolved recipe and where the run runs, train (resuming when the recipe says so),
    and save the final model and the whole log history (trainer_state.json) in output_dir."""
    out = trainer.args.output_dir
    if trainer.is_world_process_zero():
        os.makedirs(out, exist_ok=True)
        Path(out, "recipe.yaml").write_text(dump_recipe(recipe))
        Path(out, "run_info.json").write_text(json.dumps(run_info(trainer), indent=2))
    resume = recipe.training.get("resume_from_checkpoint") or None  # a path, or true for the latest
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(out)
    trainer.save_state()


def run_classification(recipe: Recipe) -> dict[str, float]:
    """The classification example: SynthShapes, torchvision classifiers, cross-entropy plus the
    recipe's UP/EOD mimic jobs from its named teachers. Same recipe, Trainer and logging machinery."""
    import torch
    from accelerate import PartialState
    from transformers import set_seed

    from kd_trainer.data.shapes import ShapesDataset, make_synth_shapes
    from kd_trainer.distill.mimic import parse_mimic_config
    from kd_trainer.distill.mimic_trainer import MimicTrainer
    from kd_trainer.models.classifier import load_classifier

    set_seed(recipe.seed)
    if recipe.data.name != "synth_shapes" or recipe.data.shapes is None:
        raise ValueError("task: classification runs on data.name: synth_shapes with a data.shapes block")
    folder = Path(recipe.data.root) / "SynthShapes"
    with PartialState().main_process_first():
        make_synth_shapes(folder, **recipe.data.shapes.model_dump())
    train, test = ShapesDataset(folder, "train", train=True), ShapesDataset(folder, "test", train=False)
    classes = recipe.data.shapes.num_classes
    teachers = {name: load_classifier(str(cfg.arch), classes, cfg.checkpoint)
                for name, cfg in (recipe.teachers or {}).items()}
    mimic = parse_mimic_config(recipe.mimic) if recipe.mimic is not None else None
    student = load_classifier(str(recipe.student.arch), classes, recipe.student.checkpoint)
    args = training_arguments(recipe)
    sample = torch.stack([train[i]["pixel_values"] for i in range(2)])
    trainer = MimicTrainer(model=student, args=args, teachers=teachers, jobs=mimic.jobs if mimic else (),
                           task_loss=mimic.task_loss if mimic else True, sample_inputs=sample,
                           train_dataset=train, eval_dataset=test)
    fit(trainer, recipe)
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    trainer.save_metrics("test", metrics)
    return metrics


def run(recipe: Recipe) -> dict[str, float]:
    """Train (if the recipe has epochs/steps to run) and evaluate; returns the test metrics."""
    if recipe.task == "classification":
        return run_classification(recipe)
    from transformers import set_seed

    from kd_trainer.distill.trainer import DistillationTrainer, resolve_terms

    set_seed(recipe.seed)
    args = training_arguments(recipe)
    dsd = prepare_data(recipe)

    terms = resolve_terms(recipe.all_terms)
    jobs = []
    if recipe.mimic is not None:
        from kd_trainer.distill.mimic import parse_mimic

        jobs = parse_mimic(recipe.mimic)
    mimic_named = {t for job in jobs for t in job.teachers}
    teacher = None
    hybrids = any(s.eval_hybrids != [] for s in recipe.stages or [])  # null: the stage's trained tower
    if any(t.spec.needs_teacher for t in terms) or ((hybrids or "teacher" in mimic_named) and recipe.teacher):
        if recipe.teacher is None:
            raise ValueError(f"terms {[t.key for t in terms if t.spec.needs_teacher]} need a `teacher:` in the recipe")
        teacher = build_model(recipe.teacher, recipe)
    direct = any(t.spec.direct_compare for t in terms)
    student = build_model(recipe.student, recipe,
                          projection_dim=teacher.embed_dim if teacher is not None and direct else None)

    teacher_cache, callbacks, train_dataset = None, [], dsd["train"]
    if recipe.teacher is not None and recipe.teacher.cache is not None and teacher is not None:
        teacher_cache, train_dataset, callbacks = open_teacher_cache(recipe, teacher, dsd.raw_train)

    eval_split = split(dsd, recipe.data.eval_split)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        terms=recipe.loss,
        stages=recipe.stages,
        teacher=teacher,
        mimic=jobs,
        mimic_teachers={name: build_model(cfg, recipe) for name, cfg in (recipe.teachers or {}).items()},
        train_dataset=train_dataset,
        eval_dataset=eval_split,
        teacher_cache=teacher_cache,
        callbacks=callbacks,
    )
    fit(trainer, recipe)

    metrics: dict[str, float] = {}
    if recipe.data.test_split is not None:
        test = split(dsd, recipe.data.test_split)
        metrics = trainer.evaluate(test, metric_key_prefix="test")
        trainer.save_metrics("test", metrics)
        if trainer.is_world_process_zero():
            logger.info("test metrics: %s", json.dumps(metrics))
    if trainer.is_world_process_zero():
        export_student(trainer, recipe)
    trainer.accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    import argparse

    parser = argparse.ArgumentParser(
        prog="kd_trainer/run.py",
        description="Run a kd_trainer recipe. Overrides are key.sub=value (YAML values), e.g. "
                    "data.name=rstpreid data.root=./data training.num_train_epochs=1",
    )
    parser.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ns = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from kd_trainer.cli import _input_errors

    try:
        recipe = load_recipe(ns.recipe, ns.overrides)
        return run(recipe)
    except _input_errors() as e:  # bad recipe, data or checkpoint: the message names it; no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

"""Run one recipe: data -> teacher -> student -> distillation -> metrics.

    accelerate launch kd_trainer/run.py recipes/ours_3stage.yaml [key.sub=value ...]
    python -m kd_trainer recipes/finetune_itc.yaml training.num_train_epochs=1

Reads top to bottom like the method section of a paper:

1. resolve the recipe's plan (every term, stage and weight looked up once);
2. load the data;
3. build the frozen teacher (when a term, a hybrid evaluation or a mimic job needs one) and the
   student, with their checkpoints;
4. train with the plan's stages (resuming when the recipe says so);
5. evaluate on the test split, save the student, its metrics and the resolved recipe, and
   export it in open_clip's Hub layout (pushed when the recipe asks).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a file (accelerate launch kd_trainer/run.py): Python put kd_trainer/ itself on
    # sys.path, where our subpackages (data, models, losses) would shadow same-named modules.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import contextlib
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets
import torch
from accelerate import PartialState
from huggingface_hub import get_token
from transformers import Trainer, TrainingArguments, set_seed

from kd_trainer.data import (
    DatasetFormatError,
    canonical_dataset_name,
    load_pedes,
    unwrap_worker_error,
    with_retrieval_transforms,
)
from kd_trainer.data.replay import ReplayConfig, ReplayDataset
from kd_trainer.data.shapes import ShapesDataset
from kd_trainer.distill.cache import CacheMismatchError, TeacherCache
from kd_trainer.distill.classification import ClassificationTrainer
from kd_trainer.distill.core import NonFiniteLossError
from kd_trainer.distill.grad_cache import exact_group_arguments
from kd_trainer.distill.plan import RunPlan
from kd_trainer.distill.retrieval import RetrievalSplit, RetrievalTrainer
from kd_trainer.models.loading import CheckpointError, load_weights, model_from_checkpoint
from kd_trainer.models.classifier import load_classifier
from kd_trainer.models.export import ModelCardInfo, export_open_clip, push_export_to_hub
from kd_trainer.models.factory import RetrievalModel, create_model
from kd_trainer.models.inherit import inherit_weights
from kd_trainer.models.precision import convert_to_original_fp16
from kd_trainer.recipe import ModelConfig, Recipe, RecipeError, dump_recipe, load_recipe
from kd_trainer.run_detection import run_detection
from kd_trainer.synthetic.pedes import make_synth_pedes
from kd_trainer.synthetic.shapes import make_synth_shapes

logger = logging.getLogger("kd_trainer")

LOCK_FILE = ".kd_trainer.lock"
INHERITANCE_FILE = "inheritance.txt"  # where each student tensor came from, in an inherited run


class RunFault(RuntimeError):
    """A run that cannot go on or finish as asked (a busy output folder, a failed push, NaN weights)."""


# Bad input and faults: the message names the recipe key, dataset record, checkpoint file or what
# went wrong; the CLI prints it on one line and exits 2, without a traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (RecipeError, DatasetFormatError, CheckpointError,
                                                 CacheMismatchError, NonFiniteLossError, RunFault)


@dataclass
class RunData:
    """The recipe's dataset: transformed splits, and the raw train rows a teacher cache replays."""

    splits: datasets.DatasetDict
    raw_train: datasets.Dataset

    def split(self, which: str) -> RetrievalSplit:
        """The gallery/query pair of ``which`` (val or test); datasets without val fall back to test."""
        if f"{which}_gallery" not in self.splits:
            if which == "val" and "test_gallery" in self.splits:
                logger.warning("The dataset has no val split; evaluating on test during training (as IRRA does).")
                which = "test"
            else:
                raise RecipeError(f"The dataset has no {which!r} split; it has {sorted(self.splits)}")
        return RetrievalSplit(which, self.splits[f"{which}_gallery"], self.splits[f"{which}_queries"])


def prepare_data(recipe: Recipe) -> RunData:
    """The dataset with on-the-fly IRRA transforms and tokenised captions."""
    cfg = recipe.data
    name = canonical_dataset_name(cfg.name)
    if cfg.synth is not None:
        if name != "synth_pedes":
            raise RecipeError(f"data.synth is only for synth_pedes, but data.name is {cfg.name!r}")
        with PartialState().main_process_first():  # one process writes, the others wait and reuse
            make_synth_pedes(Path(cfg.root) / "SynthPEDES", **cfg.synth.model_dump())
    # Only the splits this run uses are loaded (and their images checked).
    wanted = {"train", cfg.eval_split} | ({cfg.test_split} if cfg.test_split else set())
    raw = load_pedes(name, cfg.root, splits=wanted, skip_unreadable=cfg.skip_unreadable,
                     verify_images=cfg.verify_images, duplicates=cfg.duplicates)
    # Seeded augmentation: the images depend only on (seed, epoch, row), so resuming is exact.
    splits = with_retrieval_transforms(raw, image_size=tuple(cfg.image_size), augment=cfg.augment,
                                       context_length=cfg.context_length, dataset_name=name, seed=recipe.seed)
    return RunData(splits, raw["train"])


def replay_config(recipe: Recipe) -> ReplayConfig:
    """The augmentation a teacher cache replays (its image size, augmentation, caption length, K)."""
    if recipe.teacher is None:
        raise RecipeError("a teacher cache needs a `teacher:`")
    return ReplayConfig(image_size=tuple(recipe.data.image_size), augment=recipe.data.augment,
                        context_length=recipe.data.context_length, num_draws=recipe.teacher.cache_draws,
                        seed=recipe.teacher.cache_seed)


def open_teacher_cache(recipe: Recipe, teacher: RetrievalModel,
                       raw_train: datasets.Dataset) -> tuple[TeacherCache, ReplayDataset]:
    """The recipe's teacher cache, verified, and the train split that replays its augmentation
    draws. A cache made for another teacher, dataset or transform is refused, naming what changed."""
    cfg = replay_config(recipe)
    cache = TeacherCache.open(recipe.teacher.cache, teacher=teacher, dataset_raw=raw_train, transform_cfg=cfg)
    return cache, ReplayDataset(raw_train, cfg, canonical_dataset_name(recipe.data.name))


def build_model(cfg: ModelConfig, recipe: Recipe, *, projection_dim: int | None = None,
                teacher: RetrievalModel | None = None) -> RetrievalModel:
    """A model of the recipe's image size and caption length, with its weights: loaded from its
    checkpoint, or inherited from a source (the recipe's ``teacher``, or any checkpoint)."""
    size, length = tuple(recipe.data.image_size), recipe.data.context_length
    # A random initialisation depends on the seed and the architecture only, not on which models
    # were built before: a student distilled from a teacher starts where the same student trained
    # alone starts.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = create_model(cfg.architecture(), image_size=size, context_length=length,
                             projection_dim=projection_dim)
    if cfg.checkpoint:
        # Any known format: a kd_trainer run (continue-from), open_clip/OpenAI/TinyCLIP weights
        # (position embeddings resized to this image size), a HF CLIPModel folder, IRRA's best.pth.
        load_weights(model, cfg.checkpoint, irra_config=cfg.config)
    elif cfg.config:
        raise RecipeError("`config:` (IRRA's configs.yaml) is given without the `checkpoint:` it describes")
    if cfg.inherit is not None:
        source = teacher if cfg.inherit.source == "teacher" else model_from_checkpoint(
            cfg.inherit.source, irra_config=cfg.inherit.config, image_size=size, context_length=length)
        if source is None:
            raise RecipeError("student.inherit.source: teacher, but the recipe has no `teacher:`")
        report = inherit_weights(model, source, layers=cfg.inherit.layers,
                                 source_name=None if cfg.inherit.source == "teacher" else cfg.inherit.source)
        if PartialState().is_main_process:
            out = Path(recipe.training.get("output_dir") or Path("runs") / recipe.name)
            out.mkdir(parents=True, exist_ok=True)
            (out / INHERITANCE_FILE).write_text(str(report) + "\n")
    return model


def training_arguments(recipe: Recipe) -> TrainingArguments:
    defaults: dict[str, Any] = {
        "output_dir": str(Path("runs") / recipe.name),
        "seed": recipe.seed,
        "report_to": "none",
        "per_device_eval_batch_size": 256,
    }
    training = dict(recipe.training)
    if recipe.contrastive_accumulation == "exact":  # the DataLoader yields whole groups; the trainer splits them
        training, _ = exact_group_arguments(training)
    args = {**defaults, **training}
    args["remove_unused_columns"] = False  # transforms need the raw columns (validated in the recipe)
    if isinstance(args.get("resume_from_checkpoint"), bool):  # `true`: fit() passes it to train()
        args.pop("resume_from_checkpoint")
    # The Trainer's own push would upload checkpoints in our training layout and swap nothing for
    # open_clip users; export_student pushes the open_clip folder instead, once, at the end.
    args["push_to_hub"] = False
    return TrainingArguments(**args)


def exact_steps(recipe: Recipe) -> int:
    """How many micro-batches each group splits into under ``contrastive_accumulation: exact`` (else 1)."""
    if recipe.contrastive_accumulation != "exact":
        return 1
    return exact_group_arguments(recipe.training)[1]


def export_student(trainer: Trainer, recipe: Recipe) -> list[Path]:
    """Write the student into ``output_dir`` in open_clip's Hub layout (config, safetensors, model
    card) and push that folder when the recipe's ``training.push_to_hub`` asks for it."""
    out = trainer.args.output_dir
    teacher = None
    if recipe.teacher is not None:
        teacher = recipe.teacher.arch if isinstance(recipe.teacher.arch, str) else "custom architecture"
        if recipe.teacher.checkpoint:
            teacher += f" ({recipe.teacher.checkpoint})"
    repo_id = recipe.training.get("hub_model_id")
    model = trainer.accelerator.unwrap_model(trainer.model)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RunFault(f"the trained student has non-finite weights ({len(bad)} tensors, e.g. {bad[:3]}); "
                       f"nothing was exported or pushed from {out}")
    card = ModelCardInfo.from_run_dir(out, teacher=teacher, repo_id=repo_id)
    files = export_open_clip(model, out, card=card)
    if recipe.training.get("push_to_hub"):
        try:
            url = push_export_to_hub(out, repo_id, token=recipe.training.get("hub_token"),
                                     private=recipe.training.get("hub_private_repo"),
                                     revision=recipe.training.get("hub_revision"))
        except Exception as e:  # network, token, permissions: the exported folder is complete either way
            raise RunFault(f"the run finished and {out} holds the exported student, but pushing it to "
                           f"{repo_id!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                           f"Push it later with: huggingface-cli upload {repo_id} {out}") from None
        logger.info("pushed %s to %s", out, url)
    return files


def run_info(trainer: Trainer) -> dict[str, Any]:
    """Where and how the run ran: processes, device, precision (saved beside the results)."""
    acc, args = trainer.accelerator, trainer.args
    return {
        "world_size": args.world_size,
        "distributed_type": str(acc.distributed_type.value),
        "device": str(acc.device),
        "mixed_precision": acc.mixed_precision,
        "global_train_batch_size": args.per_device_train_batch_size * args.world_size
        * args.gradient_accumulation_steps,
        "torch": torch.__version__,
    }


def fit(trainer: Trainer, recipe: Recipe) -> None:
    """Record the resolved recipe and where the run runs, train (resuming when the recipe says so),
    and save the final model and the whole log history (trainer_state.json) in output_dir."""
    out = trainer.args.output_dir
    if trainer.is_world_process_zero():
        os.makedirs(out, exist_ok=True)
        Path(out, "recipe.yaml").write_text(dump_recipe(recipe))
        Path(out, "run_info.json").write_text(json.dumps(run_info(trainer), indent=2))
    resume = recipe.training.get("resume_from_checkpoint") or None  # a path, or true for the latest complete
    trainer.train(resume_from_checkpoint=resume)
    trainer.restore_selected()  # with `select:`, the best evaluation of the last stage is the result
    trainer.save_model(out)
    trainer.save_state()


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Hold ``output_dir`` for this run: a second run writing there at the same time would mix its
    checkpoints with ours. A lock left by a process that no longer runs (on this host) is stale and
    taken over; one held by a live process is refused, saying how to clear it."""
    if not PartialState().is_main_process:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    lock = Path(output_dir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                logger.warning("removing the stale lock %s of process %s, which no longer runs", lock,
                               holder.get("pid"))
                lock.unlink(missing_ok=True)
                continue
            raise RunFault(f"{output_dir} is in use by another run (process {holder.get('pid')} on "
                           f"{holder.get('host')}): give this run its own training.output_dir, or, if that run "
                           f"is not running any more, delete {lock}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def preflight(recipe: Recipe, args: TrainingArguments) -> None:
    """What can be checked before any data or model is loaded: the output folder is writable, a
    resume path is a checkpoint, and a push has a token and a network to go to. All problems are
    reported together, each with its key."""
    problems = []
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kd_trainer.write-test.{os.getpid()}"  # one per process: they probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        problems.append(f"training.output_dir: {out} is not writable ({e.strerror or e})")
    resume = recipe.training.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume:
        path = Path(resume)
        if not path.is_dir():
            problems.append(f"training.resume_from_checkpoint: {resume} is not a folder (expected a checkpoint-N "
                            "folder written by an earlier run of this recipe, or true for the latest one)")
        elif not (path / "trainer_state.json").is_file():
            problems.append(f"training.resume_from_checkpoint: {resume} holds no trainer_state.json, so it is not "
                            "a complete checkpoint-N folder")
    if recipe.training.get("push_to_hub"):
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            problems.append("training.push_to_hub: HF_HUB_OFFLINE is set, so the push at the end would fail; "
                            "unset it, or train without pushing and upload the run folder later")
        if not (recipe.training.get("hub_token") or get_token()):
            problems.append("training.push_to_hub: no Hugging Face token (run `huggingface-cli login`, set HF_TOKEN, "
                            "or give training.hub_token)")
    if problems:
        raise RecipeError("the run cannot start:\n  - " + "\n  - ".join(problems))


def run_classification(recipe: Recipe, args: TrainingArguments) -> dict[str, float]:
    """The classification example: SynthShapes, torchvision classifiers, cross-entropy plus the
    recipe's UP/EOD mimic jobs from its named teachers. Same recipe, trainer core and logging."""
    set_seed(recipe.seed)
    if recipe.data.name != "synth_shapes" or recipe.data.shapes is None:
        raise RecipeError("task: classification runs on data.name: synth_shapes with a data.shapes block")
    folder = Path(recipe.data.root) / "SynthShapes"
    with PartialState().main_process_first():
        make_synth_shapes(folder, **recipe.data.shapes.model_dump())
    train, test = ShapesDataset(folder, "train", train=True), ShapesDataset(folder, "test", train=False)
    classes = recipe.data.shapes.num_classes
    teachers = {name: load_classifier(str(cfg.arch), classes, cfg.checkpoint)
                for name, cfg in (recipe.teachers or {}).items()}
    mimic = recipe.mimic
    student = load_classifier(str(recipe.student.arch), classes, recipe.student.checkpoint)
    trainer = ClassificationTrainer(model=student, args=args, teachers=teachers,
                                    mimic_jobs=mimic.jobs if mimic else (),
                                    task_loss=mimic.task_loss if mimic else True,
                                    max_nonfinite_skips=recipe.nonfinite_skips, train_dataset=train, eval_dataset=test)
    fit(trainer, recipe)
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    trainer.save_metrics("test", metrics)
    return metrics


def run(recipe: Recipe) -> dict[str, float]:
    """Check what can be checked, hold the output folder, train and evaluate; the test metrics."""
    args = training_arguments(recipe)
    preflight(recipe, args)
    with output_lock(args.output_dir):
        if recipe.task == "classification":
            return run_classification(recipe, args)
        if recipe.task == "detection":
            return run_detection(recipe, args, fit=fit)  # fit passed in: run_detection sits beside run.py
        return run_retrieval(recipe, args)


def run_retrieval(recipe: Recipe, args: TrainingArguments) -> dict[str, float]:
    """Train (if the recipe has epochs/steps to run) and evaluate; returns the test metrics."""
    set_seed(recipe.seed)
    plan = RunPlan.from_recipe(recipe)
    jobs = recipe.mimic.jobs if recipe.mimic is not None else []
    data = prepare_data(recipe)

    mimic_on_teacher = any("teacher" in job.teachers for job in jobs)
    inherits = recipe.student.inherit is not None and recipe.student.inherit.source == "teacher"
    teacher = None
    if recipe.teacher is not None and (plan.wants_teacher or mimic_on_teacher or inherits):
        teacher = build_model(recipe.teacher, recipe)
    student = build_model(recipe.student, recipe, teacher=teacher,
                          projection_dim=teacher.embed_dim if teacher is not None and plan.direct_compare else None)
    if not (plan.wants_teacher or mimic_on_teacher):
        teacher = None  # it only gave the student its weights

    if recipe.precision == "original":  # the seed code's fp16 weights, for both models
        for role, model in (("teacher", teacher), ("student", student)):
            if model is not None:
                logger.info("precision original, %s: %s", role, convert_to_original_fp16(model).summary())

    cache, train_dataset = None, data.splits["train"]
    if teacher is not None and recipe.teacher.cache is not None:
        cache, train_dataset = open_teacher_cache(recipe, teacher, data.raw_train)

    trainer = RetrievalTrainer(
        model=student,
        args=args,
        plan=plan,
        teacher=teacher,
        mimic=jobs,
        mimic_teachers={name: build_model(cfg, recipe) for name, cfg in (recipe.teachers or {}).items()},
        teacher_cache=cache,
        max_nonfinite_skips=recipe.nonfinite_skips,
        exact_accumulation_steps=exact_steps(recipe),
        train_dataset=train_dataset,
        eval_dataset=data.split(recipe.select.split if recipe.select is not None else recipe.data.eval_split),
    )
    if recipe.precision == "original" and trainer.accelerator.mixed_precision != "no":
        raise RecipeError(f"precision: original trains fp16 weights itself, but the launch asks for "
                          f"{trainer.accelerator.mixed_precision} mixed precision (accelerate config); launch "
                          "with --mixed_precision no")
    fit(trainer, recipe)

    metrics: dict[str, float] = {}
    if recipe.data.test_split is not None:
        metrics = trainer.evaluate(data.split(recipe.data.test_split), metric_key_prefix="test")
        trainer.save_metrics("test", {**metrics, **({"selected": trainer.selected} if trainer.selected else {})})
        if trainer.is_world_process_zero():
            logger.info("test metrics: %s", json.dumps(metrics))
    if trainer.is_world_process_zero():
        export_student(trainer, recipe)
    trainer.accelerator.wait_for_everyone()
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="kd_trainer/run.py",
        description="Run a kd_trainer recipe. Overrides are key.sub=value (YAML values), e.g. "
                    "data.name=rstpreid data.root=./data training.num_train_epochs=1",
    )
    parser.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ns = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with one_line_errors():
        return run(load_recipe(ns.recipe, ns.overrides))


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input and known faults end in ``error: <message>`` and exit code 2, without a traceback;
    a data error raised inside a DataLoader worker is unwrapped to its own one line first."""
    try:
        yield
    except INPUT_ERRORS as e:
        print(f"error: {unwrap_worker_error(e) or e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        data_error = unwrap_worker_error(e)
        if data_error is None:
            raise  # a bug: its traceback is what a report needs
        print(f"error: {data_error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

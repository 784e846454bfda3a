"""The resolved run of every task (issue 23): the data set and its generator, the student and the
named teachers with their checkpoints, the mimic jobs and the task loss are decided once, in the
resolved run; the classification and detection runners build from it and have no other path to
them; every run saves it as ``resolved_run.json``; ``kd-trainer plan`` prints it.

Each object test changes one recipe key and checks the decision it drives in the resolved run. Each
runner test hands the runner a resolved run that disagrees with its recipe, and checks that the
models, data and trainer follow the run."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import kd_trainer.runner.classification as classification
import kd_trainer.runner.detection as detection
import kd_trainer.runner.retrieval as retrieval
from kd_trainer.distill.resolved import RESOLVED_RUN_FILE, CacheSpec, ModelSpec, TeacherUse, resolve_run
from kd_trainer.plan_view import format_plan, plan_report
from kd_trainer.recipe import load_recipe, parse_recipe
from kd_trainer.runner import run as run_recipe

ROOT = Path(__file__).resolve().parents[1]
CLS = ROOT / "recipes" / "cls_res50_to_res18_kd.yaml"
DET = ROOT / "recipes" / "det_frcnn_r50_to_r18_fpn_mimic.yaml"
TINY_SHAPES = "data.shapes={num_classes: 4, train_per_class: 8, test_per_class: 4, image_size: 32, seed: 0}"
TINY_DET = "data.det={num_classes: 3, train_images: 8, test_images: 5, image_size: 64, max_objects: 3, seed: 0}"


def cls(tmp_path: Path, *over: str):
    return load_recipe(CLS, [f"data.root={tmp_path / 'data'}", TINY_SHAPES,
                             f"training.output_dir={tmp_path / 'out'}", *over])


def det(tmp_path: Path, *over: str):
    return load_recipe(DET, [f"data.root={tmp_path / 'data'}", TINY_DET,
                             f"training.output_dir={tmp_path / 'out'}", *over])


# --------------------------------------------------------------------------- the object


def test_a_classification_recipe_s_teachers_jobs_task_loss_and_data_are_in_the_resolved_run(tmp_path):
    base = resolve_run(cls(tmp_path))
    assert base.teachers == {"teacher0": ModelSpec("resnet50", "runs/cls/teacher_res50")}
    assert base.student == ModelSpec("resnet18", None)
    (job,) = base.mimic_jobs
    assert (job.teachers, job.student, job.loss_weight, job.warm_up_iters) == ({"teacher0": ["net.fc"]}, ["net.fc"],
                                                                               1.0, 20)
    assert base.task_loss is True
    assert base.data.generated == str(tmp_path / "data" / "SynthShapes") and base.data.num_classes == 4
    assert base.data.generator == {"num_classes": 4, "train_per_class": 8, "test_per_class": 4, "image_size": 32,
                                   "seed": 0}
    moved = resolve_run(cls(tmp_path, "teachers.teacher0.checkpoint=/elsewhere/t0", "teachers.teacher0.arch=resnet34"))
    assert moved.teachers["teacher0"] == ModelSpec("resnet34", "/elsewhere/t0")
    weighed = resolve_run(cls(tmp_path, "mimic.loss_weight=0.25", "mimic.warm_up_iters=7", "mimic.task_loss=false"))
    job = weighed.mimic_jobs[0]
    assert (job.loss_weight, job.warm_up_iters, weighed.task_loss) == (0.25, 7, False)
    more = resolve_run(cls(tmp_path, "data.shapes.num_classes=6", "data.root=/d"))
    assert (more.data.num_classes, more.data.generated, more.data.generator["num_classes"]) == (6, "/d/SynthShapes", 6)
    # UP's teacher_weight is the teacher's checkpoint, resolved once by the schema, read from here.
    up = resolve_run(cls(tmp_path, "teachers.teacher0.checkpoint=null", "mimic.teacher0.teacher_weight=/up/t0.pth"))
    assert up.teachers["teacher0"].checkpoint == "/up/t0.pth"


def test_a_classification_job_may_read_the_recipe_s_teacher_by_its_name(tmp_path):
    raw = {"name": "c", "task": "classification",
           "data": {"name": "synth_shapes", "root": str(tmp_path), "shapes": {"num_classes": 4}},
           "student": {"arch": "resnet18"}, "teacher": {"arch": "resnet34", "checkpoint": "/t"},
           "mimic": {"teacher": {"mimic_name": ["net.fc"]}, "student": {"mimic_name": ["net.fc"]}}}
    assert resolve_run(parse_recipe(raw)).teachers == {"teacher": ModelSpec("resnet34", "/t")}
    raw["mimic"] = {"teacher0": {"mimic_name": ["net.fc"]}, "student": {"mimic_name": ["net.fc"]}}
    raw["teachers"] = {"teacher0": {"arch": "resnet50"}}
    assert set(resolve_run(parse_recipe(raw)).teachers) == {"teacher0"}  # a teacher no job reads is not built


def test_a_detection_recipe_s_teachers_jobs_and_data_are_in_the_resolved_run(tmp_path):
    base = resolve_run(det(tmp_path))
    assert base.teachers["teacher0"].checkpoint == "runs/det/teacher_r50"
    assert base.teachers["teacher0"].arch["depth"] == 50 and base.student.arch["depth"] == 18
    assert (base.data.num_classes, base.data.image_size) == (3, 64)
    assert base.data.generated == str(tmp_path / "data" / "SynthDet")
    assert [len(j.student) for j in base.mimic_jobs] == [5] and base.mimic_jobs[0].warm_up_iters == 50
    changed = resolve_run(det(tmp_path, "teachers.teacher0.checkpoint=/t/r50", "teachers.teacher0.arch.depth=101",
                              "mimic.loss_weight=3.0", "data.det.image_size=96"))
    assert changed.teachers["teacher0"].checkpoint == "/t/r50" and changed.teachers["teacher0"].arch["depth"] == 101
    assert changed.mimic_jobs[0].loss_weight == 3.0 and changed.data.image_size == 96


def test_a_retrieval_recipe_s_models_jobs_and_data_are_in_the_resolved_run(tmp_path):
    block = "clip.visual.transformer.resblocks.0"
    raw = {"name": "r", "data": {"name": "synth_pedes", "root": str(tmp_path), "image_size": [32, 16],
                                 "synth": {"num_identities": 24}},
           "student": {"arch": "micro"}, "teacher": {"arch": "micro", "checkpoint": "/t"},
           "teachers": {"teacher0": {"arch": "micro", "checkpoint": "/t0"}},
           "mimic": [{"loss": {"type": "cosine"}, "teachers": {"teacher0": [block]}, "student": [block],
                      "loss_weight": 0.5}],
           "loss": {"terms": [{"name": "itc"}]}}
    run = resolve_run(parse_recipe(raw))
    assert run.teachers == {"teacher0": ModelSpec("micro", "/t0")} and run.mimic_jobs[0].loss_weight == 0.5
    assert run.teacher.model == ModelSpec("micro", "/t", cache=CacheSpec(None, 8, 0))  # the schema's draws and seed
    assert not run.teacher.load  # no term and no job reads it
    assert run.data.augment is True and run.seed == 42  # the schema's default seed
    assert run.data.generated == str(tmp_path / "SynthPEDES") and run.data.generator["num_identities"] == 24
    raw["teachers"]["teacher0"]["checkpoint"] = "/t1"
    raw["mimic"][0]["loss_weight"] = 2.0
    raw["teacher"].update(cache="/c", cache_draws=3, cache_seed=5, embed_dim=16)
    raw["data"].update(augment=False)
    raw["seed"] = 4
    again = resolve_run(parse_recipe(raw))
    assert again.teachers["teacher0"].checkpoint == "/t1" and again.mimic_jobs[0].loss_weight == 2.0
    assert again.teacher.model.cache == CacheSpec("/c", 3, 5) and again.teacher.model.arch["embed_dim"] == 16
    assert again.teachers["teacher0"].cache is None and again.student.cache is None  # the `teacher:`'s only
    assert again.data.augment is False and again.seed == 4


def test_the_resolved_run_is_decided_once_and_does_not_follow_later_changes_to_the_recipe(tmp_path):
    recipe = det(tmp_path)
    run = resolve_run(recipe)
    recipe.mimic.jobs[0].loss_weight = 9.0
    recipe.teachers["teacher0"].arch["depth"] = 152
    assert run.mimic_jobs[0].loss_weight == 1.0 and run.teachers["teacher0"].arch["depth"] == 50
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.teachers = {}


# --------------------------------------------------------------------------- the runners read it


class Stop(Exception):
    """Raised by the recording trainer: the run stops once the runner has built everything."""


def record(monkeypatch, module: Any, loader: str, trainer: str) -> dict[str, Any]:
    """Replace the module's model loader and trainer with recorders (models are tags, never built)."""
    seen: dict[str, Any] = {"loads": []}

    def load(*args: Any, **kwargs: Any) -> str:
        seen["loads"].append((args, kwargs))
        return f"model{len(seen['loads']) - 1}"

    class Recorder:
        def __init__(self, model: Any, **kwargs: Any) -> None:
            seen["model"], seen["trainer"] = model, kwargs
            raise Stop

    monkeypatch.setattr(module, loader, load)
    monkeypatch.setattr(module, trainer, Recorder)
    return seen


def test_the_classification_runner_builds_from_the_resolved_run_only(tmp_path, monkeypatch):
    recipe = cls(tmp_path)
    resolved = resolve_run(recipe)
    # A run that disagrees with its recipe in every decision the runner reads.
    job = resolved.mimic_jobs[0].model_copy(update={"loss_weight": 0.125})
    data = dataclasses.replace(resolved.data, generated=str(tmp_path / "other"), num_classes=3,
                               generator={**resolved.data.generator, "num_classes": 3})
    other = dataclasses.replace(resolved, teachers={"teacherX": ModelSpec("resnet34", "/x")},
                                student=ModelSpec("resnet50", "/s"), mimic_jobs=(job,), task_loss=False, data=data)
    seen = record(monkeypatch, classification, "load_classifier", "ClassificationTrainer")
    with pytest.raises(Stop):
        classification.run_classification(recipe, other)
    assert seen["loads"] == [(("resnet34", 3, "/x"), {}), (("resnet50", 3, "/s"), {})]
    t = seen["trainer"]
    assert seen["model"] == "model1" and t["teachers"] == {"teacherX": "model0"}
    assert t["mimic_jobs"] == (job,) and t["task_loss"] is False and t["args"] is other.args
    assert len(t["train_dataset"]) == 3 * 8  # the run's 3 classes of 8 train images, not the recipe's 4
    assert (tmp_path / "other" / "train").is_dir() and not (tmp_path / "data").exists()


def test_the_detection_runner_builds_from_the_resolved_run_only(tmp_path, monkeypatch):
    recipe = det(tmp_path)
    resolved = resolve_run(recipe)
    job = resolved.mimic_jobs[0].model_copy(update={"warm_up_iters": 3})
    data = dataclasses.replace(resolved.data, generated=str(tmp_path / "other"), num_classes=2, image_size=48,
                               generator={**resolved.data.generator, "num_classes": 2, "image_size": 48})
    arch = {"depth": 18, "fpn_channels": 32}
    other = dataclasses.replace(resolved, teachers={"t": ModelSpec(arch, "/t")}, student=ModelSpec(arch, None),
                                mimic_jobs=(job,), task_loss=False, data=data)
    seen = record(monkeypatch, detection, "load_detector", "DetectionTrainer")
    with pytest.raises(Stop):
        detection.run_detection(recipe, other)
    assert seen["loads"] == [((arch,), {"num_classes": 2, "image_size": 48, "checkpoint": "/t"}),
                             ((arch,), {"num_classes": 2, "image_size": 48, "checkpoint": None})]
    t = seen["trainer"]
    assert seen["model"] == "model1" and t["teachers"] == {"t": "model0"} and t["mimic_jobs"] == (job,)
    assert t["task_loss"] is False and len(t["train_dataset"]) == 8
    assert (tmp_path / "other" / "train.json").is_file() and not (tmp_path / "data").exists()


@pytest.fixture(scope="module")
def pedes(tmp_path_factory) -> Path:
    from kd_trainer.synthetic.pedes import make_synth_pedes

    root = tmp_path_factory.mktemp("pedes")
    make_synth_pedes(root / "SynthPEDES", num_identities=24, images_per_identity=(2, 3), image_size=(64, 32), seed=3)
    return root


BLOCK = "clip.visual.transformer.resblocks.0"


def retrieval_recipe(tmp_path: Path):
    """A recipe whose data folder does not exist: a runner that reads the recipe's data fails."""
    return parse_recipe({
        "name": "r", "seed": 0,
        "data": {"name": "synth_pedes", "root": str(tmp_path / "no-data"), "image_size": [32, 16],
                 "context_length": 64},
        "student": {"arch": "micro"}, "teacher": {"arch": "micro", "checkpoint": "/t"},
        "teachers": {"teacher0": {"arch": "micro", "checkpoint": "/t0"}},
        "mimic": [{"loss": {"type": "cosine"}, "teachers": {"teacher0": [BLOCK]}, "student": [BLOCK],
                   "loss_weight": 0.5}],
        "loss": {"terms": [{"name": "itc"}, {"name": "cross_kd"}]},
        "training": {"output_dir": str(tmp_path / "out"), "use_cpu": True}})


def test_the_retrieval_runner_builds_from_the_resolved_run_only(tmp_path, pedes, monkeypatch):
    recipe = retrieval_recipe(tmp_path)
    resolved = resolve_run(recipe)
    assert resolved.teacher.load and resolved.teacher.cache is None and resolved.eval_split is None
    # A run that disagrees with its recipe in every decision the runner reads: seed, data (another
    # folder, image size, caption length), evaluation split, the teacher (another checkpoint, a cache
    # with other draws), the student, the named teachers, the mimic job, the projection width.
    job = resolved.mimic_jobs[0].model_copy(update={"loss_weight": 0.125, "teachers": {"teacherX": [BLOCK]}})
    data = dataclasses.replace(resolved.data, root=str(pedes), image_size=(48, 24), context_length=32)
    teacher = TeacherUse(load=True, in_training=True, cache="/run/cache",
                         model=ModelSpec("micro", "/T", cache=CacheSpec("/recipe/cache", 3, 11)))
    other = dataclasses.replace(resolved, seed=7, data=data, eval_split="test", teacher=teacher,
                                student=ModelSpec("micro", "/s"), teachers={"teacherX": ModelSpec("micro", "/x")},
                                mimic_jobs=(job,), projection_dim=24)
    seen: dict[str, Any] = {"created": [], "loaded": [], "opened": []}

    def create(arch: Any, **kwargs: Any) -> str:  # the seed in force is the run's (build_model seeds it)
        seen["created"].append((arch, kwargs, torch.initial_seed()))
        return f"model{len(seen['created']) - 1}"

    class Recorder:
        def __init__(self, model: Any, **kwargs: Any) -> None:
            seen["model"], seen["trainer"] = model, kwargs
            raise Stop

    monkeypatch.setattr(retrieval, "create_model", create)
    monkeypatch.setattr(retrieval, "load_weights", lambda model, path, irra_config: seen["loaded"].append(
        (model, path, irra_config)))
    monkeypatch.setattr(retrieval.TeacherCache, "open", lambda path, **kw: seen["opened"].append((path, kw)) or "cache")
    monkeypatch.setattr(retrieval, "RetrievalTrainer", Recorder)
    with pytest.raises(Stop):
        retrieval.run_retrieval(recipe, other)
    size = {"image_size": (48, 24), "context_length": 32}
    # The teacher is built first, then the student (with the run's projection), then the named teachers.
    alone, projected = {**size, "projection_dim": None}, {**size, "projection_dim": 24}
    assert seen["created"] == [("micro", alone, 7), ("micro", projected, 7), ("micro", alone, 7)]
    assert seen["loaded"] == [("model0", "/T", None), ("model1", "/s", None), ("model2", "/x", None)]
    ((path, opened),) = seen["opened"]
    assert path == "/run/cache" and opened["teacher"] == "model0"
    assert (opened["transform_cfg"].num_draws, opened["transform_cfg"].seed) == (3, 11)
    assert opened["transform_cfg"].image_size == (48, 24) and opened["transform_cfg"].context_length == 32
    t = seen["trainer"]
    assert seen["model"] == "model1" and t["teacher"] == "model0" and t["teacher_cache"] == "cache"
    assert t["mimic_teachers"] == {"teacherX": "model2"} and t["mimic_jobs"] == (job,)
    assert t["args"] is other.args and t["plan"] is other.plan
    assert t["train_dataset"].config == opened["transform_cfg"] and len(t["train_dataset"]) == len(
        opened["dataset_raw"])
    assert t["eval_dataset"].name == "test"
    gallery = t["eval_dataset"].gallery[0]["pixel_values"]
    assert tuple(gallery.shape) == (3, 48, 24) and len(t["eval_dataset"].queries[0]["input_ids"]) == 32
    assert not (tmp_path / "no-data").exists()


def test_the_retrieval_runner_builds_only_the_models_the_run_loads(tmp_path, pedes, monkeypatch):
    """No teacher model when the run does not load one, whatever the recipe's terms; the student
    alone, seeded by the run."""
    recipe = retrieval_recipe(tmp_path)
    resolved = resolve_run(recipe)
    data = dataclasses.replace(resolved.data, root=str(pedes))
    other = dataclasses.replace(resolved, data=data, teacher=TeacherUse(), teachers={}, mimic_jobs=(), seed=3)
    seen = record(monkeypatch, retrieval, "build_model", "RetrievalTrainer")
    with pytest.raises(Stop):
        retrieval.run_retrieval(recipe, other)
    assert seen["loads"] == [((other.student, other), {"teacher": None, "projection_dim": None,
                                                       "output_dir": str(tmp_path / "out")})]
    t = seen["trainer"]
    assert seen["model"] == "model0" and t["teacher"] is None and t["mimic_teachers"] == {} and t["mimic_jobs"] == ()
    assert t["teacher_cache"] is None and t["eval_dataset"] is None
    # The train images are augmented with the run's seed (3), not the recipe's (0).
    from kd_trainer.data import load_pedes, with_retrieval_transforms

    raw = load_pedes("synth_pedes", str(pedes), splits={"train"})
    first = {seed: with_retrieval_transforms(raw, image_size=(32, 16), augment=True, context_length=64,
                                             dataset_name="synth_pedes", seed=seed)["train"][0]["pixel_values"]
             for seed in (0, 3)}
    assert not torch.equal(first[0], first[3])
    assert torch.equal(t["train_dataset"][0]["pixel_values"], first[3])


@pytest.mark.parametrize("module", [classification, detection, retrieval], ids=lambda m: m.__name__.split(".")[-1])
def test_a_runner_passes_its_recipe_only_to_fit(module):
    """No runner reads a key of its recipe: the name ``recipe`` appears only as an argument of
    ``fit`` (recorded beside the run)."""
    tree = ast.parse(inspect.getsource(module))
    passed = {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "fit" for arg in node.args}
    uses = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id == "recipe"
            and id(node) not in passed]
    assert not uses, f"{module.__name__} reads its recipe at lines {uses}"


# --------------------------------------------------------------------------- resolved_run.json


def saved(out: Path) -> dict[str, Any]:
    return json.loads((out / RESOLVED_RUN_FILE).read_text())


def test_a_classification_run_saves_its_resolved_run(tmp_path, one_torch_thread):
    recipe = cls(tmp_path, "teachers.teacher0.checkpoint=null", "training.max_steps=1",
                 "training.per_device_train_batch_size=8", "training.disable_tqdm=true",
                 "training.dataloader_num_workers=0", "training.use_cpu=true")
    run_recipe(recipe)
    expected = json.loads(json.dumps(resolve_run(recipe).describe()))
    assert saved(tmp_path / "out") == expected
    assert expected["teachers"] == {"teacher0": {"arch": "resnet50", "checkpoint": None, "config": None,
                                                 "inherit": None, "cache": None}}
    assert expected["mimic_jobs"][0]["weight"] == 1.0 and expected["mimic_jobs"][0]["warm_up_iters"] == 20
    assert expected["data"]["generated"] == str(tmp_path / "data" / "SynthShapes")


def test_a_retrieval_run_saves_its_resolved_run_without_the_hub_token(tmp_path, pedes):
    recipe = parse_recipe({
        "name": "r", "data": {"name": "synth_pedes", "root": str(pedes), "image_size": [32, 16], "context_length": 64,
                              "test_split": None},
        "student": {"arch": "micro"}, "teacher": {"arch": "micro"},
        "loss": {"terms": [{"name": "itc"}, {"name": "cross_kd"}]},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 8,
                     "use_cpu": True, "disable_tqdm": True, "save_strategy": "no", "report_to": "none",
                     "hub_model_id": "me/student", "hub_token": "hf_secret"}})
    run_recipe(recipe)
    text = (tmp_path / "out" / RESOLVED_RUN_FILE).read_text()
    assert "hf_secret" not in text
    got = json.loads(text)
    assert got == json.loads(json.dumps(resolve_run(recipe).describe()))
    assert got["hub"] == {"repo_id": "me/student", "push": False} and got["teacher"]["in_training"]
    assert [s["teacher_source"] for s in got["stages"]] == ["stage 'train': no teacher cache: online teacher for "
                                                           "['cross_kd']"]


# --------------------------------------------------------------------------- kd-trainer plan


@pytest.mark.parametrize("make", [cls, det], ids=["classification", "detection"])
def test_plan_of_a_task_recipe_is_its_resolved_run(tmp_path, make):
    recipe = make(tmp_path, "teachers.teacher0.checkpoint=/ckpt/teacher0", "mimic.loss_weight=0.375")
    report = plan_report(recipe)
    assert report == resolve_run(recipe).describe()  # the same on this machine as the run will decide
    text = format_plan(report)
    assert "teacher teacher0: " in text and " from /ckpt/teacher0" in text and " x 0.375" in text
    assert f"data: {report['data']['name']}, generated in {report['data']['generated']}" in text
    assert f"output folder: {tmp_path / 'out'}" in text

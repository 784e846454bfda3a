"""A recipe is one type per task (issue 23): each holds only the keys its task reads, so a key of
another task is refused by name where the recipe is read, not when the run starts; the two values
that said "original" say what they reproduce, and the old spelling still reads the same."""

from __future__ import annotations

import copy
import warnings

import pytest
import yaml
from pydantic import TypeAdapter

from kd_trainer.recipe import (
    ClassificationRecipe,
    DetectionRecipe,
    Recipe,
    RecipeError,
    RetrievalRecipe,
    dump_recipe,
    parse_recipe,
)
from kd_trainer.distill.resolved import resolve_run
from kd_trainer.runner.resume import resume_changes

SHAPES = {"num_classes": 4, "train_per_class": 2, "test_per_class": 2, "image_size": 32}
DET = {"num_classes": 3, "train_images": 2, "test_images": 2, "image_size": 64}
RETRIEVAL = {"name": "r", "data": {"name": "synth_pedes"}, "student": {"arch": "micro"},
             "loss": {"terms": [{"name": "itc"}]}}


def _recipe(task: str, data: dict, **extra) -> dict:
    return {"name": "t", "task": task, "data": data, "student": {"arch": "resnet18"}, **extra}


def _error(raw: dict) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw)
    return str(e.value)


def test_each_task_parses_to_its_own_type():
    assert type(parse_recipe(RETRIEVAL)) is RetrievalRecipe  # no `task:`: retrieval
    assert type(parse_recipe({**RETRIEVAL, "task": "retrieval"})) is RetrievalRecipe
    assert type(parse_recipe(_recipe("classification", {"name": "synth_shapes", "shapes": SHAPES}))) \
        is ClassificationRecipe
    det = parse_recipe(_recipe("detection", {"name": "synth_det", "det": DET}))
    assert type(det) is DetectionRecipe and det.data.det.num_classes == 3 and det.data.root == "./data"
    # pydantic's own entry point dispatches the same way.
    adapter = TypeAdapter(Recipe)
    assert type(adapter.validate_python(_recipe("detection", {"name": "synth_det", "det": DET}))) is DetectionRecipe
    assert type(adapter.validate_python(RETRIEVAL)) is RetrievalRecipe


def test_the_task_types_differ_by_exactly_the_retrieval_keys():
    retrieval_only = {"loss", "stages", "optim", "precision", "select", "contrastive_accumulation"}
    assert set(RetrievalRecipe.model_fields) - set(ClassificationRecipe.model_fields) == retrieval_only
    assert set(ClassificationRecipe.model_fields) - set(DetectionRecipe.model_fields) == {"teacher"}
    assert set(DetectionRecipe.model_fields) <= set(ClassificationRecipe.model_fields)
    assert set(RetrievalRecipe.model_fields["data"].annotation.model_fields) & {"shapes", "det"} == set()


@pytest.mark.parametrize("key, value", [
    ("loss", {"terms": [{"name": "itc"}]}),
    ("stages", [{"name": "a", "epochs": 1, "loss": {"terms": [{"name": "itc"}]}}]),
    ("optim", {"preset": "irra"}),
    ("precision", "irra_fp16"),
    ("select", {"metric": "r1"}),
    ("contrastive_accumulation", "exact"),
])
def test_a_retrieval_key_in_a_detection_or_classification_recipe_is_refused_by_name(key, value):
    det = _error(_recipe("detection", {"name": "synth_det", "det": DET}, **{key: value}))
    assert (f"  - {key}: `{key}` is not a key of a task: detection recipe; it is a key of task: retrieval. "
            "task: detection trains with its own task loss plus `mimic:` jobs") in det
    cls = _error(_recipe("classification", {"name": "synth_shapes", "shapes": SHAPES}, **{key: value}))
    assert f"  - {key}: `{key}` is not a key of a task: classification recipe; it is a key of task: retrieval." in cls


@pytest.mark.parametrize("raw, line", [
    # a detection recipe's teachers are `teachers:`; classification and retrieval have `teacher:`
    (_recipe("detection", {"name": "synth_det", "det": DET}, teacher={"arch": "resnet18"}),
     "  - teacher: `teacher` is not a key of a task: detection recipe; it is a key of task: retrieval and "
     "classification. task: detection trains with its own task loss plus `mimic:` jobs from its `teachers:`: "
     "torchvision Faster R-CNNs on synth_det. Did you mean teachers?"),
    # each data block holds only its own generator
    ({**RETRIEVAL, "data": {"name": "synth_pedes", "det": DET}},
     "  - data.det: `data.det` is not a key of a task: retrieval recipe; it is a key of task: detection."),
    (_recipe("detection", {"name": "synth_det", "det": DET, "synth": {"num_identities": 5}}),
     "  - data.synth: `data.synth` is not a key of a task: detection recipe; it is a key of task: retrieval."),
    (_recipe("classification", {"name": "synth_shapes", "shapes": SHAPES, "image_size": [64, 64]}),
     "  - data.image_size: `data.image_size` is not a key of a task: classification recipe; it is a key of "
     "task: retrieval."),
    # each task runs on its own data set, generated from its block
    (_recipe("classification", {"name": "synth_shapes"}), "  - data.shapes: Field required"),
    (_recipe("classification", {"name": "synth_det", "shapes": SHAPES}),
     "  - data.name: Input should be 'synth_shapes' (got 'synth_det')"),
    (_recipe("detection", {"name": "synth_shapes", "det": DET}),
     "  - data.name: Input should be 'synth_det' (got 'synth_shapes')"),
    # data.synth is for synth_pedes only: refused when read (it was refused when the data was prepared)
    ({**RETRIEVAL, "data": {"name": "cuhk_pedes", "synth": {"num_identities": 5}}},
     "  - data: data.synth is only for synth_pedes, but data.name is 'cuhk_pedes'"),
    ({**RETRIEVAL, "data": {"name": "cuhk_pedez"}}, "  - data: Unknown dataset 'cuhk_pedez'"),
    ({**RETRIEVAL, "task": "segmentation"},
     "  - task: 'segmentation' is not a task; expected one of retrieval, classification, detection (none: retrieval)"),
    # a key no task has stays an unknown key, with the closest keys of this task
    (_recipe("detection", {"name": "synth_det", "det": DET}, mimick={}), "  - mimick: unknown key. Did you mean mimic?"),
])
def test_a_recipe_carries_only_its_tasks_keys(raw, line):
    lines = _error(raw).splitlines()
    assert lines[0] == "Invalid recipe <dict>:" and any(got.startswith(line) for got in lines[1:]), lines


@pytest.mark.parametrize("raw, line", [
    (_recipe("classification", {"name": "synth_shapes", "shapes": {"num_classes": 1}}),
     "  - data.shapes: num_classes must be between 2 and 20, got 1"),
    (_recipe("classification", {"name": "synth_shapes", "shapes": {"train_per_class": 0}}),
     "  - data.shapes: SynthShapes needs train_per_class and test_per_class >= 1"),
    (_recipe("detection", {"name": "synth_det", "det": {"image_size": 16}}),
     "  - data.det: SynthDet image_size must be at least 32 pixels"),
    (_recipe("detection", {"name": "synth_det", "det": {"max_objects": 0}}),
     "  - data.det: SynthDet needs max_objects, train_images and test_images >= 1"),
])
def test_a_tasks_generator_arguments_are_checked_in_its_own_block(raw, line):
    assert any(got.startswith(line) for got in _error(raw).splitlines()[1:])


def _old_dump(recipe) -> dict:
    """``recipe`` as a recipe.yaml written before the split held it: every key of every task, each
    other task's at its default (written here by hand, as the old schema wrote them)."""
    saved = yaml.safe_load(dump_recipe(recipe))
    retrieval = {"teacher": None, "loss": None, "stages": None, "optim": None, "precision": None, "select": None,
                 "contrastive_accumulation": "plain"}
    data = {"image_size": [384, 128], "augment": True, "context_length": 77, "eval_split": "val",
            "test_split": "test", "skip_unreadable": False, "verify_images": False, "duplicates": "warn",
            "synth": None, "shapes": None, "det": None}
    for key, value in retrieval.items():
        saved.setdefault(key, value)
    for key, value in data.items():
        saved["data"].setdefault(key, value)
    return saved


@pytest.mark.parametrize("raw", [
    RETRIEVAL,
    _recipe("classification", {"name": "synth_shapes", "shapes": SHAPES}),
    _recipe("detection", {"name": "synth_det", "det": DET}),
])
def test_a_recipe_yaml_saved_before_the_split_reads_as_the_same_recipe(raw):
    recipe = parse_recipe(copy.deepcopy(raw))
    old = _old_dump(recipe)
    assert len(old) > len(recipe.model_dump()) or recipe.task == "retrieval"
    assert parse_recipe(old).model_dump(mode="json") == recipe.model_dump(mode="json")
    # Only the other tasks' defaults are dropped: a value there is still refused.
    if recipe.task != "retrieval":
        assert "`contrastive_accumulation` is not a key" in _error({**old, "contrastive_accumulation": "exact"})
        assert "`data.image_size` is not a key" in _error({**old, "data": {**old["data"], "image_size": [64, 64]}})


def test_a_detection_recipe_resolves_to_plain_accumulation_without_the_key():
    det = parse_recipe(_recipe("detection", {"name": "synth_det", "det": DET}))
    assert "contrastive_accumulation" not in det.model_dump() and not hasattr(det, "contrastive_accumulation")
    assert resolve_run(det, describe_only=True).contrastive_accumulation == "plain"


# --- `original` renamed: precision: irra_fp16, optim.preset: irra -----------------------------

def test_the_old_spelling_is_read_as_the_new_one_with_a_warning():
    old = {**RETRIEVAL, "precision": "original", "optim": {"preset": "original", "lr": 2e-5},
           "training": {"eval_strategy": "no"}}
    with pytest.warns(FutureWarning) as caught:
        recipe = parse_recipe(old)
    assert recipe.precision == "irra_fp16" and recipe.optim.preset == "irra" and recipe.optim.lr == 2e-5
    messages = sorted(str(w.message) for w in caught)
    assert any(m.startswith("`optim.preset: original` is now spelled `optim.preset: irra`") for m in messages)
    assert any(m.startswith("`precision: original` is now spelled `precision: irra_fp16`") for m in messages)
    assert all("\n" not in m for m in messages)
    new = {**RETRIEVAL, "precision": "irra_fp16", "optim": {"preset": "irra", "lr": 2e-5},
           "training": {"eval_strategy": "no"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        assert parse_recipe(new).model_dump() == recipe.model_dump()
    assert "precision: original" not in dump_recipe(recipe) and "preset: original" not in dump_recipe(recipe)


def test_a_stage_optim_in_the_old_spelling_merges_with_the_new_one():
    stages = [{"name": "a", "epochs": 1, "optim": {"preset": "original", "lr": 3e-5}, "loss": {"terms": [{"name": "itc"}]}}]
    raw = {**RETRIEVAL, "optim": {"preset": "irra"}, "stages": stages}
    del raw["loss"]
    with pytest.warns(FutureWarning):
        recipe = parse_recipe(raw)
    merged = recipe.stage_optim(recipe.stages[0])  # the same preset: the stage's fields over the recipe's
    assert merged.preset == "irra" and merged.lr == 3e-5 and merged.resolve().eps == 1e-3


def test_precision_irra_fp16_keeps_its_rules():
    assert "precision: irra_fp16 trains fp16 weights itself; drop training.bf16" in \
        _error({**RETRIEVAL, "precision": "irra_fp16", "training": {"bf16": True}})


def _resume_from(tmp_path, saved_text: str, now: dict):
    (tmp_path / "recipe.yaml").write_text(saved_text)
    (tmp_path / "checkpoint-2").mkdir()
    return resume_changes(parse_recipe(now), str(tmp_path), str(tmp_path / "checkpoint-2"))


def test_a_run_started_as_original_resumes_under_the_new_names_without_a_change(tmp_path):
    now = {**RETRIEVAL, "precision": "irra_fp16", "optim": {"preset": "irra"}}
    saved = yaml.safe_load(dump_recipe(parse_recipe(now)))
    saved["precision"], saved["optim"]["preset"] = "original", "original"  # as the run wrote it
    saved["data"].update(shapes=None, det=None)  # the old schema's data block held every task's generator
    with pytest.warns(FutureWarning):
        assert _resume_from(tmp_path, yaml.safe_dump(saved, sort_keys=False), now) == {}


def test_a_real_change_beside_the_renamed_values_is_still_refused(tmp_path):
    now = {**RETRIEVAL, "precision": "irra_fp16", "optim": {"preset": "irra", "lr": 2e-5}}
    saved = yaml.safe_load(dump_recipe(parse_recipe({**now, "optim": {"preset": "irra", "lr": 1e-5}})))
    saved["precision"], saved["optim"]["preset"] = "original", "original"
    with pytest.warns(FutureWarning), pytest.raises(RecipeError, match=r"optim\.lr \(1e-05 -> 2e-05\)"):
        _resume_from(tmp_path, yaml.safe_dump(saved, sort_keys=False), now)

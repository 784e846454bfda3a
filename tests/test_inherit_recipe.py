"""Weight inheritance through a recipe: derived architectures, `student.inherit`, the plan's map."""

from __future__ import annotations

import pytest
import torch

from kd_trainer.distill.resolved import resolve_run
from kd_trainer.models.factory import create_model
from kd_trainer.plan_view import format_plan, plan_report
from kd_trainer.recipe import RecipeError, parse_recipe
from kd_trainer.runner.retrieval import INHERITANCE_FILE, build_model


def _recipe(tmp_path, student: dict, **extra):
    return parse_recipe({
        "name": "inh", "data": {"name": "synth_pedes", "image_size": [32, 16]},
        "student": student, "teacher": {"arch": "micro", "vision_layers": 3, "text_layers": 3},
        "loss": {"terms": [{"name": "itc"}]}, "training": {"output_dir": str(tmp_path / "run")}, **extra})


def test_explicit_layers_copy_exactly_those_teacher_layers(tmp_path):
    recipe = _recipe(tmp_path, {"arch": "micro", "inherit": {"layers": {"vision": [2], "text": "uniform_last"}}})
    torch.manual_seed(0)
    run = resolve_run(recipe)
    teacher = build_model(run.teacher.model, run)
    student = build_model(run.student, run, teacher=teacher, output_dir=run.output_dir)
    t, s = teacher.clip.state_dict(), student.clip.state_dict()
    for k, v in s.items():
        if k.startswith("visual.transformer.resblocks.0."):
            assert torch.equal(v, t[k.replace("resblocks.0.", "resblocks.2.")]), k
        elif k.startswith("transformer.resblocks.0."):  # one text layer of three, the last included: layer 2
            assert torch.equal(v, t[k.replace("resblocks.0.", "resblocks.2.")]), k
        else:
            assert torch.equal(v, t[k]), k
    written = (tmp_path / "run" / INHERITANCE_FILE).read_text()
    assert "0<-2" in written and "source layers dropped: 0, 1" in written


def test_same_shape_inheritance_reproduces_the_source(tmp_path):
    recipe = _recipe(tmp_path, {"arch": "micro", "vision_layers": 3, "text_layers": 3, "inherit": {}})
    run = resolve_run(recipe)
    teacher = build_model(run.teacher.model, run)
    student = build_model(run.student, run, teacher=teacher)
    x = torch.randn(2, 3, 32, 16)
    ids = torch.randint(300, 4000, (2, 77))
    assert torch.equal(student.encode_image(x), teacher.encode_image(x))
    assert torch.equal(student.encode_text(ids), teacher.encode_text(ids))


def test_plan_prints_the_layer_map_without_loading_weights(tmp_path):
    recipe = _recipe(tmp_path, {"arch": "micro", "inherit": {"layers": "uniform"}})
    text = format_plan(plan_report(recipe))
    assert "vision layers (uniform, 1 of 3): 0<-0" in text and "source layers dropped: 1, 2" in text


@pytest.mark.parametrize("student, match", [
    ({"arch": "micro", "vision_width": 40}, "not divisible by the head width 16"),
    ({"arch": "micro", "inherit": {}, "checkpoint": "x.pth"}, "either `checkpoint:`"),
])
def test_bad_derivations_are_recipe_errors(tmp_path, student, match):
    with pytest.raises(RecipeError, match=match):
        _recipe(tmp_path, student)


def test_a_teacher_cannot_inherit(tmp_path):
    with pytest.raises(RecipeError, match="inherit: is for the student"):
        parse_recipe({"name": "x", "data": {"name": "synth_pedes"}, "student": {"arch": "micro"},
                      "teacher": {"arch": "micro", "inherit": {}}, "loss": {"terms": [{"name": "itc"}]}})


def test_derived_architecture_builds_the_named_backbone():
    named = create_model("clip-6l").clip.state_dict()
    recipe = parse_recipe({"name": "x", "data": {"name": "synth_pedes"},
                           "student": {"arch": "clip-vit-b16", "vision_layers": 6, "text_layers": 6},
                           "loss": {"terms": [{"name": "itc"}]}})
    with torch.device("meta"):
        derived = create_model(recipe.student.architecture()).clip.state_dict()
    assert {k: tuple(v.shape) for k, v in derived.items()} == {k: tuple(v.shape) for k, v in named.items()}

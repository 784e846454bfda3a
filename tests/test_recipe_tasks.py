"""Each task's data and teachers are checked where the recipe is read, not when the run starts."""

from __future__ import annotations

import pytest

from kd_trainer.recipe import RecipeError, parse_recipe

SHAPES = {"num_classes": 4, "train_per_class": 2, "test_per_class": 2, "image_size": 32}
DET = {"num_classes": 3, "train_images": 2, "test_images": 2, "image_size": 64}


def _recipe(task: str, data: dict, **extra) -> dict:
    return {"name": "t", "task": task, "data": data, "student": {"arch": "resnet18"}, **extra}


@pytest.mark.parametrize("raw, match", [
    (_recipe("classification", {"name": "synth_shapes"}), "task: classification runs on data.name: synth_shapes "
                                                          "with a data.shapes block"),
    (_recipe("classification", {"name": "synth_det", "shapes": SHAPES}), "data.name: synth_shapes"),
    (_recipe("detection", {"name": "synth_shapes", "det": DET}), "task: detection runs on data.name: synth_det"),
    (_recipe("detection", {"name": "synth_det", "det": DET}, teacher={"arch": "resnet18"}),
     "reads its teachers from `teachers:`"),
    ({"name": "t", "data": {"name": "synth_pedes", "det": DET}, "student": {"arch": "micro"},
      "loss": {"terms": [{"name": "itc"}]}}, r"data.det \(task: detection\) does not belong in a task: retrieval"),
])
def test_a_recipe_carries_only_its_tasks_data(raw, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(raw)


def test_each_task_with_its_own_data_parses():
    assert parse_recipe(_recipe("classification", {"name": "synth_shapes", "shapes": SHAPES})).task == "classification"
    assert parse_recipe(_recipe("detection", {"name": "synth_det", "det": DET})).task == "detection"

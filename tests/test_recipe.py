"""Recipe validation: every bad key or type is named; overrides reach nested keys."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kd_trainer.recipe import RecipeError, apply_overrides, dump_recipe, load_recipe, parse_recipe

BASE = {
    "name": "t",
    "data": {"name": "synth_pedes", "root": "/tmp/x", "image_size": [32, 16]},
    "student": {"arch": "micro"},
    "loss": {"terms": [{"name": "itc", "temperature": 0.02}]},
    "training": {"learning_rate": 1e-3, "num_train_epochs": 2},
}


def with_(path: str, value) -> dict:
    raw = copy.deepcopy(BASE)
    return apply_overrides(raw, [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}"])


def test_valid_recipe_parses_with_defaults():
    r = parse_recipe(copy.deepcopy(BASE))
    assert r.data.image_size == (32, 16)
    assert r.data.augment is True and r.data.context_length == 77
    assert r.loss.terms[0].side == "both" and r.loss.terms[0].weight == 1.0
    assert r.teacher is None


@pytest.mark.parametrize(
    "path,value,expect",
    [
        ("data.imagesize", [1, 2], "data.imagesize: unknown key"),
        ("student.arch_name", "x", "student.arch_name: unknown key"),
        ("data.image_size", "tall", "data.image_size"),
        ("data.augment", "sometimes", "data.augment"),
        ("loss.terms.0.weight", "heavy", "loss.terms.0.weight"),
        ("loss.terms.0.side", "left", "loss.terms.0.side"),
        ("training.learning_rat", 0.1, "training.learning_rat"),
        ("training.learning_rate", "fast", "training.learning_rate"),
        ("training.num_train_epochs", [1], "training.num_train_epochs"),
        ("training.remove_unused_columns", True, "training.remove_unused_columns"),
        ("data.eval_split", "train", "data.eval_split"),
    ],
)
def test_bad_key_or_type_is_named(path, value, expect):
    with pytest.raises(RecipeError) as e:
        parse_recipe(with_(path, value), "r.yaml")
    assert expect in str(e.value)
    assert "r.yaml" in str(e.value)


def test_unknown_training_field_suggests_the_right_one():
    with pytest.raises(RecipeError, match="Did you mean learning_rate"):
        parse_recipe(with_("training.learning_rat", 0.1))


def test_missing_required_section_is_named():
    raw = copy.deepcopy(BASE)
    del raw["student"]
    with pytest.raises(RecipeError, match="student: Field required"):
        parse_recipe(raw)


def test_duplicate_terms_are_refused():
    raw = copy.deepcopy(BASE)
    raw["loss"]["terms"].append({"name": "itc"})
    with pytest.raises(RecipeError, match="listed twice"):
        parse_recipe(raw)


def test_overrides_parse_yaml_values_and_reach_lists(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(BASE))
    r = load_recipe(f, ["data.image_size=[64,32]", "loss.terms.0.weight=0.25", "training.num_train_epochs=7",
                        "teacher.arch=micro", "data.name=rstpreid"])
    assert r.data.image_size == (64, 32)
    assert r.loss.terms[0].weight == 0.25
    assert r.training["num_train_epochs"] == 7
    assert r.teacher is not None and r.teacher.arch == "micro"
    assert r.data.name == "rstpreid"



def test_a_number_yaml_reads_as_a_string_is_kept_as_the_number(tmp_path: Path):
    # YAML 1.1 reads `3e-4` (no dot) as the string "3e-4"; it used to reach the range check as a
    # string and end in a TypeError traceback.
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(BASE))
    r = load_recipe(f, ["training.learning_rate=3e-4", "training.weight_decay=1e-2"])
    assert r.training["learning_rate"] == pytest.approx(3e-4) and isinstance(r.training["learning_rate"], float)
    assert r.training["weight_decay"] == pytest.approx(1e-2)
    with pytest.raises(RecipeError, match="learning_rate.*out of range"):
        load_recipe(f, ["training.learning_rate=-1e-3"])

@pytest.mark.parametrize("bad", ["noequals", "loss.terms.5.weight=1", "data.name.sub=1", "=3"])
def test_bad_overrides_are_explained(bad):
    with pytest.raises(RecipeError):
        apply_overrides(copy.deepcopy(BASE), [bad])


def test_dump_roundtrips(tmp_path: Path):
    r = parse_recipe(copy.deepcopy(BASE))
    f = tmp_path / "again.yaml"
    f.write_text(dump_recipe(r))
    assert load_recipe(f) == r


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_every_shipped_recipe_is_valid():
    recipes = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").rglob("*.yaml"))
    recipes = [p for p in recipes if "accelerate" not in p.parts]
    assert recipes, "no recipes found"
    for p in recipes:
        load_recipe(p)

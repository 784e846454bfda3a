"""Every bad recipe ends in `error: <one line naming the key>` and exit code 2, before anything
is loaded or trained (issue 13, row 4): the CLI is called as a user calls it."""

from __future__ import annotations

import pytest
import yaml

from kd_trainer.cli import main

BASE = {"name": "x", "data": {"name": "synth_pedes", "root": "unused"}, "student": {"arch": "micro"},
        "loss": {"terms": [{"name": "itc"}]}, "training": {"max_steps": 1}}


def _run(tmp_path, capsys, text: str, *overrides: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        main([str(path), *overrides])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("overrides, expected", [
    (["loss.terms.0.name=cros_kd"], "unknown loss term 'cros_kd'; did you mean 'cross_kd'"),
    (["loss.terms.0.side=image"], "loss term 'itc' has no side 'image'"),
    (["student.arch=tinyclp-xsmall"], "unknown architecture 'tinyclp-xsmall'; did you mean tinyclip-xsmall"),
    (["data.name=cuhk"], "Unknown dataset 'cuhk'; valid names: cuhk_pedes"),
    (["loss.terms.0.name=cross_kd"], "loss terms ['cross_kd'] read a teacher, but the recipe has no `teacher:`"),
    (["loss.terms.0.temperature=0"], "loss.terms.0.temperature: Input should be greater than 0"),
    (["training.learning_rate=-0.1"], "'training.learning_rate' = -0.1 is out of range"),
    (["training.per_device_train_batch_size=0"], "'training.per_device_train_batch_size' = 0 is out of range"),
    (["training.max_steps=-5"], "'training.max_steps' = -5 is out of range"),
    (["training.max_steps=[1"], "override 'training.max_steps=[1': the value is not valid YAML"),
])
def test_bad_recipe_values_are_one_line_exit_2(tmp_path, capsys, overrides, expected):
    err = _run(tmp_path, capsys, yaml.safe_dump(BASE), *overrides)
    assert expected in err


def test_a_tab_in_the_yaml_is_one_line_with_its_position(tmp_path, capsys):
    err = _run(tmp_path, capsys, "name: x\ndata:\n\tname: synth_pedes\n")
    assert "is not valid YAML at line 3" in err and "tabs" in err


def test_a_missing_recipe_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope.yaml")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err

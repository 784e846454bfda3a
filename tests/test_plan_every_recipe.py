"""`kd-trainer plan` prints the plan of every shipped recipe (issue 24: detection and classification
recipes crashed). Plans build no data; retrieval models are built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_trainer.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.relative_to(RECIPES).parts)


def test_the_shipped_recipes_are_found():
    names = {p.name for p in ALL}
    assert len(ALL) >= 30 and "det_frcnn_r50_to_r18_fpn_mimic.yaml" in names and "cls_res50_to_res18_kd.yaml" in names


@pytest.mark.parametrize("recipe", ALL, ids=[str(p.relative_to(RECIPES)) for p in ALL])
def test_plan_prints_for_every_recipe(recipe, capsys):
    main(["plan", str(recipe)])
    out = capsys.readouterr().out
    assert out.startswith("plan of ") and "checkpoint kept: " in out


def test_a_detection_plan_names_its_models_and_mimic_pairs(capsys):
    main(["plan", str(RECIPES / "det_frcnn_two_teachers_two_jobs.yaml")])
    out = capsys.readouterr().out
    assert ": task detection" in out and "teacher teacher0: " in out and "teacher teacher1: " in out
    assert out.count("  mimic job ") == 2 and " <- teacher0 " in out and " <- teacher1 " in out
    main(["plan", str(RECIPES / "cls_res50_to_res18_kd.yaml"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "classification" and report["student"]["arch"] == "resnet18"
    assert report["mimic_jobs"] and all(j["student"] for j in report["mimic_jobs"])

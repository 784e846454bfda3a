"""The demo: both students start from the same weights, and several seeds give a spread table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kd_trainer.demo import RECIPE_DIR, run_demo, spread_table
from kd_trainer.recipe import load_recipe
from kd_trainer.runner.retrieval import build_model


def test_both_students_start_from_the_teachers_first_layers_whatever_their_seed(tmp_path):
    teacher_recipe = load_recipe(RECIPE_DIR / "teacher.yaml", ["seed=7"])
    teacher = build_model(teacher_recipe.student, teacher_recipe)  # a stand-in for the trained teacher

    def student(file: str, seed: int):
        recipe = load_recipe(RECIPE_DIR / file, [f"seed={seed}", "teacher.checkpoint=null",
                                                 f"training.output_dir={tmp_path / file / str(seed)}"])
        return build_model(recipe.student, recipe, teacher=teacher).state_dict()

    alone, distilled, other_seed = student("student_nokd.yaml", 1), student("student_kd.yaml", 1), \
        student("student_nokd.yaml", 2)
    assert alone.keys() == distilled.keys() == other_seed.keys()
    assert all(torch.equal(v, distilled[k]) and torch.equal(v, other_seed[k]) for k, v in alone.items())
    # Half depth, inherited from the teacher's first layers: vision blocks 0-1 and text blocks 0-1.
    source = teacher.state_dict()
    blocks = {k for k in alone if ".resblocks." in k}
    assert {k.split(".resblocks.")[1].split(".")[0] for k in blocks} == {"0", "1"}
    assert all(torch.equal(alone[k], source[k]) for k in alone)
    assert any(".resblocks.3." in k for k in source)  # the teacher is deeper: something was cut
    assert (tmp_path / "student_kd.yaml" / "1" / "inheritance.txt").is_file()


def test_spread_table_gives_mean_and_sample_std():
    rows = {"s": [{"r1": 10.0, "r5": 1, "r10": 1, "mAP": 4.0, "mINP": 1}, {"r1": 14.0, "r5": 1, "r10": 1,
                                                                          "mAP": 8.0, "mINP": 1}]}
    line = spread_table(rows).splitlines()[2]
    # mean 12, sample std sqrt(((10-12)^2 + (14-12)^2) / 1) = 2.83; mAP 6 ± 2.83
    assert re.search(r"12\.00 ± 2\.83 .* 6\.00 ± 2\.83 .* 2 \|$", line), line
    single = spread_table({"t": rows["s"][:1]}).splitlines()[2]
    assert "±" not in single and re.search(r"\|  10\.00        \| .* 1 \|$", single), single


@pytest.mark.slow
def test_demo_runs_two_seeds_against_one_teacher(tmp_path):
    small = ["data.synth.num_identities=24", "training.num_train_epochs=1", "training.disable_tqdm=true",
             "training.eval_strategy=no", "training.load_best_model_at_end=false", "training.save_strategy=no"]
    results = run_demo(root=str(tmp_path / "data"), runs=str(tmp_path / "runs"), overrides=small, seeds=2)
    assert [len(v) for v in results.values()] == [1, 2, 2]
    assert results["student, KD"][0] != results["student, KD"][1]
    text = (Path(tmp_path / "runs") / "results.md").read_text()
    assert "seed 42" in text and "Students over seeds [42, 1]" in text and text.count("±") >= 10
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == [
        "student_kd", "student_kd_seed1", "student_nokd", "student_nokd_seed1", "teacher"]

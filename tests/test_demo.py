"""The demo: both students start from the same weights, and several seeds give a spread table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kd_trainer.demo import RECIPE_DIR, run_demo, spread_table
from kd_trainer.recipe import load_recipe
from kd_trainer.run import build_model


def test_the_kd_student_starts_where_the_student_alone_starts():
    alone = load_recipe(RECIPE_DIR / "student_nokd.yaml", ["seed=1"])
    distilled = load_recipe(RECIPE_DIR / "student_kd.yaml", ["seed=1", "teacher.checkpoint=null"])
    a = build_model(alone.student, alone)
    build_model(distilled.teacher, distilled)  # the KD run builds its teacher first
    b = build_model(distilled.student, distilled)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = build_model(alone.student, load_recipe(RECIPE_DIR / "student_nokd.yaml", ["seed=2"]))
    assert not torch.equal(c.clip.visual.proj, a.clip.visual.proj)  # the seed does set it


def test_spread_table_gives_mean_and_sample_std():
    rows = {"s": [{"r1": 10.0, "r5": 1, "r10": 1, "mAP": 4.0, "mINP": 1}, {"r1": 14.0, "r5": 1, "r10": 1,
                                                                          "mAP": 8.0, "mINP": 1}]}
    line = spread_table(rows).splitlines()[2]
    # mean 12, sample std sqrt(((10-12)^2 + (14-12)^2) / 1) = 2.83; mAP 6 ± 2.83
    assert re.search(r"12\.00 ± 2\.83 .* 6\.00 ± 2\.83 .* 2 \|$", line), line


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

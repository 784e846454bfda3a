"""The demo: both students start from the same weights, and several seeds give a spread table."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from kd_trainer.demo import PROVENANCE, RECIPE_DIR, _stale, made_from, run_demo, spread_table
from kd_trainer.recipe import load_recipe
from kd_trainer.runner.retrieval import build_model
from kd_trainer.synthetic.pedes import GENERATOR_VERSION


def test_both_students_start_from_the_same_weights_at_each_seed(tmp_path):
    def student(file: str, seed: int):
        no_teacher = ["teacher.checkpoint=null"] if file == "student_kd.yaml" else []
        recipe = load_recipe(RECIPE_DIR / file, [f"seed={seed}", *no_teacher,
                                                 f"training.output_dir={tmp_path / file / str(seed)}"])
        assert recipe.student.arch == "tiny-student" and recipe.student.inherit is None
        return build_model(recipe.student, recipe).state_dict()

    alone, distilled, other_seed = student("student_nokd.yaml", 1), student("student_kd.yaml", 1), \
        student("student_nokd.yaml", 2)
    assert alone.keys() == distilled.keys() == other_seed.keys()
    assert all(torch.equal(v, distilled[k]) for k, v in alone.items())
    assert not all(torch.equal(v, other_seed[k]) for k, v in alone.items())


def test_the_teacher_is_pretrained_on_a_corpus_that_shares_no_person_with_the_target():
    pretrain = load_recipe(RECIPE_DIR / "teacher_pretrain.yaml")
    teacher = load_recipe(RECIPE_DIR / "teacher.yaml")
    target = teacher.data.synth
    assert pretrain.data.synth.disjoint_from == (target.num_identities, target.seed)
    assert pretrain.data.synth.seed != target.seed and pretrain.data.root != teacher.data.root
    assert teacher.student.checkpoint == pretrain.training["output_dir"]
    for file in ("student_nokd.yaml", "student_kd.yaml"):  # the students see the target set only
        assert load_recipe(RECIPE_DIR / file).data == teacher.data


def _finished(out: Path, recipe_text: str, provenance: dict) -> None:
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(recipe_text)
    (out / "test_results.json").write_text("{}")
    (out / PROVENANCE).write_text(json.dumps(provenance))


def test_a_finished_run_is_read_back_only_when_recipe_generator_and_teacher_match(tmp_path):
    made = {"generator_version": GENERATOR_VERSION, "teacher": "abc"}
    assert _stale(tmp_path / "none", "r", made) == ""  # nothing there: train it
    _finished(tmp_path / "same", "r", made)
    assert _stale(tmp_path / "same", "r", made) is None
    assert "another recipe" in _stale(tmp_path / "same", "r2", made)
    _finished(tmp_path / "old", "r", {**made, "generator_version": GENERATOR_VERSION - 1})
    assert f"generator version {GENERATOR_VERSION - 1}" in _stale(tmp_path / "old", "r", made)
    assert "another teacher" in _stale(tmp_path / "same", "r", {**made, "teacher": "def"})


def test_provenance_records_the_blake2b_digest_of_the_teachers_weights(tmp_path):
    """The format of demo_provenance.json, unchanged: runs/ made before keep being read back."""
    weights = bytes(range(256)) * 5000  # 1.28 MB: more than one read chunk
    (tmp_path / "model.safetensors").write_bytes(weights)
    assert made_from(tmp_path) == {"generator_version": GENERATOR_VERSION,
                                   "teacher": hashlib.blake2b(weights, digest_size=16).hexdigest()}
    assert made_from(None) == {"generator_version": GENERATOR_VERSION}


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
    assert (tmp_path / "data" / "corpus" / "SynthPEDES" / "reid_raw.json").is_file()
    assert results["student, KD"][0] != results["student, KD"][1]
    text = (Path(tmp_path / "runs") / "results.md").read_text()
    assert "seed 42" in text and "Students over seeds [42, 1]" in text and text.count("±") >= 10
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == [
        "student_kd", "student_kd_seed1", "student_nokd", "student_nokd_seed1", "teacher", "teacher_pretrain"]
    assert "closes" in text and "of the teacher's R@1" in text
    # A second call reads every run back: nothing is trained again.
    again = run_demo(root=str(tmp_path / "data"), runs=str(tmp_path / "runs"), overrides=small, seeds=2)
    assert again == results

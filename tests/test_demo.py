"""The demo: both students start from the same weights, and several seeds give a spread table."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_efficiency_image_models import _md_tables
from test_report import metrics_json
from test_report_html import _hand_count

from kd_trainer.demo import PROVENANCE, RECIPE_DIR, _stale, made_from, results_table, run_demo, spread_table
from kd_trainer.distill.resolved import resolve_run
from kd_trainer.models.factory import create_model
from kd_trainer.models.loading import MODEL_CONFIG_NAME, model_config
from kd_trainer.recipe import dump_recipe, load_recipe
from kd_trainer.report import Latency, write_report
from kd_trainer.runner.retrieval import build_model
from kd_trainer.synthetic.pedes import GENERATOR_VERSION


def test_both_students_start_from_the_same_weights_at_each_seed(tmp_path):
    def student(file: str, seed: int):
        no_teacher = ["teacher.checkpoint=null"] if file == "student_kd.yaml" else []
        recipe = load_recipe(RECIPE_DIR / file, [f"seed={seed}", *no_teacher,
                                                 f"training.output_dir={tmp_path / file / str(seed)}"])
        assert recipe.student.arch == "tiny-student" and recipe.student.inherit is None
        run = resolve_run(recipe)
        return build_model(run.student, run).state_dict()

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
    recipe = load_recipe(RECIPE_DIR / "student_kd.yaml")
    longer = load_recipe(RECIPE_DIR / "student_kd.yaml", ["training.num_train_epochs=17"])
    assert _stale(tmp_path / "none", recipe, made) == ""  # nothing there: train it
    _finished(tmp_path / "same", dump_recipe(recipe), made)
    assert _stale(tmp_path / "same", recipe, made) is None
    assert "another recipe" in _stale(tmp_path / "same", longer, made)
    _finished(tmp_path / "old", dump_recipe(recipe), {**made, "generator_version": GENERATOR_VERSION - 1})
    assert f"generator version {GENERATOR_VERSION - 1}" in _stale(tmp_path / "old", recipe, made)
    assert "another teacher" in _stale(tmp_path / "same", recipe, {**made, "teacher": "def"})
    _finished(tmp_path / "unreadable", "data: [not, a, recipe\n", made)  # not even YAML
    assert "another recipe" in _stale(tmp_path / "unreadable", recipe, made)


def test_a_run_saved_by_an_older_schema_layout_is_still_the_same_recipe(tmp_path):
    """recipe.yaml files written before the recipe became a union of task types hold the keys in
    another order and the other tasks' blocks (data.shapes: null, data.det: null): the same recipe,
    so a finished demo teacher is read back, not trained again."""
    recipe = load_recipe(RECIPE_DIR / "teacher.yaml")
    raw = yaml.safe_load(dump_recipe(recipe))
    raw["data"].update(shapes=None, det=None)
    older = {k: raw[k] for k in reversed(list(raw))}  # another key order
    _finished(tmp_path / "run", yaml.safe_dump(older, sort_keys=False), {"generator_version": GENERATOR_VERSION})
    assert _stale(tmp_path / "run", recipe, {"generator_version": GENERATOR_VERSION}) is None


def test_provenance_records_the_blake2b_digest_of_the_teachers_weights(tmp_path):
    """The format of demo_provenance.json, unchanged: runs/ made before keep being read back."""
    weights = bytes(range(256)) * 5000  # 1.28 MB: more than one read chunk
    (tmp_path / "model.safetensors").write_bytes(weights)
    assert made_from(tmp_path) == {"generator_version": GENERATOR_VERSION,
                                   "teacher": hashlib.blake2b(weights, digest_size=16).hexdigest()}
    assert made_from(None) == {"generator_version": GENERATOR_VERSION}


def _micro_run(folder: Path, name: str, results: dict, arch: str | None) -> None:
    """A finished retrieval run folder; with ``arch``, its saved (untrained) model beside the results."""
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"name": name, "data": {"name": "synth_pedes"},
                                                        "student": {"arch": arch or "micro"},
                                                        "training": {"output_dir": str(folder)}}))
    (folder / "test_results.json").write_text(json.dumps(results))
    if arch is not None:
        model = create_model(arch, image_size=(32, 16))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / MODEL_CONFIG_NAME).write_text(json.dumps(model_config(model)))


def test_the_results_table_has_the_cost_columns_of_kd_trainer_report(tmp_path):
    rows = {"teacher": (58.81, 84.84, 90.16, 59.27, 47.09), "student, no KD": (25.61, 63.73, 78.69, 28.62, 18.04),
            "student, KD": (47.54, 82.99, 87.91, 47.29, 31.87)}
    metrics = {label: dict(zip(("r1", "r5", "r10", "mAP", "mINP"), v)) for label, v in rows.items()}
    folders = {label: tmp_path / "runs" / f"run{i}" for i, label in enumerate(rows)}
    for i, (label, folder) in enumerate(folders.items()):  # the KD student's folder has no weights
        _micro_run(folder, f"run{i}", metrics_json(*rows[label]), None if label == "student, KD" else "micro")
    head, *body = _md_tables(results_table(metrics, folders, latency=Latency(warmup=0, iters=2)))[0]
    cost = ["Params M (image / text)", "GFLOPs (image / caption)", "CPU ms b1 (image / caption)"]
    assert head == ["model", "R@1", "R@5", "R@10", "mAP", "mINP", *cost]
    params, flops = _hand_count("micro", (32, 16), 77)
    for row, (label, values) in zip(body, rows.items()):
        assert row[:6] == [label, *(f"{v:.2f}" for v in values)]
        if label == "student, KD":
            assert row[6:] == ["–", "–", "–"]
            continue
        assert row[6] == f"{params['image'] / 1e6:.2f} / {params['text'] / 1e6:.2f}"
        gflops = [float(x) for x in row[7].split(" / ")]
        assert gflops == pytest.approx([flops["image"] / 1e9, flops["text"] / 1e9], rel=0.01)
        assert all(float(ms) > 0 for ms in row[8].split(" / "))
    # kd-trainer report on the same folders: the same headings and the same parameter and FLOP cells
    report = write_report([tmp_path / "runs"], tmp_path / "report", plots=False, html=False, galleries=None,
                          latency=Latency(warmup=0, iters=2))
    r_head, *r_body = _md_tables(report["table"])[0]
    assert r_head[-3:] == cost
    assert sorted(r[-3:-1] for r in r_body) == sorted(r[6:8] for r in body)


def test_spread_table_gives_mean_and_sample_std():
    rows = {"s": [{"r1": 10.0, "r5": 1, "r10": 1, "mAP": 4.0, "mINP": 1}, {"r1": 14.0, "r5": 1, "r10": 1,
                                                                          "mAP": 8.0, "mINP": 1}]}
    line = spread_table(rows).splitlines()[2]
    # mean 12, sample std sqrt(((10-12)^2 + (14-12)^2) / 1) = 2.83; mAP 6 ± 2.83
    assert re.search(r"12\.00 ± 2\.83 .* 6\.00 ± 2\.83 .* 2 \|$", line), line
    single = spread_table({"t": rows["s"][:1]}).splitlines()[2]
    assert "±" not in single and re.search(r"\|  10\.00        \| .* 1 \|$", single), single


@pytest.mark.slow
def test_demo_runs_two_seeds_against_one_teacher(tmp_path, capsys):
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
    # the seed-42 table has the report's cost columns, every model measured (each run folder has weights)
    head, *body = _md_tables(text)[0]
    assert head[-3:] == ["Params M (image / text)", "GFLOPs (image / caption)", "CPU ms b1 (image / caption)"]
    assert [r[0] for r in body] == ["teacher", "student, no KD", "student, KD"]
    assert body[1][-3:-1] == body[2][-3:-1] != body[0][-3:-1], "the students share one architecture"
    assert "FlopCounterMode" in text and "torch threads" in text
    # A second call reads every run back: nothing is trained again.
    said = capsys.readouterr().out
    for step in ("step 1/4: the teacher, pre-trained", "step 2/4: the teacher, fine-tuned",
                 "step 3/4: the student trained alone, seed 1",
                 "step 4/4: the student distilled from the teacher, seed 42"):
        assert f"== demo {step}" in said, step
    again = run_demo(root=str(tmp_path / "data"), runs=str(tmp_path / "runs"), overrides=small, seeds=2)
    assert again == results
    assert "training it again" not in capsys.readouterr().out
    # A stale run is trained again in its own folder, which the demo owns (a plain run would refuse
    # a folder that holds a finished run).
    stale = tmp_path / "runs" / "student_nokd_seed1"
    made = json.loads((stale / PROVENANCE).read_text())
    (stale / PROVENANCE).write_text(json.dumps({**made, "generator_version": GENERATOR_VERSION - 1}))
    run_demo(root=str(tmp_path / "data"), runs=str(tmp_path / "runs"), overrides=small, seeds=2)
    said = capsys.readouterr().out
    assert f"{stale}: it was trained on SynthPEDES of generator version {GENERATOR_VERSION - 1}" in said, said[:3000]
    assert said.count("training it again") == 1
    assert json.loads((stale / PROVENANCE).read_text())["generator_version"] == GENERATOR_VERSION

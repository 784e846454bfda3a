"""The classification example: UP/EOD mimic recipes, both seed shapes, on SynthShapes and ResNets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kd_trainer.data.shapes import ShapesDataset
from kd_trainer.models.classifier import load_classifier
from kd_trainer.recipe import RecipeError, load_recipe
from kd_trainer.runner import run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TINY = "data.shapes={num_classes: 4, train_per_class: 8, test_per_class: 4, image_size: 32, seed: 0}"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this module runs torch on one thread (the conftest fixture)."""


def common(tmp_path: Path, out: str) -> list[str]:
    return [f"data.root={tmp_path / 'data'}", TINY, "training.num_train_epochs=1", "training.logging_steps=1",
            "training.per_device_train_batch_size=16", f"training.output_dir={tmp_path / out}",
            "training.disable_tqdm=true", "training.dataloader_num_workers=0"]


def logs(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_single_job_recipe_distils_logits_from_a_trained_teacher(tmp_path):
    run(load_recipe(ROOT / "recipes" / "cls" / "teacher_res34.yaml", common(tmp_path, "teacher")))
    metrics = run(load_recipe(ROOT / "recipes" / "cls_res50_to_res18_kd.yaml", [
        *common(tmp_path, "student"), "teachers.teacher0.arch=resnet34",
        f"teachers.teacher0.checkpoint={tmp_path / 'teacher'}"]))
    assert metrics["test_samples"] == 16
    # The reported accuracy is the saved student's, recomputed here image by image.
    student = load_classifier("resnet18", 4, str(tmp_path / "student")).eval()
    test = ShapesDataset(tmp_path / "data" / "SynthShapes", "test", train=False)
    with torch.no_grad():
        hits = sum(int(student(pixel_values=test[i]["pixel_values"][None])["logits"].argmax()) == int(test[i]["labels"])
                   for i in range(len(test)))
    assert metrics["test_accuracy"] == pytest.approx(100.0 * hits / len(test))
    entries = logs(tmp_path / "student")
    assert len(entries) == 2  # 32 images, batch 16
    for h in entries:  # one job, one teacher, kd on the logits; warm-up 20 on the global step
        ramp = min(1.0, (h["step"] - 1) / 20)
        assert h["mimic/mimic_job0/teacher0/kd"] > 0
        assert h["mimic/mimic_job0/weighted"] == pytest.approx(ramp * h["mimic/mimic_job0/teacher0/kd"], rel=1e-4, abs=2e-6)
        assert h["loss"] == pytest.approx(h["loss_ce"] + h["mimic/total"], rel=1e-4)


def test_two_jobs_two_teachers_with_adapters_and_warm_up_across_a_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kd_trainer")
    over = [*common(tmp_path, "two"), "teachers.teacher0.checkpoint=null", "teachers.teacher1.checkpoint=null",
            "training.num_train_epochs=2", "training.save_strategy=steps", "training.save_steps=1",
            "mimic.mimic_job1.warm_up_iters=3"]
    recipe = ROOT / "recipes" / "cls_two_teachers_two_jobs.yaml"
    run(load_recipe(recipe, over))
    out = tmp_path / "two"
    full = logs(out)
    adapters = json.loads((out / "mimic_adapters.json").read_text())["training_only"]
    # ResNet-18 layer3 (256 ch) -> ResNet-50 layer3 (1024) and -> ResNet-34 layer3 (256, forced by adapter: conv1x1)
    assert sorted({k.split(".")[2] for k in adapters}) == ["mimic_job1__teacher0__0", "mimic_job1__teacher1__0"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert weights["mimic_head.adapters.mimic_job1__teacher0__0.weight"].shape == (1024, 256, 1, 1)

    def check(entries):
        for h in entries:
            ramp = min(1.0, (h["step"] - 1) / 3)
            kd = (h["mimic/mimic_job0/teacher0/kd"] + h["mimic/mimic_job0/teacher1/kd"]) / 2  # reduce: mean
            l2 = h["mimic/mimic_job1/teacher0/l2"] + h["mimic/mimic_job1/teacher1/l2"]  # reduce: sum
            assert h["mimic/mimic_job0/weighted"] == pytest.approx(kd, rel=1e-4, abs=2e-6)
            assert h["mimic/mimic_job1/weighted"] == pytest.approx(0.5 * ramp * l2, rel=1e-4, abs=2e-6)

    check(full)
    assert [h["step"] for h in full] == [1, 2, 3, 4]
    # Resume from step 1: the ramp continues from the restored global step, not from zero.
    run(load_recipe(recipe, [*over, f"training.resume_from_checkpoint={out / 'checkpoint-1'}",
                             f"training.output_dir={tmp_path / 'resumed'}"]))
    assert f"resuming from {out / 'checkpoint-1'} at step 1" in caplog.text, "a resume says where it starts"
    assert 'test metrics: {"test_accuracy": ' in caplog.text and f"(the run: {out})" in caplog.text
    resumed = [h for h in logs(tmp_path / "resumed") if h["step"] > 1]
    assert [h["step"] for h in resumed] == [2, 3, 4]
    check(resumed)
    assert resumed[0]["mimic/mimic_job1/weighted"] > 0, "a ramp restarted at zero would give 0 at the first step"


def test_mimic_errors_name_the_problem(tmp_path):
    recipe = ROOT / "recipes" / "cls_two_teachers_two_jobs.yaml"
    with pytest.raises(RecipeError, match="teacher2"):
        load_recipe(recipe, ["mimic.mimic_job0.teacher2={mimic_name: [net.fc]}"])
    with pytest.raises(ValueError, match=r"net\.layer3"):
        run(load_recipe(recipe, [*common(tmp_path, "bad"), "teachers.teacher0.checkpoint=null",
                                 "teachers.teacher1.checkpoint=null", "mimic.mimic_job1.student.mimic_name=[net.layr3]"]))
    with pytest.raises(ValueError, match=r"256.*1024|1024.*256"):
        run(load_recipe(recipe, [*common(tmp_path, "noadapter"), "teachers.teacher0.checkpoint=null",
                                 "teachers.teacher1.checkpoint=null", "mimic.mimic_job1.adapter=none"]))

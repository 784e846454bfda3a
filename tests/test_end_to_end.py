"""The vertical slice on real files: SynthPEDES on disk -> teacher -> distilled student -> metrics.

Tiny models and a tiny generated dataset, but every layer is the real one: recipe files,
loaders, transforms, DistillationTrainer, retrieval evaluation, saving and reloading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd_trainer.data import load_pedes, with_retrieval_transforms
from kd_trainer.data.collator import collate_retrieval
from kd_trainer.evaluation import evaluate_retrieval
from kd_trainer.models.loading import CheckpointError, load_model
from kd_trainer.recipe import load_recipe
from kd_trainer.runner import run
from kd_trainer.synthetic.pedes import make_synth_pedes

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synth_pedes(root / "SynthPEDES", num_identities=24, images_per_identity=(2, 3), image_size=(64, 32), seed=3)
    return root


def write_recipe(folder: Path, name: str, *, out: Path, data_root: Path, terms: list, teacher: dict | None = None,
                 arch: str = "micro", training: dict | None = None) -> Path:
    recipe = {
        "name": name,
        "seed": 0,
        "data": {"name": "synth_pedes", "root": str(data_root), "image_size": [32, 16], "context_length": 64},
        "student": {"arch": arch},
        "loss": {"terms": terms},
        "training": {"output_dir": str(out), "num_train_epochs": 2, "per_device_train_batch_size": 16,
                     "learning_rate": 1e-3, "report_to": "none", "disable_tqdm": True, "use_cpu": True,
                     **(training or {})},
    }
    if teacher:
        recipe["teacher"] = teacher
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_root) -> Path:
    work = tmp_path_factory.mktemp("teacher")
    out = work / "out"
    path = write_recipe(work, "teacher", out=out, data_root=data_root,
                        terms=[{"name": "itc", "temperature": 0.05}, {"name": "sdm", "temperature": 0.05}],
                        training={"eval_strategy": "epoch", "save_strategy": "epoch", "load_best_model_at_end": True,
                                  "metric_for_best_model": "r1", "save_total_limit": 1})
    run(load_recipe(path))
    return out


def test_teacher_run_evaluates_each_epoch_and_saves_everything(teacher_run: Path):
    for name in ("model.safetensors", "kd_trainer_model.json", "recipe.yaml", "test_results.json",
                 "trainer_state.json"):
        assert (teacher_run / name).is_file(), name
    state = json.loads((teacher_run / "trainer_state.json").read_text())
    evals = [h for h in state["log_history"] if "eval_r1" in h]
    assert [h["epoch"] for h in evals] == [1.0, 2.0], "eval_strategy: epoch must evaluate after every epoch"
    assert state["best_metric"] == max(h["eval_r1"] for h in evals), "metric_for_best_model: r1 selects on eval R@1"
    metrics = json.loads((teacher_run / "test_results.json").read_text())
    assert set(metrics) >= {"test_r1", "test_r5", "test_r10", "test_mAP", "test_mINP"}
    assert metrics["test_r1"] <= metrics["test_r5"] <= metrics["test_r10"]  # recall grows with K


def test_saved_model_reloads_to_identical_metrics(teacher_run: Path, data_root: Path):
    model = load_model(teacher_run)
    dsd = with_retrieval_transforms(load_pedes("synth_pedes", data_root), image_size=(32, 16), augment=False,
                                    context_length=64)
    again = evaluate_retrieval(model, dsd["test_gallery"], dsd["test_queries"], collate_fn=collate_retrieval,
                               progress=False)
    saved = json.loads((teacher_run / "test_results.json").read_text())
    for k, v in again.items():
        assert saved[f"test_{k}"] == pytest.approx(v, abs=1e-9), k


def test_distilled_student_from_the_teacher_run(tmp_path: Path, teacher_run: Path, data_root: Path):
    out = tmp_path / "student"
    path = write_recipe(tmp_path, "student", out=out, data_root=data_root,
                        terms=[{"name": "itc", "temperature": 0.05}, {"name": "cross_kd"},
                               {"name": "motis", "side": "both"}],
                        teacher={"arch": "micro", "checkpoint": str(teacher_run)},
                        training={"logging_steps": 1})
    metrics = run(load_recipe(path))
    assert "test_r1" in metrics
    state_logs = json.loads((out / "test_results.json").read_text())
    assert state_logs["test_r1"] == metrics["test_r1"]
    # The student folder holds the student alone: it reloads as a micro model, no teacher inside.
    student = load_model(out)
    assert sum(p.numel() for p in student.parameters()) == sum(
        p.numel() for p in load_model(teacher_run).parameters())


def test_output_is_an_open_clip_folder_that_reloads_identically(teacher_run: Path, data_root: Path):
    import open_clip
    import torch

    model = load_model(teacher_run)
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{teacher_run}")
    dsd = with_retrieval_transforms(load_pedes("synth_pedes", data_root), image_size=(32, 16), augment=False,
                                    context_length=64)
    batch = collate_retrieval([dsd["test_gallery"][i] | dsd["test_queries"][i] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(batch["pixel_values"], normalize=True),
                                   model.encode_image(batch["pixel_values"]), atol=1e-6, rtol=0)
        torch.testing.assert_close(clip.encode_text(batch["input_ids"], normalize=True),
                                   model.encode_text(batch["input_ids"]), atol=1e-6, rtol=0)
    card = (teacher_run / "README.md").read_text()
    saved = json.loads((teacher_run / "test_results.json").read_text())
    assert "library_name: open_clip" in card and f"{saved['test_r1']:.2f}" in card


def test_eval_command_with_teacher_reports_hybrid_pairings(tmp_path: Path, teacher_run: Path, data_root: Path):
    from kd_trainer.cli import main as cli_main
    from kd_trainer.models.factory import create_model
    import torch

    torch.manual_seed(5)  # a different "student": a random micro model saved as a bare state dict
    student = create_model("micro", image_size=(32, 16), context_length=64)
    import safetensors.torch

    safetensors.torch.save_file(student.clip.state_dict(), str(tmp_path / "student.safetensors"))
    out = tmp_path / "eval.json"
    cli_main(["eval", str(tmp_path / "student.safetensors"), "--arch", "micro", "--image-size", "32", "16",
              "--context-length", "64", "--dataset", "synth_pedes", "--root", str(data_root),
              "--teacher", str(teacher_run), "--output", str(out)])
    got = json.loads(out.read_text())
    teacher = load_model(teacher_run)
    dsd = with_retrieval_transforms(load_pedes("synth_pedes", data_root), image_size=(32, 16), augment=False,
                                    context_length=64)
    want = evaluate_retrieval(student, dsd["test_gallery"], dsd["test_queries"], text_model=teacher,
                              collate_fn=collate_retrieval, progress=False)
    assert got["hybrid-image"] == pytest.approx(want, abs=1e-9)
    saved = json.loads((teacher_run / "test_results.json").read_text())
    assert got["teacher"]["r1"] == pytest.approx(saved["test_r1"], abs=1e-9)
    assert set(got) == {"model", "teacher", "hybrid-image", "hybrid-text"}


def test_staged_run_resumes_through_the_recipe_to_the_same_weights(tmp_path: Path, teacher_run: Path,
                                                                   data_root: Path):
    import shutil

    import safetensors.torch

    out = tmp_path / "staged"
    recipe = {
        "name": "staged", "seed": 0,
        "data": {"name": "synth_pedes", "root": str(data_root), "image_size": [32, 16], "context_length": 64},
        "student": {"arch": "micro"}, "teacher": {"arch": "micro", "checkpoint": str(teacher_run)},
        "stages": [
            {"name": "image", "epochs": 1, "trainable": "image",
             "loss": {"terms": [{"name": "motis", "side": "image"}, {"name": "st_itc", "temperature": 0.05}]}},
            {"name": "text", "epochs": 1, "trainable": "text",
             "loss": {"terms": [{"name": "motis", "side": "text"}, {"name": "ts_itc", "temperature": 0.05}]}},
        ],
        "training": {"output_dir": str(out), "per_device_train_batch_size": 16, "learning_rate": 1e-3,
                     "report_to": "none", "disable_tqdm": True, "use_cpu": True, "save_strategy": "steps",
                     "save_steps": 1, "eval_strategy": "no", "dataloader_num_workers": 2},
    }
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run(load_recipe(path))
    want = safetensors.torch.load_file(str(out / "model.safetensors"))
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    stop = steps[len(steps) // 2]  # mid-run; the plain resume picks the latest checkpoint left
    for s in steps:
        if s > stop:
            shutil.rmtree(out / f"checkpoint-{s}")
    (out / "model.safetensors").unlink()
    run(load_recipe(path, ["training.resume_from_checkpoint=true"]))
    got = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert set(got) == set(want), set(got) ^ set(want)
    assert all(torch_equal(got[k], want[k]) for k in want), [k for k in want if not torch_equal(got[k], want[k])]


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_retrieval_recipe_with_mimic_jobs_on_clip_layers(tmp_path: Path, teacher_run: Path, data_root: Path):
    """UP-style mimic on CLIP towers beside the embedding terms: hidden states through a linear
    adapter, and text attention maps recomputed from the hooked block inputs."""
    from kd_trainer.models.loading import load_model as reload

    out = tmp_path / "mimic"
    mimic = {"mimic_as_jobs": True,
             "mimic_job0": {"loss_weight": 1.0, "adapter": "linear", "cfgs": {"loss": {"type": "cosine"}},
                            "teacher": {"mimic_name": ["clip.visual.transformer.resblocks.0"]},
                            "student": {"mimic_name": ["clip.visual.transformer.resblocks.0"]}},
             "mimic_job1": {"loss_weight": 0.5, "warm_up_iters": 2, "cfgs": {"loss": {"type": "kld"}},
                            "teacher": {"mimic_name": ["clip.transformer.resblocks.0@attn"]},
                            "student": {"mimic_name": ["clip.transformer.resblocks.0@attn"]}}}
    path = write_recipe(tmp_path, "mimic", out=out, data_root=data_root,
                        terms=[{"name": "itc", "temperature": 0.05}, {"name": "cross_kd"}],
                        teacher={"arch": "micro", "checkpoint": str(teacher_run)},
                        training={"num_train_epochs": 1, "logging_steps": 1})
    raw = yaml.safe_load(path.read_text())
    raw["mimic"] = mimic
    path.write_text(yaml.safe_dump(raw))
    run(load_recipe(path))
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    for h in logs:
        assert h["mimic/mimic_job0/teacher/cosine"] >= 0 and h["mimic/mimic_job1/teacher/kld"] >= 0
        ramp = min(1.0, (h["step"] - 1) / 2)
        assert h["mimic/mimic_job1/weighted"] == pytest.approx(0.5 * ramp * h["mimic/mimic_job1/teacher/kld"],
                                                               rel=1e-4, abs=2e-6)
        assert h["loss"] == pytest.approx(h["loss_itc_weighted"] + h["loss_cross_kd_weighted"] + h["mimic/total"],
                                          rel=1e-4, abs=1e-5)
    # The adapter trains and saves with the student, and is dropped where the dual encoder is used.
    import safetensors.torch

    assert any(k.startswith("mimic_head.") for k in safetensors.torch.load_file(str(out / "model.safetensors")))
    assert not any("mimic" in k for k in safetensors.torch.load_file(str(out / "open_clip_model.safetensors")))
    reloaded = reload(out)
    assert not hasattr(reloaded, "mimic_head")


def test_cache_teacher_then_train_from_the_cache(tmp_path: Path, teacher_run: Path, data_root: Path, caplog):
    """`kd-trainer cache-teacher`, then a run whose teacher terms read the cache; on the same replayed
    batch the cached teacher gives the online teacher's term values; a stale cache is refused."""
    import logging

    import torch

    from kd_trainer.cli import main as cli_main
    from kd_trainer.data.collator import collate_retrieval as collate
    from kd_trainer.losses import Features, compute_term

    out, cache = tmp_path / "cached", tmp_path / "cache"
    path = write_recipe(tmp_path, "cached", out=out, data_root=data_root,
                        terms=[{"name": "itc", "temperature": 0.05}, {"name": "cross_kd"}, {"name": "motis"}],
                        teacher={"arch": "micro", "checkpoint": str(teacher_run), "cache": str(cache),
                                 "cache_draws": 2},
                        training={"num_train_epochs": 2, "logging_steps": 1})
    cli_main(["cache-teacher", str(path)])
    assert (cache / "cache_meta.json").is_file()
    with caplog.at_level(logging.INFO, logger="kd_trainer"):
        metrics = run(load_recipe(path))
    assert "test_r1" in metrics
    # Same replayed items, teacher online vs cached: identical term values.
    from kd_trainer.distill.resolved import resolve_run
    from kd_trainer.runner.retrieval import build_model, open_teacher_cache, prepare_data

    resolved = resolve_run(load_recipe(path))
    teacher = build_model(resolved.teacher.model, resolved)
    cached, train = open_teacher_cache(resolved, teacher, prepare_data(resolved).raw_train)
    train.set_epoch(1)
    batch = collate([train[i] for i in range(6)])
    student = load_model(out)
    with torch.no_grad():
        s = dict(student_image=student.clip.encode_image(batch["pixel_values"]),
                 student_text=student.clip.encode_text(batch["input_ids"]))
        online = Features(**s, teacher_image=teacher.clip.encode_image(batch["pixel_values"]),
                          teacher_text=teacher.clip.encode_text(batch["input_ids"]))
        offline = Features(**s, **cached.lookup(batch))
    for term in ("cross_kd", "motis"):
        assert compute_term(term, offline, temperature=0.5) == pytest.approx(
            float(compute_term(term, online, temperature=0.5)), abs=1e-5)
    # A cache made with another augmentation is refused, naming what changed; the CLI exits 2.
    # (At another image size the teacher's run folder itself no longer fits: loading it is strict.)
    bad = path.with_name("bad.yaml")
    raw = yaml.safe_load(path.read_text())
    raw["data"]["augment"] = not raw["data"].get("augment", True)
    raw["training"]["output_dir"] += "_other_augment"  # not the finished run's folder, which is refused
    bad.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "kd_trainer", str(bad)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "transform config changed" in proc.stderr, proc.stderr[-2000:]


class FakeHfApi:
    """Records what would be sent to the Hub; no network."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, kw.get("repo_type"), kw.get("private")))
        return None

    def create_branch(self, repo_id, **kw):
        FakeHfApi.calls.append(("create_branch", repo_id, kw.get("branch")))

    def create_commit(self, repo_id, operations, **kw):
        FakeHfApi.calls.append(("create_commit", repo_id, kw.get("repo_type"),
                                sorted((op.path_in_repo, os.path.basename(op.path_or_fileobj)) for op in operations)))
        return None


def test_push_to_hub_uploads_exactly_the_open_clip_folder(tmp_path: Path, data_root: Path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the run checks a push could happen before training
    FakeHfApi.calls = []
    out = tmp_path / "pushed"
    path = write_recipe(tmp_path, "pushed", out=out, data_root=data_root, terms=[{"name": "itc"}],
                        training={"num_train_epochs": 1, "save_strategy": "steps", "save_steps": 1,
                                  "push_to_hub": True, "hub_model_id": "someone/tiny-student",
                                  "hub_token": "hf_test", "hub_private_repo": True})
    run(load_recipe(path))
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir()), "checkpoints exist and must not be pushed"
    files = ["README.md", "open_clip_config.json", "open_clip_model.safetensors", "recipe.yaml", "test_results.json"]
    assert FakeHfApi.calls == [
        ("create_repo", "someone/tiny-student", "model", True),
        ("create_commit", "someone/tiny-student", "model", [(f, f) for f in files]),
    ]


def test_wrong_teacher_architecture_is_a_clear_error(tmp_path: Path, teacher_run: Path, data_root: Path):
    path = write_recipe(tmp_path, "bad", out=tmp_path / "o", data_root=data_root,
                        terms=[{"name": "motis"}], teacher={"arch": "tiny-student", "checkpoint": str(teacher_run)})
    with pytest.raises(CheckpointError, match="does not match the model"):
        run(load_recipe(path))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}


def test_python_dash_m_runs_a_recipe_with_overrides(tmp_path: Path, data_root: Path):
    path = write_recipe(tmp_path, "cli", out=tmp_path / "ignored", data_root=data_root, terms=[{"name": "itc"}])
    out = tmp_path / "cli_out"
    proc = subprocess.run([sys.executable, "-m", "kd_trainer", str(path), f"training.output_dir={out}",
                           "training.max_steps=2", "loss.terms.0.temperature=0.1"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "test_results.json").is_file()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["loss"]["terms"][0]["temperature"] == 0.1


def test_accelerate_launch_runs_the_entry_script(tmp_path: Path, data_root: Path):
    out = tmp_path / "acc_out"
    path = write_recipe(tmp_path, "acc", out=out, data_root=data_root, terms=[{"name": "itc"}],
                        training={"max_steps": 2})
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "kd_trainer/run.py", str(path)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "test_results.json").is_file()


def test_bad_recipe_key_exits_2_naming_the_key(tmp_path: Path, data_root: Path):
    path = write_recipe(tmp_path, "bad", out=tmp_path / "o", data_root=data_root, terms=[{"name": "itc"}])
    proc = subprocess.run([sys.executable, "kd_trainer/run.py", str(path), "training.learning_rat=0.1"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "training.learning_rat" in proc.stderr and "Traceback" not in proc.stderr

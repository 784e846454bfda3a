"""RetrievalTrainer: accumulation semantics, a frozen teacher kept out of checkpoints, term logging."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from transformers import TrainingArguments

from kd_trainer.distill.retrieval import RetrievalTrainer
from kd_trainer.models.factory import create_model

from tiny import batch_items, plan_of
from tiny import micro_pair as make_models
from kd_trainer.recipe import RecipeError, TermConfig, parse_recipe


def train_once(tmp_path, terms, *, batch: int, accum: int, steps: int = 1, **extra):
    student, teacher = make_models()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}a{accum}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, max_steps=steps, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, report_to="none",
        save_strategy="no", logging_steps=1, seed=0, remove_unused_columns=False, use_cpu=True, **extra,
    )
    trainer = RetrievalTrainer(model=student, args=args, plan=plan_of(terms), teacher=teacher,
                               train_dataset=batch_items())
    trainer.train()
    return trainer, student, teacher


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_accumulation_equals_big_batch_for_a_per_sample_term(tmp_path):
    fd = [TermConfig(name="fd")]
    _, s8, _ = train_once(tmp_path, fd, batch=8, accum=1)
    _, s4, _ = train_once(tmp_path, fd, batch=4, accum=2)
    start, _ = make_models()
    assert max_param_diff(s8, start) > 1e-3, "the update must actually move the weights"
    assert max_param_diff(s8, s4) < 1e-6


def test_accumulation_changes_a_batch_dependent_term(tmp_path):
    """Documented behaviour: itc over two softmaxes of 4 is not itc over one softmax of 8."""
    itc = [TermConfig(name="itc", temperature=0.5)]
    _, s8, _ = train_once(tmp_path, itc, batch=8, accum=1)
    _, s4, _ = train_once(tmp_path, itc, batch=4, accum=2)
    assert max_param_diff(s8, s4) > 1e-5


def test_teacher_is_frozen_and_never_saved(tmp_path):
    terms = [TermConfig(name="itc", temperature=0.5), TermConfig(name="cross_kd")]
    student, teacher = make_models()
    teacher_before = copy.deepcopy(teacher.state_dict())
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, report_to="none", save_strategy="steps", save_steps=3,
                             logging_steps=1, remove_unused_columns=False, use_cpu=True)
    trainer = RetrievalTrainer(model=student, args=args, plan=plan_of(terms), teacher=teacher,
                               train_dataset=batch_items())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    assert not trainer.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher weight {k} changed"
    for folder in (tmp_path / "run" / "checkpoint-3", tmp_path / "final"):
        saved = safetensors.torch.load_file(str(folder / "model.safetensors"))
        assert set(saved) == set(student.state_dict()), "a checkpoint holds exactly the student"
    # The optimizer saw the student only.
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in student.parameters())


def test_teacher_runs_first_in_inference_mode_and_every_term_can_use_its_embeddings(tmp_path):
    # fd saves the teacher embedding for backward: that must work with an inference-mode teacher.
    terms = [TermConfig(name="fd"), TermConfig(name="cross_kd"), TermConfig(name="motis", side="image")]
    student, teacher = make_models()
    calls = []
    teacher.clip.visual.register_forward_hook(
        lambda m, i, o: calls.append(("teacher", torch.is_inference_mode_enabled(), torch.is_grad_enabled())))
    student.clip.visual.register_forward_hook(
        lambda m, i, o: calls.append(("student", torch.is_inference_mode_enabled(), torch.is_grad_enabled())))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-2, report_to="none", save_strategy="no", remove_unused_columns=False,
                             use_cpu=True)
    start = copy.deepcopy(student)
    trainer = RetrievalTrainer(model=student, args=args, plan=plan_of(terms), teacher=teacher,
                               train_dataset=batch_items())
    trainer.train()
    assert calls == [("teacher", True, False), ("student", False, True)] * 2
    assert max_param_diff(student, start) > 0


def test_every_term_is_logged_unweighted_and_weighted(tmp_path):
    terms = [TermConfig(name="itc", temperature=0.5, weight=0.5), TermConfig(name="motis", side="image", weight=2.0)]
    trainer, _, _ = train_once(tmp_path, terms, batch=4, accum=1, steps=2)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        for key, w in (("itc", 0.5), ("motis[image]", 2.0)):
            assert f"loss_{key}" in h and f"loss_{key}_weighted" in h
            assert h[f"loss_{key}_weighted"] == pytest.approx(w * h[f"loss_{key}"], rel=1e-4)
        total = h["loss_itc_weighted"] + h["loss_motis[image]_weighted"]
        assert h["loss"] == pytest.approx(total, rel=1e-3)


def test_kd_term_without_teacher_is_refused(tmp_path):
    """Refused where the recipe is read: the trainer only ever gets a plan resolved from a valid recipe."""
    with pytest.raises(RecipeError, match=r"loss terms \['motis'\] read a teacher"):
        parse_recipe({"name": "r", "data": {"name": "synth_pedes"}, "student": {"arch": "micro"},
                      "loss": {"terms": [{"name": "motis"}]}, "training": {"output_dir": str(tmp_path)}})


def test_unknown_term_lists_valid_names(tmp_path):
    student, _ = make_models()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="did you mean 'cross_kd'"):  # refused where the recipe is read
        RetrievalTrainer(model=student, args=args, plan=plan_of([TermConfig(name="cros_kd")]),
                         train_dataset=batch_items())


def test_projection_is_created_and_trained_when_widths_differ(tmp_path):
    """A student narrower than its teacher gets Linear projections for direct-comparison terms."""
    torch.manual_seed(0)
    student = create_model("micro", projection_dim=128)
    teacher = create_model("tiny-student", image_size=(32, 16))
    before = student.image_proj.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.1,
                             optim="sgd", report_to="none", save_strategy="no", remove_unused_columns=False,
                             use_cpu=True)
    trainer = RetrievalTrainer(model=student, args=args, plan=plan_of([TermConfig(name="motis", side="image")]),
                                  teacher=teacher, train_dataset=batch_items())
    trainer.train()
    assert not torch.equal(before, student.image_proj.weight)

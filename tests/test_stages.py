"""The stage scheduler: layout, freezing, fresh optimizers, schedules, hybrid evaluation, resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from kd_trainer.distill.stages import StageLRScheduler, StageOptimizer
from kd_trainer.models.towers import TOWER_PREFIXES
from kd_trainer.distill.retrieval import RetrievalTrainer
from kd_trainer.models.factory import create_model
from kd_trainer.recipe import StageConfig

from tiny import batch_items, plan_of

IMAGE, TEXT = TOWER_PREFIXES["image"], TOWER_PREFIXES["text"]


def stage(name, trainable, terms, **kw):
    return StageConfig.model_validate({"name": name, "trainable": trainable, "loss": {"terms": terms}, **kw})


THREE = [
    stage("image", "image", [{"name": "motis", "side": "image"}, {"name": "st_itc", "temperature": 0.1}], epochs=1),
    stage("text", "text", [{"name": "motis", "side": "text"}, {"name": "ts_itc", "temperature": 0.1},
                           {"name": "ss_itc", "temperature": 0.1}], epochs=1),
    stage("joint", "all", [{"name": "motis"}, {"name": "inter_ss_kl"}, {"name": "ss_itc", "temperature": 0.1}],
          epochs=1),
]


def models(seed=0):
    torch.manual_seed(seed)
    student = create_model("micro")
    torch.manual_seed(seed + 1)
    teacher = create_model("micro")
    return student, teacher


def args_for(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, optim="adamw_torch",
                lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.01, report_to="none",
                save_strategy="no", eval_strategy="no", logging_steps=1, seed=0, data_seed=0,
                remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """Snapshots taken inside the loop: parameters after every step, and the optimizer's contents."""

    def __init__(self):
        self.params, self.opt = {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        staged = optimizer.optimizer if not isinstance(optimizer, StageOptimizer) else optimizer
        inner = staged.inner
        names = {id(p): n for n, p in model.named_parameters()}
        in_opt = {names[id(p)] for g in inner.param_groups for p in g["params"]}
        with_state = {names[id(p)] for p in inner.state}
        self.opt[state.global_step] = (id(inner), staged.stage, in_opt, with_state)
        self.params[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, after, prefixes):
    return {n for n in before if n.startswith(prefixes) and not torch.equal(before[n], after[n])}


def all_of(params, prefixes):
    return {n for n in params if n.startswith(prefixes)}


def test_each_stage_trains_exactly_its_towers_with_a_fresh_optimizer(tmp_path):
    student, teacher = models()
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    rec = Recorder()
    trainer = RetrievalTrainer(model=student, args=args_for(tmp_path), plan=plan_of(stages=THREE), teacher=teacher,
                                  train_dataset=batch_items(8), callbacks=[rec])
    trainer.train()
    assert trainer.state.max_steps == 6 and [s.end_step for s in trainer.plan.stages] == [2, 4, 6]
    snaps = {0: start, **rec.params}
    image, text = all_of(start, IMAGE), all_of(start, TEXT)
    # Stage 1 moves every image parameter and no text parameter; stage 2 the reverse; stage 3 both.
    assert changed(snaps[0], snaps[2], IMAGE) == image and not changed(snaps[0], snaps[2], TEXT)
    assert changed(snaps[2], snaps[4], TEXT) == text and not changed(snaps[2], snaps[4], IMAGE)
    assert changed(snaps[4], snaps[6], IMAGE) == image and changed(snaps[4], snaps[6], TEXT) == text
    # The optimizer holds exactly the stage's parameters, and state for those only.
    for step, (want, stage_idx) in {1: (image, 0), 2: (image, 0), 3: (text, 1), 4: (text, 1), 5: (image | text, 2)}.items():
        _, idx, in_opt, with_state = rec.opt[step]
        assert idx == stage_idx
        assert in_opt == want | ({"clip.logit_scale"} if stage_idx == 2 else set())
        assert with_state == want, f"step {step}: optimizer state for {sorted(with_state ^ want)[:3]}"
    # A fresh inner optimizer at each stage start, the same one within a stage.
    ids = {s: rec.opt[s][0] for s in rec.opt}
    assert ids[1] == ids[2] != ids[3] == ids[4] != ids[5] == ids[6]
    # A fresh linear LR schedule per stage: each stage's first step runs at the peak LR again.
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[0] == lrs[2] == lrs[4] == pytest.approx(1e-2)
    assert lrs[1] == lrs[3] == lrs[5] == pytest.approx(0.5e-2)


def test_frozen_tower_runs_without_autograd(tmp_path):
    student, teacher = models()
    seen = []

    def hook(module, inputs, output):
        seen.append(output.requires_grad)

    student.clip.transformer.register_forward_hook(hook)  # the text tower's trunk
    stages = [stage("text", "text", [{"name": "ss_itc", "temperature": 0.1}], steps=1),
              stage("image", "image", [{"name": "ss_itc", "temperature": 0.1}], steps=1)]
    RetrievalTrainer(model=student, args=args_for(tmp_path), plan=plan_of(stages=stages), teacher=teacher,
                        train_dataset=batch_items(8)).train()
    assert seen == [True, False]


def test_named_module_stage_moves_only_those_parameters(tmp_path):
    student, teacher = models()
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    stages = [stage("last", ["clip.visual.transformer.resblocks.0.mlp", "clip.visual.proj"],
                    [{"name": "st_itc", "temperature": 0.1}], steps=2)]
    trainer = RetrievalTrainer(model=student, args=args_for(tmp_path, max_grad_norm=1e-3), plan=plan_of(stages=stages),
                                  teacher=teacher, train_dataset=batch_items(8))
    trainer.train()
    after = dict(student.named_parameters())
    moved = {n for n in start if not torch.equal(start[n], after[n])}
    assert moved and all(n.startswith(("clip.visual.transformer.resblocks.0.mlp.", "clip.visual.proj")) for n in moved)


def test_unknown_trainable_name_lists_close_ones(tmp_path):
    student, teacher = models()
    stages = [stage("x", ["clip.visual.transformer.resblock.0"], [{"name": "st_itc"}], steps=1)]
    with pytest.raises(ValueError, match=r"matches no parameter.*clip\.visual\.transformer\.resblocks\.0"):
        RetrievalTrainer(model=student, args=args_for(tmp_path), plan=plan_of(stages=stages), teacher=teacher,
                            train_dataset=batch_items(8))


def test_alpha_mix_and_schedules_are_logged_per_stage(tmp_path):
    student, teacher = models()
    piecewise = {"type": "piecewise", "unit": "epoch", "boundaries": [1], "values": [0.9, 0.6]}
    stages = [
        StageConfig.model_validate({"name": "a", "epochs": 2, "loss": {"alpha": piecewise, "terms": [
            {"name": "motis"}, {"name": "ss_itc", "temperature": 0.1, "weight": 2.0}]}}),
        StageConfig.model_validate({"name": "b", "steps": 3, "loss": {"terms": [
            {"name": "fd", "weight": {"type": "warmup", "value": 4.0, "steps": 4, "clock": "run"}},
            {"name": "ss_itc", "temperature": 0.1, "weight": {"type": "linear", "start": 1.0, "end": 0.0,
                                                               "finish": 2}}]}}),
    ]
    trainer = RetrievalTrainer(model=student, args=args_for(tmp_path), plan=plan_of(stages=stages), teacher=teacher,
                                  train_dataset=batch_items(8))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["stage"] for h in logs] == [1, 1, 1, 1, 2, 2, 2]
    for h, alpha in zip(logs[:4], [0.9, 0.9, 0.6, 0.6]):  # 2 steps per epoch; alpha drops in epoch 2
        assert h["a/alpha"] == pytest.approx(alpha)
        assert h["a/loss_motis_weighted"] == pytest.approx(alpha * h["a/loss_motis"], rel=1e-5)
        assert h["a/loss_ss_itc_weighted"] == pytest.approx((1 - alpha) * 2.0 * h["a/loss_ss_itc"], rel=1e-5)
        assert h["loss"] == pytest.approx(h["a/loss_motis_weighted"] + h["a/loss_ss_itc_weighted"], rel=1e-4)
    for i, h in enumerate(logs[4:]):
        run_step = 4 + i  # the warm-up counts the run's steps; the linear decay the stage's
        assert h["b/loss_fd_weighted"] == pytest.approx(4.0 * min(1.0, run_step / 4) * h["b/loss_fd"], rel=1e-5)
        assert h["b/loss_ss_itc_weighted"] == pytest.approx(max(0.0, 1 - i / 2) * h["b/loss_ss_itc"], rel=1e-5, abs=1e-9)
        assert "a/loss_motis" not in h


def test_layout_is_saved_for_reports(tmp_path):
    student, teacher = models()
    trainer = RetrievalTrainer(model=student, args=args_for(tmp_path), plan=plan_of(stages=THREE), teacher=teacher,
                                  train_dataset=batch_items(8))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    layout = json.loads((tmp_path / "final" / "stages.json").read_text())
    assert layout["steps_per_epoch"] == 2
    assert [(s["name"], s["start_step"], s["end_step"]) for s in layout["stages"]] == \
        [("image", 0, 2), ("text", 2, 4), ("joint", 4, 6)]


def _final_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("stop", [1, 2, 3, 4, 5])
def test_resume_equals_uninterrupted(tmp_path, stop):
    """Stops mid-stage (1, 3, 5) and exactly on stage boundaries (2, 4) resume to the same weights."""
    kw = dict(save_strategy="steps", save_steps=1, lr_scheduler_type="linear", warmup_steps=1)
    student, teacher = models()
    full = RetrievalTrainer(model=student, args=args_for(tmp_path / "full", **kw), plan=plan_of(stages=THREE),
                               teacher=teacher, train_dataset=batch_items(8))
    full.train()
    want = _final_weights(full)

    student, teacher = models()
    resumed = RetrievalTrainer(model=student, args=args_for(tmp_path / "full", **kw), plan=plan_of(stages=THREE),
                                  teacher=teacher, train_dataset=batch_items(8))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{stop}"))
    got = _final_weights(resumed)
    worst = max((want[n] - got[n]).abs().max().item() for n in want)
    assert worst == 0.0, f"resumed at step {stop} differs by {worst}"
    stage_of_first = resumed.plan.stage_at(stop).name
    assert stage_of_first == ["image", "text", "text", "joint", "joint"][stop - 1]  # the next step's stage


def test_staged_optimizer_refuses_a_plain_state(tmp_path):
    student, teacher = models()
    trainer = RetrievalTrainer(model=student, args=args_for(tmp_path), plan=plan_of(stages=THREE), teacher=teacher,
                                  train_dataset=batch_items(8))
    opt = trainer.create_optimizer()
    with pytest.raises(ValueError, match="not saved by a staged run"):
        opt.load_state_dict(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1).state_dict())


def test_staged_scheduler_restores_the_next_steps_lr_after_a_stage_switch():
    """Loading a later stage's state into a freshly built (stage 0) pair restores the exact LR."""
    from transformers import get_scheduler


    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]

    def build_opt(k):
        return torch.optim.AdamW([params[k]], lr=0.1 * (k + 1))

    def build_sched(k, opt):
        return get_scheduler("linear", optimizer=opt, num_warmup_steps=0, num_training_steps=10)

    opt = StageOptimizer(build_opt)
    sched = StageLRScheduler(opt, build_sched)
    opt.begin_stage(1)
    sched.begin_stage(1)
    for _ in range(3):
        params[1].grad = torch.ones(3)
        opt.step()
        sched.step()
    saved_opt, saved_sched, lr = opt.state_dict(), sched.state_dict(), opt.param_groups[0]["lr"]
    assert lr == pytest.approx(0.2 * 7 / 10)

    opt2 = StageOptimizer(build_opt)
    sched2 = StageLRScheduler(opt2, build_sched)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.stage == sched2.stage == 1 and opt2.param_groups[0]["params"][0] is params[1]
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr)
    assert sched2.get_last_lr() == pytest.approx([lr])


def test_no_logging_window_spans_two_stages(tmp_path):
    student, teacher = models()
    trainer = RetrievalTrainer(model=student, args=args_for(tmp_path, logging_steps=5), plan=plan_of(stages=THREE),
                                  teacher=teacher, train_dataset=batch_items(8))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 5]  # the ends of stages 1 and 2, plus logging_steps=5
    for h in logs:
        stages = {k.split("/")[0] for k in h if "/loss_" in k}
        assert len(stages) == 1, h

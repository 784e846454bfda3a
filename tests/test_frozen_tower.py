"""A staged run under the original's optimiser: the frozen tower stays in the optimiser and moves by decay alone (issue 25).

Facts (from the original code, issue 25): nothing sets ``requires_grad=False`` on the student, so
every stage's Adam holds every student tensor; the frozen tower runs under ``torch.no_grad()``;
PyTorch 1.11's ``zero_grad()`` zeroes a gradient that exists instead of freeing it. So in stage 2
the image tower (trained in stage 1) has a zero gradient at every step, Adam's coupled decay makes
it ``wd * p``, and its fp32 tensors move; fp16 ones round back; a tensor that never had a gradient
(the text tower in stage 1) is skipped by Adam and stays untouched.

The Adam update is written out below from its formula (Kingma & Ba, with the L2 term added to the
gradient), not taken from ``torch.optim``; the LR from the original's schedule with no warm-up.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import yaml
from transformers import TrainerCallback

from kd_trainer.cli import main
from kd_trainer.distill.frozen_tower import FrozenGradients
from kd_trainer.distill.plan import RunPlan
from kd_trainer.distill.stages import StageOptimizer
from kd_trainer.models.factory import create_model
from kd_trainer.models.precision import convert_to_irra_fp16
from kd_trainer.plan_view import plan_report
from kd_trainer.recipe import RecipeError, parse_recipe

from tiny import fp16_micro_trainer

LR, WD, EPS, B1, B2 = 1e-3, 4e-5, 1e-3, 0.9, 0.999
STEPS_PER_EPOCH, EPOCHS = 2, 2  # 8 items, batch 4; each stage 2 epochs: stage 1 = steps 0-3, stage 2 = 4-7

RECIPE = {
    "name": "frozen_tower", "data": {"name": "synth_pedes", "image_size": [32, 16]},
    "student": {"arch": "micro"}, "teacher": {"arch": "micro"},
    "optim": {"preset": "irra", "lr": LR, "warmup_epochs": 0},
    "precision": "irra_fp16",
    "stages": [
        {"name": "image", "epochs": EPOCHS, "trainable": "image",
         "loss": {"terms": [{"name": "motis", "side": "image"}, {"name": "st_itc", "temperature": 0.1}]}},
        {"name": "text", "epochs": EPOCHS, "trainable": "text",
         "loss": {"terms": [{"name": "motis", "side": "text"}, {"name": "ts_itc", "temperature": 0.1}]}},
    ],
    "training": {"max_grad_norm": 0},
}


def recipe(**optim):
    raw = copy.deepcopy(RECIPE)
    raw["optim"].update(optim)
    return parse_recipe(raw)


def is_image(name: str) -> bool:
    return name.startswith("clip.visual.")


def is_text(name: str) -> bool:
    return name.startswith(("clip.transformer.", "clip.token_embedding.", "clip.positional_embedding",
                            "clip.ln_final.", "clip.text_projection"))


def lr_factor(stage_epoch: int) -> float:
    """The original's schedule with no warm-up: a cosine from 1 to 0 over the stage's epochs."""
    return 0.5 * (1 + math.cos(math.pi * stage_epoch / EPOCHS))


def adam_on_zero_gradients(p0: np.ndarray, lrs: list[float], wd: float) -> np.ndarray:
    """A fresh Adam whose gradient is zero at every step, so with coupled decay it is ``wd * p``:
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``, in float64."""
    p, m, v = p0.astype(np.float64), np.zeros(p0.shape), np.zeros(p0.shape)
    for t, lr in enumerate(lrs, start=1):
        g = 0.0 + wd * p
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        p = p - lr * (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)
    return p


class Snapshots(TrainerCallback):
    """The student's tensors after every optimizer step."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.after[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def original_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decay")
    snaps = Snapshots()
    trainer = fp16_micro_trainer(recipe(), out, [snaps])
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return out, {0: start, **snaps.after}


@pytest.mark.slow
def test_frozen_image_tower_moves_by_coupled_decay_alone(original_run):
    _, snaps = original_run
    start, end1, end2 = snaps[0], snaps[4], snaps[8]
    stage2_lrs = [LR * lr_factor(k // STEPS_PER_EPOCH) for k in range(EPOCHS * STEPS_PER_EPOCH)]
    assert stage2_lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    image = [n for n in start if is_image(n)]
    fp32 = [n for n in image if end1[n].dtype == torch.float32]
    fp16 = [n for n in image if end1[n].dtype == torch.float16]
    assert {"clip.visual.class_embedding", "clip.visual.positional_embedding", "clip.visual.ln_pre.weight"} <= set(fp32)
    assert "clip.visual.conv1.weight" in fp16
    assert all(not torch.equal(start[n], end1[n]) for n in image), "stage 1 trains every image tensor"
    moved = 0.0
    for n in fp32:
        wd = 0.0 if "bias" in n else WD  # the original: no decay on names with `bias`
        want = adam_on_zero_gradients(end1[n].numpy(), stage2_lrs, wd)
        got = end2[n].numpy().astype(np.float64)
        # Float32 arithmetic in four steps: a few ulps of p, far below the decay's own step.
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9, err_msg=n)
        if wd == 0.0:
            assert torch.equal(end2[n], end1[n]), f"{n}: zero gradient and no decay must not move it"
        else:
            moved = max(moved, float(np.max(np.abs(want - end1[n].numpy()) / (np.abs(end1[n].numpy()) + 1e-12))))
    # The decay's move is ~0.04 * lr * p per step: 1e-4 of p over the stage, 50x the tolerance.
    assert moved > 1e-4
    for n in fp16:  # below half an fp16 step: rounded back, bit for bit
        assert torch.equal(end2[n], end1[n]), n


@pytest.mark.slow
def test_never_touched_tower_stays_bit_identical(original_run):
    _, snaps = original_run
    start, end1, end2 = snaps[0], snaps[4], snaps[8]
    text = [n for n in start if is_text(n)]
    assert text and all(torch.equal(end1[n], start[n]) for n in text), "stage 1: the text tower never had a gradient"
    assert all(not torch.equal(end2[n], end1[n]) for n in text), "stage 2 trains every text tensor"
    # logit_scale is read by no term: never a gradient, never moved, though in every optimiser.
    assert torch.equal(end2["clip.logit_scale"], start["clip.logit_scale"])


@pytest.mark.slow
@pytest.mark.parametrize("stop", [4, 5])  # the stage boundary, and mid-epoch in the decaying stage
def test_resumed_run_ends_bit_identical(original_run, stop):
    out, snaps = original_run
    resumed = fp16_micro_trainer(recipe(), out)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{stop}"))
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p.detach(), snaps[8][n]), f"resumed at step {stop}: {n} differs"


@pytest.mark.slow
def test_exclude_keeps_the_frozen_tower_out_and_unchanged(tmp_path):
    snaps = Snapshots()
    trainer = fp16_micro_trainer(recipe(frozen_tower="exclude"), tmp_path, [snaps], save_steps=0)
    trainer.train()
    opt = trainer.optimizer
    while not isinstance(opt, StageOptimizer):
        opt = opt.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert {names[id(p)] for g in opt.param_groups for p in g["params"]} == \
        {n for n in names.values() if is_text(n)} | {"text_proj.weight", "text_proj.bias"} & set(names.values())
    assert opt.gradients is None
    image = [n for n in snaps.after[4] if is_image(n)]
    assert all(torch.equal(snaps.after[8][n], snaps.after[4][n]) for n in image)


# --- the setting, its check and its plan ---------------------------------------------------------

def test_the_original_preset_turns_it_on_and_a_user_can_turn_it_off():
    assert recipe().optim.resolve().frozen_tower == "optimise_by_decay"
    assert recipe(frozen_tower="exclude").optim.resolve().frozen_tower == "exclude"
    plan = RunPlan.from_recipe(recipe(frozen_tower="exclude"))
    assert [s.optim.frozen_tower for s in plan.stages] == ["exclude", "exclude"]
    with pytest.raises(RecipeError, match="frozen_tower applies to preset 'irra' only"):
        parse_recipe({**RECIPE, "optim": {"preset": "trainer", "frozen_tower": "exclude"}})


def test_a_bad_value_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    with pytest.raises(SystemExit) as e:
        main([str(path), "optim.frozen_tower=keep"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "optim.frozen_tower: Input should be 'optimise_by_decay' or 'exclude'" in err


def test_plan_shows_which_tensors_move_by_decay_alone():
    with torch.device("meta"):
        student = create_model("micro", image_size=(32, 16))
    convert_to_irra_fp16(student)
    names = {n: p for n, p in student.named_parameters()}
    rows = [s["frozen_tower"] for s in plan_report(recipe())["stages"]]
    image = {n for n in names if is_image(n)}
    # Stage 1: everything in the optimiser; the text tower (and logit_scale) have had no gradient yet.
    assert rows[0]["optimised_tensors"] == len(names)
    assert set(rows[0]["no_gradient_yet"]) == set(names) - image and not rows[0]["decay_only"]
    # Stage 2: the image tower's decayed tensors move; its biases (no decay) and logit_scale stay.
    decayed = {n for n in image if "bias" not in n}
    assert set(rows[1]["decay_only"]) == decayed and set(rows[1]["no_weight_decay"]) == image - decayed
    assert rows[1]["no_gradient_yet"] == ["clip.logit_scale"]
    assert (rows[1]["decay_only_fp32"], rows[1]["decay_only_fp16"]) == \
        (sum(names[n].dtype == torch.float32 for n in decayed), sum(names[n].dtype == torch.float16 for n in decayed))
    # Stage 2's optimiser groups cover every student tensor, as the original's build_optimizer does.
    groups = plan_report(recipe())["stages"][1]["optimiser"]["groups"]
    assert sum(g["tensors"] for g in groups) == len(names)
    off = [s["frozen_tower"] for s in plan_report(recipe(frozen_tower="exclude"))["stages"]]
    assert off[1] == {"setting": "exclude", "optimised_tensors": len(names) - len(image) - 1,
                      "unchanged_tensors": len(image) + 1}


def test_gradients_are_zeroed_not_freed_and_saved_with_the_optimizer():
    model = create_model("micro")
    plan = RunPlan.from_recipe(recipe()).bind(model)
    params = dict(model.named_parameters())
    grads = FrozenGradients(model, plan.stages)
    ln, tok = params["clip.visual.ln_pre.weight"], params["clip.token_embedding.weight"]
    ln.grad = torch.ones_like(ln)
    grads.before_step(0)  # stage 1 trains the image tower: its gradient is recorded
    assert "clip.visual.ln_pre.weight" in grads.had_gradient and tok.grad is None
    ln.grad = None  # the Trainer freed it; stage 2 does not train it
    tok.grad = torch.ones_like(tok)
    grads.before_step(1)
    assert torch.equal(ln.grad, torch.zeros_like(ln)) and tok.grad is not None
    again = FrozenGradients(model, plan.stages)
    again.load_state_dict(grads.state_dict())
    assert again.had_gradient == grads.had_gradient
    opt = StageOptimizer(lambda i: torch.optim.Adam(model.parameters()), gradients=None)
    with pytest.raises(ValueError, match="optim.frozen_tower=optimise_by_decay"):
        opt.load_state_dict({"stage": 0, "inner": {}, "gradients": grads.state_dict()})

"""The original run's optimiser, LR schedule and fp16 weights, checked against independent tables.

Facts (issue 12, from IRRA's solver/build.py, solver/lr_scheduler.py and CLIP's convert_weights):
Adam (0.9, 0.999), eps 1e-3, LR 1e-5, coupled weight decay 4e-5 on every name without `bias`;
`bias`: LR x 2, decay 0; `cross`/`classifier`/`mlm_head`: LR x 5; per-epoch warm-up + cosine;
Linear/Conv/MHA weights and the projections in fp16, LayerNorm and embeddings fp32.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from open_clip.model import convert_weights_to_lp
from open_clip.transformer import LayerNormFp32
from torch import nn

from kd_trainer.distill.optim import (
    EpochLRFactor,
    create_optimizer,
    create_scheduler,
    describe_groups,
    lr_per_epoch,
    original_lr_factor,
    param_groups,
)
from kd_trainer.distill.stages import StageOptimizer, StageLRScheduler
from kd_trainer.losses.notation import unit
from kd_trainer.losses.task import info_nce
from kd_trainer.models.factory import create_model
from kd_trainer.models.precision import convert_to_irra_fp16, float32_embeddings
from kd_trainer.recipe.optim import IRRA, OptimConfig

LR, WD = 1e-5, 4e-5

# Every bias of the micro model with projections (written out, not derived from a rule).
MICRO_BIASES = {
    "clip.visual.ln_pre.bias", "clip.visual.ln_post.bias", "clip.ln_final.bias",
    "image_proj.bias", "text_proj.bias",
    *(f"clip.{tower}transformer.resblocks.0.{leaf}" for tower in ("visual.", "")
      for leaf in ("ln_1.bias", "attn.in_proj_bias", "attn.out_proj.bias", "ln_2.bias", "mlp.c_fc.bias",
                   "mlp.c_proj.bias")),
}
# Every tensor of the micro model that CLIP's convert_weights turns to fp16.
MICRO_FP16 = {
    "clip.visual.conv1.weight", "clip.visual.proj", "clip.text_projection",
    "image_proj.weight", "image_proj.bias", "text_proj.weight", "text_proj.bias",
    *(f"clip.{tower}transformer.resblocks.0.{leaf}" for tower in ("visual.", "")
      for leaf in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                   "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")),
}
# ... and what stays fp32: LayerNorms, embeddings, logit_scale.
MICRO_FP32 = {
    "clip.positional_embedding", "clip.logit_scale", "clip.token_embedding.weight", "clip.visual.class_embedding",
    "clip.visual.positional_embedding", "clip.visual.ln_pre.weight", "clip.visual.ln_pre.bias",
    "clip.visual.ln_post.weight", "clip.visual.ln_post.bias", "clip.ln_final.weight", "clip.ln_final.bias",
    *(f"clip.{tower}transformer.resblocks.0.{ln}.{p}" for tower in ("visual.", "") for ln in ("ln_1", "ln_2")
      for p in ("weight", "bias")),
}


def lr_and_decay(groups):
    return {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}


# --- parameter groups ---------------------------------------------------------------------------

def test_groups_of_a_clip_student_match_the_table():
    model = create_model("micro", projection_dim=48)
    names = {n for n, _ in model.named_parameters()}
    assert MICRO_BIASES <= names and len(names) == 42
    got = lr_and_decay(param_groups(model.named_parameters(), lr=LR, weight_decay=WD))
    expected = {n: (2e-5, 0.0) if n in MICRO_BIASES else (1e-5, 4e-5) for n in names}
    assert got.keys() == expected.keys()
    for n in names:
        assert got[n] == pytest.approx(expected[n], rel=1e-12, abs=0), n
    # LayerNorm gains and the embeddings decay, as in the original.
    assert got["clip.visual.ln_pre.weight"] == (LR, WD) and got["clip.token_embedding.weight"] == (LR, WD)


def test_frozen_parameters_are_left_out_and_groups_name_their_members():
    model = create_model("micro")
    for p in model.clip.visual.parameters():
        p.requires_grad_(False)
    groups = param_groups(model.named_parameters(), lr=LR, weight_decay=WD)
    listed = [n for g in groups for n in g["param_names"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {n for n, p in model.named_parameters() if not n.startswith("clip.visual.")}
    assert [g["kind"] for g in groups] == ["base", "bias"]
    for g in groups:
        assert [id(p) for p in g["params"]] == [id(dict(model.named_parameters())[n]) for n in g["param_names"]]
    rows = describe_groups(groups)
    assert [(r["kind"], r["tensors"]) for r in rows] == [("base", 11), ("bias", 7)]
    with pytest.raises(ValueError, match="no parameter requires a gradient"):
        param_groups([(n, p.detach()) for n, p in model.named_parameters()], lr=LR, weight_decay=WD)


class Heads(nn.Module):
    """Names the CLIP student lacks: IRRA's cross-modal module, classifier and MLM head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.cross_attn = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 3)
        self.mlm_head = nn.Sequential()
        self.mlm_head.add_module("dense", nn.Linear(4, 4))
        self.cross_classifier = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def irra_groups(model, lr, wd, bias_lr_factor=2.0, lr_factor=5.0, wd_bias=0.0):
    """IRRA's build_optimizer loop, as it is written: each test overwrites the previous LR."""
    out = {}
    for key, value in model.named_parameters():
        if not value.requires_grad:
            continue
        g_lr, g_wd = lr, wd
        if "cross" in key:
            g_lr = lr * lr_factor
        if "bias" in key:
            g_lr, g_wd = lr * bias_lr_factor, wd_bias
        if "classifier" in key or "mlm_head" in key:
            g_lr = lr * lr_factor
        out[key] = (g_lr, g_wd)
    return out


def test_heads_and_biases_follow_the_original_rule_order():
    model = Heads()
    got = lr_and_decay(param_groups(model.named_parameters(), lr=LR, weight_decay=WD))
    table = {
        "encoder.weight": (1e-5, 4e-5), "encoder.bias": (2e-5, 0.0),
        "ln.weight": (1e-5, 4e-5), "ln.bias": (2e-5, 0.0),
        "cross_attn.weight": (5e-5, 4e-5), "cross_attn.bias": (2e-5, 0.0),  # cross is tested before bias
        "classifier.weight": (5e-5, 4e-5), "classifier.bias": (5e-5, 0.0),  # classifier after it
        "mlm_head.dense.weight": (5e-5, 4e-5), "mlm_head.dense.bias": (5e-5, 0.0),
        "cross_classifier.weight": (5e-5, 4e-5), "cross_classifier.bias": (5e-5, 0.0),
    }
    assert got.keys() == table.keys()
    for n, v in table.items():
        assert got[n] == pytest.approx(v, rel=1e-12), n
    reference = irra_groups(model, LR, WD)
    assert {n: pytest.approx(v, rel=1e-12) for n, v in reference.items()} == got


def test_head_precedence_is_configurable():
    got = lr_and_decay(param_groups(Heads().named_parameters(), lr=LR, weight_decay=WD, heads_before_bias=()))
    assert got["cross_attn.bias"] == pytest.approx((5e-5, 0.0))
    got = lr_and_decay(param_groups(Heads().named_parameters(), lr=1.0, weight_decay=0.5, bias_lr_factor=3.0,
                                    head_lr_factor=7.0, head_keywords=("encoder",), heads_before_bias=(),
                                    bias_weight_decay=0.25))
    assert got["encoder.weight"] == (7.0, 0.5) and got["encoder.bias"] == (7.0, 0.25)
    assert got["classifier.weight"] == (1.0, 0.5) and got["classifier.bias"] == (3.0, 0.25)
    with pytest.raises(ValueError, match="heads_before_bias"):
        param_groups(Heads().named_parameters(), lr=LR, weight_decay=WD, head_keywords=("x",))


# --- the optim: block -----------------------------------------------------------------------------

def test_original_preset_resolves_to_the_original_numbers():
    s = OptimConfig(preset="irra").resolve()
    assert (s.type, s.lr, s.betas, s.eps, s.weight_decay, s.bias_weight_decay) == \
        ("adam", 1e-5, (0.9, 0.999), 1e-3, 4e-5, 0.0)
    assert (s.bias_lr_factor, s.head_lr_factor, s.head_keywords, s.heads_before_bias) == \
        (2.0, 5.0, ("cross", "classifier", "mlm_head"), ("cross",))
    assert (s.warmup_epochs, s.warmup_factor, s.schedule, s.step_unit) == (5, 0.1, "cosine", "epoch")
    over = OptimConfig.model_validate({"preset": "irra", "lr": 3e-4, "betas": [0.8, 0.99],
                                       "head_keywords": ["adapter"]}).resolve()
    assert (over.lr, over.betas, over.eps, over.head_keywords, over.heads_before_bias) == \
        (3e-4, (0.8, 0.99), 1e-3, ("adapter",), ())


@pytest.mark.parametrize("raw, message", [
    ({"preset": "trainer", "lr": 1e-4}, "preset 'trainer' takes its optimiser"),
    ({"preset": "irra", "betas": [0.9, 1.0]}, r"betas must both lie in \[0, 1\)"),
    ({"preset": "irra", "eps": 0}, "greater than 0"),
    ({"preset": "irra", "learning_rate": 1e-4}, "Extra inputs are not permitted"),
    ({"preset": "irra", "type": "sgd"}, "'adam' or 'adamw'"),
    ({"preset": "irra", "head_keywords": ["cross", ""]}, "empty string"),
    ({"lr": 1e-4}, "preset"),
])
def test_bad_optim_blocks_are_refused_naming_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig.model_validate(raw)


def test_a_stage_block_overrides_only_what_it_writes():
    run = OptimConfig.model_validate({"preset": "irra", "lr": 2e-5, "warmup_epochs": 3})
    stage = OptimConfig.model_validate({"preset": "irra", "lr": 5e-5})
    merged = run.merged(stage).resolve()
    assert (merged.lr, merged.warmup_epochs, merged.eps) == (5e-5, 3, 1e-3)
    assert run.merged(None) is run
    assert run.merged(OptimConfig(preset="trainer")).uses_trainer


def test_optimizer_types_and_hyperparameters():
    model = create_model("micro")
    adam = create_optimizer(model.named_parameters(), IRRA)
    assert type(adam) is torch.optim.Adam
    assert (adam.defaults["betas"], adam.defaults["eps"]) == ((0.9, 0.999), 1e-3)
    assert [(g["kind"], g["lr"], g["weight_decay"]) for g in adam.param_groups] == \
        [("base", 1e-5, 4e-5), ("bias", 2e-5, 0.0)]
    adamw = create_optimizer(model.named_parameters(),
                             OptimConfig(preset="irra", type="adamw").resolve())
    assert type(adamw) is torch.optim.AdamW


# --- one Adam step, by hand ----------------------------------------------------------------------

class WB(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        self.b_bias = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))


def adam_by_hand(p, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-3, decoupled=False):
    """Adam on plain floats, element by element (coupled: g + wd p; decoupled: p (1 - lr wd))."""
    p, m, v = list(p), [0.0] * len(p), [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            gi = g[i] if decoupled else g[i] + wd * p[i]
            if decoupled:
                p[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            p[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_two_adam_steps_equal_the_hand_computation(kind):
    model = WB()
    settings = OptimConfig(preset="irra", type=kind, lr=1e-2, weight_decay=0.1).resolve()
    opt = create_optimizer(model.named_parameters(), settings)
    grads_w, grads_b = [[0.2, -0.4], [-0.05, 0.3]], [[0.3], [0.001]]
    for gw, gb in zip(grads_w, grads_b):
        model.w.grad = torch.tensor(gw, dtype=torch.float64)
        model.b_bias.grad = torch.tensor(gb, dtype=torch.float64)
        opt.step()
    decoupled = kind == "adamw"
    want_w = adam_by_hand([1.0, -2.0], grads_w, lr=1e-2, wd=0.1, decoupled=decoupled)
    want_b = adam_by_hand([0.5], grads_b, lr=2e-2, wd=0.0, decoupled=decoupled)  # bias: LR x 2, no decay
    assert model.w.tolist() == pytest.approx(want_w, rel=0, abs=1e-14)
    assert model.b_bias.tolist() == pytest.approx(want_b, rel=0, abs=1e-14)
    # The decay matters: without it the first weight would have moved less.
    assert adam_by_hand([1.0, -2.0], grads_w, lr=1e-2, wd=0.0)[0] != pytest.approx(want_w[0], abs=1e-6)


# --- the LR schedule -----------------------------------------------------------------------------

def expected_factors(n=60, warmup=5, start=0.1):
    """The 60 epochs, by a second construction: evenly spaced warm-up, then a sampled cosine."""
    ramp = np.linspace(start, 1.0, warmup + 1)[:warmup]
    angles = np.linspace(0.0, np.pi, n - warmup + 1)[: n - warmup]
    return np.concatenate([ramp, (1 + np.cos(angles)) / 2])


def test_lr_factor_for_60_epochs():
    got = np.array([original_lr_factor(e, 60) for e in range(60)])
    np.testing.assert_allclose(got, expected_factors(), rtol=0, atol=1e-15)
    assert got[:6].tolist() == pytest.approx([0.1, 0.28, 0.46, 0.64, 0.82, 1.0])
    assert original_lr_factor(60, 60) == 0.0 and original_lr_factor(75, 60) == 0.0
    assert lr_per_epoch(IRRA, 60) == pytest.approx((1e-5 * expected_factors()).tolist(), rel=1e-12)
    with pytest.raises(ValueError, match="epoch_index"):
        original_lr_factor(-1, 60)
    with pytest.raises(ValueError, match="num_epochs"):
        original_lr_factor(0, 0)


class IRRAScheduler(torch.optim.lr_scheduler.LRScheduler):
    """IRRA's LRSchedulerWithWarmup (linear warm-up, cosine, target 0), stepped once per epoch."""

    def __init__(self, optimizer, warmup_factor=0.1, warmup_epochs=5, total_epochs=60):
        self.warmup_factor, self.warmup_epochs, self.total_epochs = warmup_factor, warmup_epochs, total_epochs
        super().__init__(optimizer)

    def get_lr(self):
        e = self.last_epoch
        if e < self.warmup_epochs:
            a = e / self.warmup_epochs
            return [b * (self.warmup_factor * (1 - a) + a) for b in self.base_lrs]
        ratio = (e - self.warmup_epochs) / (self.total_epochs - self.warmup_epochs)
        return [b * 0.5 * (1 + math.cos(math.pi * ratio)) for b in self.base_lrs]


def test_per_step_schedule_gives_every_step_the_lr_of_the_original_per_epoch_schedule():
    spe, epochs = 3, 60
    ours_model, irra_model = Heads(), Heads()
    ours = create_optimizer(ours_model.named_parameters(), IRRA)
    sched = create_scheduler(ours, IRRA, steps_per_epoch=spe, num_epochs=epochs)
    irra = torch.optim.Adam([{"params": [p], "lr": lr, "weight_decay": wd} for p, (lr, wd) in
                             zip([p for p in irra_model.parameters() if p.requires_grad],
                                 irra_groups(irra_model, LR, WD).values())], lr=LR, eps=1e-3)
    irra_sched = IRRAScheduler(irra)
    names = [n for n, p in irra_model.named_parameters() if p.requires_grad]
    ours_by_name = lambda: {n: g["lr"] for g in ours.param_groups for n in g["param_names"]}  # noqa: E731
    factors = expected_factors()
    for epoch in range(epochs):
        for _ in range(spe):
            got = ours_by_name()
            want = {n: g["lr"] for n, g in zip(names, irra.param_groups)}
            assert got == pytest.approx(want, rel=1e-12), epoch
            assert got["encoder.weight"] == pytest.approx(LR * factors[epoch], rel=1e-12)
            assert got["classifier.bias"] == pytest.approx(5 * LR * factors[epoch], rel=1e-12)
            ours.step()  # no gradients: moves nothing, but keeps the optimizer-then-scheduler order
            sched.step()
        irra.step()
        irra_sched.step()  # the original: once, at the end of the epoch


def test_step_unit_step_reads_the_fractional_epoch():
    f = EpochLRFactor(steps_per_epoch=4, num_epochs=10, warmup_epochs=2, warmup_factor=0.2, step_unit="step")
    assert f(0) == pytest.approx(0.2) and f(2) == pytest.approx(0.2 * 0.75 + 0.25) and f(8) == pytest.approx(1.0)
    assert f(24) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    g = EpochLRFactor(steps_per_epoch=4, num_epochs=10, warmup_epochs=2, warmup_factor=0.2)
    assert g(3) == pytest.approx(0.2) and g(4) == pytest.approx(0.6)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)


def train(model, opt, sched, steps, lrs):
    for step in steps:
        x, y = batch(step)
        lrs.append([g["lr"] for g in opt.param_groups])
        loss = nn.functional.cross_entropy(model.classifier(model.ln(model.cross_attn(model.encoder(x)))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def fresh(settings):
    torch.manual_seed(0)
    model = Heads()
    opt = create_optimizer(model.named_parameters(), settings)
    return model, opt, create_scheduler(opt, settings, steps_per_epoch=4, num_epochs=8)


def test_schedule_resumes_exactly_from_a_saved_state(tmp_path):
    settings = OptimConfig(preset="irra", lr=1e-2, warmup_epochs=2).resolve()
    model, opt, sched = fresh(settings)
    whole_lrs: list = []
    train(model, opt, sched, range(20), whole_lrs)

    model2, opt2, sched2 = fresh(settings)
    part_lrs: list = []
    train(model2, opt2, sched2, range(11), part_lrs)  # stops mid-epoch (epoch 2, step 3 of 4)
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()},
               tmp_path / "ckpt.pt")
    model3, opt3, sched3 = fresh(settings)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    sched3.load_state_dict(saved["sched"])
    train(model3, opt3, sched3, range(11, 20), part_lrs)

    assert part_lrs == whole_lrs
    assert whole_lrs[8] != whole_lrs[7]  # the factor changed when epoch 2 began
    for (n, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), n


def test_each_stage_gets_its_own_schedule_and_resumes_inside_it(tmp_path):
    """Two stages (2 and 3 epochs of 3 steps) under StageOptimizer/StageLRScheduler, driven as the
    StageScheduler callback drives them; stopped at step 8 (stage 2, epoch 1) and resumed."""
    settings = OptimConfig(preset="irra", lr=1e-2, warmup_epochs=1, warmup_factor=0.5).resolve()
    spe, stage_epochs, stage_params = 3, [2, 3], [("encoder.", "ln."), ("cross_attn.", "classifier.")]
    bounds = [0, 6, 15]

    def build():
        torch.manual_seed(0)
        model = Heads()
        opt = StageOptimizer(lambda i: create_optimizer(
            [(n, p) for n, p in model.named_parameters() if n.startswith(stage_params[i])], settings))
        sched = StageLRScheduler(opt, lambda i, inner: create_scheduler(
            inner, settings, steps_per_epoch=spe, num_epochs=stage_epochs[i]))
        return model, opt, sched

    def run(model, opt, sched, steps, lrs):
        for step in steps:
            stage = 0 if step < bounds[1] else 1
            opt.begin_stage(stage)
            sched.begin_stage(stage)
            x, y = batch(step)
            lrs.append((stage, [g["lr"] for g in opt.param_groups]))
            loss = nn.functional.cross_entropy(model.classifier(model.ln(model.cross_attn(model.encoder(x)))), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    model, opt, sched = build()
    whole: list = []
    run(model, opt, sched, range(15), whole)
    # Stage-local epochs: stage 2 starts its warm-up again (factor 0.5), whatever stage 1 ended at.
    want = [original_lr_factor(s // spe, 2, 1, 0.5) for s in range(6)] + \
           [original_lr_factor(s // spe, 3, 1, 0.5) for s in range(9)]
    # Stage 1 groups: base, bias (LR x 2); stage 2: bias (cross_attn.bias), head and head bias (LR x 5).
    scales = [[1, 2]] * 6 + [[2, 5, 5]] * 9
    assert [lrs for _, lrs in whole] == [pytest.approx([1e-2 * k * f for k in ks], rel=1e-12)
                                         for ks, f in zip(scales, want)]

    model2, opt2, sched2 = build()
    part: list = []
    run(model2, opt2, sched2, range(8), part)
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()},
               tmp_path / "staged.pt")
    model3, opt3, sched3 = build()
    saved = torch.load(tmp_path / "staged.pt", weights_only=True)
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])  # the Trainer restores the optimizer, then the scheduler
    sched3.load_state_dict(saved["sched"])
    run(model3, opt3, sched3, range(8, 15), part)
    assert part == whole
    for (n, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), n


# --- precision: irra_fp16 ------------------------------------------------------------------------

def test_fp16_conversion_converts_exactly_what_clip_converts():
    model = create_model("micro", projection_dim=48)
    assert MICRO_FP16 | MICRO_FP32 == {n for n, _ in model.named_parameters()} and not MICRO_FP16 & MICRO_FP32
    reference = copy.deepcopy(model)
    report = convert_to_irra_fp16(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {n for n, d in dtypes.items() if d == torch.float16} == MICRO_FP16
    assert {n for n, d in dtypes.items() if d == torch.float32} == MICRO_FP32
    assert set(report.converted) == MICRO_FP16 and set(report.kept) == MICRO_FP32
    # open_clip's own converter agrees tensor by tensor.
    convert_weights_to_lp(reference)
    assert {n: p.dtype for n, p in reference.named_parameters()} == dtypes
    assert len(report.layer_norms) == 7 and all(isinstance(m, LayerNormFp32) for m in model.modules()
                                                if isinstance(m, nn.LayerNorm))
    assert report.input_casts == ["clip.visual"]
    again = convert_to_irra_fp16(model)
    assert again.converted == [] and again.layer_norms == []
    assert len(model.clip.visual._forward_pre_hooks) == 1


def test_fp16_forward_casts_as_the_original_does():
    torch.manual_seed(0)
    model = create_model("micro")
    convert_to_irra_fp16(model)
    ln = model.clip.visual.ln_pre
    x = torch.randn(2, 9, 32).half()
    want = nn.functional.layer_norm(x.float(), (32,), ln.weight, ln.bias, ln.eps).half()
    assert ln(x).dtype == torch.float16 and torch.equal(ln(x), want)
    out = model(pixel_values=torch.randn(2, 3, 32, 16), input_ids=torch.randint(1, 49407, (2, 77)))
    assert {k: v.dtype for k, v in out.items()} == {"image_embeds": torch.float16, "text_embeds": torch.float16}
    cast = float32_embeddings({**out, "pids": torch.tensor([1, 2])})
    assert cast["image_embeds"].dtype == torch.float32 and cast["pids"].dtype == torch.int64
    assert torch.equal(cast["text_embeds"], out["text_embeds"].float())


def test_three_fp16_weight_steps_on_cpu_give_finite_losses():
    torch.manual_seed(0)
    student, teacher = create_model("micro"), create_model("micro")
    convert_to_irra_fp16(student)
    convert_to_irra_fp16(teacher)
    teacher.requires_grad_(False)
    settings = OptimConfig(preset="irra", lr=1e-3).resolve()
    opt = create_optimizer(student.named_parameters(), settings)
    sched = create_scheduler(opt, settings, steps_per_epoch=1, num_epochs=3)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    g = torch.Generator().manual_seed(1)
    images, ids = torch.randn(4, 3, 32, 16, generator=g), torch.randint(1, 49407, (4, 77), generator=g)
    losses = []
    for _ in range(3):
        out = float32_embeddings(student(pixel_values=images, input_ids=ids))
        with torch.no_grad():
            t = float32_embeddings(teacher(pixel_values=images, input_ids=ids))
        loss = info_nce(unit(out["image_embeds"]), unit(out["text_embeds"]), 0.02) + \
            info_nce(unit(out["image_embeds"]), unit(t["text_embeds"]), 0.02)
        opt.zero_grad()
        loss.backward()
        assert student.clip.visual.conv1.weight.grad.dtype == torch.float16
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    for n, p in student.named_parameters():
        assert p.dtype == (torch.float16 if n in MICRO_FP16 else torch.float32), n
        assert torch.isfinite(p).all(), n
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert "clip.visual.conv1.weight" in moved and "clip.ln_final.weight" in moved

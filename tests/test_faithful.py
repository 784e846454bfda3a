"""The faithful recipes reproduce the original run (issue 12), checked against the facts written out here.

The facts, from the original code (``docs/methods.md``, "The original run, for reference", and issue 12),
are restated below as an independent table: nothing is read from ``kd_trainer.recipe.optim`` or
``kd_trainer.distill.optim``. Each seed recipe's ``plan_report`` (what ``kd-trainer plan`` prints)
is checked against them: parameter groups with LR and weight decay, the LR and alpha at every one of
the 60 epochs of every stage, every term with its temperature and group, and the parameter dtypes
under ``precision: irra_fp16``. Then two runs on tiny models: a staged run under the original's
optimiser resumes to the same weights as an uninterrupted one, and a run with ``select:`` keeps the
weights of its best evaluation and records which.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from kd_trainer.distill.plan import RunPlan
from kd_trainer.losses import Features, get_term
from kd_trainer.models.factory import create_model
from kd_trainer.models.precision import convert_to_irra_fp16
from kd_trainer.plan_view import plan_report
from kd_trainer.recipe import load_recipe
from kd_trainer.recipe.schedules import Clock
from kd_trainer.runner import run
from kd_trainer.synthetic.pedes import make_synth_pedes

from tiny import fp16_micro_trainer

ROOT = Path(__file__).resolve().parents[1]

# --- the original's facts, written out -----------------------------------------------------------

BASE_LR, WEIGHT_DECAY, EPS, BETAS = 1e-5, 4e-5, 1e-3, (0.9, 0.999)
BIAS_LR_FACTOR = 2.0  # (heads, LR x5, do not occur: the students have no randomly initialised head)
EPOCHS = 60  # --num_epoch 60, per stage


def original_lr(e: int, n: int = EPOCHS, base: float = BASE_LR) -> float:
    """The base LR during 0-based epoch ``e`` of a stage of ``n`` epochs: a linear warm-up from 0.1
    over 5 epochs, then a cosine to 0 over the remaining ``n - 5``."""
    if e < 5:
        return base * (0.1 * (1 - e / 5) + e / 5)
    return base * 0.5 * (1 + math.cos(math.pi * (e - 5) / (n - 5)))


def default_alpha(e: int) -> float:
    """The original's default alpha at 0-based epoch ``e``: 0.9 in (1-based) epochs 1-9, then 0.6."""
    return 0.9 if e + 1 < 10 else 0.6


def cosin_alpha(e: int) -> float:
    """``--distillation_cosin_weight``: 0.9 up to (1-based) epoch 20, linear to 0.5 at epoch 50, then 0.5."""
    k = e + 1
    if k <= 20:
        return 0.9
    if k >= 50:
        return 0.5
    return 0.9 - 0.4 * (k - 20) / 30


# Student tensors by tower, by name (OpenAI/open_clip CLIP layout under the `clip.` prefix).
def tower_of(name: str) -> str:
    if name.startswith("clip.visual."):
        return "image"
    if name.startswith(("clip.transformer.", "clip.token_embedding.", "clip.positional_embedding",
                        "clip.ln_final.", "clip.text_projection")):
        return "text"
    return "neither"  # logit_scale: trained only when everything trains


def trains(trainable: str, name: str) -> bool:
    return trainable == "all" or tower_of(name) == trainable


# Converted to fp16 by the original's convert_weights: Linear/Conv weights and biases (the MLP, the
# attention output projection, the patch convolution), MultiheadAttention's packed in-projection,
# and the two projection matrices. Everything else stays fp32.
FP16_NAME = re.compile(r"(conv1\.weight|attn\.in_proj_(weight|bias)|attn\.out_proj\.(weight|bias)"
                       r"|mlp\.c_(fc|proj)\.(weight|bias)|visual\.proj|text_projection)$")
FP32_NAME = re.compile(r"(ln_\w+\.(weight|bias)|token_embedding\.weight|positional_embedding|class_embedding"
                       r"|logit_scale)$")

# Per seed recipe, per stage: (name, what trains, {term key: (temperature or None if the term reads
# none, group, weight)}, alpha per 0-based epoch or None for no mix).
D, T = "distill", "task"
FACTS = {
    "cross_kd": [("train", "all", {"cross_kd": (0.5, D, 1), "itc": (0.02, T, 1)}, default_alpha)],
    # CLIP-KD path: no alpha; task sdm + 2000 * fd + icl + crd, icl/crd at 0.07 (crd summed: kwargs below).
    "clip_kd": [("train", "all", {"sdm": (0.02, T, 1), "fd": (None, D, 2000), "icl": (0.07, D, 1),
                                  "crd": (0.07, D, 1)}, None)],
    "motis_2stage": [
        ("image", "image", {"motis[image]": (0.5, D, 1), "st_itc": (0.02, T, 1)}, default_alpha),
        # The distillation config names no inter_ss_kl, though the command passes its temperature.
        ("text", "text", {"motis[text]": (0.5, D, 1), "inter_ts_kl[text]": (0.5, D, 1), "ts_itc": (0.02, T, 1),
                          "ss_itc": (0.02, T, 1)}, default_alpha),
    ],
    "conaclip_2stage": [
        ("image", "image", {"motis[image]": (0.5, D, 1), "intra_ss_sd[image]": (None, D, 1),
                            "intra_ts_sd[image]": (None, D, 1), "st_itc": (0.02, T, 1)}, default_alpha),
        ("text", "text", {"motis[text]": (0.5, D, 1), "intra_ss_sd[text]": (None, D, 1),
                          "intra_ts_sd[text]": (None, D, 1), "intra_ts_sym_sd": (None, D, 1),
                          "inter_ss_sd": (None, D, 1), "inter_ts_sym_kl": (0.5, D, 1), "ts_itc": (0.02, T, 1),
                          "ss_itc": (0.02, T, 1)}, default_alpha),
    ],
    "ours_3stage": [
        ("image", "image", {"motis[image]": (0.5, D, 1), "st_itc": (0.02, T, 1)}, default_alpha),
        ("text", "text", {"motis[text]": (0.5, D, 1), "inter_ts_kl[text]": (0.5, D, 1), "ts_itc": (0.02, T, 1)},
         default_alpha),
        ("joint", "all", {"motis": (0.5, D, 1), "inter_ss_kl": (0.5, D, 1), "ss_itc": (0.02, T, 1)}, default_alpha),
    ],
    "ours_from_motis": [("train", "all", {"motis": (0.5, D, 1), "inter_ss_kl": (0.5, D, 1),
                                          "intra_ss_sd": (None, D, 1), "ts_itc": (0.02, T, 1),
                                          "st_itc": (0.02, T, 1)}, default_alpha)],
}
SEED_RECIPES = list(FACTS)


def recipe_of(name: str, *overrides: str):
    return load_recipe(ROOT / "recipes" / f"{name}.yaml", list(overrides))


def meta_model(arch: str, recipe) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(arch, image_size=tuple(recipe.data.image_size), context_length=recipe.data.context_length)


def random_features(n: int = 6, d: int = 8, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    vs, ts, vt, tt = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(4))
    return Features(student_image=vs, student_text=ts, teacher_image=vt, teacher_text=tt,
                    pids=torch.arange(n) // 2)


# --- the recipes' settings --------------------------------------------------------------------------

@pytest.mark.parametrize("name", SEED_RECIPES)
def test_seed_recipe_sets_the_original_run(name):
    recipe = recipe_of(name)
    assert recipe.optim is not None and recipe.optim.preset == "irra"
    assert recipe.optim.model_dump(exclude_unset=True) == {"preset": "irra"}, "every number the original's"
    assert all(s.optim is None for s in recipe.stages or []), "no stage overrides the original's optimiser"
    assert recipe.precision == "irra_fp16"
    assert (recipe.select.metric, recipe.select.split) == ("r1", "test")
    assert recipe.training["max_grad_norm"] == 0 and recipe.training["eval_strategy"] == "epoch"
    # Settings the Trainer's own optimiser would read are absent, so nobody edits a number that does nothing.
    unused = {"learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "optim", "adam_epsilon",
              "load_best_model_at_end", "metric_for_best_model", "fp16", "bf16"}
    assert not unused & set(recipe.training)
    assert recipe.training["per_device_train_batch_size"] == 64 and recipe.data.augment
    lengths = [s.epochs for s in recipe.stages] if recipe.stages else [recipe.training["num_train_epochs"]]
    assert lengths == [EPOCHS] * len(FACTS[name])
    if name == "ours_from_motis":  # --continue_training: the MoTIS run's kept (best) model
        assert recipe.student.checkpoint == recipe_of("motis_2stage").training["output_dir"]


@pytest.mark.parametrize("name", SEED_RECIPES)
def test_plan_terms_and_mix_match_the_table(name):
    recipe = recipe_of(name)
    report = plan_report(recipe)
    plan = RunPlan.from_recipe(recipe)
    assert [(s["name"], s["trains"]) for s in report["stages"]] == [(n, t) for n, t, _, _ in FACTS[name]]
    for stage, planned, (_, _, terms, alpha) in zip(report["stages"], plan.stages, FACTS[name], strict=True):
        assert [t["key"] for t in stage["terms"]] == list(terms)
        for t in stage["terms"]:
            temperature, group, weight = terms[t["key"]]
            assert (t["group"], t["weight"]) == (group, weight), t["key"]
            if temperature is not None:
                assert t["temperature"] == temperature, t["key"]
            else:  # a similarity distance or fd: the temperature the plan shows does not matter
                spec, f = get_term(t["key"].split("[")[0]), random_features()
                assert spec.fn(f, temperature=0.5, side=t["side"]) == spec.fn(f, temperature=0.02, side=t["side"])
        # Each term's coefficient in the total at every epoch: weight * alpha (distill) or * (1 - alpha) (task).
        for e in range(EPOCHS):
            coefs, got_alpha = planned.coefficients(Clock(epoch=e, stage_epoch=e))
            assert got_alpha == (None if alpha is None else pytest.approx(alpha(e), abs=1e-12))
            for key, (_, group, weight) in terms.items():
                mix = 1.0 if alpha is None else alpha(e) if group == D else 1.0 - alpha(e)
                assert coefs[key] == pytest.approx(weight * mix, abs=1e-12), (key, e)
    if name == "clip_kd":  # crd summed over its two directions, not halved
        (crd,) = [t for t in report["stages"][0]["terms"] if t["key"] == "crd"]
        assert crd["kwargs"] == {"directions": "sum"}


@pytest.mark.parametrize("name", SEED_RECIPES)
def test_plan_alpha_per_epoch_matches_the_table(name):
    report = plan_report(recipe_of(name))
    for stage, (_, _, _, alpha) in zip(report["stages"], FACTS[name], strict=True):
        want = None if alpha is None else [alpha(e) for e in range(EPOCHS)]
        got = stage["alpha_per_epoch"]
        assert got == (None if want is None else pytest.approx(want, abs=1e-12))


@pytest.mark.parametrize("name", SEED_RECIPES)
def test_plan_optimiser_groups_match_the_table(name):
    recipe = recipe_of(name)
    report = plan_report(recipe)
    student = meta_model(recipe.student.arch, recipe)
    named = [(n, p) for n, p in student.named_parameters()]
    assert not [n for n, _ in named if any(k in n for k in ("cross", "classifier", "mlm_head"))], \
        "the student has no randomly initialised head, so no LR x5 group"
    for stage, (_, trainable, _, _) in zip(report["stages"], FACTS[name], strict=True):
        o = stage["optimiser"]
        assert (o["preset"], o["type"], tuple(o["betas"]), o["eps"]) == ("irra", "adam", BETAS, EPS)
        mine = [(n, p) for n, p in named if trains(trainable, n)]
        assert stage["trainable_tensors"] == len(mine)
        # Every stage's optimiser holds every student tensor: nothing in the original sets
        # requires_grad=False on the student (issue 25). LayerNorm gains decay like any weight;
        # names with `bias` get LR x2 and no decay.
        assert any(re.search(r"ln_\w+\.weight$", n) for n, _ in named)
        biases = [p for n, p in named if "bias" in n]
        others = [p for n, p in named if "bias" not in n]
        want = [
            {"kind": "base", "tensors": len(others), "elements": sum(p.numel() for p in others),
             "lr": BASE_LR, "weight_decay": WEIGHT_DECAY},
            {"kind": "bias", "tensors": len(biases), "elements": sum(p.numel() for p in biases),
             "lr": BASE_LR * BIAS_LR_FACTOR, "weight_decay": 0.0},
        ]
        assert o["groups"] == [{**g, "lr": pytest.approx(g["lr"], rel=1e-12)} for g in want]


@pytest.mark.parametrize("name", SEED_RECIPES)
def test_plan_lr_per_epoch_matches_the_table(name):
    report = plan_report(recipe_of(name))
    want = [original_lr(e) for e in range(EPOCHS)]
    assert want[0] == pytest.approx(1e-6) and want[5] == pytest.approx(1e-5) and want[-1] < 1e-8
    for stage in report["stages"]:  # every stage: a fresh schedule over its own 60 epochs
        assert stage["optimiser"]["lr_per_epoch"] == pytest.approx(want, rel=1e-12, abs=1e-20)


@pytest.mark.parametrize("name", SEED_RECIPES)
def test_precision_original_converts_student_and_teacher_by_name(name):
    recipe = recipe_of(name)
    report = plan_report(recipe)
    assert report["precision"]["mode"] == "irra_fp16" and report["precision"]["mixed"] is None
    for role, arch in (("student", recipe.student.arch), ("teacher", recipe.teacher.arch)):
        model = meta_model(arch, recipe)
        convert_to_irra_fp16(model)
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        fp16 = {n for n in dtypes if FP16_NAME.search(n)}
        fp32 = {n for n in dtypes if FP32_NAME.search(n)}
        assert fp16 | fp32 == set(dtypes) and not fp16 & fp32, f"{role}: a name the table does not cover"
        assert {n for n, d in dtypes.items() if d == torch.float16} == fp16, role
        assert {n for n, d in dtypes.items() if d == torch.float32} == fp32, role
        if role == "student":
            assert (report["precision"]["student_fp16_tensors"], report["precision"]["student_fp32_tensors"]) \
                == (len(fp16), len(fp32))


def test_plan_keeps_the_test_best_of_the_last_stage():
    for name in SEED_RECIPES:
        kept = plan_report(recipe_of(name))["checkpoint_kept"]
        assert "best r1 on test" in kept and "last stage" in kept, name


def test_cosin_weight_schedule_matches_the_original_flag():
    """--distillation_cosin_weight, written as the comments of the seed recipes give it."""
    recipe = recipe_of("cross_kd", "loss.alpha={type: linear, start: 0.9, end: 0.5, begin: 19, finish: 49, "
                                   "unit: epoch}", "training.num_train_epochs=60")
    (stage,) = RunPlan.from_recipe(recipe).stages
    got = [stage.coefficients(Clock(epoch=e, stage_epoch=e))[1] for e in range(EPOCHS)]
    assert got == pytest.approx([cosin_alpha(e) for e in range(EPOCHS)], abs=1e-12)
    assert "begin: 19, finish: 49" in (ROOT / "recipes" / "cross_kd.yaml").read_text()


def test_crd_summed_is_both_directions_without_the_half():
    f = random_features(seed=3)
    vs, ts, vt, tt = (torch.nn.functional.normalize(x, dim=-1) for x in
                      (f.student_image, f.student_text, f.teacher_image, f.teacher_text))

    def kl_rows(target_logits, logits):
        p, logq = target_logits.softmax(1), logits.log_softmax(1)
        return (p * (p.log() - logq)).sum(1).mean()

    tau = 0.07
    want = kl_rows(vt @ tt.T / tau, vs @ ts.T / tau) + kl_rows(tt @ vt.T / tau, ts @ vs.T / tau)
    crd = get_term("crd").fn
    assert crd(f, temperature=tau, directions="sum").item() == pytest.approx(want.item(), rel=1e-10)
    assert crd(f, temperature=tau).item() == pytest.approx(want.item() / 2, rel=1e-10)
    with pytest.raises(ValueError, match="directions must be 'mean'.*or 'sum'"):
        crd(f, temperature=tau, directions="max")


# --- the improved variants ------------------------------------------------------------------------

@pytest.mark.parametrize("name", SEED_RECIPES)
def test_improved_variant_changes_only_the_documented_improvements(name):
    real, improved = recipe_of(name), load_recipe(ROOT / "recipes" / "improved" / f"{name}.yaml")
    assert improved.method == real.method[:-1] + ", improved)" and improved.name == f"{name}_improved"
    # AdamW with bf16 mixed precision through the Trainer, fp32 weights, val selection.
    assert improved.optim.preset == "trainer" and improved.precision is None
    assert (improved.select.metric, improved.select.split) == ("r1", "val")
    t = improved.training
    assert (t["optim"], t["bf16"], t["learning_rate"], t["weight_decay"], t["lr_scheduler_type"]) == \
        ("adamw_torch", True, BASE_LR, WEIGHT_DECAY, "cosine")
    assert t["warmup_steps"] == pytest.approx(5 / 60, abs=1e-4)
    # The method itself is the same, except the corrected inter_ts_kl image side in the image stage.
    for (rn, rt, rl), (n, tr, loss) in zip(
            [(s.name, s.trainable, s.loss) for s in real.stages] if real.stages else [(None, "all", real.loss)],
            [(s.name, s.trainable, s.loss) for s in improved.stages] if improved.stages
            else [(None, "all", improved.loss)], strict=True):
        assert (rn, rt, rl.alpha) == (n, tr, loss.alpha)
        added = [c for c in loss.terms if c not in rl.terms]
        assert [c for c in loss.terms if c not in added] == list(rl.terms)
        fixed = name in ("motis_2stage", "ours_3stage") and n == "image"
        assert [(c.key, c.temperature) for c in added] == ([("inter_ts_kl[image]", 0.5)] if fixed else [])
    if name == "ours_from_motis":  # continues from the improved MoTIS run's kept model
        improved_motis = load_recipe(ROOT / "recipes" / "improved" / "motis_2stage.yaml")
        assert improved.student.checkpoint == improved_motis.training["output_dir"]
    else:
        assert improved.student == real.student
    assert improved.teacher == real.teacher and improved.data == real.data
    # The corrected image side is a real signal (the original's was identically zero).
    f = random_features(seed=5)
    assert get_term("inter_ts_kl").fn(f, temperature=0.5, side="image").item() > 1e-3


# --- resume under the original's optimiser ----------------------------------------------------------

class LRRecorder(TrainerCallback):
    """Each group's LR right before every optimizer step, by group kind."""

    def __init__(self):
        self.lrs: dict[int, dict[str, float]] = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.lrs[state.global_step] = {g["kind"]: g["lr"] for g in optimizer.param_groups}


def staged_recipe():
    """The real ours_3stage recipe on micro models: 2 epochs of 2 steps per stage, LR 1e-2."""
    return recipe_of("ours_3stage", "student.arch=micro", "teacher.arch=micro", "data.image_size=[32, 16]",
                     "optim.lr=1.0e-2", *(f"stages.{i}.epochs=2" for i in range(3)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    rec = LRRecorder()
    trainer = fp16_micro_trainer(staged_recipe(), out, [rec])
    trainer.train()
    return out, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, rec.lrs


@pytest.mark.slow
def test_staged_run_uses_the_original_lr_per_epoch_of_each_stage(uninterrupted):
    _, weights, lrs = uninterrupted
    assert sorted(lrs) == list(range(12))
    for step, got in lrs.items():
        e = (step % 4) // 2  # stage-local epoch: 3 stages of 2 epochs of 2 steps
        base = original_lr(e, n=2, base=1e-2)
        assert got == {"base": pytest.approx(base, rel=1e-12), "bias": pytest.approx(2 * base, rel=1e-12)}, step
    assert weights["clip.visual.conv1.weight"].dtype == torch.float16  # trained in fp16 weights
    assert weights["clip.visual.ln_pre.weight"].dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 4, 9])  # mid-epoch in stage 1, a stage boundary, mid-epoch in stage 3
def test_resumed_staged_run_equals_uninterrupted(uninterrupted, stop):
    out, want, _ = uninterrupted
    resumed = fp16_micro_trainer(staged_recipe(), out)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{stop}"))
    got = {n: p.detach() for n, p in resumed.model.named_parameters()}
    worst = max((want[n].float() - got[n].float()).abs().max().item() for n in want)
    assert worst == 0.0, f"resumed at step {stop} differs by {worst}"


# --- select: the kept checkpoint ------------------------------------------------------------------

@pytest.mark.slow
def test_select_keeps_the_best_evaluation_of_the_last_stage(tmp_path):
    """A two-stage run in the original's setup (its optimiser, fp16 weights, test-set selection) on
    micro models: the saved student is the checkpoint of the best test R@1 of the last stage, and
    stages.json and test_results.json say which. The last stage unlearns (ss_itc with weight -1),
    so its first epoch is its best and the kept weights are not the last ones."""
    data = tmp_path / "data"
    make_synth_pedes(data / "SynthPEDES", num_identities=20, images_per_identity=(2, 2), image_size=(32, 16), seed=1)
    out = tmp_path / "run"
    recipe = {
        "name": "select", "seed": 0,
        "data": {"name": "synth_pedes", "root": str(data), "image_size": [32, 16], "context_length": 64,
                 "augment": False},
        "student": {"arch": "micro"}, "teacher": {"arch": "micro"},
        "optim": {"preset": "irra", "lr": 5e-3, "warmup_epochs": 0},
        "precision": "irra_fp16",
        "select": {"metric": "r1", "split": "test"},
        "stages": [
            {"name": "image", "epochs": 1, "trainable": "image", "loss": {"terms": [
                {"name": "motis", "side": "image"}, {"name": "st_itc", "temperature": 0.1}]}},
            {"name": "joint", "epochs": 3, "trainable": "all", "loss": {"terms": [
                {"name": "ss_itc", "temperature": 0.1, "weight": -1.0}]}},
        ],
        "training": {"output_dir": str(out), "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64,
                     "max_grad_norm": 0, "eval_strategy": "epoch", "save_strategy": "epoch", "logging_steps": 1,
                     "report_to": "none", "disable_tqdm": True, "use_cpu": True, "dataloader_num_workers": 0},
    }
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump(recipe))
    metrics = run(load_recipe(path))

    state = json.loads((out / "trainer_state.json").read_text())
    layout = json.loads((out / "stages.json").read_text())
    evals = [h for h in state["log_history"] if "eval_r1" in h]
    last = [h for h in evals if h["eval_stage"] == 2]
    assert len(evals) == 4 and len(last) == 3
    best = max(last, key=lambda h: h["eval_r1"])  # the first of equals: a later tie does not replace it
    assert best["step"] != last[-1]["step"], "the scenario needs a best epoch before the last one"
    per_epoch = layout["steps_per_epoch"]
    want = {"metric": "r1", "split": "test", "epoch": (best["step"] - per_epoch) / per_epoch,
            "value": best["eval_r1"], "step": best["step"], "stage": "joint"}
    results = json.loads((out / "test_results.json").read_text())
    assert layout["selected"] == want and results["selected"] == want
    # The saved student is the kept checkpoint's weights, not the last ones.
    saved = load_file(out / "model.safetensors")
    kept = load_file(out / f"checkpoint-{best['step']}" / "model.safetensors")
    final = load_file(out / f"checkpoint-{last[-1]['step']}" / "model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    assert any(not torch.equal(saved[k], final[k]) for k in saved)
    # Tested after training, the kept student scores what it scored when it was kept (same split).
    assert metrics["test_r1"] == pytest.approx(best["eval_r1"], abs=1e-9)
    # Trained and saved in the original's fp16 weights, by name.
    assert {k for k, v in saved.items() if v.dtype == torch.float16} == {k for k in saved if FP16_NAME.search(k)}
    assert {k for k, v in saved.items() if v.dtype == torch.float32} == {k for k in saved if FP32_NAME.search(k)}

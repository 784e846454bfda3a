"""Feature mimic: taps by module name, attention/value relations, losses, UP configs, engine."""

from __future__ import annotations

import copy
import gc
from collections import OrderedDict
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from torch import nn

from kd_trainer.distill.mimic import MimicEngine, MimicHead, plan_adapter
from kd_trainer.losses.mimic import (
    MIMIC_LOSSES,
    UnknownMimicLossError,
    available_mimic_losses,
    build_loss,
    ce,
    cosine,
    kd,
    kl,
    kld,
    l1,
    l2,
    smooth_l1,
)
from kd_trainer.losses.registry import UnknownTermError
from kd_trainer.models.attention import attention_maps, value_relations
from kd_trainer.models.factory import create_model, get_architecture
from kd_trainer.models.layer_maps import layer_map, mapped_names, num_children
from kd_trainer.models.taps import Tap, parse_tap_name, resolve_names
from kd_trainer.recipe import RecipeError, parse_recipe
from kd_trainer.recipe.mimic import MimicConfig, MimicJob, parse_mimic_config
from kd_trainer.recipe.schedules import Clock, Warmup

CTX = 16  # short captions keep text attention maps tiny


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spin-waiting makes these tests ~10x slower; restored afterwards for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def resnets():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval(), torchvision.models.resnet50(weights=None).eval()


@pytest.fixture(scope="module")
def clip_pair():
    torch.manual_seed(0)
    student = create_model("micro", context_length=CTX)
    arch = get_architecture("micro")
    arch["vision_cfg"]["width"] = 64  # 4 heads of 16
    arch["text_cfg"].update(width=64, heads=4)
    teacher = create_model(arch, context_length=CTX)
    return student, teacher


def convnet(width: int, seed: int = 0) -> nn.Sequential:
    """A two-stage conv net with ResNet-like names, for engine tests that need no real backbone."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, width, 3, padding=1), act=nn.ReLU(),
        layer3=nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(2 * width, 5)))


def up_to_layer3(r: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))))


def parse_mimic(raw):
    """The jobs of a ``mimic:`` block (a recipe keeps the whole parsed MimicConfig)."""
    return parse_mimic_config(raw).jobs


def warmup_weight(loss_weight: float, warm_up_iters: int, step: int) -> float:
    """A job's weight at global ``step``, computed through the job's own schedule."""
    job = MimicJob(loss={"type": "l2"}, teachers={"t": ["a"]}, student=["b"], loss_weight=loss_weight,
                   warm_up_iters=warm_up_iters)
    return job.weight(step)


def clip_batch(b: int = 2):
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(b, 3, 32, 16, generator=g),
            "input_ids": torch.randint(1, 400, (b, CTX), generator=g)}


# --------------------------------------------------------------------------- taps


def test_tap_captures_resnet_layer3_exactly_and_forgets_it(resnets):
    r18, _ = resnets
    x = torch.randn(2, 3, 32, 32)
    with Tap(r18, ["layer3", "layer1.0.conv1"]) as tap, torch.no_grad():
        with tap.capture() as feats:
            r18(x)
            got = feats["layer3"].clone()
            assert set(feats) == {"layer3", "layer1.0.conv1"}
        assert feats == {} and tap.pop() == {}
        r18(x)  # outside a capture the hooks store nothing
        assert tap.pop() == {}
        h = r18.maxpool(r18.relu(r18.bn1(r18.conv1(x))))
        manual = r18.layer3(r18.layer2(r18.layer1(h)))
    assert got.shape == (2, 256, 2, 2)
    torch.testing.assert_close(got, manual)
    assert not r18.layer3._forward_hooks  # remove() took the hooks off


def test_tap_captures_clip_blocks_of_both_towers(clip_pair):
    m, _ = clip_pair
    batch = clip_batch()
    names = ["clip.visual.transformer.resblocks.0", "clip.transformer.resblocks.0"]
    with Tap(m, names) as tap, torch.no_grad():
        with tap.capture() as feats:
            m(**batch)
            vis, txt = feats[names[0]], feats[names[1]]
        clip = m.clip  # the hooks store nothing outside a capture, so run the blocks by hand here
        manual_vis = clip.visual.transformer.resblocks[0](clip.visual._embeds(batch["pixel_values"]))
        x = clip.token_embedding(batch["input_ids"]) + clip.positional_embedding
        manual_txt = clip.transformer.resblocks[0](x, attn_mask=clip.attn_mask)
    torch.testing.assert_close(vis, manual_vis)
    torch.testing.assert_close(txt, manual_txt)
    assert vis.shape == (2, 1 + 4 * 2, 32) and txt.shape == (2, CTX, 32)


def test_unknown_names_list_close_ones_and_wrapper_prefixes_resolve(resnets):
    r18, _ = resnets
    with pytest.raises(ValueError, match=r"'layer3'.*Top-level modules: conv1"):
        Tap(r18, ["layer33"])
    with pytest.raises(ValueError, match="layer4.1.conv2"):
        resolve_names(r18, ["layer4.1.conv22"])
    wrapped = nn.Module()
    wrapped.module = r18  # what DDP looks like from the outside
    assert resolve_names(wrapped, ["layer3", ""]) == {"layer3": "module.layer3", "": ""}


def test_tuple_outputs_take_element_zero_unless_indexed():
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, x * 10

    m = nn.Sequential()
    m.add_module("pair", Pair())
    x = torch.ones(2, 3)
    with Tap(m, ["pair", "pair:1"]) as tap, tap.capture() as feats:
        m.pair(x)
        torch.testing.assert_close(feats["pair"], x + 1)
        torch.testing.assert_close(feats["pair:1"], x * 10)
    assert parse_tap_name("a.b@value:4").heads == 4
    with pytest.raises(ValueError, match="unknown kind"):
        parse_tap_name("a@keys")


def _reference_attention(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return block.attn(x, x, x, need_weights=True, average_attn_weights=False, attn_mask=mask)[1]


def test_attention_maps_match_multihead_attention_with_weights(clip_pair):
    _, m = clip_pair  # 4 heads per tower
    batch = clip_batch()
    clip = m.clip
    names = ["clip.transformer.resblocks.0@attn", "clip.visual.transformer.resblocks.0.attn@attn"]
    with Tap(m, names) as tap, torch.no_grad():
        with tap.capture() as feats:
            m(**batch)
            got_txt, got_vis = feats[names[0]], feats[names[1]]
        text_block, vis_block = clip.transformer.resblocks[0], clip.visual.transformer.resblocks[0]
        x_txt = text_block.ln_1(clip.token_embedding(batch["input_ids"]) + clip.positional_embedding)
        x_vis = vis_block.ln_1(clip.visual._embeds(batch["pixel_values"]))
        ref_txt = _reference_attention(text_block, x_txt, clip.attn_mask)
        ref_vis = _reference_attention(vis_block, x_vis, None)
        torch.testing.assert_close(got_txt, ref_txt)
        torch.testing.assert_close(got_vis, ref_vis)
        assert got_txt.shape == (2, 4, CTX, CTX)
        assert torch.all(got_txt.triu(1) == 0)  # causal: no weight on later tokens
    # seq-first layout, per-head 3-D additive masks with key padding, and boolean masks: as PyTorch
    mha = nn.MultiheadAttention(8, 2, batch_first=False)
    q = torch.randn(5, 3, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[:, -1] = True
    mask3, pad_add = torch.randn(3 * 2, 5, 5), torch.zeros(3, 5).masked_fill(pad, float("-inf"))
    want = mha(q, q, q, attn_mask=mask3, key_padding_mask=pad_add, need_weights=True, average_attn_weights=False)[1]
    torch.testing.assert_close(attention_maps(mha, q, attn_mask=mask3, key_padding_mask=pad_add), want)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    want = mha(q, q, q, attn_mask=causal, key_padding_mask=pad, need_weights=True, average_attn_weights=False)[1]
    torch.testing.assert_close(attention_maps(mha, q, is_causal=True, key_padding_mask=pad), want)


def test_capture_survives_gradient_checkpointing(clip_pair):
    """open_clip re-runs checkpointed blocks during backward; hooks outside a capture ignore that."""
    student = copy.deepcopy(clip_pair[0]).train()
    student.clip.set_grad_checkpointing(True)
    names = ["clip.transformer.resblocks.0", "clip.transformer.resblocks.0@attn"]
    with Tap(student, names) as tap:
        with tap.capture() as feats:
            student(input_ids=clip_batch()["input_ids"])
            loss = feats[names[0]].pow(2).mean() + feats[names[1]].pow(2).mean()
        loss.backward()
        assert tap.pop() == {}
    assert student.clip.transformer.resblocks[0].attn.in_proj_weight.grad is not None


def test_value_relations_equal_attention_whose_queries_and_keys_are_the_values(clip_pair):
    _, m = clip_pair
    block = m.clip.visual.transformer.resblocks[0]
    x = torch.randn(2, 9, 64)
    e = block.attn.embed_dim
    twin = copy.deepcopy(block.attn)
    with torch.no_grad():  # q = k = v projection: attention(x) is then softmax(V V^T / sqrt(d))
        w_v, b_v = twin.in_proj_weight[2 * e :].clone(), twin.in_proj_bias[2 * e :].clone()
        twin.in_proj_weight.copy_(w_v.repeat(3, 1))
        twin.in_proj_bias.copy_(b_v.repeat(3))
        want = twin(x, x, x, need_weights=True, average_attn_weights=False)[1]
        torch.testing.assert_close(value_relations(block.attn, x), want)
        # MiniLM-v2 relation heads: 2 heads of width 32, by hand
        v = F.linear(x, w_v, b_v).reshape(2, 9, 2, 32).permute(0, 2, 1, 3)
        by_hand = torch.softmax(torch.einsum("bhid,bhjd->bhij", v, v) / math.sqrt(32), dim=-1)
        torch.testing.assert_close(value_relations(block.attn, x, heads=2), by_hand)


def test_layer_maps():
    assert layer_map(4, 12, "last") == [(3, 11)]
    assert layer_map(4, 12, "uniform") == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert layer_map(3, 3, "uniform") == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError, match="multiple"):
        layer_map(4, 10, "uniform")
    assert layer_map(2, 6, [1, -1]) == [(0, 1)]  # -1 skips a student layer
    assert layer_map(2, 6, [(1, -1)]) == [(1, 5)]
    with pytest.raises(ValueError, match="out of range"):
        layer_map(2, 6, [(0, 6)])
    s, t = mapped_names("s.{}@attn", "t.{}@attn", 2, 4, "uniform")
    assert (s, t) == (["s.0@attn", "s.1@attn"], ["t.1@attn", "t.3@attn"])


# --------------------------------------------------------------------------- losses

S = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
T = torch.tensor([[2.0, 0.0], [0.0, 1.0]])


def test_regression_losses_by_hand():
    # (s - t)^2 = [1, 4, 9, 9] -> sum 23
    assert l2(S, T).item() == pytest.approx(23 / 4)
    assert l2(S, T, batch_mean=True).item() == pytest.approx(23 / 2)
    s_unit = [[1 / math.sqrt(5), 2 / math.sqrt(5)], [3 / 5, 4 / 5]]
    t_unit = [[1.0, 0.0], [0.0, 1.0]]
    sq = sum((a - b) ** 2 for rs, rt in zip(s_unit, t_unit) for a, b in zip(rs, rt))
    assert l2(S, T, normalize=True, batch_mean=True).item() == pytest.approx(sq / 2)
    assert build_loss("l2_loss")(S, T).item() == pytest.approx(sq / 2)  # UP's base-mimic defaults
    assert build_loss("l2_loss", {"feat_norm": False, "batch_mean": False})(S, T).item() == pytest.approx(23 / 4)
    assert l1(S, T).item() == pytest.approx((1 + 2 + 3 + 3) / 4)
    t2 = torch.tensor([[1.5, 0.0], [0.0, 1.0]])  # |d| = 0.5 (< beta), 2, 3, 3
    assert smooth_l1(S, t2).item() == pytest.approx((0.5 * 0.25 + 1.5 + 2.5 + 2.5) / 4)
    # cos = 0 and 1 -> mean(1 - cos) = 0.5
    cos_loss = cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]]))
    assert cos_loss.item() == pytest.approx(0.5)
    # feature maps: cosine over channels (dim 1) at each pixel
    a, b = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    want = 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert cosine(a, b).item() == pytest.approx(want.mean().item(), rel=1e-5)


def test_distribution_losses_by_hand_and_by_second_formulation():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    hand = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl(s, t).item() == pytest.approx(hand)
    assert kd(s, t).item() == pytest.approx(hand)
    # relu: negative student logits become 0, as UP's kl_loss; kl_loss defaults to it, kl does not
    neg = torch.tensor([[-1.0, -2.0]])
    assert kl(neg, t, relu=True).item() == pytest.approx(hand)
    assert build_loss("kl_loss")(neg, t).item() == pytest.approx(hand)
    assert build_loss("kl")(neg, t).item() != pytest.approx(hand)
    # Hinton KD with T: T^2 * batchmean KL, against F.kl_div
    z_s, z_t, temp = torch.randn(4, 5), torch.randn(4, 5), 2.0
    ref = F.kl_div(F.log_softmax(z_s / temp, 1), F.softmax(z_t / temp, 1), reduction="batchmean") * temp**2
    assert kd(z_s, z_t, temperature=temp).item() == pytest.approx(ref.item(), rel=1e-5)
    assert build_loss("kd_loss", {"T": temp})(z_s, z_t).item() == pytest.approx(ref.item(), rel=1e-5)
    # soft CE = KL + teacher entropy
    p_t = F.softmax(z_t, 1)
    entropy = -(p_t * p_t.log()).sum(1).mean()
    assert ce(z_s, z_t).item() == pytest.approx((kd(z_s, z_t) + entropy).item(), rel=1e-5)
    # feature maps: softmax over channels, batchmean = divide the sum by N
    m_s, m_t = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 3)  # noqa: E731
    ref = F.kl_div(F.log_softmax(flat(m_s), 1), F.softmax(flat(m_t), 1), reduction="sum") / 2
    assert kl(m_s, m_t).item() == pytest.approx(ref.item(), rel=1e-5)
    # kld takes probabilities; masked zeros contribute nothing
    ps, pt = torch.tensor([[[0.5, 0.5, 0.0]]]), torch.tensor([[[0.25, 0.75, 0.0]]])
    assert kld(ps, pt).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))


def test_unknown_losses_and_kwargs_are_explained():
    with pytest.raises(ValueError, match=r"Did you mean 'l2_loss'.*Valid: .*ce_loss"):
        build_loss("l2_los")
    with pytest.raises(ValueError, match="unknown kwargs"):
        build_loss("kd", {"tau": 2})
    assert {"l2", "l1", "smooth_l1", "cosine", "kl", "kd", "ce", "kld", "l2_loss", "kl_loss", "kd_loss",
            "ce_loss"} <= set(available_mimic_losses())
    assert build_loss("kd_loss", {"T": 2, "loss_weight": 3.0}).scale == 3.0


# --------------------------------------------------------------------------- config

SINGLE = """
mimic:
  mimic_ins_type: base
  loss_weight: 2.0
  warm_up_iters: 100
  cfgs:
    loss:
      type: kl_loss
      kwargs:
        loss_weight: 1.0
  teacher0:
    teacher_weight: /ckpt/teacher0.pth
    mimic_name: [layer3, layer4]
  student:
    mimic_name: [layer3, layer4]
"""

JOBS = """
mimic:
  mimic_as_jobs: True
  mimic_job0:
    loss_weight: 1.0
    warm_up_iters: -1
    cfgs:
      loss:
        type: l2_loss
        kwargs:
          feat_norm: false
    teacher0:
      mimic_name: [layer3]
    student:
      mimic_name: [layer3]
  mimic_job1:
    mimic_ins_type: base
    loss_weight: 0.5
    warm_up_iters: 10
    cfgs:
      loss:
        type: kd_loss
        kwargs: {T: 4}
    teacher1:
      teacher_weight: /ckpt/t1.pth
      mimic_name: [fc]
    teacher2:
      mimic_name: [fc]
    student:
      mimic_name: [fc]
"""


def test_both_seed_shapes_parse_into_jobs():
    (job,) = parse_mimic(yaml.safe_load(SINGLE))
    assert job == MimicJob(name="mimic_job0", loss={"type": "kl_loss", "kwargs": {"loss_weight": 1.0}},
                           loss_weight=2.0, warm_up_iters=100, teachers={"teacher0": ["layer3", "layer4"]},
                           student=["layer3", "layer4"], teacher_checkpoints={"teacher0": "/ckpt/teacher0.pth"})
    assert job.loss.name == "kl"
    j0, j1 = parse_mimic(yaml.safe_load(JOBS))
    assert (j0.name, j0.loss.type, j0.loss.kwargs, j0.teachers, j0.student) == (
        "mimic_job0", "l2_loss", {"feat_norm": False}, {"teacher0": ["layer3"]}, ["layer3"])
    assert (j1.name, j1.loss.name, j1.loss_weight, j1.warm_up_iters) == ("mimic_job1", "kd", 0.5, 10)
    assert j1.teachers == {"teacher1": ["fc"], "teacher2": ["fc"]}
    assert j1.teacher_checkpoints == {"teacher1": "/ckpt/t1.pth"}
    assert parse_mimic_config({"task_loss": False, **yaml.safe_load(SINGLE)["mimic"]}).task_loss is False
    # our own shape: a list of jobs
    (native,) = parse_mimic([{"loss": {"type": "cosine"}, "teachers": {"t": ["a"]}, "student": ["b"]}])
    assert native.name == "mimic_job0" and native.reduce == "sum" and native.adapter == "auto"


def test_config_errors_name_the_key():
    raw = yaml.safe_load(JOBS)
    raw["mimic"]["mimic_job1"]["teacher2"]["mimic_name"] = ["fc", "avgpool"]
    with pytest.raises(ValueError, match=r"mimic\.mimic_job1\.teacher2\.mimic_name has 2 names"):
        parse_mimic(raw)
    raw = yaml.safe_load(JOBS)
    raw["mimic"]["mimic_job0"]["cfgs"]["loss"]["type"] = "l3_loss"
    with pytest.raises(ValueError, match=r"mimic\.mimic_job0\.cfgs\.loss: unknown mimic loss 'l3_loss'.*Valid"):
        parse_mimic(raw)
    raw = yaml.safe_load(JOBS)
    raw["mimic"]["job2"] = {}
    with pytest.raises(ValueError, match=r"mimic\.job2: .*mimic_job<N>"):
        parse_mimic(raw)
    raw = yaml.safe_load(SINGLE)
    raw["mimic"]["warm_up_iter"] = 5
    with pytest.raises(ValueError, match=r"mimic\.warm_up_iter: unknown key"):
        parse_mimic(raw)
    raw = yaml.safe_load(SINGLE)
    raw["mimic"]["loss_weight"] = "heavy"
    with pytest.raises(ValueError, match=r"mimic\.loss_weight"):
        parse_mimic(raw)
    with pytest.raises(ValueError, match=r"needs a 'student' key"):
        parse_mimic({"teacher0": {"mimic_name": ["a"]}})


def test_mimic_losses_are_one_table_with_the_registry_error():
    assert set(MIMIC_LOSSES) == {"l2", "l1", "smooth_l1", "cosine", "kl", "kd", "ce", "kld"}  # our names only
    assert MIMIC_LOSSES["kd"].fn is kd and MIMIC_LOSSES["l2"].aliases["l2_loss"] == {"normalize": True,
                                                                                     "batch_mean": True}
    with pytest.raises(TypeError):
        MIMIC_LOSSES["mine"] = MIMIC_LOSSES["l2"]  # read-only, as losses.TERMS
    with pytest.raises(UnknownMimicLossError) as info:
        build_loss("kd_los")
    # one except clause catches an unknown name from either table, as a lookup or as bad config
    assert isinstance(info.value, UnknownTermError) and isinstance(info.value, KeyError)
    assert isinstance(info.value, ValueError) and "Did you mean 'kd_loss'?" in str(info.value)


def test_job_weight_is_the_recipes_warmup_schedule():
    job = MimicJob(loss={"type": "l2"}, teachers={"t": ["a"]}, student=["b"], loss_weight=3.0, warm_up_iters=4)
    assert job.weight_schedule == Warmup(value=3.0, steps=4, clock="run")
    # the run's step, not the stage's: a job keeps ramping across stages and resumes
    clock = Clock(step=2, stage_step=0)
    assert job.weight_schedule(clock) == job.weight(2) == 3.0 * 2 / 4
    assert [job.weight(s) for s in range(6)] == [0.0, 0.75, 1.5, 2.25, 3.0, 3.0]
    flat = job.model_copy(update={"warm_up_iters": -1})
    assert [flat.weight(s) for s in (0, 1, 100)] == [3.0, 3.0, 3.0]


def test_config_refuses_two_jobs_of_one_name_and_two_checkpoints_for_one_teacher():
    job = MimicJob(name="same", loss={"type": "l2"}, teachers={"t": ["a"]}, student=["b"])
    with pytest.raises(ValueError, match=r"mimic: job name 'same' appears twice"):
        MimicConfig.from_jobs([job, job])
    raw = yaml.safe_load(JOBS)
    raw["mimic"]["mimic_job0"]["teacher1"] = {"mimic_name": ["layer3"], "teacher_weight": "/ckpt/other.pth"}
    with pytest.raises(ValueError, match=r"mimic_job1\.teacher1\.teacher_weight '/ckpt/t1.pth' differs from "
                                         r"'/ckpt/other.pth' given in mimic_job0"):
        parse_mimic_config(raw)
    with pytest.raises(ValueError, match="part of the log keys"):
        MimicJob(name="a/b", loss={"type": "l2"}, teachers={"t": ["a"]}, student=["b"])


def shapes_recipe(mimic, **teachers) -> dict:
    """A classification recipe around a ``mimic:`` block (nothing is built or trained)."""
    return {"name": "m", "task": "classification",
            "data": {"name": "synth_shapes", "shapes": {"num_classes": 4}},
            "student": {"arch": "resnet18"},
            "teachers": {name: {"arch": "resnet34", **cfg} for name, cfg in teachers.items()},
            "mimic": mimic}


def test_recipe_takes_every_mimic_shape_typed_once_and_saved_form_reloads():
    native = [{"loss": {"type": "kd_loss", "kwargs": {"T": 2}}, "teachers": {"teacher0": ["net.fc"]},
               "student": ["net.fc"]},
              {"name": "stage3", "loss": {"type": "l2"}, "warm_up_iters": 5, "teachers": {"teacher0": ["net.layer3"]},
               "student": ["net.layer3"]}]
    up = yaml.safe_load(SINGLE)["mimic"]
    for shape in (native, up, {"jobs": native, "task_loss": False}):
        recipe = parse_recipe(shapes_recipe(shape, teacher0={}))
        assert isinstance(recipe.mimic, MimicConfig)
        assert recipe.mimic == parse_mimic_config(shape)
        # what a run saves beside its weights reads back to the same config
        saved = recipe.model_dump(mode="json")
        assert parse_recipe(saved).mimic == recipe.mimic
    assert [j.name for j in parse_recipe(shapes_recipe(native, teacher0={})).mimic.jobs] == ["mimic_job0", "stage3"]
    assert parse_recipe(shapes_recipe({"jobs": native, "task_loss": False}, teacher0={})).mimic.task_loss is False
    with pytest.raises(RecipeError, match=r"mimic\.1\.loss"):
        parse_recipe(shapes_recipe([native[0], {**native[1], "loss": {"type": "l3"}}], teacher0={}))
    with pytest.raises(RecipeError, match=r"mimic jobs name teachers \['teacher0'\]"):
        parse_recipe(shapes_recipe(native, teacher1={}))


def test_up_teacher_weight_is_the_teachers_checkpoint():
    """Seed 002: ``teacher_weight: xxx  # path of teacher model``. It loads that teacher (the
    recipe's checkpoint, the one field the run loads teachers from); it is not a loss factor."""
    up = yaml.safe_load(SINGLE)["mimic"]  # teacher0.teacher_weight: /ckpt/teacher0.pth
    recipe = parse_recipe(shapes_recipe(up, teacher0={}))
    assert recipe.teachers["teacher0"].checkpoint == "/ckpt/teacher0.pth"
    assert parse_recipe(shapes_recipe(up, teacher0={"checkpoint": "/ckpt/teacher0.pth"})).teachers[
        "teacher0"].checkpoint == "/ckpt/teacher0.pth"
    with pytest.raises(RecipeError, match=r"teacher 'teacher0': mimic teacher_weight '/ckpt/teacher0.pth' and the "
                                          r"recipe's checkpoint '/elsewhere.pth' differ"):
        parse_recipe(shapes_recipe(up, teacher0={"checkpoint": "/elsewhere.pth"}))
    without = {**up, "teacher0": {"mimic_name": up["teacher0"]["mimic_name"]}}
    assert parse_recipe(shapes_recipe(without, teacher0={})).teachers["teacher0"].checkpoint is None
    with pytest.raises(RecipeError, match=r"mimic\.teacher0\.teacher_weight is the path of the teacher's checkpoint"):
        parse_recipe(shapes_recipe({**up, "teacher0": {**up["teacher0"], "teacher_weight": 0.5}}, teacher0={}))


# --------------------------------------------------------------------------- adapters and engine


def test_conv1x1_adapter_bridges_resnet18_to_resnet50_and_only_student_side_learns(resnets):
    r18, r50 = resnets
    student = copy.deepcopy(r18).train()
    job = MimicJob(loss={"type": "l2"}, teachers={"teacher0": ["layer3"]}, student=["layer3"])
    engine = MimicEngine(student, {"teacher0": r50}, [job])
    x = torch.randn(2, 3, 32, 32)
    teacher_forward = lambda name, t: up_to_layer3(t, x)  # noqa: E731  (layer4 is not needed)
    bn_before = student.bn1.running_mean.clone()
    assert engine.build_adapters(x, teacher_forward=teacher_forward) == ["mimic_job0__teacher0__0"]
    torch.testing.assert_close(student.bn1.running_mean, bn_before)  # dry run left BN statistics alone
    assert isinstance(engine.head, MimicHead) and MimicHead.key("job.a", "t", 0) == "job_a__t__0"
    adapter = engine.head.adapters["mimic_job0__teacher0__0"]
    assert isinstance(adapter, nn.Conv2d) and (adapter.in_channels, adapter.out_channels, adapter.kernel_size) == (
        256, 1024, (1, 1))
    assert engine.head.training_only_keys("mimic_head.") == [
        "mimic_head.adapters.mimic_job0__teacher0__0.weight", "mimic_head.adapters.mimic_job0__teacher0__0.bias"]
    student.mimic_head = engine.head  # the integrator's move: trained and saved with the student
    step = engine.run(x, step=5, student_forward=lambda s: up_to_layer3(s, x), teacher_forward=teacher_forward)
    step.losses["mimic/total"].backward()
    assert student.layer3[0].conv1.weight.grad is not None and adapter.weight.grad is not None
    assert student.layer4[0].conv1.weight.grad is None  # beyond the tapped layer: untouched
    assert all(p.grad is None and not p.requires_grad for p in r50.parameters())
    assert not r50.training
    assert step.output.shape == (2, 256, 2, 2)
    engine.remove()


def test_linear_adapter_for_tokens_and_relation_maps_on_clip(clip_pair):
    student, teacher = clip_pair
    student = copy.deepcopy(student)
    jobs = parse_mimic([
        {"name": "hidden", "loss": {"type": "cosine"}, "teachers": {"t": ["clip.transformer.resblocks.0"]},
         "student": ["clip.transformer.resblocks.0"]},
        {"name": "relations", "loss": {"type": "kld"},
         "teachers": {"t": ["clip.transformer.resblocks.0@value:2", "clip.visual.transformer.resblocks.0@attn"]},
         "student": ["clip.transformer.resblocks.0@value:2", "clip.visual.transformer.resblocks.0@attn"]},
    ])
    engine = MimicEngine(student, {"t": teacher}, jobs[:1])
    assert engine.build_adapters(clip_batch()) == ["hidden__t__0"]
    lin = engine.head.adapters["hidden__t__0"]
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (32, 64)
    logs = engine.run(clip_batch(), step=0).losses
    assert set(logs) == {"mimic/hidden/t/cosine", "mimic/hidden/weighted", "mimic/total"}
    engine.remove()
    # relation maps are compared as they are: equal relation heads work, unequal attention heads do not
    engine = MimicEngine(student, {"t": teacher}, [jobs[1].model_copy(update={
        "teachers": {"t": jobs[1].teachers["t"][:1]}, "student": jobs[1].student[:1]})])
    logs = engine.run(clip_batch(), step=0).losses
    assert logs["mimic/relations/t/kld"].item() > 0
    engine.remove()
    engine = MimicEngine(student, {"t": teacher}, [jobs[1]])
    with pytest.raises(ValueError, match=r"@value:H"):
        engine.run(clip_batch(), step=0)
    engine.remove()


def test_adapter_none_mismatch_names_job_teacher_modules_and_shapes():
    job = MimicJob(name="feat", loss={"type": "l2"}, teachers={"big": ["layer3"]}, student=["stem"], adapter="none")
    engine = MimicEngine(convnet(4), {"big": convnet(8)}, [job])
    pattern = (r"mimic job 'feat', teacher 'big': student feature 'stem' \(2, 4, 8, 8\) vs teacher feature "
               r"'layer3' \(2, 16, 4, 4\)")
    with pytest.raises(ValueError, match=pattern):
        engine.build_adapters(torch.randn(2, 3, 8, 8))
    engine.remove()
    with pytest.raises(ValueError, match="spatial"):
        plan_adapter("auto", (2, 128, 4, 4), (2, 1024, 2, 2))
    assert plan_adapter("auto", (2, 7, 32), (2, 7, 64)) == ("linear", 32, 64)
    assert plan_adapter("auto", (2, 7, 32), (2, 7, 32)) is None
    assert plan_adapter("linear", (2, 32), (2, 32)) == ("linear", 32, 32)  # explicit: always a regressor


def test_lazy_adapters_warn_and_a_locked_head_refuses():
    job = MimicJob(loss={"type": "l2"}, teachers={"teacher0": ["layer3"]}, student=["layer3"])
    x = torch.randn(2, 3, 8, 8)
    engine = MimicEngine(convnet(4), {"teacher0": convnet(8)}, [job])
    engine.head.lock()
    with pytest.raises(RuntimeError, match="locked"):
        engine.run(x, step=0)
    engine.head.locked = False
    with pytest.warns(UserWarning, match="built lazily"):
        engine.run(x, step=0)
    assert isinstance(engine.head.adapters["mimic_job0__teacher0__0"], nn.Conv2d)
    engine.remove()


def test_warm_up_ramp_and_teacher_reduction():
    w = 8
    assert [warmup_weight(2.0, w, s) for s in (0, w // 2, w, 2 * w)] == [0.0, 1.0, 2.0, 2.0]
    assert warmup_weight(2.0, -1, 0) == warmup_weight(2.0, 0, 0) == 2.0
    jobs = parse_mimic(yaml.safe_load(f"""
mimic_as_jobs: True
mimic_job0:
  loss_weight: 2.0
  warm_up_iters: {w}
  cfgs: {{loss: {{type: mse, kwargs: {{loss_weight: 0.5}}}}}}
  teacherA: {{mimic_name: [fc]}}
  teacherB: {{mimic_name: [fc]}}
  student: {{mimic_name: [fc]}}
  reduce: mean
"""))
    engine = MimicEngine(convnet(4), {"teacherA": convnet(8, seed=1), "teacherB": convnet(8, seed=2)}, jobs)
    x = torch.randn(2, 3, 8, 8)
    for step, factor in ((0, 0.0), (w // 2, 0.5), (w, 1.0), (2 * w, 1.0)):
        logs = engine.run(x, step=step).losses
        a, b = logs["mimic/mimic_job0/teacherA/l2"], logs["mimic/mimic_job0/teacherB/l2"]
        assert engine.weight("mimic_job0", step) == pytest.approx(2.0 * 0.5 * factor)
        torch.testing.assert_close(logs["mimic/mimic_job0/weighted"], (a + b) / 2 * 2.0 * 0.5 * factor)
        torch.testing.assert_close(logs["mimic/total"], logs["mimic/mimic_job0/weighted"])
    assert engine.log_keys() == ["mimic/mimic_job0/teacherA/l2", "mimic/mimic_job0/teacherB/l2",
                                 "mimic/mimic_job0/weighted", "mimic/total"]
    engine.remove()


def test_no_feature_outlives_the_step_and_missing_features_are_explained():
    student, teacher = convnet(4), convnet(8)
    job = MimicJob(loss={"type": "l2"}, teachers={"teacher0": ["layer3"]}, student=["layer3"])
    engine = MimicEngine(student, {"teacher0": teacher}, [job])
    x = torch.randn(2, 3, 8, 8)
    engine.build_adapters(x)
    refs = []
    with engine.capture() as cap:
        student(x)
        engine.run_teachers(x)
        refs += [weakref.ref(cap.student["layer3"]), weakref.ref(cap.teachers["teacher0"]["layer3"])]
        loss = engine.losses(cap.student, cap.teachers, step=1)["mimic/total"]
    assert cap.student == {} and cap.teachers["teacher0"] == {}
    assert engine.student_tap.pop() == {} and engine.teacher_taps["teacher0"].pop() == {}
    assert refs[1]() is None  # the teacher feature had no graph holding it
    loss.backward()
    del loss
    gc.collect()
    assert refs[0]() is None  # the student feature lived only as long as the loss's graph
    assert student.stem.weight.grad is not None and teacher.stem.weight.grad is None
    with engine.capture() as cap:
        student(x)  # teacher forward forgotten (e.g. cached teacher embeddings)
        with pytest.raises(RuntimeError, match=r"not captured in this step: teacher0 'layer3'"):
            engine.losses(cap.student, cap.teachers, step=1)
    engine.remove()
    assert not student.layer3._forward_hooks and not teacher.layer3._forward_hooks
    assert num_children(student, "") == 6

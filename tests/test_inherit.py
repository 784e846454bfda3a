"""Students born from their teacher: derived architectures and strict weight inheritance.

The teacher is a stand-in for ViT-B/16 with its structure (12 + 12 layers, patch 16, QuickGELU, causal
text) at tiny widths; every expected tensor is sliced by hand here from the teacher's state dict.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from kd_trainer.losses.registry import Features
from kd_trainer.losses.task import itc
from kd_trainer.models.loading.errors import CheckpointError
from kd_trainer.models.derive import ArchitectureError, derive_architecture
from kd_trainer.models.factory import create_model, get_architecture
from kd_trainer.models.inherit import InheritanceError, inherit_weights, plan_inheritance, select_layers

# ViT-B/16's structure at tiny widths: head width 16 (4 vision heads, 3 text heads).
TEACHER = derive_architecture("clip-vit-b16", vision_width=64, vision_heads=4, text_width=48, text_heads=3,
                              embed_dim=32)
TEACHER_SIZE = (64, 32)  # a 4x2 patch grid
ORIGINALS = {"clip-6l": (6, 6), "clip-v6l-t12l": (6, 12), "clip-v12l-t6l": (12, 6)}
VIS, TXT = "clip.visual.transformer.resblocks.", "clip.transformer.resblocks."
CAPTIONS = ["a man in a red coat", "a woman with a blue bag", "a child in green shoes", "a man in black jeans"]


@pytest.fixture(scope="module")
def teacher():
    """Built once: inheritance reads the source and never writes it (checked in the width test)."""
    torch.manual_seed(0)
    return create_model(TEACHER, image_size=TEACHER_SIZE)


def _student(arch, seed: int = 1, **kwargs):
    torch.manual_seed(seed)
    return create_model(arch, **{"image_size": TEACHER_SIZE, **kwargs})


def _embed(model, size=TEACHER_SIZE):
    images = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(7))
    tokens = open_clip.tokenize(CAPTIONS[:3], context_length=model.context_length)
    with torch.no_grad():
        return model.encode_image(images, normalize=False), model.encode_text(tokens, normalize=False)


def _block(sd, prefix, i):
    p = f"{prefix}{i}."
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


# --------------------------------------------------------------------------------------------
# Architectures


def test_the_original_backbones_are_vit_b16_with_fewer_layers():
    b16 = get_architecture("clip-vit-b16")
    for name, (v, t) in ORIGINALS.items():
        cfg = get_architecture(name)
        assert cfg == derive_architecture("clip-vit-b16", vision_layers=v, text_layers=t)
        assert (cfg["vision_cfg"]["width"], cfg["vision_cfg"]["head_width"], cfg["text_cfg"]["width"],
                cfg["embed_dim"], cfg["image_size"]) == (768, 64, 512, 512, [384, 128])
        assert {k: cfg[k] for k in ("quick_gelu", "image_size")} == {k: b16[k] for k in ("quick_gelu", "image_size")}
        with torch.device("meta"):  # shapes only: the full-size models cost nothing to build
            student, teacher = create_model(name), create_model("clip-vit-b16")
        assert len(student.clip.visual.transformer.resblocks) == v
        assert len(student.clip.transformer.resblocks) == t
        assert student.clip.visual.transformer.resblocks[0].attn.num_heads == 12
        report = plan_inheritance(student, teacher)  # the original's rule on the real shapes
        assert report.layers["vision"].selected == tuple(range(v))
        assert report.layers["text"].selected == tuple(range(t))
        assert not report.cut and not report.kept
        assert len(report.unused) == 12 * ((12 - v) + (12 - t))  # 12 tensors per dropped block


def test_derive_changes_only_what_it_is_told_and_keeps_the_head_width():
    base = get_architecture("clip-vit-b16")
    cfg = derive_architecture("clip-vit-b16", vision_width=384, text_width=256, embed_dim=256, vision_layers=4)
    assert cfg["vision_cfg"] == {**base["vision_cfg"], "layers": 4, "width": 384, "head_width": 64}
    assert cfg["text_cfg"] == {**base["text_cfg"], "width": 256, "heads": 4}
    assert cfg["embed_dim"] == 256 and cfg["quick_gelu"] and cfg["image_size"] == [384, 128]
    assert get_architecture("clip-vit-b16") == base  # the named config is untouched
    assert derive_architecture(TEACHER, vision_heads=2)["vision_cfg"]["head_width"] == 32
    assert derive_architecture(TEACHER, text_mlp_ratio=2)["text_cfg"]["mlp_ratio"] == 2.0
    m = _student(derive_architecture(TEACHER, text_width=32, vision_mlp_ratio=2))
    assert m.clip.transformer.resblocks[0].attn.num_heads == 2
    assert m.clip.visual.transformer.resblocks[0].mlp.c_fc.weight.shape == (128, 64)


@pytest.mark.parametrize("kwargs, message", [
    ({"vision_width": 700}, "vision width 700 is not divisible by the head width 64"),
    ({"text_width": 300}, "text width 300 is not divisible by the head width 64"),
    ({"vision_width": 384, "vision_heads": 5}, "not divisible by vision_heads 5"),
    ({"text_layers": 0}, "text_layers must be a positive integer"),
    ({"vision_layers": True}, "vision_layers must be a positive integer"),
    ({"embed_dim": 2.5}, "embed_dim must be a positive integer"),
    ({"vision_mlp_ratio": 1.001}, "choose a ratio"),
])
def test_derive_refuses_what_cannot_be_built(kwargs, message):
    with pytest.raises(ArchitectureError, match=message):
        derive_architecture("clip-vit-b16", **kwargs)


# --------------------------------------------------------------------------------------------
# Depth


def test_layer_selection_rules():
    assert select_layers("first", 12, 6) == [0, 1, 2, 3, 4, 5]
    assert select_layers("uniform", 12, 6) == [0, 2, 4, 6, 8, 10]
    assert select_layers("uniform", 12, 5) == [0, 2, 4, 6, 8]  # k = 12 // 5 = 2, as TinyCLIP
    assert select_layers("uniform", 12, 4) == [0, 3, 6, 9]
    # i * 11 / 5 = 0, 2.2, 4.4, 6.6, 8.8, 11 rounded; i * 11 / 4 = 0, 2.75, 5.5, 8.25, 11 (5.5 rounds up)
    assert select_layers("uniform_last", 12, 6) == [0, 2, 4, 7, 9, 11]
    assert select_layers("uniform_last", 12, 5) == [0, 3, 6, 8, 11]
    assert select_layers("uniform_last", 12, 1) == [11]
    assert select_layers("uniform_last", 12, 12) == list(range(12)) == select_layers("uniform", 12, 12)
    assert select_layers([11, 0, 0], 12, 3) == [11, 0, 0]
    assert select_layers([0, 1, 1, 2], 3, 4) == [0, 1, 1, 2]  # a list may make a deeper student
    with pytest.raises(InheritanceError, match="Did you mean 'uniform'"):
        select_layers("unifrom", 12, 6)
    with pytest.raises(InheritanceError, match="only drops layers"):
        select_layers("first", 6, 12, tower="text")
    with pytest.raises(InheritanceError, match="has 2 entries"):
        select_layers([0, 1], 12, 3)
    with pytest.raises(InheritanceError, match=r"names layers \[12\]"):
        select_layers([0, 12, 3], 12, 3)
    with pytest.raises(InheritanceError, match="a list of integers"):
        select_layers(3, 12, 3)


@pytest.mark.parametrize("layers, vision, text", [
    ("first", [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]),
    ("uniform", [0, 2, 4, 6, 8, 10], [0, 2, 4, 6, 8, 10]),
    ("uniform_last", [0, 2, 4, 7, 9, 11], [0, 2, 4, 7, 9, 11]),
    ({"vision": [1, 3, 5, 7, 9, 11], "text": [11, 10, 2, 3, 0, 0]}, [1, 3, 5, 7, 9, 11], [11, 10, 2, 3, 0, 0]),
    ({"vision": "uniform"}, [0, 2, 4, 6, 8, 10], [0, 1, 2, 3, 4, 5]),  # a tower left out: first
])
def test_a_depth_halved_student_holds_the_chosen_teacher_layers(teacher, layers, vision, text):
    student = _student(derive_architecture(TEACHER, vision_layers=6, text_layers=6))
    report = inherit_weights(student, teacher, layers=layers)
    t, s = teacher.state_dict(), student.state_dict()
    for prefix, chosen in ((VIS, vision), (TXT, text)):
        for i, j in enumerate(chosen):
            got, want = _block(s, prefix, i), _block(t, prefix, j)
            assert got.keys() == want.keys() and len(got) == 12
            for name in got:
                assert torch.equal(got[name], want[name]), (prefix, i, j, name)
    outside = [k for k in s if not k.startswith((VIS, TXT))]
    assert len(outside) == 14  # embeddings, positions, conv1, ln_pre/ln_post/ln_final, projections, scale
    for k in outside:
        assert torch.equal(s[k], t[k]), k
    assert report.layers["vision"].selected == tuple(vision) and report.layers["text"].selected == tuple(text)
    dropped = {f"{VIS}{j}." for j in set(range(12)) - set(vision)} | {f"{TXT}{j}." for j in set(range(12)) - set(text)}
    assert {k for k in report.unused} == {k for k in t if k.startswith(tuple(dropped))}
    assert "source layers dropped" in report.summary()


# --------------------------------------------------------------------------------------------
# Width


def test_same_depth_and_width_gives_bit_identical_embeddings(teacher):
    student = _student(TEACHER)
    before = _embed(student)
    assert not torch.equal(before[0], _embed(teacher)[0])
    report = inherit_weights(student, teacher, layers="uniform")
    for got, want in zip(_embed(student), _embed(teacher)):
        assert torch.equal(got, want)
    assert len(report.tensors) == len(teacher.state_dict()) and not report.cut
    assert not report.unused and not report.kept and not report.notes
    half = _student(TEACHER).half()  # a cast is the one change: values equal in float16
    report = inherit_weights(half, teacher)
    assert report.notes == ["source weights in float32, student in float16: values are cast"]
    assert all(torch.equal(v, teacher.state_dict()[k].half()) for k, v in half.state_dict().items())
    assert "widths: unchanged" in report.summary()


def test_a_width_reduced_student_keeps_the_first_heads_of_q_k_v(teacher):
    # 4 -> 2 vision heads, 3 -> 2 text heads (head width 16), MLP and embedding halved/quartered,
    # a 2x2 grid instead of 4x2 and 32 text positions instead of 77.
    arch = derive_architecture(TEACHER, vision_width=32, text_width=32, embed_dim=16, vision_layers=6)
    student = _student(arch, image_size=(32, 32), context_length=32)
    source_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    report = inherit_weights(student, teacher, layers={"vision": "uniform"})
    t, s = teacher.state_dict(), student.state_dict()
    assert all(torch.equal(t[k], v) for k, v in source_before.items())  # the source is only read

    def heads(w, n_keep, n_all, in_keep=None):  # the first n_keep of n_all heads (width 16) of each of q, k, v
        out = []
        for part in w.chunk(3):  # q, k, v
            kept = part.reshape(n_all, 16, *part.shape[1:])[:n_keep].reshape(n_keep * 16, *part.shape[1:])
            out.append(kept if in_keep is None else kept[:, :in_keep])
        return out

    for prefix, i, j, n_all, mlp in ((VIS, 3, 6, 4, 128), (TXT, 2, 2, 3, 128)):
        src, dst = _block(t, prefix, j), _block(s, prefix, i)
        for got, want in zip(dst["attn.in_proj_weight"].chunk(3), heads(src["attn.in_proj_weight"], 2, n_all, 32)):
            assert torch.equal(got, want)
        for got, want in zip(dst["attn.in_proj_bias"].chunk(3), heads(src["attn.in_proj_bias"], 2, n_all)):
            assert torch.equal(got, want)
        # the output projection reads the kept heads: its first 2 * 16 input columns
        assert torch.equal(dst["attn.out_proj.weight"], src["attn.out_proj.weight"][:32, :32])
        assert torch.equal(dst["mlp.c_fc.weight"], src["mlp.c_fc.weight"][:mlp, :32])
        assert torch.equal(dst["mlp.c_proj.weight"], src["mlp.c_proj.weight"][:32, :mlp])
        for name in ("ln_1.weight", "ln_2.bias", "attn.out_proj.bias", "mlp.c_proj.bias"):
            assert torch.equal(dst[name], src[name][:32])
        assert torch.equal(dst["mlp.c_fc.bias"], src["mlp.c_fc.bias"][:mlp])
    assert torch.equal(s["clip.visual.proj"], t["clip.visual.proj"][:32, :16])
    assert torch.equal(s["clip.text_projection"], t["clip.text_projection"][:32, :16])
    assert torch.equal(s["clip.token_embedding.weight"], t["clip.token_embedding.weight"][:, :32])
    assert torch.equal(s["clip.visual.conv1.weight"], t["clip.visual.conv1.weight"][:32])
    assert torch.equal(s["clip.visual.class_embedding"], t["clip.visual.class_embedding"][:32])
    assert torch.equal(s["clip.positional_embedding"], t["clip.positional_embedding"][:32, :32])
    # the 4x2 visual grid resized to 2x2 by hand, class token kept, then the first 32 channels
    pos = t["clip.visual.positional_embedding"]
    grid = F.interpolate(pos[1:].reshape(1, 4, 2, 64).permute(0, 3, 1, 2), size=(2, 2), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).reshape(4, 64)
    assert torch.allclose(s["clip.visual.positional_embedding"], torch.cat([pos[:1], grid])[:, :32], atol=0, rtol=0)
    assert torch.equal(s["clip.logit_scale"], t["clip.logit_scale"])
    assert report.widths["vision heads"] == (4, 2) and report.widths["text heads"] == (3, 2)
    assert report.widths["embed"] == (32, 16) and report.widths["vision mlp"] == (256, 128)
    summary = report.summary()
    assert "vision width 64 -> 32" in summary and "grid 4x2 -> 2x2" in summary and "positions 77 -> 32" in summary
    assert "q, k, v: first 2 of 4 heads (head width 16)" in report.table()
    images, texts = _embed(student, (32, 32))
    assert images.shape == (3, 16) and texts.shape == (3, 16) and torch.isfinite(images).all()


def test_training_only_projections_keep_their_initialisation_or_are_left_out(teacher):
    student = _student(derive_architecture(TEACHER, embed_dim=16), projection_dim=32)
    proj = {k: v.clone() for k, v in student.state_dict().items() if k.startswith(("image_proj.", "text_proj."))}
    report = inherit_weights(student, teacher)
    assert sorted(report.kept) == sorted(proj)
    for k, v in proj.items():
        assert torch.equal(student.state_dict()[k], v)
    # the other way: a source with projections, a student without
    back = _student(TEACHER, seed=3)
    teacher_with_proj = _student(TEACHER, seed=4, projection_dim=64)
    report = inherit_weights(back, teacher_with_proj)
    assert sorted(report.unused) == ["image_proj.bias", "image_proj.weight", "text_proj.bias", "text_proj.weight"]
    assert all("training-only" in why for why in report.unused.values())
    # and the same projections on both sides are inherited like any other tensor (embed 32 -> 16 columns)
    narrow = _student(derive_architecture(TEACHER, embed_dim=16), seed=5, projection_dim=64)
    report = inherit_weights(narrow, teacher_with_proj)
    assert not report.kept
    got, src = narrow.state_dict(), teacher_with_proj.state_dict()
    assert torch.equal(got["image_proj.weight"], src["image_proj.weight"][:, :16])
    assert torch.equal(got["text_proj.bias"], src["text_proj.bias"])


# --------------------------------------------------------------------------------------------
# Strictness


def _patch8(arch):
    cfg = derive_architecture(arch)
    cfg["vision_cfg"]["patch_size"] = 8
    return cfg


def _layer_scale(arch):
    cfg = derive_architecture(arch)
    cfg["vision_cfg"]["ls_init_value"] = 0.1
    return cfg


def _gelu(arch):
    cfg = derive_architecture(arch)
    cfg["quick_gelu"] = False
    return cfg


def _vocab(arch):
    cfg = derive_architecture(arch)
    cfg["text_cfg"]["vocab_size"] = 1000
    return cfg


@pytest.mark.parametrize("arch, expected", [
    # a different patch: the patch filter cannot be cut; the grid itself is resized
    (_patch8(TEACHER), ["clip.visual.conv1.weight <- clip.visual.conv1.weight: patch 16 in the source, 8 in the "
                        "student"]),
    # wider than the source: every vision tensor is listed
    (derive_architecture(TEACHER, vision_width=128),
     ["clip.visual.class_embedding", f"{VIS}0.attn.in_proj_weight", f"{VIS}11.mlp.c_proj.bias",
      "vision width 128 in the student is wider than the source's 64", "8 heads in the student, 4 in the source"]),
    # 1 head of width 32 against heads of width 16
    (derive_architecture(TEACHER, vision_width=32, vision_heads=1),
     [f"{VIS}{i}.attn.in_proj_weight" for i in range(12)] + ["head width 16 in the source, 32 in the student"]),
    # layer scale the source does not have
    (_layer_scale(TEACHER), [f"{VIS}{i}.ls_{n}.gamma: the source has no" for i in range(12) for n in (1, 2)]),
    (_gelu(TEACHER), ["vision activation: QuickGELU in the source, GELU in the student",
                      "text activation: QuickGELU in the source, GELU in the student"]),
    (_vocab(TEACHER), ["clip.token_embedding.weight <- clip.token_embedding.weight: vocabulary 49408 in the source, "
                       "1000 in the student"]),
])
def test_a_mismatch_the_rules_cannot_explain_fails_with_the_list(teacher, arch, expected):
    student = _student(arch)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(InheritanceError) as err:
        inherit_weights(student, teacher)
    message = str(err.value)
    for line in expected:
        assert line in message, (line, message)
    assert isinstance(err.value, CheckpointError)
    for k, v in student.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_a_source_tensor_the_student_has_no_place_for_is_an_error():
    source = _student(_layer_scale(TEACHER), seed=0)
    with pytest.raises(InheritanceError, match=rf"{VIS}0\.ls_1\.gamma: a source tensor the student has no place"):
        inherit_weights(_student(TEACHER), source)


def test_layer_selection_for_an_unknown_tower_is_an_error(teacher):
    with pytest.raises(InheritanceError, match=r"unknown towers \['image'\]"):
        inherit_weights(_student(TEACHER), teacher, layers={"image": "uniform"})


# --------------------------------------------------------------------------------------------
# The original backbones, inherited and trained


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_the_original_backbones_inherit_from_a_tiny_vit_b16_and_train(teacher, name):
    tiny = derive_architecture(name, vision_width=64, vision_heads=4, text_width=48, text_heads=3, embed_dim=32)
    student = _student(tiny)
    report = inherit_weights(student, teacher, layers="first", source_name="tiny ViT-B/16")
    v, t = ORIGINALS[name]
    assert report.layers["vision"].selected == tuple(range(v)) and report.layers["text"].selected == tuple(range(t))
    assert report.source == "tiny ViT-B/16" and not report.cut
    s_sd, t_sd = student.state_dict(), teacher.state_dict()
    assert torch.equal(s_sd[f"{VIS}{v - 1}.attn.in_proj_weight"], t_sd[f"{VIS}{v - 1}.attn.in_proj_weight"])
    assert torch.equal(s_sd[f"{TXT}{t - 1}.mlp.c_fc.weight"], t_sd[f"{TXT}{t - 1}.mlp.c_fc.weight"])

    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, *TEACHER_SIZE, generator=g)
    tokens = open_clip.tokenize(CAPTIONS)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    losses = []
    for _ in range(3):
        out = student(pixel_values=images, input_ids=tokens)
        loss = itc(Features(student_image=out["image_embeds"], student_text=out["text_embeds"]), temperature=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    moved = student.state_dict()[f"{VIS}0.attn.in_proj_weight"]
    assert not torch.equal(moved, t_sd[f"{VIS}0.attn.in_proj_weight"])

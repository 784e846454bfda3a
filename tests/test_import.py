"""Importing real checkpoints: each foreign format, written at a tiny size, loads and embeds as its writer did."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kd_trainer.models.factory import create_model
from kd_trainer.models.loading import (
    CheckpointError,
    load_model,
    load_pretrained,
    load_weights,
    model_from_hf_clip,
    model_from_irra,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def _embeddings(model, seed=0, n=2):
    """Raw (unnormalised) image and text embeddings of fixed random inputs at the model's size."""
    g = torch.Generator().manual_seed(seed)
    h, w = model.image_size
    images = torch.randn(n, 3, h, w, generator=g)
    vocab = model.clip.vocab_size
    text = torch.randint(1, vocab - 1, (n, model.context_length), generator=g)
    text[:, -1] = vocab - 1  # EOT: the highest id, where open_clip pools
    with torch.no_grad():
        return model.encode_image(images, normalize=False), model.encode_text(text, normalize=False)


def _assert_same(a, b):
    for x, y in zip(_embeddings(a), _embeddings(b)):
        torch.testing.assert_close(x, y, **TOL)


def _randomised(model, seed=0):
    """Perturb every tensor, so layer norms and biases are not at their (symmetric) initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _source_model(arch="micro", seed=0, **kw):
    torch.manual_seed(seed)
    return _randomised(create_model(arch, **kw), seed).eval()


class _JitHolder(nn.Module):
    """An open_clip CLIP's modules and parameters, plus the metadata scalars OpenAI's archives carry."""

    def __init__(self, clip):
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, p in clip.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x):
        return x * self.logit_scale


def _write(fmt, clip, tmp_path):
    sd = clip.state_dict()
    if fmt == "open_clip_ddp":  # open_clip training checkpoint: nested, DDP prefix, extra fields
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "openai_jit":
        path = tmp_path / "ViT-micro.pt"
        with warnings.catch_warnings():  # torch.jit.trace is deprecated, but it is how OpenAI's files were made
            warnings.simplefilter("ignore")
            torch.jit.trace(_JitHolder(clip), torch.ones(1)).save(str(path))
    elif fmt == "open_clip_folder":
        path = tmp_path / "oc"
        path.mkdir()
        cfg = {"embed_dim": 32, "quick_gelu": True, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16,
               "patch_size": 8, "image_size": [32, 16]}, "text_cfg": {"context_length": 77, "vocab_size": 49408,
               "width": 32, "heads": 2, "layers": 1}}
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
        safetensors.torch.save_file(sd, str(path / "open_clip_model.safetensors"))
    else:  # TinyCLIP release file, DDP layout
        path = tmp_path / "TinyCLIP-micro.pt"
        tiny = {(f"_image_encoder.module.{k}" if k.startswith("visual.") else
                 "_logit_scale.module.logit_scale" if k == "logit_scale" else f"_text_encoder.module.{k}"): v
                for k, v in sd.items()}
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in tiny.items()}}, path)
    return path


@pytest.mark.parametrize("fmt", ["open_clip_ddp", "openai_jit", "open_clip_folder", "tinyclip"])
def test_each_open_clip_family_format_loads_and_embeds_as_written(tmp_path, fmt):
    src = _source_model()
    path = _write(fmt, src.clip, tmp_path)
    dst = create_model("micro")
    report = load_weights(dst, path)  # the existing entry point routes through load_pretrained
    assert report.format == fmt.replace("_ddp", "")
    assert report.loaded == len(dst.state_dict()) and not report.resized
    if fmt == "openai_jit":
        assert sorted(report.dropped) == ["context_length", "input_resolution", "vocab_size"]
        assert "TorchScript metadata" in report.summary()
    _assert_same(src, dst)


def test_tinyclip_224_checkpoint_at_384x128_gets_the_bilinear_grid(tmp_path):
    arch = {"embed_dim": 24, "quick_gelu": True, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16,
            "patch_size": 16}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                            "layers": 1}}
    src = _source_model(arch, image_size=(224, 224))
    path = tmp_path / "tinyclip_yfcc15m_micro.pth"  # plain state dict with OpenAI/open_clip key names
    torch.save(src.clip.state_dict(), path)
    dst = create_model(arch, image_size=(384, 128), context_length=32)
    report = load_pretrained(dst, path)

    assert report.format == "open_clip"
    assert report.resized == ["clip.visual.positional_embedding", "clip.positional_embedding"]
    assert "14x14 -> 24x8" in report.summary() and "77 -> 32 (truncated)" in report.summary()
    old = src.clip.visual.positional_embedding.detach()
    grid = old[1:].reshape(14, 14, 32).permute(2, 0, 1)[None]  # (1, D, H, W)
    expected = F.interpolate(grid, size=(24, 8), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    expected = torch.cat([old[:1], expected.reshape(24 * 8, 32)])
    assert torch.equal(dst.clip.visual.positional_embedding.detach(), expected)
    assert torch.equal(dst.clip.positional_embedding.detach(), src.clip.positional_embedding.detach()[:32])
    assert torch.equal(dst.clip.visual.conv1.weight, src.clip.visual.conv1.weight)
    image, text = _embeddings(dst)
    assert image.shape == (2, 24) and text.shape == (2, 24)


def test_wrong_architecture_names_the_key_and_both_shapes(tmp_path):
    wide = {"embed_dim": 32, "quick_gelu": True, "vision_cfg": {"layers": 1, "width": 64, "head_width": 16,
            "patch_size": 8}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                           "layers": 1}}
    path = tmp_path / "vit_big.pth"
    torch.save(create_model(wide, image_size=(32, 16)).clip.state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(create_model("micro"), path)
    msg = str(e.value)
    assert "wrong shape: clip.ln_final.bias checkpoint (64,) vs model (32,)" in msg
    assert "a different architecture: the checkpoint has vision 1 layers x 64 (patch 8)" in msg
    assert "positional_embedding" in msg  # not resized: its width differs, so it is the wrong architecture too


def test_truncated_files_are_clear(tmp_path):
    for fmt in ("openai_jit", "tinyclip"):
        path = _write(fmt, _source_model().clip, tmp_path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="may be truncated"):
            load_pretrained(create_model("micro"), path)


# --------------------------------------------------------------------------------------------
# IRRA: an independent re-implementation of IRRA's encoders is the reference

IRRA_ARCH = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"layers": 1, "width": 128, "head_width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 120, "width": 128, "heads": 2, "layers": 1}}
IRRA_SIZE = (40, 24)


def _irra_checkpoint(tmp_path, stride, *, pretrain_choice="/pretrained/tiny-clip.pt", write_config=True):
    """IRRA's best.pth layout: {"model": base_model.* + heads, "optimizer", ...}, matrices in fp16 as IRRA's
    convert_weights leaves them; and configs.yaml as IRRA's yaml.dump(vars(args)) writes it (tuples tagged)."""
    ny, nx = (IRRA_SIZE[0] - 8) // stride + 1, (IRRA_SIZE[1] - 8) // stride + 1
    clip = _source_model(IRRA_ARCH, image_size=(ny * 8, nx * 8)).clip
    model = {f"base_model.{k}": (v.half() if v.ndim >= 2 and "positional" not in k and "token" not in k else v)
             for k, v in clip.state_dict().items() if k != "logit_scale"}
    heads = {"classifier.weight": (11003, 32), "classifier.bias": (11003,), "cross_attn.in_proj_weight": (96, 32),
             "cross_attn.out_proj.weight": (32, 32), "cross_modal_transformer.resblocks.0.ln_1.weight": (32,),
             "ln_pre_t.weight": (32,), "ln_pre_i.bias": (32,), "ln_post.weight": (32,),
             "mlm_head.dense.weight": (32, 32), "mlm_head.fc.weight": (120, 32)}
    model.update({k: torch.zeros(shape) for k, shape in heads.items()})
    run = tmp_path / "logs" / "CUHK-PEDES" / "iira"
    run.mkdir(parents=True)
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0]}]},
                "num_epoch": 60, "iteration": 0, "epoch": 37}, run / "best.pth")
    if write_config:
        args = {"pretrain_choice": pretrain_choice, "img_size": IRRA_SIZE, "stride_size": stride, "text_length": 16,
                "temperature": 0.02, "loss_names": "sdm+mlm+id", "milestones": (20, 50), "vocab_size": 120}
        (run / "configs.yaml").write_text(yaml.dump(args, default_flow_style=False))
    return run / "best.pth", {k: v.float() for k, v in model.items()}


def _irra_block(x, sd, p, mask=None):
    """One of IRRA's ResidualAttentionBlocks (64-wide heads, QuickGELU), written out with plain tensor ops."""
    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"], 1e-5)

    b, n, d = x.shape
    heads = d // 64
    q, k, v = (ln(x, "ln_1") @ sd[f"{p}attn.in_proj_weight"].t() + sd[f"{p}attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, 64).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / 8.0 + (0 if mask is None else mask)
    out = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + out @ sd[f"{p}attn.out_proj.weight"].t() + sd[f"{p}attn.out_proj.bias"]
    h = ln(x, "ln_2") @ sd[f"{p}mlp.c_fc.weight"].t() + sd[f"{p}mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[f"{p}mlp.c_proj.weight"].t() + sd[f"{p}mlp.c_proj.bias"]


def _irra_encode_image(sd, images, stride):
    """IRRA's encode_image: conv with stride_size, class token, positions, ln_pre, blocks, ln_post, proj, token 0."""
    p = "base_model.visual."
    x = F.conv2d(images, sd[f"{p}conv1.weight"], stride=stride).flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{p}class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd[f"{p}positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd[f"{p}ln_pre.weight"], sd[f"{p}ln_pre.bias"], 1e-5)
    x = _irra_block(x, sd, f"{p}transformer.resblocks.0.")
    x = F.layer_norm(x, x.shape[-1:], sd[f"{p}ln_post.weight"], sd[f"{p}ln_post.bias"], 1e-5) @ sd[f"{p}proj"]
    return x[:, 0]


def _irra_encode_text(sd, ids):
    """IRRA's encode_text: tokens + positions, causal blocks, ln_final, projection, taken at argmax(ids)."""
    p = "base_model."
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    x = sd[f"{p}token_embedding.weight"][ids] + sd[f"{p}positional_embedding"]
    x = _irra_block(x, sd, f"{p}transformer.resblocks.0.", mask)
    x = F.layer_norm(x, x.shape[-1:], sd[f"{p}ln_final.weight"], sd[f"{p}ln_final.bias"], 1e-5)
    x = x @ sd[f"{p}text_projection"]
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]


@pytest.mark.parametrize("stride", [8, 6])  # 6 < patch 8: IRRA's overlapping patches
def test_irra_teacher_matches_irra_encoders(tmp_path, stride):
    path, sd = _irra_checkpoint(tmp_path, stride)
    model = model_from_irra(path).eval()
    grid = ((40 - 8) // stride + 1, (24 - 8) // stride + 1)
    assert model.image_size == IRRA_SIZE and model.context_length == 16
    assert tuple(model.clip.visual.grid_size) == grid and model.clip.visual.conv1.stride == (stride, stride)
    report = model.load_report
    assert report.format == "irra" and report.filled == ["clip.logit_scale"]
    assert len(report.dropped) == 10 and all(report.rules[k].startswith("IRRA-only") for k in report.dropped)
    assert math.isclose(model.clip.logit_scale.exp().item(), 1 / 0.02, rel_tol=1e-6)

    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, *IRRA_SIZE, generator=g)
    ids = torch.randint(1, 100, (3, 16), generator=g)
    ids[torch.arange(3), torch.tensor([4, 9, 15])] = 119  # EOT: the highest id, as in CLIP's BPE
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=False), _irra_encode_image(sd, images, stride),
                                   **TOL)
        torch.testing.assert_close(model.encode_text(ids, normalize=False), _irra_encode_text(sd, ids), **TOL)


def test_irra_into_an_existing_model_and_the_converter_cli(tmp_path):
    path, _ = _irra_checkpoint(tmp_path, 6)
    teacher = model_from_irra(path)
    model = create_model(IRRA_ARCH, image_size=IRRA_SIZE)  # the recipe's arch + size; stride comes from configs.yaml
    report = load_weights(model, path)
    assert "patch stride set to 6" in report.summary()
    _assert_same(teacher, model)

    script = Path(__file__).resolve().parents[1] / "data_scripts" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "teacher"
    assert cli.main([str(path), "--out", str(out)]) == 0
    _assert_same(teacher, load_model(out))


def test_irra_config_missing_or_inconsistent_is_explained(tmp_path):
    path, _ = _irra_checkpoint(tmp_path, 8, write_config=False)
    expected = str(path.parent / "configs.yaml")
    with pytest.raises(CheckpointError, match="IRRA checkpoint") as e:
        model_from_irra(path)
    assert expected in str(e.value)
    with pytest.raises(CheckpointError, match="configs.yaml"):
        load_pretrained(create_model(IRRA_ARCH, image_size=IRRA_SIZE), path)

    path, _ = _irra_checkpoint(tmp_path / "b", 8, pretrain_choice="ViT-B/16")
    with pytest.raises(CheckpointError, match="pretrain_choice 'ViT-B/16' \\(clip-vit-b16"):
        model_from_irra(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        model_from_irra(path)


# --------------------------------------------------------------------------------------------
# Hugging Face CLIPModel


def test_hf_clip_folder_converts_to_the_same_dual_encoder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                     "num_hidden_layers": 2, "max_position_embeddings": 16, "eos_token_id": 99},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 48, "intermediate_size": 96,
                       "num_attention_heads": 3, "num_hidden_layers": 2, "layer_norm_eps": 1e-6},
        projection_dim=24)
    torch.manual_seed(0)
    hf = _randomised(CLIPModel(config)).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = model_from_hf_clip(tmp_path / "hf").eval()
    assert model.load_report.format == "hf_clip" and model.image_size == (32, 32)

    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(1, 98, (2, 16), generator=g)
    ids[0, 5:], ids[1, 11:] = 0, 0
    ids[0, 4], ids[1, 10] = 99, 99  # EOS: first eos_token_id for HF, argmax for open_clip
    with torch.no_grad():
        hf_img, hf_txt = hf.get_image_features(pixel_values=pixels), hf.get_text_features(input_ids=ids)
        hf_img = getattr(hf_img, "pooler_output", hf_img)  # a tensor in transformers 4, an output in 5
        hf_txt = getattr(hf_txt, "pooler_output", hf_txt)
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), hf_img, **TOL)
        torch.testing.assert_close(model.encode_text(ids, normalize=False), hf_txt, **TOL)
        torch.testing.assert_close(model.clip.logit_scale, hf.logit_scale, **TOL)

    tall = model_from_hf_clip(tmp_path / "hf", image_size=(48, 16))
    assert tall.load_report.resized == ["clip.visual.positional_embedding"]
    assert "4x4 -> 6x2" in tall.load_report.summary()

"""Pretrained CLIP checkpoints from other code bases, mapped onto a kd_trainer :class:`RetrievalModel`.

Every checkpoint takes one path (:func:`load_pretrained`, which ``checkpoint.load_weights`` calls):
read the file or folder, detect its format, rename its keys to open_clip ``CLIP`` names, apply the
named rules below, then load strictly. Formats (``LoadReport.format``):

- ``kd_trainer``: our own state dicts and run folders (keys under ``clip.``, optional ``image_proj``/``text_proj``).
- ``open_clip``: open_clip / OpenAI key names (``visual.conv1.weight``, ``transformer.resblocks.N...``,
  ``token_embedding.weight``, ``logit_scale``), plain or nested under ``state_dict``/``model``, with or
  without DDP's ``module.`` prefix. TinyCLIP's ``tinyclip_yfcc15m_xsmall.pth`` is this format.
- ``openai_jit``: OpenAI's TorchScript archives (``ViT-B-16.pt``), read with ``torch.jit.load``.
- ``open_clip_folder``: ``open_clip_config.json`` + ``open_clip_model.safetensors``/``open_clip_pytorch_model.bin``.
- ``tinyclip``: TinyCLIP release files (``_image_encoder.visual.*``, ``_text_encoder.*``,
  ``_logit_scale.logit_scale``, DDP's ``.module`` after those prefixes or ``module.`` before them).
- ``irra``: IRRA's ``best.pth`` (``{"model": ...}``, CLIP under ``base_model.``) plus its ``configs.yaml``.
- ``hf_clip``: Hugging Face ``CLIPModel`` folders (``config.json`` + ``model.safetensors``/``pytorch_model.bin``)
  or a bare state dict with their key names.

Rules. Each key a rule explains is listed in the :class:`LoadReport` with the rule's text; any other
missing, unexpected or reshaped key stops the load with a :class:`CheckpointError` listing them.

- IRRA-only heads (``classifier``, ``cross_attn``, ``cross_modal_transformer``, ``ln_pre_t``, ``ln_pre_i``,
  ``ln_post``, ``mlm_head``): dropped; they serve IRRA's ID and MLM losses, not the embeddings.
- IRRA has no CLIP ``logit_scale`` (its scale is the fixed ``1/temperature``): filled with
  ``log(1/temperature)`` from ``configs.yaml``. IRRA's ``stride_size`` sets the patch stride of the model.
- OpenAI TorchScript metadata (``input_resolution``, ``context_length``, ``vocab_size``): dropped.
- Hugging Face ``position_ids`` buffers: dropped (an ``arange``, rebuilt by the model).
- Position embeddings of foreign checkpoints: the visual grid is resized bilinearly (class token kept),
  the text positions are truncated or linearly stretched (:func:`resize_text_positions` says why).
  kd_trainer checkpoints are not resized unless asked: they were trained at the recipe's size, so a
  different size is more likely a recipe mistake than an intent.
- kd_trainer's training-only ``image_proj``/``text_proj``: dropped when the target has none.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kd_trainer.models.checkpoint import (
    MODEL_CONFIG_NAME,
    PROJECTION_PREFIXES,
    CheckpointError,
    LoadReport,
    _is_torchscript,
    _show,
    _weights_file,
    load_model,
    logger,
    read_state_dict,
)
from kd_trainer.models.factory import RetrievalModel, create_model, get_architecture, list_architectures

PathLike = str | os.PathLike

IRRA_CONFIG_NAME = "configs.yaml"
IRRA_HEAD_PREFIXES = ("classifier.", "cross_attn.", "cross_modal_transformer.", "ln_pre_t.", "ln_pre_i.",
                      "ln_post.", "mlm_head.")
IRRA_CONFIG_KEYS = ("pretrain_choice", "img_size", "stride_size", "text_length", "temperature")
OPENAI_JIT_METADATA = ("input_resolution", "context_length", "vocab_size")
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG_NAME = "config.json"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# IRRA's pretrain_choice -> our named architecture of the same shape.
OPENAI_ARCHS = {"ViT-B/16": "clip-vit-b16"}

RULE_IRRA_HEAD = "IRRA-only head tensors (ID classifier and MLM heads; not part of the embeddings)"
RULE_JIT_METADATA = "OpenAI TorchScript metadata (the model's own config holds these)"
RULE_HF_POSITION_IDS = "Hugging Face position_ids buffers (an arange the model rebuilds)"
RULE_PROJECTION = "training-only projection or mimic adapter tensors"

VISUAL_POS = "clip.visual.positional_embedding"
TEXT_POS = "clip.positional_embedding"


# --------------------------------------------------------------------------------------------
# The detected checkpoint


@dataclass(frozen=True)
class IrraConfig:
    """The parts of IRRA's ``configs.yaml`` (``yaml.dump(vars(args))``) that define its model."""

    path: Path
    pretrain_choice: str
    img_size: tuple[int, int]  # (H, W)
    stride_size: int
    text_length: int
    temperature: float


@dataclass
class Source:
    """A checkpoint read and renamed to open_clip ``CLIP`` keys (kd_trainer keys for ``kd_trainer``)."""

    format: str
    path: Path
    tensors: dict[str, torch.Tensor]
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> rule that dropped it
    visual_grid: tuple[int, int] | None = None  # the (H, W) grid of visual.positional_embedding, if known
    irra: IrraConfig | None = None
    arch: dict[str, Any] | None = None  # the architecture a folder's config declares
    notes: list[str] = field(default_factory=list)


def read_source(path: PathLike, *, irra_config: PathLike | None = None, trusted: bool = False) -> Source:
    """Read a checkpoint file or folder, detect its format and rename its keys to open_clip's."""
    p = Path(path)
    if p.is_dir() and (p / OPEN_CLIP_CONFIG_NAME).is_file():
        return _read_open_clip_folder(p, trusted)
    if p.is_dir() and not (p / MODEL_CONFIG_NAME).is_file() and _is_hf_clip_folder(p):
        return _read_hf_folder(p, trusted)
    sd = _strip_prefix(read_state_dict(p, trusted=trusted), "module.")
    fmt = _classify(sd)
    if fmt == "irra":
        return _irra_source(sd, p, irra_config)
    if fmt == "tinyclip":
        return Source("tinyclip", p, _tinyclip_keys(sd))
    if fmt == "hf_clip":
        return Source("hf_clip", p, *hf_clip_to_open_clip(sd))
    if fmt == "kd_trainer":
        return Source("kd_trainer", p, sd)
    fmt = "openai_jit" if _is_torchscript(_weights_file(p)) else "open_clip"
    return Source(fmt, p, *_drop_jit_metadata(sd))


def _classify(sd: dict[str, torch.Tensor]) -> str:
    """The format of a state dict, from the key prefixes only its format uses."""
    keys = list(sd)
    if any(k.startswith("base_model.") for k in keys):
        return "irra"
    if any(k.startswith(("_image_encoder.", "_text_encoder.", "_logit_scale.")) for k in keys):
        return "tinyclip"
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf_clip"
    if any(k.startswith("clip.") for k in keys):
        return "kd_trainer"
    return "open_clip"


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """DDP saves every key under ``module.``; strip it only when all keys have it."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _drop_jit_metadata(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """OpenAI's TorchScript state dicts carry three scalars that are config, not weights."""
    dropped = {k: RULE_JIT_METADATA for k in OPENAI_JIT_METADATA if k in sd and sd[k].ndim == 0}
    return {k: v for k, v in sd.items() if k not in dropped}, dropped


_TINYCLIP_KEY = re.compile(r"^_(?:image_encoder|text_encoder|logit_scale)\.(?:module\.)?(.+)$")


def _tinyclip_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TinyCLIP wraps open_clip's modules: ``_image_encoder.visual.*`` holds ``visual.*``, ``_text_encoder.*``
    the text tower's top-level keys, ``_logit_scale.logit_scale`` the scale. Other keys pass through, to be
    reported as unexpected (e.g. ``l0_module`` pruning masks, which change the forward pass)."""
    out = {}
    for k, v in sd.items():
        m = _TINYCLIP_KEY.match(k)
        out[m.group(1) if m else k] = v
    return out


# --------------------------------------------------------------------------------------------
# IRRA


class _IrraYamlLoader(yaml.SafeLoader):
    """Safe YAML plus the ``!!python/tuple`` tag that IRRA's ``yaml.dump`` writes for tuple arguments
    (``img_size``, ``milestones``); nothing else beyond plain YAML is constructed."""


_IrraYamlLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                                lambda loader, node: tuple(loader.construct_sequence(node)))


def irra_config_path(checkpoint: PathLike) -> Path:
    """Where IRRA keeps a run's config: ``configs.yaml`` in the folder of its ``best.pth``."""
    p = Path(checkpoint)
    return (p if p.is_dir() else p.parent) / IRRA_CONFIG_NAME


def read_irra_config(path: PathLike) -> IrraConfig:
    """IRRA's ``configs.yaml``; the keys that shape the model must all be there (IRRA writes all its args)."""
    p = Path(path)
    try:
        raw = yaml.load(p.read_text(), Loader=_IrraYamlLoader)
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"Cannot read IRRA config {str(p)!r} ({type(e).__name__}: {e}).") from e
    missing = [k for k in IRRA_CONFIG_KEYS if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise CheckpointError(f"IRRA config {str(p)!r} lacks {missing}; expected the configs.yaml IRRA writes "
                              f"next to best.pth, with {list(IRRA_CONFIG_KEYS)}.")
    size = raw["img_size"]
    size = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    if len(size) != 2:
        raise CheckpointError(f"IRRA config {str(p)!r}: img_size {raw['img_size']!r} is not [height, width].")
    return IrraConfig(p, str(raw["pretrain_choice"]), size, int(raw["stride_size"]), int(raw["text_length"]),
                      float(raw["temperature"]))


def _find_irra_config(checkpoint: Path, irra_config: PathLike | None) -> IrraConfig:
    """The config is part of an IRRA model (image size, stride, text length, temperature): required."""
    p = Path(irra_config) if irra_config is not None else irra_config_path(checkpoint)
    if not p.is_file():
        raise CheckpointError(
            f"{str(checkpoint)!r} is an IRRA checkpoint (CLIP weights under 'base_model.'), whose model is defined "
            f"by IRRA's configs.yaml (img_size, stride_size, text_length, temperature). Expected it at {str(p)!r}, "
            "which does not exist; pass irra_config=<path> (convert_checkpoint.py --irra-config) if it is elsewhere.")
    return read_irra_config(p)


def irra_grid(img_size: tuple[int, int], patch_size: int, stride_size: int) -> tuple[int, int]:
    """IRRA's patch grid (num_y, num_x): ``(size - patch) // stride + 1`` per side, as its VisionTransformer
    computes it; with stride < patch the patches overlap, and a remainder of the image is never seen."""
    h, w = img_size
    grid = ((h - patch_size) // stride_size + 1, (w - patch_size) // stride_size + 1)
    if min(grid) < 1 or stride_size < 1:
        raise CheckpointError(f"IRRA img_size {img_size} with patch {patch_size} and stride {stride_size} "
                              "gives no patches.")
    return grid


def _irra_source(sd: dict[str, torch.Tensor], path: Path, irra_config: PathLike | None) -> Source:
    """Strip ``base_model.``, drop IRRA's heads, and check the checkpoint against its config."""
    cfg = _find_irra_config(path, irra_config)
    tensors: dict[str, torch.Tensor] = {}
    dropped = {}
    for k, v in sd.items():
        if k.startswith("base_model."):
            tensors[k[len("base_model."):]] = v
        elif k.startswith(IRRA_HEAD_PREFIXES):
            dropped[k] = RULE_IRRA_HEAD
        else:
            tensors[k] = v  # unexplained: reported as unexpected
    patch = tensors["visual.conv1.weight"].shape[-1] if "visual.conv1.weight" in tensors else 16
    grid = irra_grid(cfg.img_size, patch, cfg.stride_size)
    _check_irra_shapes(tensors, cfg, grid, path)
    return Source("irra", path, tensors, dropped, visual_grid=grid, irra=cfg)


def _check_irra_shapes(tensors: dict[str, torch.Tensor], cfg: IrraConfig, grid: tuple[int, int], path: Path) -> None:
    """IRRA could not have run with a config whose grid or text length disagrees with its weights."""
    pos, text = tensors.get("visual.positional_embedding"), tensors.get("positional_embedding")
    if pos is not None and pos.shape[0] != grid[0] * grid[1] + 1:
        raise CheckpointError(
            f"IRRA config {str(cfg.path)!r} (img_size {cfg.img_size}, stride_size {cfg.stride_size}) gives a "
            f"{grid[0]}x{grid[1]} patch grid ({grid[0] * grid[1] + 1} positions), but {str(path)!r} has "
            f"{pos.shape[0]}: the config does not belong to this checkpoint.")
    if text is not None and text.shape[0] != cfg.text_length:
        raise CheckpointError(
            f"IRRA config {str(cfg.path)!r} has text_length {cfg.text_length}, but {str(path)!r} has "
            f"{text.shape[0]} text positions; IRRA adds them to text_length tokens, so they must agree.")


def _count_blocks(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)})


def irra_architecture(tensors: dict[str, torch.Tensor], cfg: IrraConfig) -> str | dict[str, Any]:
    """The CLIP IRRA built for these weights. IRRA's ``build_CLIP_from_openai_pretrained`` reads widths,
    depths, patch size, vocabulary and context length off the state dict and uses 64-wide heads and
    QuickGELU; we do the same, and return our named architecture when ``pretrain_choice`` names one."""
    if "visual.proj" not in tensors:
        raise CheckpointError(f"The IRRA checkpoint has no base_model.visual.proj: only ViT CLIP backbones are "
                              f"supported, not ResNets (pretrain_choice is {cfg.pretrain_choice!r}).")
    try:
        width, tw = tensors["visual.conv1.weight"].shape[0], tensors["ln_final.weight"].shape[0]
        arch = {"embed_dim": tensors["text_projection"].shape[1], "quick_gelu": True,
                "vision_cfg": {"layers": _count_blocks(tensors, "visual.transformer.resblocks."), "width": width,
                               "head_width": 64, "patch_size": tensors["visual.conv1.weight"].shape[-1]},
                "text_cfg": {"context_length": tensors["positional_embedding"].shape[0],
                             "vocab_size": tensors["token_embedding.weight"].shape[0], "width": tw,
                             "heads": tw // 64, "layers": _count_blocks(tensors, "transformer.resblocks.")}}
    except KeyError as e:
        raise CheckpointError(f"The IRRA checkpoint has no base_model.{e.args[0]}, which IRRA's CLIP has.") from e
    if width % 64 or tw % 64:
        raise CheckpointError(f"IRRA uses heads of width 64, but the checkpoint's towers are {width} and {tw} wide.")
    name = OPENAI_ARCHS.get(cfg.pretrain_choice)
    if name is None:
        return arch
    named = get_architecture(name)
    if _same_shape(named, arch):
        return name
    raise CheckpointError(f"IRRA config {str(cfg.path)!r} says pretrain_choice {cfg.pretrain_choice!r} ({name}: "
                          f"{_describe(named)}), but the checkpoint holds a {_describe(arch)} CLIP.")


def _same_shape(named: dict[str, Any], arch: dict[str, Any]) -> bool:
    return named["embed_dim"] == arch["embed_dim"] and all(
        named[tower].get(k) == v for tower in ("vision_cfg", "text_cfg") for k, v in arch[tower].items())


def _describe(arch: dict[str, Any]) -> str:
    v, t = arch["vision_cfg"], arch["text_cfg"]
    return (f"vision {v['layers']}x{v['width']} patch {v.get('patch_size')}, text {t['layers']}x{t['width']}, "
            f"embed {arch['embed_dim']}")


def apply_irra_stride(model: RetrievalModel, stride_size: int) -> list[str]:
    """Give ``model`` IRRA's patch embedding: stride ``stride_size`` (overlapping patches below the patch size)
    and the grid IRRA computes at the model's image size. open_clip always strides by the patch size, but
    nothing in its forward pass depends on that, so setting the conv stride and grid is exact. Returns notes
    for the report; a new positional embedding (when the grid changes) is filled by the load that follows."""
    visual = model.clip.visual
    kh, kw = visual.conv1.kernel_size
    if kh != kw:
        raise CheckpointError(f"IRRA's patches are square, but the model's patch is {kh}x{kw}.")
    grid = irra_grid(model.image_size, kh, stride_size)
    notes = []
    if tuple(visual.conv1.stride) != (stride_size, stride_size):
        visual.conv1.stride = (stride_size, stride_size)
        notes.append(f"patch stride set to {stride_size} (IRRA stride_size; patch {kh})")
    if tuple(visual.grid_size) != grid:
        visual.grid_size = grid
        pos = visual.positional_embedding
        visual.positional_embedding = nn.Parameter(pos.new_zeros(grid[0] * grid[1] + 1, pos.shape[1]))
        notes.append(f"position grid set to {grid[0]}x{grid[1]} (IRRA: (size - patch) // stride + 1)")
    return notes


def create_strided_model(arch: str | dict[str, Any], image_size: tuple[int, int], stride_size: int, *,
                         context_length: int | None = None, projection_dim: int | None = None) -> RetrievalModel:
    """A model with IRRA's patch stride at IRRA's image size (which need not be a multiple of the patch).
    open_clip sizes its grid as image // patch, so the model is built at the size that gives IRRA's grid
    and then given the true image size and stride."""
    patch = get_architecture(arch)["vision_cfg"].get("patch_size", 16)
    patch = patch if isinstance(patch, int) else patch[0]
    ny, nx = irra_grid(image_size, patch, stride_size)
    model = create_model(arch, image_size=(ny * patch, nx * patch), context_length=context_length,
                         projection_dim=projection_dim)
    model.clip.visual.image_size = (int(image_size[0]), int(image_size[1]))
    apply_irra_stride(model, stride_size)
    return model


def model_from_irra(checkpoint: PathLike, config: PathLike | None = None) -> RetrievalModel:
    """IRRA's teacher exactly as IRRA ran it: the CLIP its ``best.pth`` holds, at ``configs.yaml``'s img_size,
    stride_size and text_length (``config`` defaults to the ``configs.yaml`` next to the checkpoint).
    The model's ``load_report`` attribute holds the :class:`LoadReport`."""
    src = read_source(checkpoint, irra_config=config)
    if src.irra is None:
        raise CheckpointError(f"{str(checkpoint)!r} is not an IRRA checkpoint (no 'base_model.' keys; "
                              f"it looks like {src.format}).")
    cfg = src.irra
    model = create_strided_model(irra_architecture(src.tensors, cfg), cfg.img_size, cfg.stride_size,
                                 context_length=cfg.text_length)
    model.load_report = _load_source(model, src)
    return model


# --------------------------------------------------------------------------------------------
# Hugging Face CLIPModel


def _is_hf_clip_folder(folder: Path) -> bool:
    """A folder with a transformers ``config.json`` of ``model_type`` ``clip``."""
    try:
        return json.loads((folder / HF_CONFIG_NAME).read_text()).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False


def _hf_config(folder: Path) -> Any:
    from transformers import CLIPConfig

    return CLIPConfig.from_pretrained(str(folder), local_files_only=True)


def _hf_mlp_ratio(c: Any, tower: str) -> float:
    ratio = c.intermediate_size / c.hidden_size
    if int(c.hidden_size * ratio) != c.intermediate_size:
        raise CheckpointError(f"HF {tower} intermediate_size {c.intermediate_size} is not expressible as "
                              f"open_clip's int(width * mlp_ratio) for width {c.hidden_size}.")
    return ratio


def hf_clip_architecture(config: Any) -> dict[str, Any]:
    """Our (open_clip) architecture dict for a transformers ``CLIPConfig``, or a folder holding its config.json.
    HF's ``quick_gelu`` is open_clip's ``quick_gelu=True``, its ``gelu`` open_clip's ``nn.GELU``; a
    layer_norm_eps other than open_clip's 1e-5 goes into ``norm_kwargs``."""
    if isinstance(config, (str, os.PathLike)):
        config = _hf_config(Path(config))
    v, t = config.vision_config, config.text_config
    acts = {v.hidden_act, t.hidden_act}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(f"HF CLIP activations {sorted(acts)}: open_clip supports one of quick_gelu/gelu "
                              "for both towers.")
    vision = {"layers": v.num_hidden_layers, "width": v.hidden_size, "patch_size": v.patch_size,
              "head_width": v.hidden_size // v.num_attention_heads, "mlp_ratio": _hf_mlp_ratio(v, "vision")}
    text = {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size, "width": t.hidden_size,
            "heads": t.num_attention_heads, "layers": t.num_hidden_layers, "mlp_ratio": _hf_mlp_ratio(t, "text")}
    for cfg, hf in ((vision, v), (text, t)):
        if hf.layer_norm_eps != 1e-5:
            cfg["norm_kwargs"] = {"eps": hf.layer_norm_eps}
    return {"embed_dim": config.projection_dim, "quick_gelu": acts == {"quick_gelu"},
            "image_size": [v.image_size, v.image_size], "vision_cfg": vision, "text_cfg": text}


_HF_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
# nn.Linear stores (out, in); open_clip's projections are (in, out) matrices applied as x @ proj.
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_HF_BLOCK_PARTS = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                   "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


def hf_clip_to_open_clip(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename a transformers ``CLIPModel`` state dict to open_clip's ``CLIP``: separate q/k/v projections
    become one ``in_proj`` (nn.MultiheadAttention's q;k;v order), fc1/fc2 become c_fc/c_proj,
    pre_layrnorm/post_layernorm become ln_pre/ln_post, projections are transposed. Returns the tensors
    and the keys dropped by a rule; keys no rule knows are kept as they are, to be reported as unexpected."""
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    qkv: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for k, v in sd.items():
        m = _HF_LAYER.match(k)
        if k.endswith("embeddings.position_ids"):
            dropped[k] = RULE_HF_POSITION_IDS
        elif k in _HF_NAMES:
            out[_HF_NAMES[k]] = v
        elif k in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[k]] = v.t().contiguous()
        elif m:
            _hf_block_key(k, m, v, out, qkv)
        else:
            out[k] = v
    for target, parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[target] = torch.cat([parts[x][1] for x in "qkv"])
        else:  # incomplete: keep the originals, so the load names them
            out.update(dict(parts.values()))
    return out, dropped


def _hf_block_key(key: str, m: re.Match, v: torch.Tensor, out: dict[str, torch.Tensor],
                  qkv: dict[str, dict[str, tuple[str, torch.Tensor]]]) -> None:
    """One key of an encoder layer: q/k/v parts are collected for concatenation, the rest renamed."""
    tower, idx, rest = m.groups()
    block = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{idx}."
    q = _HF_QKV.match(rest)
    if q:
        qkv.setdefault(f"{block}attn.in_proj_{q.group(2)}", {})[q.group(1)] = (key, v)
        return
    for hf, oc in _HF_BLOCK_PARTS.items():
        if rest.startswith(hf):
            out[block + oc + rest[len(hf):]] = v
            return
    out[key] = v


def _read_hf_folder(folder: Path, trusted: bool) -> Source:
    """A ``save_pretrained`` folder of ``CLIPModel``: config.json gives the architecture and image grid."""
    config = _hf_config(folder)
    file = _first_file(folder, HF_WEIGHT_FILES, "a Hugging Face CLIPModel folder (sharded weights are not supported)")
    tensors, dropped = hf_clip_to_open_clip(read_state_dict(file, trusted=trusted))
    v, t = config.vision_config, config.text_config
    g = v.image_size // v.patch_size
    notes = []
    if t.eos_token_id not in (2, t.vocab_size - 1):  # HF pools at the first eos_token_id, open_clip at argmax
        notes.append(f"HF pools text at eos_token_id {t.eos_token_id}, open_clip at the highest token id: "
                     "they agree only when EOS is the highest id in each sequence (CLIP's BPE tokenizer)")
    return Source("hf_clip", folder, tensors, dropped, visual_grid=(g, g), arch=hf_clip_architecture(config),
                  notes=notes)


def model_from_hf_clip(folder: PathLike, image_size: int | tuple[int, int] | None = None,
                       context_length: int | None = None) -> RetrievalModel:
    """The open_clip dual encoder equivalent to a Hugging Face ``CLIPModel`` folder, at ``image_size``
    (default: the config's) and ``context_length`` (default: max_position_embeddings); position embeddings
    are resized when those differ. The model's ``load_report`` attribute holds the :class:`LoadReport`."""
    src = read_source(folder)
    if src.format != "hf_clip" or src.arch is None:
        raise CheckpointError(f"{str(folder)!r} is not a Hugging Face CLIPModel folder (config.json with "
                              f"model_type 'clip' and one of {list(HF_WEIGHT_FILES)}); found {src.format}.")
    return _model_for(src, src.arch, image_size, context_length)


# --------------------------------------------------------------------------------------------
# open_clip folders


_OPEN_CLIP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"}


def open_clip_architecture(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Our architecture dict for an open_clip ``model_cfg``; only ViT + text-transformer CLIPs (the dual
    encoder kd_trainer builds), not timm/HF towers or CustomTextCLIP."""
    extra = sorted(k for k, v in model_cfg.items() if k not in _OPEN_CLIP_KEYS and v)
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if extra or vision.get("timm_model_name") or text.get("hf_model_name") or isinstance(vision.get("layers"), list):
        raise CheckpointError(f"Unsupported open_clip model config (keys {extra}, vision {sorted(vision)}, text "
                              f"{sorted(text)}): only ViT + text-transformer CLIP models are supported.")
    arch = {k: v for k, v in model_cfg.items() if k in _OPEN_CLIP_KEYS}
    size = vision.get("image_size", 224)
    arch["image_size"] = [size, size] if isinstance(size, int) else list(size)
    return arch


def _read_open_clip_folder(folder: Path, trusted: bool) -> Source:
    """open_clip's ``save_pretrained`` layout: the config declares the architecture and image size."""
    try:
        cfg = json.loads((folder / OPEN_CLIP_CONFIG_NAME).read_text())
    except ValueError as e:
        raise CheckpointError(f"Cannot parse {str(folder / OPEN_CLIP_CONFIG_NAME)!r}: {e}") from e
    arch = open_clip_architecture(cfg.get("model_cfg", cfg))
    file = _first_file(folder, OPEN_CLIP_WEIGHT_FILES, "an open_clip folder")
    tensors, dropped = _drop_jit_metadata(_strip_prefix(read_state_dict(file, trusted=trusted), "module."))
    patch = arch["vision_cfg"].get("patch_size", 16)
    grid = (arch["image_size"][0] // patch, arch["image_size"][1] // patch)
    return Source("open_clip_folder", folder, tensors, dropped, visual_grid=grid, arch=arch)


def model_from_open_clip(folder: PathLike, image_size: int | tuple[int, int] | None = None,
                         context_length: int | None = None) -> RetrievalModel:
    """The model an open_clip folder (``open_clip_config.json`` + weights) describes, at ``image_size``."""
    src = read_source(folder)
    if src.format != "open_clip_folder" or src.arch is None:
        raise CheckpointError(f"{str(folder)!r} is not an open_clip folder (no {OPEN_CLIP_CONFIG_NAME}).")
    return _model_for(src, src.arch, image_size, context_length)


def _first_file(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"No weights in {str(folder)!r}, {what}: expected one of {list(names)}.")


# --------------------------------------------------------------------------------------------
# Any source


def model_from_checkpoint(path: PathLike, *, arch: str | dict[str, Any] | None = None,
                          image_size: int | tuple[int, int] | None = None, context_length: int | None = None,
                          irra_config: PathLike | None = None, trusted: bool = False) -> RetrievalModel:
    """A model built and loaded from any supported input. Folders with a config (kd_trainer, open_clip,
    Hugging Face) and IRRA checkpoints say their architecture; bare state dicts need ``arch``."""
    p = Path(path)
    if p.is_dir() and (p / MODEL_CONFIG_NAME).is_file() and arch is None and image_size is None \
            and context_length is None:
        return load_model(p)
    src = read_source(p, irra_config=irra_config, trusted=trusted)
    if src.irra is not None:
        cfg = src.irra
        size = image_size if image_size is not None else cfg.img_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        model = create_strided_model(arch or irra_architecture(src.tensors, cfg), size, cfg.stride_size,
                                     context_length=context_length or cfg.text_length)
        model.load_report = _load_source(model, src)
        return model
    if arch is None and src.arch is None:
        raise CheckpointError(f"{str(path)!r} ({src.format}) does not say its architecture: give one, a name "
                              f"from {list_architectures()} or an open_clip-style dict.")
    return _model_for(src, arch or src.arch, image_size, context_length)


def _model_for(src: Source, arch: str | dict[str, Any], image_size: Any, context_length: int | None) -> RetrievalModel:
    model = create_model(arch, image_size=image_size, context_length=context_length)
    model.load_report = _load_source(model, src)
    return model


def load_pretrained(model: RetrievalModel, path: PathLike, *, irra_config: PathLike | None = None,
                    resize_positions: bool | None = None, trusted: bool = False) -> LoadReport:
    """Load any supported checkpoint (see the module docstring) into ``model``, strictly.

    ``irra_config``: IRRA's configs.yaml, when not next to the checkpoint. ``resize_positions``: resize
    position embeddings that differ in length (default: for every format but kd_trainer's own).
    ``trusted``: read pickles that hold more than tensors (only for files you trust).
    An IRRA checkpoint also sets the model's patch stride to its ``stride_size`` (see :func:`apply_irra_stride`).
    """
    return _load_source(model, read_source(path, irra_config=irra_config, trusted=trusted), resize_positions)


def _load_source(model: RetrievalModel, src: Source, resize_positions: bool | None = None) -> LoadReport:
    """Apply the rules to a read source, check every key, and load."""
    report = LoadReport(source=str(src.path), format=src.format, notes=list(src.notes))
    for k, rule in src.dropped.items():
        report.dropped.append(k)
        report.rules[k] = rule
    if src.irra is not None:
        report.notes += apply_irra_stride(model, src.irra.stride_size)
    sd = dict(src.tensors) if src.format == "kd_trainer" else {f"clip.{k}": v for k, v in src.tensors.items()}
    expected = model.state_dict()
    _drop_projections(sd, expected, report)
    if src.irra is not None:
        _fill_irra_logit_scale(sd, expected, src.irra, report)
    if resize_positions if resize_positions is not None else src.format != "kd_trainer":
        _resize_positions(model, sd, expected, src, report)
    _check_strict(model, sd, expected, src.path)
    model.load_state_dict(sd, strict=True)
    report.loaded = len(sd)
    logger.info(report.summary())
    return report


def _drop_projections(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], report: LoadReport) -> None:
    """A student's image_proj/text_proj map into its teacher's space during training only; a model built
    without them (e.g. the student reused as a teacher) has no use for them."""
    for k in list(sd):
        if k.startswith(PROJECTION_PREFIXES) and k not in expected:
            report.dropped.append(k)
            report.rules[k] = RULE_PROJECTION
            del sd[k]


def _fill_irra_logit_scale(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], cfg: IrraConfig,
                           report: LoadReport) -> None:
    """IRRA's CLIP has no logit_scale; its similarity scale is the fixed 1/temperature of configs.yaml.
    open_clip keeps the log of the scale, so log(1/temperature) makes the two models' logits equal."""
    k = "clip.logit_scale"
    if k not in expected or k in sd:
        return
    if cfg.temperature <= 0:
        raise CheckpointError(f"IRRA config {str(cfg.path)!r} has temperature {cfg.temperature}; need > 0.")
    sd[k] = torch.full_like(expected[k], math.log(1.0 / cfg.temperature))
    report.filled.append(k)
    report.rules[k] = f"IRRA keeps no CLIP logit_scale: log(1/temperature), temperature {cfg.temperature}"


# --------------------------------------------------------------------------------------------
# Position embeddings


def resize_visual_positions(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """A ``(1 + H*W, D)`` visual position embedding on another grid: the class token is kept, the grid is
    resized bilinearly (``align_corners=False``, as IRRA's and timm's resize_pos_embed), row-major (H, W)
    as open_clip flattens the patch grid. Computed in float32, returned in ``pos``'s dtype."""
    (oh, ow), (nh, nw) = old_grid, new_grid
    grid = pos[1:].float().reshape(1, oh, ow, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(nh, nw), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(nh * nw, -1)
    return torch.cat([pos[:1].float(), grid]).to(pos.dtype)


def resize_text_positions(pos: torch.Tensor, length: int) -> torch.Tensor:
    """A ``(L, D)`` text position embedding for ``length`` tokens.

    Shorter: truncated. Text positions are absolute and the text tower is causal, so the first ``length``
    positions mean exactly what they meant in training, and the dropped ones could only hold tokens past
    the new end; interpolating would instead shift every position's meaning. Longer: linear interpolation
    over the whole sequence (``align_corners=True``, so the first and last positions are kept), since no
    trained embedding exists for the new positions; such a model needs fine-tuning to use them well.
    """
    if length <= pos.shape[0]:
        return pos[:length].clone()
    stretched = F.interpolate(pos.float().t()[None], size=length, mode="linear", align_corners=True)
    return stretched[0].t().contiguous().to(pos.dtype)


def _square_grid(n: int, src: Source) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"{str(src.path)!r}: visual.positional_embedding has {n} grid positions, not a square "
                              "grid, and the checkpoint does not say its image size; load it at its own size.")
    return side, side


def _resize_positions(model: RetrievalModel, sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                      src: Source, report: LoadReport) -> None:
    """Resize position embeddings that differ only in length; any other difference is left to the shape check."""
    pos = sd.get(VISUAL_POS)
    if pos is not None and VISUAL_POS in expected and pos.shape != expected[VISUAL_POS].shape \
            and pos.ndim == 2 and pos.shape[1:] == expected[VISUAL_POS].shape[1:]:
        old = src.visual_grid or _square_grid(pos.shape[0] - 1, src)
        new = tuple(model.clip.visual.grid_size)
        if old[0] * old[1] + 1 == pos.shape[0] and new[0] * new[1] + 1 == expected[VISUAL_POS].shape[0]:
            sd[VISUAL_POS] = resize_visual_positions(pos, old, new)
            report.resized.append(VISUAL_POS)
            report.rules[VISUAL_POS] = (f"visual grid {old[0]}x{old[1]} -> {new[0]}x{new[1]} "
                                        "(bilinear, class token kept)")
    pos = sd.get(TEXT_POS)
    if pos is not None and TEXT_POS in expected and pos.shape != expected[TEXT_POS].shape \
            and pos.ndim == 2 and pos.shape[1:] == expected[TEXT_POS].shape[1:]:
        n = expected[TEXT_POS].shape[0]
        sd[TEXT_POS] = resize_text_positions(pos, n)
        report.resized.append(TEXT_POS)
        how = "truncated" if n < pos.shape[0] else "linear interpolation"
        report.rules[TEXT_POS] = f"text positions {pos.shape[0]} -> {n} ({how})"


def _tower_summary(sd: dict[str, torch.Tensor]) -> str | None:
    """Depth, width and patch of both towers, to say in one line why hundreds of keys differ."""
    conv, ln = sd.get("clip.visual.conv1.weight"), sd.get("clip.ln_final.weight")
    if conv is None or ln is None or conv.ndim != 4:
        return None
    return (f"vision {_count_blocks(sd, 'clip.visual.transformer.resblocks.')} layers x {conv.shape[0]} "
            f"(patch {conv.shape[-1]}), text {_count_blocks(sd, 'clip.transformer.resblocks.')} layers x {ln.shape[0]}")


def _check_strict(model: RetrievalModel, sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  path: Path) -> None:
    """Every key the rules left must match the model exactly; the error names the rest, with both shapes."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    reshaped = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if not (missing or unexpected or reshaped):
        return
    arch = model.arch if not isinstance(model.arch, dict) else "custom architecture"
    lines = [f"Checkpoint {str(path)!r} does not match the model ({arch!r}):"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {_show(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_show(unexpected)}")
    if reshaped:
        lines.append("  wrong shape: " + _show([f"{k} checkpoint {tuple(sd[k].shape)} vs model "
                                                 f"{tuple(expected[k].shape)}" for k in reshaped]))
    ours, theirs = _tower_summary(expected), _tower_summary(sd)
    if ours and theirs and ours != theirs:
        lines.append(f"  a different architecture: the checkpoint has {theirs}, the model {ours}.")
    lines.append("Check the architecture and image_size in the recipe against the checkpoint.")
    raise CheckpointError("\n".join(lines))

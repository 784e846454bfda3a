"""IRRA's checkpoints: ``best.pth`` (``{"model": ...}``, CLIP under ``base_model.``) plus its ``configs.yaml``.

The config is part of the model: IRRA builds its CLIP at ``img_size`` with patches strided by
``stride_size`` (overlapping below the patch size), adds ``text_length`` text positions, and scales
similarities by a fixed ``1/temperature`` instead of a learnt ``logit_scale``. Rules:

- IRRA-only heads (``classifier``, ``cross_attn``, ``cross_modal_transformer``, ``ln_pre_t``,
  ``ln_pre_i``, ``ln_post``, ``mlm_head``): dropped; they serve IRRA's ID and MLM losses, not the
  embeddings.
- ``logit_scale``: filled with ``log(1/temperature)``, so the two models' logits are equal.
- ``stride_size``: set on the model (:mod:`.stride`).
- A config whose grid or text length disagrees with the weights does not belong to them: refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from kd_trainer.models.factory import get_architecture
from kd_trainer.models.loading.errors import CheckpointError
from kd_trainer.models.loading.source import Fill, PathLike, Source, count_blocks
from kd_trainer.models.loading.stride import irra_grid

IRRA = "irra"
IRRA_PREFIX = "base_model."
IRRA_WEIGHT_FILE = "best.pth"
IRRA_CONFIG_NAME = "configs.yaml"
IRRA_HEAD_PREFIXES = ("classifier.", "cross_attn.", "cross_modal_transformer.", "ln_pre_t.", "ln_pre_i.",
                      "ln_post.", "mlm_head.")
IRRA_CONFIG_KEYS = ("pretrain_choice", "img_size", "stride_size", "text_length", "temperature")
# IRRA's pretrain_choice -> our named architecture of the same shape.
OPENAI_ARCHS = {"ViT-B/16": "clip-vit-b16"}

RULE_IRRA_HEAD = "IRRA-only head tensors (ID classifier and MLM heads; not part of the embeddings)"


@dataclass(frozen=True)
class IrraConfig:
    """The parts of IRRA's ``configs.yaml`` (``yaml.dump(vars(args))``) that define its model."""

    path: Path
    pretrain_choice: str
    img_size: tuple[int, int]  # (H, W)
    stride_size: int
    text_length: int
    temperature: float


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


def irra_source(sd: dict[str, torch.Tensor], path: Path, irra_config: PathLike | None = None) -> Source:
    """Strip ``base_model.``, drop IRRA's heads, check the weights against the config, and describe
    the model IRRA built from them (architecture, image size, stride, text length, logit scale)."""
    cfg = _find_irra_config(path, irra_config)
    tensors: dict[str, torch.Tensor] = {}
    dropped = {}
    for k, v in sd.items():
        if k.startswith(IRRA_PREFIX):
            tensors[k[len(IRRA_PREFIX):]] = v
        elif k.startswith(IRRA_HEAD_PREFIXES):
            dropped[k] = RULE_IRRA_HEAD
        else:
            tensors[k] = v  # unexplained: reported as unexpected
    patch = tensors["visual.conv1.weight"].shape[-1] if "visual.conv1.weight" in tensors else 16
    grid = irra_grid(cfg.img_size, patch, cfg.stride_size)
    _check_irra_shapes(tensors, cfg, grid, path)
    if cfg.temperature <= 0:
        raise CheckpointError(f"IRRA config {str(cfg.path)!r} has temperature {cfg.temperature}; need > 0.")
    scale = Fill(math.log(1.0 / cfg.temperature),
                 f"IRRA keeps no CLIP logit_scale: log(1/temperature), temperature {cfg.temperature}")
    return Source(IRRA, path, tensors, dropped, visual_grid=grid, arch=irra_architecture(tensors, cfg),
                  image_size=cfg.img_size, context_length=cfg.text_length, stride_size=cfg.stride_size,
                  fills={"clip.logit_scale": scale})


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
                "vision_cfg": {"layers": count_blocks(tensors, "visual.transformer.resblocks."), "width": width,
                               "head_width": 64, "patch_size": tensors["visual.conv1.weight"].shape[-1]},
                "text_cfg": {"context_length": tensors["positional_embedding"].shape[0],
                             "vocab_size": tensors["token_embedding.weight"].shape[0], "width": tw,
                             "heads": tw // 64, "layers": count_blocks(tensors, "transformer.resblocks.")}}
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

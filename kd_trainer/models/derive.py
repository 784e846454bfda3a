"""Architectures derived from another one with a different depth or width.

Students are often the teacher made smaller (the original's ``CLIP_6L``, TinyCLIP's inherited
students). Rather than a JSON file per variant, :func:`derive_architecture` takes a named
architecture (or a dict in its layout) and changes only what it is told, so a recipe can say
``student: {arch: clip-vit-b16, vision_layers: 6}`` and every other field (patch, vocabulary,
context length, activation, image size) stays the base's.

Width changes keep the base's head width unless told otherwise: weight inheritance
(:mod:`kd_trainer.models.inherit`) keeps whole heads, as TinyCLIP does, so a width that is not a
multiple of the head width is refused here, before a model is built.
"""

from __future__ import annotations

from typing import Any

from kd_trainer.models.factory import get_architecture

__all__ = ["ArchitectureError", "DERIVE_KEYS", "derive_architecture"]

# The keyword arguments of derive_architecture, i.e. the keys a recipe may set beside `arch`.
DERIVE_KEYS = ("vision_layers", "text_layers", "vision_width", "text_width", "vision_heads", "text_heads",
               "embed_dim", "vision_mlp_ratio", "text_mlp_ratio")


class ArchitectureError(ValueError):
    """An architecture that cannot be derived as asked; the message names the field and what fits."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArchitectureError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _mlp_ratio(name: str, value: Any, width: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ArchitectureError(f"{name} must be a positive number, got {value!r}.")
    hidden = width * value
    # open_clip sizes the MLP as int(width * mlp_ratio); a fraction would be cut silently.
    if hidden != int(hidden):
        raise ArchitectureError(f"{name} {value} gives an MLP of {hidden} units at width {width}; choose a ratio "
                                "that makes width * ratio a whole number.")
    return float(value)


def _vision(cfg: dict[str, Any], layers: int | None, width: int | None, heads: int | None,
            mlp_ratio: float | None) -> dict[str, Any]:
    out = dict(cfg)
    if layers is not None:
        out["layers"] = _positive_int("vision_layers", layers)
    new_width = _positive_int("vision_width", width) if width is not None else int(cfg["width"])
    head_width = int(cfg.get("head_width", 64))  # open_clip's default
    if heads is not None:
        heads = _positive_int("vision_heads", heads)
        if new_width % heads:
            raise ArchitectureError(f"vision width {new_width} is not divisible by vision_heads {heads}; give a "
                                    "head count that divides the width.")
        head_width = new_width // heads
    elif new_width % head_width:
        raise ArchitectureError(f"vision width {new_width} is not divisible by the head width {head_width} "
                                f"({new_width / head_width:.2f} heads); choose a multiple of {head_width} "
                                "(inheritance keeps whole heads) or give vision_heads.")
    out["width"], out["head_width"] = new_width, head_width
    if mlp_ratio is not None:
        out["mlp_ratio"] = _mlp_ratio("vision_mlp_ratio", mlp_ratio, new_width)
    elif width is not None:
        _mlp_ratio("vision mlp_ratio", cfg.get("mlp_ratio", 4.0), new_width)
    return out


def _text(cfg: dict[str, Any], layers: int | None, width: int | None, heads: int | None,
          mlp_ratio: float | None) -> dict[str, Any]:
    out = dict(cfg)
    if layers is not None:
        out["layers"] = _positive_int("text_layers", layers)
    old_width, old_heads = int(cfg["width"]), int(cfg["heads"])
    new_width = _positive_int("text_width", width) if width is not None else old_width
    if heads is not None:
        heads = _positive_int("text_heads", heads)
        if new_width % heads:
            raise ArchitectureError(f"text width {new_width} is not divisible by text_heads {heads}; give a head "
                                    "count that divides the width.")
    else:
        head_width = old_width // old_heads
        if new_width % head_width:
            raise ArchitectureError(f"text width {new_width} is not divisible by the head width {head_width} "
                                    f"({new_width / head_width:.2f} heads); choose a multiple of {head_width} "
                                    "(inheritance keeps whole heads) or give text_heads.")
        heads = new_width // head_width
    out["width"], out["heads"] = new_width, heads
    if mlp_ratio is not None:
        out["mlp_ratio"] = _mlp_ratio("text_mlp_ratio", mlp_ratio, new_width)
    elif width is not None:
        _mlp_ratio("text mlp_ratio", cfg.get("mlp_ratio", 4.0), new_width)
    return out


def derive_architecture(
    base: str | dict[str, Any],
    *,
    vision_layers: int | None = None,
    text_layers: int | None = None,
    vision_width: int | None = None,
    text_width: int | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    embed_dim: int | None = None,
    vision_mlp_ratio: float | None = None,
    text_mlp_ratio: float | None = None,
) -> dict[str, Any]:
    """``base`` (a name from ``configs/`` or a dict in its layout) with the given fields changed.

    Widths keep the base's head width (so ``vision_width=384`` of ViT-B/16 has 6 heads of 64) unless
    ``vision_heads``/``text_heads`` say how many heads; a width the heads do not divide is refused.
    The MLP keeps the base's ``mlp_ratio`` unless given. The result is a new dict in the same layout,
    accepted by :func:`kd_trainer.models.factory.create_model`; ``base`` is not modified.
    """
    cfg = get_architecture(base)
    if not isinstance(cfg["vision_cfg"].get("layers"), int) or "width" not in cfg["text_cfg"]:
        raise ArchitectureError(f"Architecture {base if isinstance(base, str) else 'dict'!r} is not a ViT CLIP "
                                "(vision_cfg.layers is not one number, or text_cfg has no width); only ViT "
                                "dual encoders can be derived.")
    cfg["vision_cfg"] = _vision(cfg["vision_cfg"], vision_layers, vision_width, vision_heads, vision_mlp_ratio)
    cfg["text_cfg"] = _text(cfg["text_cfg"], text_layers, text_width, text_heads, text_mlp_ratio)
    if embed_dim is not None:
        cfg["embed_dim"] = _positive_int("embed_dim", embed_dim)
    return cfg

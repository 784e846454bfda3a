"""Convert a pretrained CLIP checkpoint into a kd_trainer model folder (``model.safetensors`` +
``kd_trainer_model.json``), which ``kd_trainer.models.loading.load_model`` and recipes read back.

Inputs: IRRA ``best.pth`` (with its ``configs.yaml``), TinyCLIP files (open_clip keys or the release
layout), OpenAI TorchScript archives, open_clip checkpoints and folders, Hugging Face ``CLIPModel``
folders. Bare state dicts do not say their architecture: give ``--arch``.

    python data_scripts/convert_checkpoint.py logs/CUHK-PEDES/iira/best.pth --out runs/irra_teacher
    python data_scripts/convert_checkpoint.py tinyclip_yfcc15m_xsmall.pth --arch tinyclip-xsmall \\
        --image-size 384 128 --out runs/tinyclip_xsmall
    python data_scripts/convert_checkpoint.py hf/clip-vit-base-patch16 --image-size 384 128 --out runs/hf_clip
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from kd_trainer.models.loading import (
    MODEL_CONFIG_NAME,
    CheckpointError,
    load_model,
    model_config,
    model_from_checkpoint,
)


def _arch(value: str | None) -> Any:
    """A named architecture, or an open_clip-style JSON file."""
    if value and value.endswith(".json"):
        return json.loads(Path(value).read_text())
    return value


def _model_json(model: Any) -> dict[str, Any]:
    """What load_model needs; ``stride_size`` too when the patch stride is not the patch size (IRRA)."""
    cfg = model_config(model)
    conv = model.clip.visual.conv1
    if tuple(conv.stride) != tuple(conv.kernel_size) or tuple(model.clip.visual.grid_size) != tuple(
            s // k for s, k in zip(model.image_size, conv.kernel_size)):
        cfg["stride_size"] = int(conv.stride[0])
    return cfg


def _save(model: Any, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"))
    (out / MODEL_CONFIG_NAME).write_text(json.dumps(_model_json(model), indent=2))


def _max_difference(a: Any, b: Any) -> float:
    """Largest embedding difference between the converted model and the folder read back."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, *a.image_size, generator=g)
    text = torch.randint(1, a.clip.vocab_size - 1, (2, a.context_length), generator=g)
    with torch.no_grad():
        return max((a.encode_image(images) - b.encode_image(images)).abs().max().item(),
                   (a.encode_text(text) - b.encode_text(text)).abs().max().item())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert a pretrained CLIP checkpoint into a kd_trainer model folder.")
    ap.add_argument("input", help="checkpoint file or folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--arch", help="architecture name (kd-trainer archs) or JSON file; needed for bare state dicts")
    ap.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: the source's)")
    ap.add_argument("--context-length", type=int, help="text length (default: the source's)")
    ap.add_argument("--irra-config", help="IRRA configs.yaml (default: next to the checkpoint)")
    ap.add_argument("--trust-pickle", action="store_true", help="read pickles holding more than tensors")
    ap.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} is not empty (use --overwrite)", file=sys.stderr)
        return 2
    try:
        model = model_from_checkpoint(args.input, arch=_arch(args.arch), image_size=args.image_size,
                                      context_length=args.context_length, irra_config=args.irra_config,
                                      trusted=args.trust_pickle)
        _save(model, out)
        diff = _max_difference(model, load_model(out))
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = getattr(model, "load_report", None)
    print(report.summary() if report is not None else f"read kd_trainer folder {args.input}")
    print(f"wrote {out} ({model.arch if isinstance(model.arch, str) else 'custom architecture'}, "
          f"image size {model.image_size}, context length {model.context_length}); "
          f"read back, max embedding difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

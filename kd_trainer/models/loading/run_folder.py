"""kd_trainer's own checkpoints: a run's output folder (or a ``checkpoint-N`` folder inside it).

The folder holds the training weights, ``model.safetensors`` (the whole student: CLIP under
``clip.``, and the training-only ``image_proj``/``text_proj`` projections and ``mimic_head``
adapters when the run had them), and ``kd_trainer_model.json``, which says how to rebuild the
model (:func:`model_config` writes it). A finished run's folder also holds an open_clip export
(``open_clip_model.safetensors``), which leaves the training-only tensors out; a run folder is
always read from its training weights, never from the export, so it can be continued from with
its projections, and a damaged ``model.safetensors`` is an error rather than a silent switch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kd_trainer.models.factory import RetrievalModel, get_architecture
from kd_trainer.models.loading.errors import CheckpointError
from kd_trainer.models.loading.files import read_file
from kd_trainer.models.loading.source import KD_TRAINER, PathLike, Source
from kd_trainer.models.loading.stride import irra_grid

MODEL_CONFIG_NAME = "kd_trainer_model.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CLIP_PREFIX = "clip."  # every kd_trainer key of the dual encoder; projections and adapters sit beside it
_CONFIG_KEYS = ("arch", "image_size", "context_length")


def is_run_folder(path: PathLike) -> bool:
    """A folder with ``kd_trainer_model.json``: a kd_trainer run's output or one of its checkpoints."""
    p = Path(path)
    return p.is_dir() and (p / MODEL_CONFIG_NAME).is_file()


def model_config(model: RetrievalModel) -> dict[str, Any]:
    """What :func:`read_run_folder` needs to rebuild ``model``: the architecture as data (the named JSON
    may change later), its name, image size, text length, projection width, and the patch stride
    when it is not the patch size (an IRRA teacher strides its patches by less than their size)."""
    proj = model.image_proj.out_features if model.image_proj is not None else None
    visual = model.clip.visual
    conv = visual.conv1
    natural_grid = tuple(s // k for s, k in zip(model.image_size, conv.kernel_size))
    strided = tuple(conv.stride) != tuple(conv.kernel_size) or tuple(visual.grid_size) != natural_grid
    return {
        **({"stride_size": int(conv.stride[0])} if strided else {}),
        "arch": get_architecture(model.arch) if model.arch is not None else None,
        "arch_name": model.arch if isinstance(model.arch, str) else None,
        "image_size": list(model.image_size),
        "context_length": model.context_length,
        "projection_dim": proj,
    }


def read_model_config(folder: Path) -> dict[str, Any]:
    """``kd_trainer_model.json``, with the keys a rebuild needs."""
    file = folder / MODEL_CONFIG_NAME
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read {str(file)!r} ({type(e).__name__}: {e}); it says how to rebuild "
                              "the model of a kd_trainer run folder.") from e
    missing = [k for k in _CONFIG_KEYS if not isinstance(cfg, dict) or cfg.get(k) is None]
    if missing:
        raise CheckpointError(f"{str(file)!r} lacks {missing}; a kd_trainer run writes {list(_CONFIG_KEYS)} "
                              "(and projection_dim, stride_size when they apply).")
    return cfg


def read_run_folder(folder: Path, trusted: bool = False) -> Source:
    """The run's training weights and the model they belong to. Only ``model.safetensors`` (or
    ``pytorch_model.bin``) is read: the open_clip export beside it lacks the training-only tensors."""
    cfg = read_model_config(folder)
    file = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if file is None:
        raise CheckpointError(
            f"{str(folder)!r} is a kd_trainer run folder ({MODEL_CONFIG_NAME}) without its training weights: "
            f"expected one of {list(WEIGHT_FILES)}. The open_clip export in a run folder leaves out the training-"
            "only projections and adapters, so it is not read in their place; point to a checkpoint-N folder "
            "inside the run instead.")
    size = (int(cfg["image_size"][0]), int(cfg["image_size"][1]))
    stride = int(cfg["stride_size"]) if cfg.get("stride_size") else None
    patch = get_architecture(cfg["arch"])["vision_cfg"].get("patch_size", 16)
    patch = patch if isinstance(patch, int) else patch[0]
    grid = irra_grid(size, patch, stride) if stride is not None else (size[0] // patch, size[1] // patch)
    return Source(KD_TRAINER, folder, read_file(file, trusted=trusted), visual_grid=grid, arch=cfg["arch"],
                  arch_name=cfg.get("arch_name"), image_size=size, context_length=int(cfg["context_length"]),
                  stride_size=stride, projection_dim=cfg.get("projection_dim"))

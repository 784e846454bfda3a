"""Which checkpoint format a file or folder is, and its :class:`~.source.Source` read by that format's module.

Folders say what they are by a config file: ``kd_trainer_model.json`` (a kd_trainer run, checked
first, since a finished run also holds an open_clip export), ``open_clip_config.json``, or a
transformers ``config.json`` of ``model_type`` ``clip``. A bare state dict (a file, or a folder
with only weights) is told by the key prefixes only its format uses. Formats (``LoadReport.format``):

- ``kd_trainer``: our own state dicts and run folders (keys under ``clip.``; :mod:`.run_folder`).
- ``open_clip``: open_clip / OpenAI key names (:mod:`.openclip`).
- ``openai_jit``: OpenAI's TorchScript archives (:mod:`.openai`).
- ``open_clip_folder``: ``open_clip_config.json`` + weights (:mod:`.openclip`).
- ``tinyclip``: TinyCLIP release files (:mod:`.tinyclip`).
- ``irra``: IRRA's ``best.pth`` plus its ``configs.yaml`` (:mod:`.irra`).
- ``hf_clip``: Hugging Face ``CLIPModel`` folders or state dicts (:mod:`.hf_clip`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd_trainer.models.loading.errors import CheckpointError
from kd_trainer.models.loading.files import is_torchscript, read_file
from kd_trainer.models.loading.hf_clip import HF_CLIP, HF_PREFIXES, hf_clip_source, is_hf_clip_folder, read_hf_folder
from kd_trainer.models.loading.irra import IRRA, IRRA_PREFIX, IRRA_WEIGHT_FILE, irra_source
from kd_trainer.models.loading.openai import openai_jit_source
from kd_trainer.models.loading.openclip import (
    OPEN_CLIP,
    OPEN_CLIP_CONFIG_NAME,
    OPEN_CLIP_WEIGHT_FILES,
    open_clip_source,
    read_open_clip_folder,
)
from kd_trainer.models.loading.run_folder import CLIP_PREFIX, WEIGHT_FILES, is_run_folder, read_run_folder
from kd_trainer.models.loading.source import KD_TRAINER, PathLike, Source, strip_prefix
from kd_trainer.models.loading.tinyclip import TINYCLIP, TINYCLIP_PREFIXES, tinyclip_source

# Weight files of folders that carry no config: ours first, then open_clip's and an IRRA run folder's.
FOLDER_WEIGHT_FILES = WEIGHT_FILES + OPEN_CLIP_WEIGHT_FILES + (IRRA_WEIGHT_FILE,)


def classify(sd: dict[str, torch.Tensor]) -> str:
    """The format of a state dict, from the key prefixes only its format uses."""
    keys = list(sd)
    if any(k.startswith(IRRA_PREFIX) for k in keys):
        return IRRA
    if any(k.startswith(TINYCLIP_PREFIXES) for k in keys):
        return TINYCLIP
    if any(k.startswith(HF_PREFIXES) for k in keys):
        return HF_CLIP
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return KD_TRAINER
    return OPEN_CLIP


def weights_file(path: Path) -> Path:
    """The file that holds a checkpoint's weights: ``path`` itself, or the first known weight file of a folder."""
    if path.is_dir():
        for name in FOLDER_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"No weights in folder {str(path)!r}: expected one of {list(WEIGHT_FILES)} "
                              "(the output folder of a kd_trainer run, or a checkpoint-N folder inside it).")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist.")
    return path


def read_state_dict(path: PathLike, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or run folder (``.safetensors``, a torch pickle optionally nested
    under ``state_dict`` or ``model``, or an OpenAI TorchScript archive), with their keys as stored.

    Pickles are read with ``weights_only=True``; ``trusted=True`` allows arbitrary Python objects
    in them, for files from a source you trust that hold more than tensors and containers.
    """
    return read_file(weights_file(Path(path)), trusted=trusted)


def read_source(path: PathLike, *, irra_config: PathLike | None = None, trusted: bool = False) -> Source:
    """Read a checkpoint file or folder, detect its format and rename its keys to open_clip's."""
    p = Path(path)
    if is_run_folder(p):
        return read_run_folder(p, trusted)
    if p.is_dir() and (p / OPEN_CLIP_CONFIG_NAME).is_file():
        return read_open_clip_folder(p, trusted)
    if p.is_dir() and is_hf_clip_folder(p):
        return read_hf_folder(p, trusted)
    file = weights_file(p)
    sd = strip_prefix(read_file(file, trusted=trusted), "module.")
    fmt = classify(sd)
    if fmt == IRRA:
        return irra_source(sd, p, irra_config)
    if fmt == TINYCLIP:
        return tinyclip_source(sd, p)
    if fmt == HF_CLIP:
        return hf_clip_source(sd, p)
    if fmt == KD_TRAINER:
        return Source(KD_TRAINER, p, sd)
    return openai_jit_source(sd, p) if is_torchscript(file) else open_clip_source(sd, p)

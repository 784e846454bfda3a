"""Reading weights into a :class:`RetrievalModel`, strictly.

The original research code printed mismatched keys and carried on; here every key is
accounted for. A checkpoint loads when its keys match the model exactly, up to rules we can
name (a training-only projection that the target has no use for; for checkpoints from other
code bases, the rules in :mod:`kd_trainer.models.importers`). Anything else stops the run
with an error listing the missing, unexpected and reshaped keys.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from kd_trainer.models.factory import RetrievalModel, create_model

logger = logging.getLogger("kd_trainer")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Weight files of other code bases' folders (open_clip's save_pretrained layout, an IRRA run folder).
FOREIGN_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "best.pth")
MODEL_CONFIG_NAME = "kd_trainer_model.json"
PROJECTION_PREFIXES = ("image_proj.", "text_proj.", "mimic_head.")  # training-only: projections, mimic adapters
_PROJECTION_PREFIXES = PROJECTION_PREFIXES  # the name before importers.py existed


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says what was found and expected."""


@dataclass
class LoadReport:
    """What a load did with every key: loaded, or explained by a named rule (``rules[key]``)."""

    source: str
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)  # checkpoint keys explained by a rule and not loaded
    format: str = "kd_trainer"  # the detected checkpoint format (see kd_trainer.models.importers)
    resized: list[str] = field(default_factory=list)  # model keys whose checkpoint tensor a rule resized
    filled: list[str] = field(default_factory=list)  # model keys absent from the checkpoint, set by a rule
    rules: dict[str, str] = field(default_factory=dict)  # key -> the rule that explained it
    notes: list[str] = field(default_factory=list)  # changes made to the model itself (e.g. patch stride)

    @property
    def ignored(self) -> list[str]:
        """Alias of :attr:`dropped`: checkpoint keys a rule explained and left out."""
        return self.dropped

    def summary(self) -> str:
        """One line per kind of event, each naming the rule, so a log shows why keys moved."""
        s = f"loaded {self.loaded} tensors from {self.source} ({self.format})"
        by_rule: dict[str, list[str]] = {}
        for k in self.dropped:
            by_rule.setdefault(self.rules.get(k, "training-only projection tensors"), []).append(k)
        for rule, keys in by_rule.items():
            s += f"; dropped {len(keys)} {rule} ({_show(keys, 6)})"
        for k in self.resized:
            s += f"; resized {k}: {self.rules.get(k, '')}"
        for k in self.filled:
            s += f"; filled {k}: {self.rules.get(k, '')}"
        for note in self.notes:
            s += f"; {note}"
        return s


def _show(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in WEIGHT_FILES + FOREIGN_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"No weights in folder {str(path)!r}: expected one of {list(WEIGHT_FILES)} "
                              "(the output folder of a kd_trainer run, or a checkpoint-N folder inside it).")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist.")
    return path


def _is_torchscript(file: Path) -> bool:
    """OpenAI ships CLIP as TorchScript archives: zips with ``constants.pkl`` and ``code/``."""
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def _load_file(file: Path, trusted: bool) -> Any:
    if file.suffix == ".safetensors":
        return safetensors.torch.load_file(str(file))
    if _is_torchscript(file):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still how OpenAI ships
            return dict(torch.jit.load(str(file), map_location="cpu").state_dict())
    return torch.load(str(file), map_location="cpu", weights_only=not trusted)


def read_state_dict(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or run folder (``.safetensors``, a torch pickle optionally nested
    under ``state_dict`` or ``model``, or an OpenAI TorchScript archive), with their keys as stored.

    Pickles are read with ``weights_only=True``; ``trusted=True`` allows arbitrary Python objects
    in them, for files from a source you trust that hold more than tensors and containers.
    """
    file = _weights_file(Path(path))
    try:
        sd = _load_file(file, trusted)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"Checkpoint {str(file)!r} holds Python objects besides tensors, which are not "
                              f"read by default ({str(e).splitlines()[0]}). If you trust the file, load it with "
                              "trusted=True (convert_checkpoint.py --trust-pickle).") from e
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, safetensors.SafetensorError) as e:
        raise CheckpointError(f"Cannot read checkpoint {str(file)!r} ({type(e).__name__}: {e}). "
                              "The file may be truncated or not a PyTorch/safetensors checkpoint.") from e
    for nest in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(nest), dict):
            sd = sd[nest]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"Checkpoint {str(file)!r} does not hold a state dict of tensors.")
    return sd


def load_weights(model: RetrievalModel, path: str | os.PathLike, **kwargs: Any) -> LoadReport:
    """Load a checkpoint into ``model``, strictly: a kd_trainer state dict or run folder, or any format
    :func:`kd_trainer.models.importers.load_pretrained` detects (open_clip/OpenAI keys or folders,
    OpenAI TorchScript, TinyCLIP release files, IRRA ``best.pth``, Hugging Face ``CLIPModel`` folders).
    Keyword arguments go to ``load_pretrained`` (``irra_config``, ``resize_positions``, ``trusted``)."""
    from kd_trainer.models.importers import load_pretrained

    return load_pretrained(model, path, **kwargs)


def load_model(path: str | os.PathLike) -> RetrievalModel:
    """Rebuild a model saved by a kd_trainer run (its folder holds ``kd_trainer_model.json``)."""
    folder = Path(path)
    cfg_file = folder / MODEL_CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {MODEL_CONFIG_NAME}: it is not a kd_trainer output folder. "
                              "Give the architecture explicitly (recipe `arch:`) to load plain weights.")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("stride_size"):  # an IRRA teacher with its own patch stride (written by convert_checkpoint.py)
        from kd_trainer.models.importers import create_strided_model

        model = create_strided_model(cfg["arch"], tuple(cfg["image_size"]), int(cfg["stride_size"]),
                                     context_length=cfg["context_length"], projection_dim=cfg.get("projection_dim"))
    else:
        model = create_model(cfg["arch"], image_size=tuple(cfg["image_size"]),
                             context_length=cfg["context_length"], projection_dim=cfg.get("projection_dim"))
    model.arch = cfg.get("arch_name") or cfg["arch"]
    load_weights(model, folder)
    return model

"""Can a run resume from this checkpoint folder, and did a save fail because the disk is full?

A ``checkpoint-N`` folder marked complete can still hold a file that cannot be read (a disk
error, a copy cut short, a file overwritten by hand). Each file is read here before the Trainer
loads it, so the user gets one line naming the file rather than a deserialiser's traceback, and
``resume_from_checkpoint: true`` can pass over a damaged folder to an intact one:

* ``*.json``: parsed;
* ``*.safetensors``: the header is parsed and checked against the file's length (safetensors
  stores no checksum, so flipped bits inside the tensor data are not detected);
* ``*.pt``, ``*.pth``, ``*.bin`` (``torch.save``'s zip archives): every member is read and its
  CRC-32 compared with the one torch wrote.

A checkpoint of another architecture is named with both architectures before any tensor is
loaded (the Trainer would stop on the first size mismatch, or load a partial state silently).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from kd_trainer.models.loading import CheckpointError

__all__ = ["CheckpointSaveError", "architecture_mismatch", "checkpoint_problem", "disk_full", "raise_if_not_resumable"]

WEIGHTS = "model.safetensors"
# Below this much free space after a failed write the disk is taken to be full: a write that
# ran out of space leaves its partial file behind, filling the disk to (almost) nothing.
FULL_BELOW_BYTES = 16 * 2**20


class CheckpointSaveError(RuntimeError):
    """A checkpoint or the final model could not be written (a full disk); the message says
    which checkpoint is the newest complete one and how to go on."""


def _read_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as the kind of file its name says, or None when it can."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif path.suffix in (".pt", ".pth", ".bin"):
            if not zipfile.is_zipfile(path):
                return "it is not a torch.save archive (empty, cut short or overwritten)"
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f"its member {bad} fails its CRC check"
    except (OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        if type(e).__name__ != "SafetensorError":
            raise
        return f"its header is damaged ({str(e).splitlines()[0]})"
    return None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """One line saying which file of ``folder`` cannot be read and why, or None when every file reads."""
    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file():
        return f"the checkpoint {folder} holds no trainer_state.json"
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        problem = _read_problem(path)
        if problem is not None:
            return f"the checkpoint {folder} is damaged: its file {path.name} cannot be read ({problem})"
    return None


def _describe(config: Any) -> str:
    """An architecture's name as its saved config gives it (a named one, or its fields)."""
    if isinstance(config, Mapping):
        for key in ("arch_name", "arch", "name"):
            if isinstance(config.get(key), str):
                return repr(config[key])
    return json.dumps(config, sort_keys=True, default=str)


def architecture_mismatch(folder: str | os.PathLike, model: torch.nn.Module,
                          configs: Mapping[str, Any]) -> str | None:
    """One line naming the checkpoint's architecture and ``model``'s when the weights in ``folder``
    do not fit ``model`` (a tensor of another shape, or one only one side has); None when they fit.
    ``configs`` are the files the trainer saves beside the weights (file name -> content)."""
    folder = Path(folder)
    path = folder / WEIGHTS
    if not path.is_file():
        return None  # another weights layout (sharded, .bin): the Trainer's own loader reports on it
    with safe_open(str(path), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    resized = [k for k in saved if k in ours and saved[k] != ours[k]]
    only_saved, only_ours = sorted(set(saved) - set(ours)), sorted(set(ours) - set(saved))
    if not (resized or only_saved or only_ours):
        return None
    theirs, mine = "an architecture it does not record", None
    for name, config in configs.items():
        if (folder / name).is_file():
            try:
                theirs = _describe(json.loads((folder / name).read_text()))
            except (OSError, ValueError):
                pass
            mine = _describe(config)
    details = []
    if resized:
        k = resized[0]
        details.append(f"{len(resized)} tensors differ in shape (e.g. {k}: {list(saved[k])} there, {list(ours[k])} here)")
    if only_saved:
        details.append(f"{len(only_saved)} tensors only in the checkpoint (e.g. {only_saved[0]})")
    if only_ours:
        details.append(f"{len(only_ours)} tensors only in this model (e.g. {only_ours[0]})")
    return (f"the checkpoint {folder} holds a model of architecture {theirs}, but this run builds "
            f"{mine or 'another one'}: {'; '.join(details)}. Resume with the recipe that made it, or start a new "
            f"run from its weights (student.checkpoint: {folder})")


def raise_if_not_resumable(folder: str | os.PathLike, model: torch.nn.Module, configs: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` (one line) when ``folder`` has an unreadable file or another architecture."""
    problem = checkpoint_problem(folder) or architecture_mismatch(folder, model, configs)
    if problem is not None:
        raise CheckpointError(problem)


def disk_full(error: BaseException, folder: str | os.PathLike) -> bool:
    """Did ``error``, raised while writing into ``folder``, come from a full disk (or quota)?

    An ``OSError`` says so by its errno; torch's zip writer and safetensors do not always carry
    it (torch reports only a short write), so a disk left with almost no free space counts too."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(seen) for s in ("No space left", "StorageFull", "Disk quota exceeded")):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW_BYTES
    except OSError:
        return False

"""The tensors stored in one checkpoint file, read without running code from it.

A file is recognised by its first bytes, not its name: a safetensors file (an 8-byte header
length, then a JSON header), a ``torch.save`` zip archive (which is also the layout of OpenAI's
TorchScript archives), or a legacy ``torch.save`` pickle. Anything else is not a checkpoint, and is
reported as such, never as a pickle that needs trusting.

Pickles are read with ``weights_only=True``. Only a well-formed pickle that holds Python objects
besides tensors and containers gets the advice to trust it (``trusted=True``,
``convert_checkpoint.py --trust-pickle``), since that load may run code from the file.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import safetensors
import safetensors.torch
import torch

from kd_trainer.models.loading.errors import CheckpointError

NOT_A_CHECKPOINT = "not a checkpoint (could not be read as torch.save / safetensors / TorchScript)"

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch_zip"  # torch.save since PyTorch 1.6, and TorchScript archives
TORCH_PICKLE = "torch_pickle"  # torch.save's legacy format: a pickle stream
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # pickle's PROTO opcode, the first byte of every protocol >= 2 pickle
_MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def file_kind(file: Path) -> str | None:
    """``safetensors``, ``torch_zip`` or ``torch_pickle`` from the file's first bytes; None for anything else.

    A truncated file keeps its first bytes, so it is still recognised, and its read then fails with
    a message that says it may be truncated."""
    with open(file, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 0 < header_len < _MAX_SAFETENSORS_HEADER:
            return SAFETENSORS
    if head.startswith(_ZIP_MAGIC):
        return TORCH_ZIP
    if len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        return TORCH_PICKLE
    return None


def is_torchscript(file: Path) -> bool:
    """OpenAI ships CLIP as TorchScript archives: zips with ``constants.pkl`` and ``code/``."""
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def _parse_pickles(stream: IO[bytes], count: int) -> None:
    """Walk ``count`` consecutive pickles opcode by opcode, executing nothing; ValueError where one is malformed."""
    for _ in range(count):
        for _ in pickletools.genops(stream):
            pass


def _is_well_formed_pickle(file: Path, kind: str) -> bool:
    """Whether the file's pickle parses to its end. A ``weights_only`` refusal of a well-formed pickle
    means it holds Python objects; of a malformed one, that the file is damaged or not a checkpoint.
    A zip keeps its pickle in ``data.pkl``; a legacy file starts with four pickles (magic number,
    protocol, system info, the object), followed by the raw storages."""
    try:
        if kind == TORCH_ZIP:
            with zipfile.ZipFile(file) as z:
                name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if name is None:
                    return False
                _parse_pickles(io.BytesIO(z.read(name)), 1)
        else:
            with open(file, "rb") as f:
                _parse_pickles(f, 4)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError):
        return False
    return True


def _read_any(file: Path, kind: str, trusted: bool) -> Any:
    if kind == SAFETENSORS:
        return safetensors.torch.load_file(str(file))
    if kind == TORCH_ZIP and is_torchscript(file):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still how OpenAI ships
            return dict(torch.jit.load(str(file), map_location="cpu").state_dict())
    return torch.load(str(file), map_location="cpu", weights_only=not trusted)


def read_file(file: Path, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint file, optionally nested under ``state_dict`` or ``model``, keys as stored."""
    kind = file_kind(file)
    if kind is None:
        if file.stat().st_size == 0:
            raise CheckpointError(f"{str(file)!r} is empty (0 bytes): {NOT_A_CHECKPOINT}.")
        raise CheckpointError(f"{str(file)!r} is {NOT_A_CHECKPOINT}: its first bytes are none of these formats'.")
    try:
        sd = _read_any(file, kind, trusted)
    except pickle.UnpicklingError as e:
        if trusted or not _is_well_formed_pickle(file, kind):
            raise CheckpointError(f"Cannot read checkpoint {str(file)!r} ({str(e).splitlines()[0]}): it is "
                                  f"{NOT_A_CHECKPOINT}, or it is truncated or damaged.") from e
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

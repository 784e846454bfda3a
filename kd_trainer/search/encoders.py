"""Which model embeds a gallery and a query: a PyTorch model (a run folder, an open_clip export, any
checkpoint ``kd-trainer eval`` reads) or one variant of an ONNX export, behind one interface.

    encoder = load_encoder("runs/demo/student_kd")                    # PyTorch
    encoder = load_encoder("exports/student", onnx_variant="int8")    # ONNX: a folder with preprocess.json
    feats = encoder.embed_images(paths)                               # (N, D) float32
    query = encoder.embed_texts(["a woman in a red coat"])

Each side is preprocessed by the code its own evaluation uses, so an index holds the embeddings
evaluation would compute: a PyTorch model through the data pipeline's evaluation transform and
:func:`kd_trainer.evaluation.embed_dataset` (what ``kd-trainer eval`` runs), an ONNX export from its
``preprocess.json`` through :class:`~kd_trainer.models.onnx.OnnxDualEncoder` (what ``eval --onnx`` runs).

The fingerprint says which model made the embeddings: for PyTorch, the sha256 of every weight and the
architecture (:func:`kd_trainer.distill.cache.teacher_fingerprint`, the digest a teacher cache is
checked against); for ONNX, the sha256 of the variant's two graph files and of the preprocessing spec.
Two encoders with one fingerprint give the same embeddings, so a query embedded by one can be ranked
against a gallery embedded by the other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import datasets
import torch

from kd_trainer.data import RetrievalTransform, build_image_transform, collate_retrieval, open_image, tokenize
from kd_trainer.distill.cache.fingerprint import teacher_fingerprint
from kd_trainer.evaluation import embed_dataset
from kd_trainer.models.loading import model_from_checkpoint
from kd_trainer.models.onnx import PREPROCESS_FILE, VARIANTS, OnnxDualEncoder
from kd_trainer.search.errors import SearchIndexError

__all__ = ["Encoder", "OnnxEncoder", "TorchEncoder", "is_onnx_export", "load_encoder"]


class Encoder(Protocol):
    """What indexing and searching need from a model."""

    def describe(self) -> dict[str, Any]:
        """``path``, ``kind`` (pytorch | onnx), ``variant``, ``fingerprint``, ``embed_dim``."""
        ...

    def embed_images(self, paths: Sequence[str], batch_size: int = 64) -> torch.Tensor: ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


def is_onnx_export(path: str | os.PathLike) -> bool:
    """A folder written by ``kd-trainer export-onnx`` (it has ``preprocess.json``)."""
    return (Path(path) / PREPROCESS_FILE).is_file()


def load_encoder(path: str | os.PathLike, *, onnx_variant: str | None = None) -> "TorchEncoder | OnnxEncoder":
    """The model at ``path``: an ONNX export (``onnx_variant``, default fp32) or anything
    :func:`~kd_trainer.models.loading.model_from_checkpoint` reads."""
    if is_onnx_export(path):
        return OnnxEncoder(path, onnx_variant or "fp32")
    if onnx_variant is not None:
        raise SearchIndexError(f"--onnx-variant {onnx_variant} applies to an ONNX export (a folder with "
                         f"{PREPROCESS_FILE}); {str(path)!r} is not one")
    return TorchEncoder(path)


class TorchEncoder:
    """A PyTorch dual encoder, on the CPU, in eval mode."""

    kind = "pytorch"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.model = model_from_checkpoint(str(path)).eval()
        self._fingerprint: str | None = None

    def describe(self) -> dict[str, Any]:
        if self._fingerprint is None:  # a full pass over the weights: computed once
            self._fingerprint = teacher_fingerprint(self.model)["digest"]
        return {"path": str(self.path), "kind": self.kind, "variant": None, "fingerprint": self._fingerprint,
                "embed_dim": int(self.model.embed_dim), "image_size": list(self.model.image_size),
                "context_length": int(self.model.context_length)}

    def embed_images(self, paths: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        # The rows of a gallery split as load_pedes gives them, through the transform evaluation uses.
        rows = datasets.Dataset.from_dict({"image_path": list(paths), "pid": list(range(len(paths)))})
        view = rows.with_transform(RetrievalTransform(build_image_transform(self.model.image_size, train=False),
                                                      self.model.context_length, "gallery"))
        feats, _ = embed_dataset(self.model.encode_image, view, "pixel_values", device=torch.device("cpu"),
                                 batch_size=batch_size, collate_fn=collate_retrieval, desc="gallery",
                                 progress=False)
        return feats

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(tokenize(list(texts), self.model.context_length)).float()


def _sha256_file(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _batches(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class OnnxEncoder:
    """One variant of an ONNX export, preprocessed from its ``preprocess.json``."""

    kind = "onnx"

    def __init__(self, path: str | os.PathLike, variant: str = "fp32"):
        if variant not in VARIANTS:
            raise SearchIndexError(f"onnx variant must be one of {list(VARIANTS)}, got {variant!r}")
        self.path = Path(path).resolve()
        self.variant = variant
        self.runtime = OnnxDualEncoder(self.path, variant)
        self._fingerprint: str | None = None

    def describe(self) -> dict[str, Any]:
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps({k: self.runtime.spec.get(k) for k in ("image", "text", "output")},
                                          sort_keys=True).encode())
            for tower in sorted(self.runtime.paths):
                _sha256_file(self.runtime.paths[tower], h)
            self._fingerprint = h.hexdigest()
        return {"path": str(self.path), "kind": self.kind, "variant": self.variant, "fingerprint": self._fingerprint,
                "embed_dim": int(self.runtime.embed_dim), "image_size": list(self.runtime.image_size),
                "context_length": int(self.runtime.context_length)}

    def embed_images(self, paths: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        rt = self.runtime
        return torch.cat([rt.encode_image(rt.preprocess_images(open_image(p, "gallery") for p in chunk))
                          for chunk in _batches(list(paths), batch_size)]).float()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.runtime.encode_text(self.runtime.tokenize(list(texts))).float()

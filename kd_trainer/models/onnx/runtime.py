"""Running an exported folder: one variant's two graphs in ONNX Runtime, with the preprocessing of its
``preprocess.json`` and the ``encode_image`` / ``encode_text`` interface evaluation uses.

    encoder = OnnxDualEncoder("exports/student", variant="int8")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from kd_trainer.data import tokenize
from kd_trainer.data.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID
from kd_trainer.models.onnx.folder import (
    IMAGE_INPUT,
    PAD_TOKEN_ID,
    PREPROCESS_FILE,
    TEXT_INPUT,
    VARIANTS,
    OnnxFolderError,
    check_graphs,
    read_spec,
    require_deploy,
)

__all__ = ["OnnxDualEncoder"]


def _ort() -> Any:
    require_deploy()
    import onnxruntime

    return onnxruntime


def _graph_shape(session: Any) -> list[Any]:
    return list(session.get_inputs()[0].shape)


class OnnxDualEncoder:
    """One variant of an exported folder, with the interface evaluation uses (``encode_image`` /
    ``encode_text`` returning float32 tensors) and the preprocessing of ``preprocess.json``.

    Loading checks that the folder is whole (each graph matches the checksum ``preprocess.json`` records,
    and ``export_report.json`` describes these graphs: :func:`~kd_trainer.models.onnx.folder.check_graphs`),
    that the graphs take what ``preprocess.json`` promises (image size, context length, embedding width)
    and that its token ids are CLIP's, so a folder assembled by hand from mismatched pieces fails here,
    naming the file or both values, instead of returning embeddings of the wrong inputs.
    """

    def __init__(self, folder: str | os.PathLike, variant: str = "fp32", *,
                 providers: Sequence[str] | None = None, threads: int | None = None):
        ort = _ort()
        self.folder = Path(folder)
        self.spec = read_spec(self.folder)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        written = self.spec.get("variants", {})
        if variant not in written:
            hint = f"; export with --{variant}" if variant != "fp32" else ""
            raise OnnxFolderError(f"{str(self.folder)!r} has no {variant} graphs (it has {sorted(written)}){hint}")
        self.variant = variant
        img, txt = self.spec["image"], self.spec["text"]
        self.image_size = (int(img["size"][0]), int(img["size"][1]))
        self.context_length = int(txt["context_length"])
        self.embed_dim = int(self.spec["output"]["embed_dim"])
        self.mean = np.asarray(img["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(img["std"], dtype=np.float32).reshape(3, 1, 1)
        if (txt["sot_token_id"], txt["eot_token_id"], txt["pad_token_id"]) != (SOT_TOKEN_ID, EOT_TOKEN_ID,
                                                                               PAD_TOKEN_ID):
            raise OnnxFolderError(f"{PREPROCESS_FILE} has start/end/pad ids {txt['sot_token_id']}/"
                                  f"{txt['eot_token_id']}/{txt['pad_token_id']}; this tokenizer (CLIP BPE) uses "
                                  f"{SOT_TOKEN_ID}/{EOT_TOKEN_ID}/{PAD_TOKEN_ID}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        providers = list(providers or ["CPUExecutionProvider"])
        if variant == "fp16" and providers[0] == "CPUExecutionProvider":
            # ONNX Runtime 1.32's CPU provider crashes (segfault) in an ORT_ENABLE_ALL-only graph
            # optimisation of these fp16 graphs; one level down runs them correctly.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        self.paths = check_graphs(self.folder, self.spec, written[variant])
        self.sessions = {}
        for tower, path in self.paths.items():
            try:
                self.sessions[tower] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as e:  # onnxruntime's own errors (Fail, InvalidProtobuf, ...) share no base class
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise OnnxFolderError(f"{str(path)!r} cannot be loaded by ONNX Runtime: {first}") from e
        self._check_graphs()

    def _check_graphs(self) -> None:
        image_shape, text_shape = _graph_shape(self.sessions["image"]), _graph_shape(self.sessions["text"])
        graph_hw = tuple(image_shape[2:])
        if len(image_shape) != 4 or graph_hw != self.image_size:
            raise OnnxFolderError(f"{self.paths['image']}: the graph takes images of shape "
                                  f"{image_shape} (H, W = {graph_hw}), but {PREPROCESS_FILE} resizes to "
                                  f"{self.image_size}; the graph was exported at another image size")
        if len(text_shape) != 2 or text_shape[1] != self.context_length:
            raise OnnxFolderError(f"{self.paths['text']}: the graph takes token ids of shape "
                                  f"{text_shape}, but {PREPROCESS_FILE} says context_length {self.context_length}")
        for tower in ("image", "text"):
            out_shape = self.sessions[tower].get_outputs()[0].shape
            if out_shape[-1] != self.embed_dim:
                raise OnnxFolderError(f"the {tower} graph outputs {out_shape}, but {PREPROCESS_FILE} says "
                                      f"embed_dim {self.embed_dim}")

    # preprocessing, from preprocess.json alone
    def preprocess_images(self, images: Iterable[Image.Image]) -> np.ndarray:
        """``(N, 3, H, W)`` float32: RGB, squash resize (bilinear, antialiased), /255, mean/std."""
        h, w = self.image_size
        out = [np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)
               .transpose(2, 0, 1) / 255.0 for im in images]
        return ((np.stack(out) - self.mean) / self.std).astype(np.float32)

    def tokenize(self, captions: Sequence[str]) -> np.ndarray:
        """``(N, context_length)`` int64 CLIP BPE ids."""
        return tokenize(list(captions), self.context_length).numpy()

    # the graphs
    def encode_image(self, pixel_values: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = pixel_values.detach().cpu().numpy() if isinstance(pixel_values, torch.Tensor) else pixel_values
        return torch.from_numpy(self.sessions["image"].run(None, {IMAGE_INPUT: x.astype(np.float32)})[0])

    def encode_text(self, input_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = input_ids.detach().cpu().numpy() if isinstance(input_ids, torch.Tensor) else input_ids
        return torch.from_numpy(self.sessions["text"].run(None, {TEXT_INPUT: x.astype(np.int64)})[0])



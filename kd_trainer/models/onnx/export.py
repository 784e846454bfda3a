"""Export: a dual encoder's two towers traced to ONNX graphs (plus INT8 / FP16 variants) and the
``preprocess.json`` that says how to make their inputs. What the folder holds is described in
:mod:`kd_trainer.models.onnx`; whether the graphs still are the model is :mod:`.verify`'s job.

INT8: the schemes are in :mod:`.quantize`; by default ONNX Runtime's dynamic quantisation of the matrix
products (int8 weights with one scale per output channel, activations quantised per call). Measured on
SynthPEDES (docs/results.md, "Which INT8").
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from kd_trainer.data import CLIP_MEAN, CLIP_STD, tokenize
from kd_trainer.data.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID
from kd_trainer.models.factory import RetrievalModel
from kd_trainer.models.finite import require_finite_weights
from kd_trainer.models.loading import resize_visual_positions
from kd_trainer.models.onnx.folder import (
    IMAGE_ENCODER,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    PAD_TOKEN_ID,
    PREPROCESS_FILE,
    SPEC_FORMAT,
    TEXT_ENCODER,
    TEXT_INPUT,
    TEXT_OUTPUT,
    OnnxExportError,
    file_sha256,
    graph_file_name,
    install_export,
    new_stage,
    require_deploy,
    write_json,
)
from kd_trainer.models.onnx.quantize import DEFAULT_INT8_SCHEME, Int8Scheme, resolve_int8_scheme

__all__ = [
    "PROBE_CAPTIONS",
    "OnnxExport",
    "arch_label",
    "at_image_size",
    "preprocess_spec",
    "export_onnx",
]

OPSET = 18
# Captions for the numerical check when no dataset is given (any text works; these look like the task's).
PROBE_CAPTIONS = (
    "A woman in a red coat and black trousers carries a white shoulder bag.",
    "The man wears a blue shirt, grey shorts and white sneakers.",
    "a young girl with long black hair",
    "A person in a green jacket is walking with a backpack and dark jeans, looking down at a phone.",
)


# ----------------------------------------------------------------------------------------------
# The PyTorch side: the modules that get traced


def at_image_size(model: RetrievalModel, image_size: Sequence[int] | None) -> RetrievalModel:
    """``model`` itself when ``image_size`` is None or its own size; otherwise a copy that takes
    ``(H, W)`` images: the patch grid follows the convolution's kernel and stride
    (``(H - k) // s + 1``, which is ``H / patch`` for a plain ViT and IRRA's grid for a strided one) and
    the visual position embedding is resized to it (bilinear, class token kept, as every importer does).

    Deploying at a lower resolution buys speed at some accuracy; the dataset check of
    :func:`verify_onnx_export` measures how much against the model at its own size.
    """
    if image_size is None:
        return model
    size = (int(image_size[0]), int(image_size[1]))
    if size == tuple(model.image_size):
        return model
    visual = model.clip.visual
    (kh, kw), (sh, sw) = visual.conv1.kernel_size, visual.conv1.stride
    if size[0] < kh or size[1] < kw:
        raise OnnxExportError(f"image size {size} (H, W) is smaller than the model's {kh}x{kw} patch")
    grid = ((size[0] - kh) // sh + 1, (size[1] - kw) // sw + 1)
    out = copy.deepcopy(model)
    v = out.clip.visual
    pos = v.positional_embedding
    if pos.shape[0] != v.grid_size[0] * v.grid_size[1] + 1:
        raise OnnxExportError(f"the visual position embedding has {pos.shape[0]} rows, not 1 + the "
                         f"{v.grid_size[0]}x{v.grid_size[1]} grid; cannot resize it to image size {size}")
    with torch.no_grad():
        v.positional_embedding = nn.Parameter(resize_visual_positions(pos.detach(), tuple(v.grid_size), grid))
    v.grid_size = grid
    v.image_size = size
    return out


class _ImageTower(nn.Module):
    def __init__(self, model: RetrievalModel):
        super().__init__()
        self.clip = model.clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixel_values, normalize=True)


class _TextTower(nn.Module):
    def __init__(self, model: RetrievalModel):
        super().__init__()
        self.clip = model.clip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(input_ids, normalize=True)


def arch_label(model: RetrievalModel) -> str:
    """The architecture's name, as reports and preprocess.json show it."""
    return model.arch if isinstance(model.arch, str) else "custom architecture"


def preprocess_spec(model: RetrievalModel, variants: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """What ``preprocess.json`` says: how to turn an image and a caption into the graphs' inputs.

    The image transform is IRRA's evaluation transform (``kd_trainer.data.transforms``): a plain resize
    to (H, W), aspect ratio not kept ("squash", never a centre crop, which would cut off head and feet),
    bilinear with antialiasing (PIL's ``Image.resize(..., BILINEAR)``), then /255 and (x - mean) / std,
    RGB, NCHW. The tokenizer is CLIP's BPE (the vocabulary bundled in open_clip) as
    ``kd_trainer.data.tokenizer`` applies it.
    """
    h, w = (int(x) for x in model.image_size)
    return {
        "format": SPEC_FORMAT,
        "image": {
            "input": IMAGE_INPUT, "dtype": "float32", "layout": "NCHW", "channel_order": "RGB",
            "size": [h, w], "resize": "squash", "interpolation": "bilinear", "antialias": True,
            "scale": 1 / 255, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
        },
        "text": {
            "input": TEXT_INPUT, "dtype": "int64", "tokenizer": "clip_bpe",
            "vocab": "bpe_simple_vocab_16e6.txt.gz (OpenAI CLIP, bundled with open_clip)",
            "lowercase": True,
            "cleaning": "ftfy.fix_text, html.unescape twice, strip, whitespace runs to one space, lower-case "
                        "(open_clip SimpleTokenizer, clean='lower')",
            "context_length": int(model.context_length),
            "sot_token_id": SOT_TOKEN_ID, "eot_token_id": EOT_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID,
            "truncation": "keep the first context_length ids and make the last one eot_token_id",
        },
        "output": {
            "image": IMAGE_OUTPUT, "text": TEXT_OUTPUT, "embed_dim": int(model.embed_dim),
            "l2_normalized": True, "similarity": "dot product",
        },
        "source": {"arch": arch_label(model)},
        "variants": {k: dict(v) for k, v in (variants or {}).items()},
    }


# ----------------------------------------------------------------------------------------------
# Export


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: ``files[variant][tower]`` (tower ``image`` / ``text``)."""

    folder: Path
    files: dict[str, dict[str, Path]]
    spec: dict[str, Any]


def _trace(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    module.eval()  # the wrapper itself; the model inside is in eval mode already
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=[input_name],
                                output_names=[output_name], dynamic_shapes=({0: batch},),
                                opset_version=OPSET, external_data=False, verbose=False)
    program.save(str(path))
    onnx.checker.check_model(str(path))


class _BelowErrorFrom(logging.Filter):
    """Drops records below ERROR logged from files under ``folder``."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or self.folder not in record.pathname


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """Under the CLI's INFO logging, the exporter's graph passes (onnxscript, onnx_ir) and the quantiser
    (onnxruntime.quantization, on the root logger) write hundreds of lines per graph; the quantiser also
    warns to run its pre-processing (``quant_pre_process``), whose symbolic shape inference fails on these
    graphs. Errors still show; what the export did is in the report."""
    # the weight-only quantiser logs on its own logger (onnxruntime.quantization.matmul_nbits_quantizer),
    # whose records reach the root logger's handlers without passing the root logger's filters
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "onnxruntime.quantization")]
    levels = [lg.level for lg in loggers]
    quantizer = _BelowErrorFrom(os.path.join("onnxruntime", "quantization"))
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    logging.getLogger().addFilter(quantizer)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quantizer)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _convert_fp16(fp32: Path, out: Path, tower: str) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Inputs and outputs stay float32, so the same preprocessing and the same comparison apply.
    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.save(model, str(out))


def export_onnx(
    model: RetrievalModel,
    out_dir: str | os.PathLike,
    *,
    int8: bool = False,
    fp16: bool = False,
    image_size: Sequence[int] | None = None,
    int8_scheme: Union[str, Int8Scheme] = DEFAULT_INT8_SCHEME,
) -> OnnxExport:
    """Write ``model``'s two towers as ONNX graphs into ``out_dir`` with ``preprocess.json``.

    ``image_size`` ``(H, W)`` exports at another input size (see :func:`at_image_size`); by default the
    model's own. ``int8`` adds INT8 graphs quantised by ``int8_scheme`` (a name in
    :data:`~kd_trainer.models.onnx.quantize.INT8_SCHEMES`, by default ``dynamic``, or a callable; the name
    is recorded in ``preprocess.json``), ``fp16`` half-precision ones (for GPU and NPU runtimes; float32
    inputs and outputs). The training-only projections are not exported.

    A model with non-finite weights is refused before anything is traced or written. The folder changes
    only when the export is complete (:func:`kd_trainer.models.onnx.folder.install_export`): an export
    that fails or is killed leaves the previous one whole. Nothing is checked here beyond ONNX's own
    model checker: :func:`verify_onnx_export` does that.
    """
    require_deploy()
    quantize_int8 = resolve_int8_scheme(int8_scheme)
    require_finite_weights(model.clip, name="the model", refused="exported")
    was_training = model.training
    traced = at_image_size(model, image_size).eval()
    out = Path(out_dir)
    stage = new_stage(out)
    h, w = traced.image_size
    files: dict[str, dict[str, Path]] = {"fp32": {"image": stage / IMAGE_ENCODER, "text": stage / TEXT_ENCODER}}
    try:
        with _quiet_exporter_logs(), torch.no_grad():
            _trace(_ImageTower(traced), torch.zeros(2, 3, h, w), files["fp32"]["image"], IMAGE_INPUT, IMAGE_OUTPUT)
            _trace(_TextTower(traced), tokenize(list(PROBE_CAPTIONS[:2]), traced.context_length),
                   files["fp32"]["text"], TEXT_INPUT, TEXT_OUTPUT)
            for variant, wanted, convert in (("int8", int8, quantize_int8), ("fp16", fp16, _convert_fp16)):
                if wanted:
                    files[variant] = {t: stage / graph_file_name(t, variant) for t in ("image", "text")}
                    for tower in ("image", "text"):
                        convert(files["fp32"][tower], files[variant][tower], tower)
        spec = preprocess_spec(traced, {v: {t: p.name for t, p in f.items()} for v, f in files.items()})
        spec["source"]["model_image_size"] = list(model.image_size)
        if int8:
            spec["int8_scheme"] = (int8_scheme if isinstance(int8_scheme, str)
                                   else getattr(int8_scheme, "name", "custom"))
            if callable(getattr(quantize_int8, "describe", None)):  # what a calibrated scheme decided
                spec["int8_plan"] = quantize_int8.describe()
        spec["sha256"] = {p.name: file_sha256(p) for f in files.values() for p in f.values()}
        write_json(stage / PREPROCESS_FILE, spec)
        install_export(stage, out)
    finally:
        model.train(was_training)
        shutil.rmtree(stage, ignore_errors=True)  # only left when the export failed
    return OnnxExport(folder=out, files={v: {t: out / p.name for t, p in f.items()} for v, f in files.items()},
                      spec=spec)

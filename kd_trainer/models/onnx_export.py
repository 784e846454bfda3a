"""Ship a dual encoder to runtimes without Python or PyTorch: two ONNX graphs, the preprocessing they
expect, and proof on the retrieval metric that the graphs still are the model.

    export = export_onnx(model, "exports/student", int8=True)      # graphs + preprocess.json
    report = verify_onnx_export("exports/student", model, dataset="rstpreid", root="./data")
    encoder = OnnxDualEncoder("exports/student", variant="int8")  # encode_image / encode_text, as evaluation wants

The folder:

* ``image_encoder.onnx`` / ``text_encoder.onnx``: ``pixel_values (batch, 3, H, W) float32`` ->
  ``image_embeds (batch, D)`` and ``input_ids (batch, L) int64`` -> ``text_embeds (batch, D)``, both
  outputs L2-normalised, so a similarity is a dot product. The batch axis is dynamic; H, W and L are fixed.
* ``image_encoder.int8.onnx`` ... (``int8=True``) and ``*.fp16.onnx`` (``fp16=True``): the same graphs,
  weights quantised / stored in half precision, inputs and outputs unchanged.
* ``preprocess.json``: everything a serving stack needs to make those inputs (squash resize to (H, W),
  bilinear with antialiasing as PIL does it, /255, mean/std; CLIP BPE with the start/end/pad ids and the
  context length), read back here by :class:`OnnxDualEncoder`, which preprocesses only from it.
* ``export_report.json``: what :func:`verify_onnx_export` measured.

Why the checks. An exported graph can be numerically faithful and still not be the model users trained:
a wrong input size, a wrong tokenizer setting, or quantisation that moves close pairs past each other all
pass a smoke test. So the export is compared twice: the graphs against the PyTorch module on one batch
(max abs difference of the embeddings; fp32 must agree to ``atol``), and, given a dataset, every variant is
evaluated with the project's own ranking code (:func:`kd_trainer.evaluation.rank_metrics`, on images and
captions preprocessed from ``preprocess.json``) against the PyTorch model at its own size
(:func:`kd_trainer.evaluation.evaluate_retrieval`); a drop of R@1 or mAP by more than ``tolerance``
points fails the export.

INT8: ONNX Runtime's dynamic quantisation (weights int8 ahead of time, activations quantised per call)
of the matrix products only: every ``MatMul`` and ``Gemm`` with a constant weight, with one scale per
output channel. Measured on SynthPEDES (README, "Deploy: ONNX / INT8"): per-tensor scales, or also
quantising the token embedding (``Gather``, which would make the text graph 4x smaller) or the patch
convolution, cost up to 1-2 R@1 points where this choice costs none.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from kd_trainer.data import (
    CLIP_MEAN,
    CLIP_STD,
    DatasetFormatError,
    canonical_dataset_name,
    collate_retrieval,
    load_pedes,
    open_image,
    tokenize,
    with_retrieval_transforms,
)
from kd_trainer.data.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID
from kd_trainer.evaluation import evaluate_retrieval, format_metrics, rank_metrics
from kd_trainer.models.factory import RetrievalModel
from kd_trainer.models.loading import CheckpointError, resize_visual_positions

__all__ = [
    "IMAGE_ENCODER",
    "TEXT_ENCODER",
    "PREPROCESS_FILE",
    "REPORT_FILE",
    "VARIANTS",
    "DeployDependencyError",
    "OnnxFolderError",
    "ExportVerificationError",
    "OnnxExport",
    "OnnxDualEncoder",
    "at_image_size",
    "preprocess_spec",
    "export_onnx",
    "compare_embeddings",
    "evaluate_onnx",
    "verify_onnx_export",
    "format_export_report",
    "update_model_card",
]

IMAGE_ENCODER = "image_encoder.onnx"
TEXT_ENCODER = "text_encoder.onnx"
PREPROCESS_FILE = "preprocess.json"
REPORT_FILE = "export_report.json"
VARIANTS = ("fp32", "int8", "fp16")
IMAGE_INPUT, TEXT_INPUT = "pixel_values", "input_ids"
IMAGE_OUTPUT, TEXT_OUTPUT = "image_embeds", "text_embeds"
PAD_TOKEN_ID = 0
OPSET = 18
SPEC_FORMAT = "kd_trainer-onnx/1"
CARD_START = "<!-- kd_trainer:onnx-export:start -->"
CARD_END = "<!-- kd_trainer:onnx-export:end -->"
# Captions for the numerical check when no dataset is given (any text works; these look like the task's).
PROBE_CAPTIONS = (
    "A woman in a red coat and black trousers carries a white shoulder bag.",
    "The man wears a blue shirt, grey shorts and white sneakers.",
    "a young girl with long black hair",
    "A person in a green jacket is walking with a backpack and dark jeans, looking down at a phone.",
)
EXTRA_HINT = "pip install 'kd_trainer[deploy]'"


class DeployDependencyError(ImportError):
    """The ``deploy`` extra (onnx, onnxruntime, onnxscript) is not installed."""


class OnnxFolderError(CheckpointError):
    """An ONNX export folder that cannot be used as asked: a file missing, or graphs that disagree with
    ``preprocess.json`` (the message names both values)."""


class ExportVerificationError(RuntimeError):
    """The exported graphs are not the model: embeddings differ beyond ``atol`` or a retrieval metric
    dropped beyond ``tolerance``. ``report`` holds every measurement (also written to export_report.json)."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # sys.modules[name] is None: the package is blocked, as good as absent
        return False


def _require_deploy() -> None:
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if not _installed(name)]
    if missing:
        raise DeployDependencyError(f"ONNX export needs {', '.join(missing)} (not installed): {EXTRA_HINT}")


def _ort() -> Any:
    _require_deploy()
    import onnxruntime

    return onnxruntime


def _file_name(tower: str, variant: str) -> str:
    base = IMAGE_ENCODER if tower == "image" else TEXT_ENCODER
    return base if variant == "fp32" else base.replace(".onnx", f".{variant}.onnx")


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
        raise ValueError(f"image size {size} (H, W) is smaller than the model's {kh}x{kw} patch")
    grid = ((size[0] - kh) // sh + 1, (size[1] - kw) // sw + 1)
    out = copy.deepcopy(model)
    v = out.clip.visual
    pos = v.positional_embedding
    if pos.shape[0] != v.grid_size[0] * v.grid_size[1] + 1:
        raise ValueError(f"the visual position embedding has {pos.shape[0]} rows, not 1 + the "
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


def _arch_name(model: RetrievalModel) -> str:
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
        "source": {"arch": _arch_name(model)},
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
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
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


def _quantize_int8(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser rewrites the exporter's Gemm nodes (attention output projections) as MatMul first.
    quantize_dynamic(fp32, out, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8)


def _convert_fp16(fp32: Path, out: Path) -> None:
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
) -> OnnxExport:
    """Write ``model``'s two towers as ONNX graphs into ``out_dir`` with ``preprocess.json``.

    ``image_size`` ``(H, W)`` exports at another input size (see :func:`at_image_size`); by default the
    model's own. ``int8`` adds dynamically quantised graphs, ``fp16`` half-precision ones (for GPU and NPU
    runtimes; float32 inputs and outputs). The training-only projections are not exported.
    Nothing is checked here beyond ONNX's own model checker: :func:`verify_onnx_export` does that.
    """
    _require_deploy()
    was_training = model.training
    traced = at_image_size(model, image_size).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = traced.image_size
    files: dict[str, dict[str, Path]] = {"fp32": {"image": out / IMAGE_ENCODER, "text": out / TEXT_ENCODER}}
    try:
        with _quiet_exporter_logs(), torch.no_grad():
            _trace(_ImageTower(traced), torch.zeros(2, 3, h, w), files["fp32"]["image"], IMAGE_INPUT, IMAGE_OUTPUT)
            _trace(_TextTower(traced), tokenize(list(PROBE_CAPTIONS[:2]), traced.context_length),
                   files["fp32"]["text"], TEXT_INPUT, TEXT_OUTPUT)
            for variant, wanted, convert in (("int8", int8, _quantize_int8), ("fp16", fp16, _convert_fp16)):
                if wanted:
                    files[variant] = {t: out / _file_name(t, variant) for t in ("image", "text")}
                    for tower in ("image", "text"):
                        convert(files["fp32"][tower], files[variant][tower])
    finally:
        model.train(was_training)
    spec = preprocess_spec(traced, {v: {t: p.name for t, p in f.items()} for v, f in files.items()})
    spec["source"]["model_image_size"] = list(model.image_size)
    (out / PREPROCESS_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return OnnxExport(folder=out, files=files, spec=spec)


# ----------------------------------------------------------------------------------------------
# The ONNX side: running an exported folder


def _read_spec(folder: Path) -> dict[str, Any]:
    path = folder / PREPROCESS_FILE
    if not path.is_file():
        raise OnnxFolderError(f"{str(folder)!r} has no {PREPROCESS_FILE}: not a folder written by "
                              "`kd-trainer export-onnx`")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OnnxFolderError(f"{str(path)!r} is not valid JSON ({e})") from e
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise OnnxFolderError(f"{str(path)!r} has format {found!r}, expected {SPEC_FORMAT!r}")
    return spec


def _graph_shape(session: Any) -> list[Any]:
    return list(session.get_inputs()[0].shape)


class OnnxDualEncoder:
    """One variant of an exported folder, with the interface evaluation uses (``encode_image`` /
    ``encode_text`` returning float32 tensors) and the preprocessing of ``preprocess.json``.

    Loading checks that the graphs take what ``preprocess.json`` promises (image size, context length,
    embedding width) and that its token ids are CLIP's, so a folder assembled by hand from mismatched
    pieces fails here, naming both values, instead of returning embeddings of the wrong inputs.
    """

    def __init__(self, folder: str | os.PathLike, variant: str = "fp32", *,
                 providers: Sequence[str] | None = None, threads: int | None = None):
        ort = _ort()
        self.folder = Path(folder)
        self.spec = _read_spec(self.folder)
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
        self.paths = {tower: self.folder / written[variant][tower] for tower in ("image", "text")}
        self.sessions = {}
        for tower, path in self.paths.items():
            if not path.is_file():
                raise OnnxFolderError(f"{str(path)!r} is listed in {PREPROCESS_FILE} but missing")
            self.sessions[tower] = ort.InferenceSession(str(path), options, providers=providers)
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


# ----------------------------------------------------------------------------------------------
# Verification


def compare_embeddings(model: RetrievalModel, encoder: OnnxDualEncoder, pixel_values: torch.Tensor,
                       input_ids: torch.Tensor) -> dict[str, float]:
    """Max abs difference between the PyTorch model's and the graphs' normalised embeddings of one
    batch (the same input tensors on both sides), per tower."""
    model.eval()
    with torch.no_grad():
        ref_img = model.encode_image(pixel_values, normalize=True).float()
        ref_txt = model.encode_text(input_ids, normalize=True).float()
    return {"image": float((encoder.encode_image(pixel_values) - ref_img).abs().max()),
            "text": float((encoder.encode_text(input_ids) - ref_txt).abs().max())}


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def evaluate_onnx(encoder: OnnxDualEncoder, gallery: Any, queries: Any, *, dataset_name: str = "",
                  batch_size: int = 64) -> dict[str, float]:
    """Text-to-image metrics of an exported folder on one raw split (``load_pedes`` rows: gallery with
    ``image_path``/``pid``, queries with ``caption``/``pid``), preprocessed from ``preprocess.json`` and
    ranked by :func:`kd_trainer.evaluation.rank_metrics`, the code every PyTorch evaluation uses."""
    paths, captions = list(gallery["image_path"]), list(queries["caption"])
    g = torch.cat([encoder.encode_image(encoder.preprocess_images(open_image(p, dataset_name) for p in chunk))
                   for chunk in _batches(paths, batch_size)])
    q = torch.cat([encoder.encode_text(encoder.tokenize(chunk)) for chunk in _batches(captions, batch_size)])
    return rank_metrics(q, g, torch.as_tensor(list(queries["pid"])), torch.as_tensor(list(gallery["pid"])))


def _probe_batch(encoder: OnnxDualEncoder, raw: Any, split: str, dataset_name: str, n: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs for the numerical check: the split's first ``n`` images and captions when a dataset is
    given (preprocessed from the spec), otherwise seeded noise images and :data:`PROBE_CAPTIONS`."""
    if raw is not None:
        gallery, queries = raw[f"{split}_gallery"], raw[f"{split}_queries"]
        paths = list(gallery["image_path"])[:n]
        images = encoder.preprocess_images(open_image(p, dataset_name) for p in paths)
        captions = list(queries["caption"])[:n]
    else:
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(n, 3, *encoder.image_size, generator=gen).numpy()
        captions = [PROBE_CAPTIONS[i % len(PROBE_CAPTIONS)] for i in range(n)]
    return torch.from_numpy(images), torch.from_numpy(encoder.tokenize(captions))


def _reference_metrics(model: RetrievalModel, raw: Any, split: str, dataset_name: str,
                       batch_size: int) -> dict[str, float]:
    views = with_retrieval_transforms(raw, image_size=model.image_size, augment=False,
                                      context_length=model.context_length, dataset_name=dataset_name)
    return evaluate_retrieval(model, views[f"{split}_gallery"], views[f"{split}_queries"], batch_size=batch_size,
                              collate_fn=collate_retrieval, progress=False)


def _file_sizes(folder: Path, files: Mapping[str, str]) -> dict[str, int]:
    return {tower: (folder / name).stat().st_size for tower, name in files.items()}


def verify_onnx_export(
    folder: str | os.PathLike,
    model: RetrievalModel,
    *,
    dataset: str | None = None,
    root: str | os.PathLike | None = None,
    split: str = "test",
    tolerance: float = 0.5,
    atol: float = 1e-4,
    batch_size: int = 64,
    probe_size: int = 8,
) -> dict[str, Any]:
    """Check every variant in ``folder`` against ``model`` (the PyTorch model, at its own size) and write
    ``export_report.json``; raise :class:`ExportVerificationError` listing every failed check.

    1. Numerics: each variant's embeddings of one batch vs the PyTorch module the graphs were traced from
       (``model`` at the export size); fp32 must agree to ``atol`` (int8/fp16 are reported, and judged by 2).
    2. With ``dataset`` and ``root``: R@1, R@5, R@10, mAP, mINP of each variant on ``split``
       (:func:`evaluate_onnx`) vs ``model``'s (:func:`kd_trainer.evaluation.evaluate_retrieval`); a drop of
       R@1 or mAP by more than ``tolerance`` points fails.
    """
    folder = Path(folder)
    if (dataset is None) != (root is None):
        raise ValueError("give both dataset and root to check retrieval, or neither")
    if tolerance < 0 or atol < 0:
        raise ValueError(f"tolerance and atol must be >= 0, got {tolerance} and {atol}")
    spec = _read_spec(folder)
    name = canonical_dataset_name(dataset) if dataset is not None else None
    raw = load_pedes(name, root, splits=[split]) if name is not None else None
    if raw is not None and f"{split}_gallery" not in raw:
        raise DatasetFormatError(f"{dataset} has no {split!r} split (it has {sorted(raw)})")
    if int(spec["text"]["context_length"]) != model.context_length:
        raise OnnxFolderError(f"{PREPROCESS_FILE} says context_length {spec['text']['context_length']}, the "
                              f"model has {model.context_length}: this folder is not an export of this model")
    traced = at_image_size(model, spec["image"]["size"])
    report: dict[str, Any] = {
        "folder": str(folder),
        "model": {"arch": _arch_name(model), "image_size": list(model.image_size),
                  "context_length": model.context_length, "embed_dim": model.embed_dim,
                  "parameters": sum(p.numel() for p in model.clip.parameters())},
        "export_image_size": list(spec["image"]["size"]),
        "tolerance": tolerance, "atol": atol,
        "dataset": {"name": name, "root": str(root), "split": split} if name else None,
        "reference": None, "variants": {}, "failures": [],
    }
    failures: list[str] = report["failures"]
    if raw is not None:
        report["reference"] = _reference_metrics(model, raw, split, name or "", batch_size)
    for variant in [v for v in VARIANTS if v in spec.get("variants", {})]:
        encoder = OnnxDualEncoder(folder, variant)
        pixels, ids = _probe_batch(encoder, raw, split, name or "", probe_size)
        diff = compare_embeddings(traced, encoder, pixels, ids)
        entry: dict[str, Any] = {"files": spec["variants"][variant],
                                 "bytes": _file_sizes(folder, spec["variants"][variant]), "max_abs_diff": diff}
        if variant == "fp32":
            for tower, d in diff.items():
                if not d <= atol:
                    failures.append(f"fp32 {tower} embeddings differ from PyTorch by {d:.3g} > atol {atol:g}")
        if raw is not None:
            metrics = evaluate_onnx(encoder, raw[f"{split}_gallery"], raw[f"{split}_queries"],
                                    dataset_name=name or "", batch_size=batch_size)
            drop = {k: report["reference"][k] - metrics[k] for k in ("r1", "mAP")}
            entry.update(metrics=metrics, drop=drop)
            for k, d in drop.items():
                if d > tolerance:
                    failures.append(f"{variant}: {'R@1' if k == 'r1' else k} {metrics[k]:.2f} vs PyTorch "
                                    f"{report['reference'][k]:.2f} (drop {d:.2f} > tolerance {tolerance:g} points)")
        report["variants"][variant] = entry
    report["passed"] = not failures
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if failures:
        size_note = ""
        if report["export_image_size"] != report["model"]["image_size"]:
            size_note = (f" (the graphs take {tuple(report['export_image_size'])} images, the model was "
                         f"trained at {tuple(report['model']['image_size'])})")
        raise ExportVerificationError(f"the ONNX export in {str(folder)!r} is not the model{size_note}: "
                                      + "; ".join(failures) + f". Details: {folder / REPORT_FILE}", report)
    return report


# ----------------------------------------------------------------------------------------------
# Reporting


def format_export_report(report: Mapping[str, Any]) -> str:
    """Markdown: one row per variant (file sizes, max abs diff) and, with a dataset, the metric table."""
    lines = [f"ONNX export at {report['export_image_size'][0]}x{report['export_image_size'][1]} "
             f"of {report['model']['arch']} ({report['model']['parameters'] / 1e6:.1f}M parameters):", "",
             "| variant | image MB | text MB | max abs diff image | max abs diff text |",
             "|---------|---------:|--------:|-------------------:|------------------:|"]
    for v, e in report["variants"].items():
        lines.append(f"| {v} | {e['bytes']['image'] / 2**20:.1f} | {e['bytes']['text'] / 2**20:.1f} | "
                     f"{e['max_abs_diff']['image']:.2e} | {e['max_abs_diff']['text']:.2e} |")
    if report.get("reference") is not None:
        d = report["dataset"]
        rows = {"PyTorch fp32": report["reference"]}
        rows.update({f"ONNX {v}": e["metrics"] for v, e in report["variants"].items()})
        lines += ["", f"{d['name']}/{d['split']}, text-to-image (%), tolerance {report['tolerance']:g} points "
                  "on R@1 and mAP:", "", format_metrics(rows)]
    else:
        lines += ["", "retrieval not checked: no dataset given (--dataset NAME --root DIR checks R@1 and mAP)"]
    lines += ["", "verification: " + ("passed" if report["passed"] else "FAILED: " + "; ".join(report["failures"]))]
    return "\n".join(lines)


def update_model_card(card: str | os.PathLike, report: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Put the export's section into a model card (``README.md``): replaced when the card already has
    one (between the kd_trainer:onnx-export markers), appended otherwise."""
    path = Path(card)
    text = path.read_text() if path.is_file() else ""
    section = (f"{CARD_START}\n## ONNX export\n\nGraphs in `{out_dir}` (`{IMAGE_ENCODER}`, `{TEXT_ENCODER}`, "
               f"`{PREPROCESS_FILE}`), written and checked by `kd-trainer export-onnx`.\n\n"
               f"{format_export_report(report)}\n{CARD_END}\n")
    if CARD_START in text and CARD_END in text:
        head, rest = text.split(CARD_START, 1)
        text = head + section + rest.split(CARD_END, 1)[1].lstrip("\n")
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + section
    path.write_text(text)
    return path

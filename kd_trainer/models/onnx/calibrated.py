"""``calibrated`` INT8: 8-bit weight blocks chosen by GPTQ on calibration data, and the MatMuls that move the
ranking most kept in float32.

The ``weight-only`` scheme rounds every weight to the nearest of its block's 256 levels. Here:

1. **Sensitivity.** Each constant-weight ``MatMul`` of both towers is rounded alone, and the calibration
   captions are ranked against the calibration images with the other tower in float32. Its sensitivity is
   how much the scores of each caption's ``top_k`` images move against each other (the variance of the
   score changes across them, averaged over captions): what can swap a caption's best two images.
2. **Kept in float32.** The most sensitive MatMuls, the fewest that hold ``keep_share`` of the summed
   sensitivity of both towers, and never more than ``max_kept_share`` of the MatMuls.
3. **GPTQ** (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
   Transformers") for the rest: the input columns of each weight are rounded one by one, and each rounding
   error is spread over the columns not yet rounded through the inverse of ``X^T X`` (the calibration
   inputs ``X`` of that MatMul), which keeps the layer's output on calibration data closer to float32 than
   rounding each weight to the nearest level. Blocks of ``block_size`` input rows per output column, each
   with its own scale and zero point, are computed from the weights as they stand when the block starts.

The result is the same ``com.microsoft.MatMulNBits`` graph as ``weight-only`` (ONNX Runtime's quantiser
writes the nodes; their weights, scales and zero points are replaced), so, like it, it saves size, not
time, on CPU. Chosen on the SynthPEDES val split, and measured on ten galleries no demo model has seen
(``bench/int8_heldout.py``: 99.6% to 99.8% of the captions keep PyTorch's top-1 file):
docs/results.md, "Which INT8".

The cost is in step 1: one pass of one tower over ``sensitivity_samples`` (64) calibration inputs per
MatMul (302 s for TinyCLIP-xsmall at 384x128 on a loaded 2-core VM; seconds for the demo models).

    scheme = calibrated_int8(images, captions)          # PIL images or paths; strings
    export_onnx(model, "exports/student", int8=True, int8_scheme=scheme)

``kd-trainer export-onnx --int8 --int8-scheme calibrated --dataset NAME --root DIR`` draws the calibration
sample from the dataset's train split (:func:`calibration_sample`).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kd_trainer.data import build_image_transform, canonical_dataset_name, load_pedes, open_image, tokenize
from kd_trainer.models.onnx.folder import IMAGE_ENCODER, TEXT_ENCODER, OnnxExportError
from kd_trainer.models.onnx.quantize import check_block_size, matmul_nbits

__all__ = ["CalibratedInt8", "calibrated_int8", "calibration_sample", "choose_kept", "dequantize", "gptq_blocks",
           "pack_matmul_nbits"]

TOWER_FILES = {"image": IMAGE_ENCODER, "text": TEXT_ENCODER}
LEVELS = 255  # 8 bits: codes 0..255


def gptq_blocks(weight: np.ndarray, hessian: np.ndarray | None, block_size: int = 32, damp: float = 0.01,
                chunk: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit codes of ``weight`` (``N x K``: output x input, as ``MatMulNBits`` stores ``B^T``) in blocks of
    ``block_size`` along K, each with a scale and a zero point (the block's range, widened to hold 0).

    ``hessian`` ``K x K`` (``X^T X`` of the layer's inputs): GPTQ, each column's rounding error spread over
    the later columns; None: round to nearest (GPTQ with an identity Hessian). ``damp`` adds that share of
    the mean diagonal to the diagonal (GPTQ's dampening, for inputs that are nearly collinear).
    Returns ``codes`` (N x K, uint8), ``scales`` (N x ceil(K / block_size), float32), ``zero_points``
    (same shape, uint8)."""
    w = torch.from_numpy(np.array(weight, dtype=np.float64))
    n, k = w.shape
    blocks = -(-k // block_size)
    if hessian is None:
        hinv = None
    else:
        h = torch.from_numpy(np.array(hessian, dtype=np.float64))
        dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        h += torch.eye(k, dtype=h.dtype) * damp * torch.diag(h).mean()
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.float64)
    scales = torch.zeros(n, blocks, dtype=torch.float64)
    zeros = torch.zeros(n, blocks, dtype=torch.float64)
    chunk = max(block_size, chunk - chunk % block_size)
    for c0 in range(0, k, chunk):
        c1 = min(c0 + chunk, k)
        errors = torch.zeros(n, c1 - c0, dtype=torch.float64)
        for i in range(c0, c1):
            if i % block_size == 0:
                part = w[:, i:i + block_size]
                lo, hi = part.amin(1).clamp(max=0), part.amax(1).clamp(min=0)
                scale = (hi - lo) / LEVELS
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                zero = torch.clamp(torch.round(-lo / scale), 0, LEVELS)
                scales[:, i // block_size], zeros[:, i // block_size] = scale, zero
            q = torch.clamp(torch.round(w[:, i] / scale) + zero, 0, LEVELS)
            codes[:, i] = q
            if hinv is not None:
                err = (w[:, i] - (q - zero) * scale) / hinv[i, i]
                w[:, i + 1:c1] -= err[:, None] * hinv[i, i + 1:c1][None, :]
                errors[:, i - c0] = err
        if hinv is not None and c1 < k:
            w[:, c1:] -= errors @ hinv[c0:c1, c1:]
    return (codes.numpy().astype(np.uint8), scales.numpy().astype(np.float32), zeros.numpy().astype(np.uint8))


def choose_kept(sensitivity: dict[Any, float], keep_share: float, max_kept_share: float) -> list[Any]:
    """The most sensitive keys, the fewest whose sensitivities sum to ``keep_share`` of the total, and never
    more than ``max_kept_share`` of the keys (rounded down); most sensitive first, ties in key order."""
    order = sorted(sensitivity, key=lambda k: (-sensitivity[k], str(k)))
    total = sum(sensitivity.values())
    kept, held = [], 0.0
    cap = math.floor(max_kept_share * len(order) + 1e-9)  # 0.29 * 100 is 28.999999999999996 in floating point
    for key in order[:cap]:
        if held >= keep_share * total:
            break
        kept.append(key)
        held += sensitivity[key]
    return kept


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int) -> np.ndarray:
    """The float weights (N x K) that ``codes`` stand for."""
    n, k = codes.shape
    per = np.repeat(np.arange(scales.shape[1]), block_size)[:k]
    return ((codes.astype(np.float32) - zero_points[:, per].astype(np.float32)) * scales[:, per]).astype(np.float32)


def pack_matmul_nbits(codes: np.ndarray, block_size: int) -> np.ndarray:
    """``MatMulNBits``' 8-bit weight layout: ``N x blocks x block_size``, K padded with code 0 (the padding
    multiplies nothing: the node reads K inputs)."""
    n, k = codes.shape
    blocks = -(-k // block_size)
    out = np.zeros((n, blocks * block_size), dtype=np.uint8)
    out[:, :k] = codes
    return out.reshape(n, blocks, block_size)


def calibration_sample(dataset: str, root: str | os.PathLike, n: int = 256, seed: int = 0,
                       split: str = "train") -> tuple[list[str], list[str]]:
    """``n`` image paths and ``n`` captions of a dataset's ``split``, drawn with ``seed`` (images without
    repeats; captions from all of the split's captions)."""
    name = canonical_dataset_name(dataset)
    raw = load_pedes(name, root, splits=[split])
    if split not in raw:
        raise OnnxExportError(f"calibrated INT8 draws its calibration sample from {dataset}'s {split!r} split, "
                              f"which {root} does not have (it has {sorted(raw)})")
    rows = raw[split]
    paths = sorted(set(rows["image_path"]))
    captions = list(rows["caption"])
    rng = random.Random(seed)
    return rng.sample(paths, min(n, len(paths))), rng.sample(captions, min(n, len(captions)))


@dataclass
class _Tower:
    """One tower's float graph (``Gemm`` rewritten as ``MatMul``), its calibration input, and what the plan
    found: the quantisable MatMuls (node name -> (input name, weight initializer name))."""

    model: Any
    feed: dict[str, np.ndarray]
    matmuls: dict[str, tuple[str, str]] = field(default_factory=dict)


class CalibratedInt8:
    """The ``calibrated`` scheme as an :data:`~kd_trainer.models.onnx.quantize.Int8Scheme` callable; it plans
    both towers once per export folder, on its first call (see the module's docstring)."""

    def __init__(self, images: Sequence[Any], captions: Sequence[str], *, block_size: int = 32,
                 damp: float = 0.01, top_k: int = 10, keep_share: float = 0.5, max_kept_share: float = 0.25,
                 sensitivity_samples: int = 64, batch_size: int = 64):
        if not images or not captions:
            raise OnnxExportError("calibrated INT8 needs calibration images and captions, got "
                                  f"{len(images)} images and {len(captions)} captions")
        check_block_size(block_size, "calibrated")
        if not 0 <= keep_share < 1 or not 0 <= max_kept_share < 1:
            raise OnnxExportError("keep_share and max_kept_share are shares in [0, 1), got "
                                  f"{keep_share} and {max_kept_share}")
        if sensitivity_samples < 2:
            raise OnnxExportError(f"calibrated INT8 ranks captions against images: sensitivity_samples must be "
                                  f">= 2, got {sensitivity_samples}")
        self.images, self.captions = list(images), list(captions)
        self.block_size, self.damp, self.top_k = block_size, damp, top_k
        self.keep_share, self.max_kept_share, self.batch_size = keep_share, max_kept_share, batch_size
        self.sensitivity_samples = sensitivity_samples
        self._plans: dict[Path, dict[str, Any]] = {}  # the export in progress: graphs and Hessians
        self._decided: dict[str, Any] | None = None  # what the last finished plan decided (describe())

    name = "calibrated"  # what preprocess.json records as the export's int8_scheme

    # -- what the export calls -------------------------------------------------------------------------
    def __call__(self, fp32: Path, out: Path, tower: str) -> None:
        if tower not in TOWER_FILES:
            raise OnnxExportError(f"calibrated INT8 quantises the image or the text tower, got {tower!r}")
        folder = Path(fp32).parent
        if folder not in self._plans:
            self._plans[folder] = self._plan(folder)
        plan = self._plans[folder]
        self._write(plan["towers"][tower], plan["kept"][tower], plan["hessians"][tower], Path(out))
        plan["written"].add(tower)
        self._decided = {"kept": plan["kept"], "kept_share": plan["kept_share"],
                         "quantised": {t: len(tw.matmuls) - len(plan["kept"][t]) for t, tw in plan["towers"].items()},
                         "sensitivity": plan["sensitivity"]}
        if plan["written"] == set(TOWER_FILES):  # both towers written: let the graphs and Hessians go
            del self._plans[folder]

    def describe(self) -> dict[str, Any]:
        """What the last export's plan decided, for preprocess.json: the MatMuls kept in float32 (by tower),
        the share of the summed sensitivity they hold, and the settings."""
        plan = self._decided
        return {"kept_float32": plan["kept"] if plan else None,
                "kept_sensitivity_share": round(plan["kept_share"], 4) if plan else None,
                "quantised_matmuls": plan["quantised"] if plan else None,
                "calibration": {"images": len(self.images), "captions": len(self.captions),
                                "sensitivity_samples": self.sensitivity_samples},
                "block_size": self.block_size, "damp": self.damp, "top_k": self.top_k,
                "keep_share": self.keep_share, "max_kept_share": self.max_kept_share}

    # -- the plan ------------------------------------------------------------------------------------------
    def _plan(self, folder: Path) -> dict[str, Any]:
        towers = {t: self._load(folder / f, t) for t, f in TOWER_FILES.items()}
        ref = {t: self._embed(towers[t], sample=True) for t in towers}
        scores = _normalise(ref["text"]) @ _normalise(ref["image"]).T
        top = np.argsort(-scores, axis=1)[:, :self.top_k]
        sensitivity = {}
        nodes = [(t, node, weight) for t, tw in towers.items() for node, (_, weight) in tw.matmuls.items()]
        for t, node, weight in tqdm(nodes, desc="INT8 sensitivity (MatMuls)", leave=False):
            moved = self._embed(towers[t], {weight: self._rounded(towers[t], weight)}, sample=True)
            s = (_normalise(moved) @ _normalise(ref["image"]).T if t == "text"
                 else _normalise(ref["text"]) @ _normalise(moved).T)
            delta = np.take_along_axis(s - scores, top, axis=1)
            sensitivity[(t, node)] = float(delta.var(axis=1).mean())
        chosen = choose_kept(sensitivity, self.keep_share, self.max_kept_share)
        kept: dict[str, list[str]] = {t: [n for tt, n in chosen if tt == t] for t in towers}
        total = sum(sensitivity.values()) or 1.0
        hessians = {t: self._hessians(towers[t], set(kept[t])) for t in towers}
        return {"towers": towers, "kept": kept, "hessians": hessians, "written": set(),
                "sensitivity": {f"{t}:{n}": v / total for (t, n), v in sensitivity.items()},
                "kept_share": sum(sensitivity[k] for k in chosen) / total}

    def _load(self, path: Path, tower: str) -> _Tower:
        import onnx
        from onnxruntime.quantization.onnx_model import ONNXModel

        if not path.is_file():
            raise OnnxExportError(f"calibrated INT8 plans both towers at once and needs {path}, which is missing")
        graph = ONNXModel(onnx.load(str(path)))
        graph.replace_gemm_with_matmul()  # as the weight-only quantiser does
        graph.remove_unused_constant()  # the Gemm weights, now transposed copies
        model = graph.model
        inits = {i.name: i for i in model.graph.initializer}
        inp = model.graph.input[0]
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if tower == "image":
            feed = {inp.name: self._pixels(tuple(dims[2:]))}
        else:
            feed = {inp.name: tokenize(self.captions, dims[1]).numpy()}
        tw = _Tower(model=model, feed=feed)
        for node in model.graph.node:
            if (node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2):
                tw.matmuls[node.name] = (node.input[0], node.input[1])
        return tw

    def _pixels(self, size: tuple[int, int]) -> np.ndarray:
        transform = build_image_transform(size, train=False)
        return torch.stack([transform(im if not isinstance(im, (str, os.PathLike)) else open_image(im))
                            for im in self.images]).numpy()

    def _session(self, model: Any, outputs: Sequence[str] = ()) -> Any:
        import onnx
        import onnxruntime as ort

        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        for name in outputs:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def _batches(self, feed: dict[str, np.ndarray], limit: int | None = None):
        (name, x), = feed.items()
        for i in range(0, len(x) if limit is None else min(limit, len(x)), self.batch_size):
            yield {name: x[i:i + self.batch_size]}

    def _embed(self, tw: _Tower, replace: dict[str, np.ndarray] | None = None, sample: bool = False) -> np.ndarray:
        """The tower's outputs for the calibration inputs (``sample``: the first ``sensitivity_samples``
        of them; ``replace``: with these initializers swapped in)."""
        import onnx

        model = tw.model
        if replace:
            model = onnx.ModelProto()
            model.CopyFrom(tw.model)
            for init in model.graph.initializer:
                if init.name in replace:
                    init.CopyFrom(onnx.numpy_helper.from_array(replace[init.name], init.name))
        sess = self._session(model)
        limit = self.sensitivity_samples if sample else None
        return np.concatenate([sess.run(None, b)[0] for b in self._batches(tw.feed, limit)]).astype(np.float64)

    def _weight(self, tw: _Tower, name: str) -> np.ndarray:
        import onnx

        return next(onnx.numpy_helper.to_array(i) for i in tw.model.graph.initializer if i.name == name)

    def _rounded(self, tw: _Tower, weight: str) -> np.ndarray:
        """The weight (K x N, as the MatMul holds it) rounded to nearest in 8-bit blocks."""
        w = self._weight(tw, weight)
        codes, scales, zeros = gptq_blocks(w.T, None, self.block_size)
        return dequantize(codes, scales, zeros, self.block_size).T.copy()

    def _hessians(self, tw: _Tower, kept: set[str]) -> dict[str, np.ndarray]:
        """``X^T X`` of each quantised MatMul's input over the calibration sample (every row: for the text
        tower that includes the padding after each caption's end)."""
        todo = {n: v for n, v in tw.matmuls.items() if n not in kept}
        inputs = sorted({x for x, _ in todo.values()})
        graph_inputs = {i.name for i in tw.model.graph.input}
        sess = self._session(tw.model, [x for x in inputs if x not in graph_inputs])
        names = [o.name for o in sess.get_outputs()]
        sums: dict[str, np.ndarray] = {}
        for batch in self._batches(tw.feed):
            values = dict(zip(names, sess.run(None, batch)))
            values.update(batch)
            for x in inputs:
                a = np.asarray(values[x], dtype=np.float64)
                a = a.reshape(-1, a.shape[-1])
                sums[x] = sums.get(x, 0) + a.T @ a
        return {n: sums[x] for n, (x, _) in todo.items()}

    # -- the graph ----------------------------------------------------------------------------------------
    def _write(self, tw: _Tower, kept: list[str], hessians: dict[str, np.ndarray], out: Path) -> None:
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(tw.model)
        graph = matmul_nbits(model, block_size=self.block_size, exclude=kept).model  # then its weights are replaced
        inits = {i.name: i for i in graph.graph.initializer}
        written = set()
        for node in graph.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            source = node.name[:-len("_Q8")] if node.name.endswith("_Q8") else node.name
            if source not in hessians:
                raise OnnxExportError(f"calibrated INT8: ONNX Runtime quantised {node.name}, which the plan does "
                                      f"not know (planned: {sorted(hessians)})")
            _, weight = tw.matmuls[source]
            codes, scales, zeros = gptq_blocks(self._weight(tw, weight).T, hessians[source], self.block_size,
                                               self.damp)
            for name, value in zip(node.input[1:4], (pack_matmul_nbits(codes, self.block_size), scales, zeros)):
                old = onnx.numpy_helper.to_array(inits[name])
                inits[name].CopyFrom(onnx.numpy_helper.from_array(value.reshape(old.shape).astype(old.dtype), name))
            written.add(source)
        missing = set(hessians) - written
        if missing:
            raise OnnxExportError(f"calibrated INT8: ONNX Runtime left {sorted(missing)} unquantised")
        onnx.save(graph, str(out))


def calibrated_int8(images: Sequence[Any], captions: Sequence[str], **options: Any) -> CalibratedInt8:
    """The ``calibrated`` scheme for an export: calibration ``images`` (PIL images or paths) and
    ``captions``; ``options`` as :class:`CalibratedInt8` takes them."""
    return CalibratedInt8(images, captions, **options)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

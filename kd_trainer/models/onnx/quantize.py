"""INT8 graphs from the fp32 ones: the quantisation schemes :func:`~kd_trainer.models.onnx.export_onnx` can
apply, by name, and the builders they come from (``bench/int8_candidates.py`` measures more of them).

* ``dynamic`` (the default): ONNX Runtime's dynamic quantisation of every ``MatMul`` with a constant
  weight (the quantiser rewrites the exporter's ``Gemm`` attention projections as ``MatMul`` first): weights
  int8 ahead of time with one scale per output channel, activations quantised to uint8 per call with one
  scale per tensor, integer matrix products. The fastest on CPU (docs/results.md, "Which INT8").
* ``weight-only``: the same matrices (``Gemm`` rewritten as ``MatMul`` + ``Add`` the same way) stored as
  8-bit blocks (``com.microsoft.MatMulNBits``, 32 weights per block along the input axis, each block with
  its own scale and zero point), activations and the products in float32. No activation is rounded, so
  the top-1 file moves 3 to 10 times less often than under ``dynamic`` on the demo models; it is slower
  than the fp32 graphs on CPU (it saves size, not time).

* ``calibrated`` (:mod:`kd_trainer.models.onnx.calibrated`): the ``weight-only`` graph with its weights
  chosen on calibration data (GPTQ), and the MatMuls whose rounding moves the ranking most kept in float32.
  It needs calibration images and captions, so it has no entry in :data:`INT8_SCHEMES`; the name is in
  :data:`CALIBRATED_INT8_SCHEMES` and the CLI builds it from ``--dataset``'s train split.

Measured against each other and against static (activation-calibrated) quantisation on the SynthPEDES val
split, and on ten galleries no demo model has seen: docs/results.md, "Which INT8". On those galleries
``calibrated`` keeps the demo models' top-1 search result for 99.6% to 99.8% of the queries
(``weight-only`` 98.6% to 99.3%, ``dynamic`` 95% to 97%): for about 1% of the queries the best and
second-best image are within 1e-4 in cosine similarity, and rounding every weight to its nearest level
moves scores by more.

A scheme is any callable ``(fp32_path, out_path, tower)`` (``tower``: ``"image"`` or ``"text"``) that writes
the INT8 graph of one tower (the export writes both fp32 graphs first, side by side, so a scheme may read
the other tower's); a name picks one of :data:`INT8_SCHEMES`. A scheme with a ``name`` attribute is
recorded under it in ``preprocess.json``, and one with ``describe()`` has what it returns recorded too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, Union

from kd_trainer.models.onnx.folder import OnnxExportError

__all__ = ["CALIBRATED_INT8_SCHEMES", "INT8_SCHEMES", "INT8_SCHEME_NAMES", "DEFAULT_INT8_SCHEME", "Int8Scheme",
           "check_block_size", "dynamic_int8", "matmul_nbits", "resolve_int8_scheme", "weight_only_int8"]

Int8Scheme = Callable[[Path, Path, str], None]


def dynamic_int8(*, per_channel: bool = True, reduce_range: bool = False,
                 exclude: Sequence[str] = ()) -> Int8Scheme:
    """ONNX Runtime's ``quantize_dynamic`` of the constant-weight ``MatMul`` nodes (int8 weights, one scale
    per output channel when ``per_channel``; ``reduce_range``: 7-bit weights, for CPUs without VNNI).
    ``exclude`` names nodes left in float32 (``node_matmul`` is the exporter's name for the final
    projection of both towers)."""

    def quantize(fp32: Path, out: Path, tower: str) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(fp32, out, op_types_to_quantize=["MatMul"], per_channel=per_channel,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude))

    return quantize


def weight_only_int8(*, block_size: int = 32, symmetric: bool = False,
                     accuracy_level: int | None = None) -> Int8Scheme:
    """8-bit weight-only quantisation (``MatMulNBits``): the constant-weight ``MatMul`` weights in blocks of
    ``block_size`` along the input axis (a power of two >= 16), each block rounded to the nearest of 256
    levels (``symmetric``: around zero, else with a zero point); ``accuracy_level`` None (0) computes in
    float32, 4 quantises the activations to int8 per block for integer products."""
    check_block_size(block_size, "weight-only")

    def quantize(fp32: Path, out: Path, tower: str) -> None:
        import onnx
        from onnxruntime.quantization.onnx_model import ONNXModel

        graph = ONNXModel(onnx.load(str(fp32)))
        graph.replace_gemm_with_matmul()  # as quantize_dynamic does: the attention output projections too
        quantised = matmul_nbits(graph.model, block_size=block_size, symmetric=symmetric,
                                 accuracy_level=accuracy_level)
        quantised.save_model_to_file(str(out), False)

    return quantize


def check_block_size(block_size: int, scheme: str) -> None:
    """``MatMulNBits`` blocks: a power of two >= 16 weights along the input axis."""
    if block_size < 16 or block_size & (block_size - 1):
        raise OnnxExportError(f"{scheme} INT8 needs a block size that is a power of two >= 16, got {block_size}")


def matmul_nbits(model: "onnx.ModelProto", *, block_size: int, symmetric: bool = False,
                 accuracy_level: int | None = None, exclude: Sequence[str] = ()) -> "ONNXModel":
    """ONNX Runtime's 8-bit weight-only quantiser on ``model`` (its ``Gemm`` nodes already rewritten as
    ``MatMul``): every constant-weight ``MatMul`` but the nodes named in ``exclude`` becomes a
    ``MatMulNBits`` (node ``<name>_Q8``, weight ``<weight>_Q8`` N x blocks x ``block_size``, with
    ``_scales`` and ``_zero_points``), each weight rounded to the nearest of its block's 256 levels.
    Returns ONNX Runtime's graph wrapper (``.model`` is the graph)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=8,
                                          accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, nodes_to_exclude=list(exclude),
                                     algo_config=config)
    quantizer.process()
    return quantizer.model


DEFAULT_INT8_SCHEME = "dynamic"
INT8_SCHEMES: dict[str, Int8Scheme] = {
    "dynamic": dynamic_int8(),
    "weight-only": weight_only_int8(),
}


#: Schemes that need calibration data, so have no ready-made callable: ``calibrated``
#: (:func:`kd_trainer.models.onnx.calibrated.calibrated_int8`).
CALIBRATED_INT8_SCHEMES = ("calibrated",)
#: Every scheme name the CLI takes.
INT8_SCHEME_NAMES = tuple(sorted([*INT8_SCHEMES, *CALIBRATED_INT8_SCHEMES]))


def resolve_int8_scheme(scheme: Union[str, Int8Scheme]) -> Int8Scheme:
    """The quantiser a name (one of :data:`INT8_SCHEMES`) or a callable stands for."""
    if callable(scheme):
        return scheme
    if scheme in CALIBRATED_INT8_SCHEMES:
        raise OnnxExportError(f"the {scheme!r} INT8 scheme needs calibration data: pass "
                              f"kd_trainer.models.onnx.calibrated.calibrated_int8(images, captions) as int8_scheme "
                              f"(Python), or --dataset NAME --root DIR (kd-trainer export-onnx draws it from the "
                              f"train split)")
    if scheme not in INT8_SCHEMES:
        raise OnnxExportError(f"unknown INT8 scheme {scheme!r}: expected one of {list(INT8_SCHEME_NAMES)}")
    return INT8_SCHEMES[scheme]

"""The ``calibrated`` INT8 scheme (kd_trainer.models.onnx.calibrated): GPTQ 8-bit weight blocks written into
ONNX Runtime's ``com.microsoft.MatMulNBits`` nodes, the most ranking-sensitive MatMuls kept in float32.

Independent computations here: ONNX Runtime's own weight-only quantiser (the codes, scales and zero points
it writes for the same weights), a one-node ``MatMulNBits`` graph run by bare ``onnxruntime`` against a
numpy dequantisation written here, hand-worked scales and codes, numpy layer errors on seeded correlated
inputs, the graphs' constant-weight MatMuls listed from the fp32 graph, and the top-1 agreement helper of
tests/test_onnx_export.py (PIL + numpy preprocessing, bare sessions, PyTorch on torchvision's transform).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kd_trainer.data import load_pedes, tokenize
from kd_trainer.models.loading import model_from_checkpoint
from kd_trainer.models.onnx import OnnxExportError, export_onnx
from kd_trainer.models.onnx.calibrated import (
    calibrated_int8,
    choose_kept,
    dequantize,
    gptq_blocks,
    pack_matmul_nbits,
)
from kd_trainer.models.onnx.quantize import resolve_int8_scheme
from test_onnx_export import (  # noqa: F401 (data_root and student are the fixtures of that module)
    DATASET,
    _pil_numpy_pixels,
    data_root,
    student,
)
from tiny import run_cli

ort = pytest.importorskip("onnxruntime", reason="the deploy extra (pip install 'kd_trainer[deploy]')")
onnx = pytest.importorskip("onnx", reason="the deploy extra (pip install 'kd_trainer[deploy]')")
from onnxruntime.quantization.onnx_model import ONNXModel  # noqa: E402 (after the importorskip)

TOWERS = {"image": "image_encoder", "text": "text_encoder"}


# ----------------------------------------------------------------------------------------------
# Helpers written here (not the module's)


def _dequant(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int) -> np.ndarray:
    """(codes - zero) * scale, each of the K inputs with its block's scale and zero point, in float64."""
    k = codes.shape[1]
    block = np.arange(k) // block_size
    return (codes.astype(np.float64) - zeros[:, block].astype(np.float64)) * scales[:, block].astype(np.float64)


def _fp32_matmuls(path: Path) -> tuple[dict[str, "onnx.NodeProto"], dict[str, np.ndarray]]:
    """The fp32 graph as the quantisers see it (ONNX Runtime's own ``Gemm`` -> ``MatMul`` rewrite): its
    constant-weight MatMul nodes by name, and its initializers by name."""
    graph = ONNXModel(onnx.load(str(path)))
    graph.replace_gemm_with_matmul()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.model.graph.initializer}
    nodes = {n.name: n for n in graph.model.graph.node
             if n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]].ndim == 2}
    return nodes, inits


def _nbits(path: Path) -> tuple[list["onnx.NodeProto"], dict[str, np.ndarray], list["onnx.NodeProto"]]:
    """An INT8 graph's MatMulNBits nodes, its initializers, and all its nodes."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    return [n for n in graph.node if n.op_type == "MatMulNBits"], inits, list(graph.node)


def _node_weights(node, inits) -> tuple[int, int, int, np.ndarray, np.ndarray, np.ndarray]:
    """(K, N, block_size, codes N x K, scales N x blocks, zero points N x blocks) of a MatMulNBits node."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bs = attrs["K"], attrs["N"], attrs["block_size"]
    assert attrs["bits"] == 8
    blocks = -(-k // bs)
    codes = inits[node.input[1]].reshape(n, blocks * bs)[:, :k]
    return k, n, bs, codes, inits[node.input[2]].reshape(n, blocks), inits[node.input[3]].reshape(n, blocks)


def _float_weight(node, fp32_inits) -> np.ndarray:
    """The fp32 weight (N x K) a MatMulNBits node was made from: ONNX Runtime names its codes ``<weight>_Q8``."""
    name = node.input[1]
    assert name.endswith("_Q8"), name
    return fp32_inits[name[:-len("_Q8")]].T


# ----------------------------------------------------------------------------------------------
# Exports of the fixture student, once for the module


@pytest.fixture(scope="module")
def raw(data_root):
    return load_pedes(DATASET, data_root, splits=["train", "test"])


@pytest.fixture(scope="module")
def exports(tmp_path_factory, student, raw) -> dict:
    """The fixture student exported with ``weight-only`` and with ``calibrated``, the latter calibrated on
    the train split's images and captions (as ``export-onnx --int8-scheme calibrated`` draws them)."""
    model = model_from_checkpoint(student).eval()
    base = tmp_path_factory.mktemp("int8_calibrated")
    export_onnx(model, base / "weight-only", int8=True, int8_scheme="weight-only")
    images = sorted(set(raw["train"]["image_path"]))
    captions = list(raw["train"]["caption"])
    scheme = calibrated_int8(images, captions)
    export_onnx(model, base / "calibrated", int8=True, int8_scheme=scheme)
    return {"weight-only": base / "weight-only", "calibrated": base / "calibrated", "scheme": scheme,
            "plan": scheme.describe(), "model": model, "images": images, "captions": captions,
            "test_images": list(raw["test_gallery"]["image_path"]),
            "test_captions": list(raw["test_queries"]["caption"])}


# ----------------------------------------------------------------------------------------------
# 1. Round to nearest is ONNX Runtime's own rounding


def test_round_to_nearest_gives_onnx_runtimes_weight_only_codes_scales_and_zero_points(exports):
    folder = exports["weight-only"]
    compared = 0
    for tower, stem in TOWERS.items():
        _, fp32_inits = _fp32_matmuls(folder / f"{stem}.onnx")
        nodes, inits, _ = _nbits(folder / f"{stem}.int8.onnx")
        assert nodes, tower
        for node in nodes:
            k, n, bs, ort_codes, ort_scales, ort_zeros = _node_weights(node, inits)
            w = _float_weight(node, fp32_inits)
            assert w.shape == (n, k)
            codes, scales, zeros = gptq_blocks(w, None, bs)
            assert codes.shape == (n, k) and scales.shape == ort_scales.shape == zeros.shape
            np.testing.assert_allclose(scales, ort_scales, rtol=1e-6, atol=0, err_msg=f"{tower} {node.name}")
            np.testing.assert_array_equal(zeros, ort_zeros, err_msg=f"{tower} {node.name}")
            # ONNX Runtime rounds v * (1 / scale) + zero in float32 (roundf: ties away from zero); here
            # v / scale in float64, ties to even. Where the two land on either side of a .5 a code may
            # differ by 1: allowed for a tiny share of the codes, never by more (on this fixture all match).
            diff = np.abs(codes.astype(int) - ort_codes.astype(int))
            assert diff.max() <= 1, (tower, node.name, diff.max())
            assert (diff > 0).mean() <= 1e-3, (tower, node.name, int((diff > 0).sum()), diff.size)
            compared += 1
    assert compared >= 4


# ----------------------------------------------------------------------------------------------
# 2. The layout MatMulNBits reads


@pytest.mark.parametrize("k, block_size", [(40, 16), (64, 32)], ids=["K padded", "K whole blocks"])
def test_packed_codes_scales_and_zero_points_multiply_as_the_numpy_dequantisation(k, block_size):
    rng = np.random.default_rng(k)
    n, m = 5, 7
    blocks = -(-k // block_size)
    codes = rng.integers(0, 256, size=(n, k)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, blocks)).astype(np.float32)
    zeros = rng.integers(0, 256, size=(n, blocks)).astype(np.uint8)
    a = rng.standard_normal((m, k)).astype(np.float32)

    packed = pack_matmul_nbits(codes, block_size)
    assert packed.shape == (n, blocks, block_size) and packed.dtype == np.uint8
    node = onnx.helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                                 K=k, N=n, bits=8, block_size=block_size)
    graph = onnx.helper.make_graph(
        [node], "nbits", [onnx.helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [None, k])],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [None, n])],
        initializer=[onnx.numpy_helper.from_array(packed, "B"), onnx.numpy_helper.from_array(scales, "scales"),
                     onnx.numpy_helper.from_array(zeros, "zero_points")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"A": a})[0]

    weights = _dequant(codes, scales, zeros, block_size)
    np.testing.assert_allclose(dequantize(codes, scales, zeros, block_size), weights, rtol=1e-6, atol=1e-6)
    expected = a.astype(np.float64) @ weights.T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# ----------------------------------------------------------------------------------------------
# 3. GPTQ


def test_gptq_keeps_the_layer_output_closer_than_round_to_nearest_on_correlated_inputs():
    rng = np.random.default_rng(0)
    n_rows, k, n, latent = 512, 96, 24, 6
    # columns strongly correlated: a few latent factors mixed into all 96 inputs, plus a little noise
    x = rng.standard_normal((n_rows, latent)) @ rng.standard_normal((latent, k)) + 0.05 * rng.standard_normal((n_rows, k))
    corr = np.corrcoef(x, rowvar=False)
    assert np.abs(corr[np.triu_indices(k, 1)]).mean() > 0.3, "the inputs should be correlated"
    w = rng.standard_normal((n, k)) * 0.1

    def layer_error(q: np.ndarray) -> float:
        return float(np.linalg.norm(x @ w.T - x @ q.T))

    rtn_codes, rtn_scales, rtn_zeros = gptq_blocks(w, None, 32)
    codes, scales, zeros = gptq_blocks(w, x.T @ x, 32)
    assert codes.dtype == np.uint8 and codes.shape == (n, k) and scales.shape == zeros.shape == (n, 3)
    rtn, gptq = layer_error(_dequant(rtn_codes, rtn_scales, rtn_zeros, 32)), layer_error(_dequant(codes, scales, zeros, 32))
    print(f"||XW^T - XQ^T||: round to nearest {rtn:.4g}, GPTQ {gptq:.4g}")
    assert gptq < 0.5 * rtn, (gptq, rtn)
    assert codes.min() >= 0 and codes.max() <= 255


def test_gptq_clamps_a_weight_pushed_past_its_blocks_top_level():
    """Every code is one of the 256 levels: a weight that GPTQ's error spreading moves beyond its block's
    range gets the end code, not a code wrapped around by the uint8 cast."""
    rng = np.random.default_rng(2)
    k, step = 32, 1 / 255
    x = rng.standard_normal((400, k))
    x[:, 1] = 0.5 * x[:, 0] + 1e-3 * rng.standard_normal(400)  # input 1 carries half of input 0
    w = np.zeros((1, k))
    w[0, 2:] = rng.uniform(0, 0.9, k - 2)
    w[0, 0], w[0, 1] = 100.4 * step, 1.0  # the block's range is [0, 1]: scale 1/255, zero 0; w1 is code 255
    # Rounding w0 down to 100 loses 0.4 steps on input 0; the least-squares fix is twice that on input 1
    # (x1 = x0 / 2), taking w1 to about 255.8 levels: above the top one.
    codes, scales, zeros = gptq_blocks(w, x.T @ x, 32)
    assert (float(scales[0, 0]), int(zeros[0, 0])) == (pytest.approx(step), 0)
    assert codes[0, 0] == 100 and codes[0, 1] == 255, codes[0, :3]


def test_gptq_with_an_identity_hessian_and_no_dampening_is_round_to_nearest():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 80)).astype(np.float32)
    for got, want in zip(gptq_blocks(w, np.eye(80), 16, damp=0.0), gptq_blocks(w, None, 16)):
        np.testing.assert_array_equal(got, want)


def test_a_block_scale_is_its_range_widened_to_hold_zero():
    # one block of 16 per row, K = 4 (padded); worked by hand:
    w = np.array([[0.2, 0.4, 1.0, 0.6],      # all >= 0: range [0, 1.0]    -> scale 1/255,  zero 0
                  [-2.55, -1.0, -0.5, -0.1],  # all <= 0: range [-2.55, 0]  -> scale 0.01,   zero 255
                  [-1.0, 0.0, 1.55, 0.4]])     # both signs: [-1.0, 1.55]   -> scale 0.01,   zero 100
    codes, scales, zeros = gptq_blocks(w, None, 16)
    np.testing.assert_allclose(scales[:, 0], [1 / 255, 0.01, 0.01], rtol=1e-6)
    np.testing.assert_array_equal(zeros[:, 0], [0, 255, 100])
    # code = round(w / scale) + zero
    np.testing.assert_array_equal(codes, [[51, 102, 255, 153],
                                          [0, 155, 205, 245],
                                          [0, 100, 255, 140]])


# ----------------------------------------------------------------------------------------------
# 4. Which MatMuls stay in float32


def test_choose_kept_takes_the_fewest_most_sensitive_up_to_the_cap():
    s = {"a": 1.0, "b": 5.0, "c": 3.0, "d": 0.5, "e": 0.5}  # total 10
    assert choose_kept(s, 0.5, 0.99) == ["b"]  # 5 of 10 reaches a half
    assert choose_kept(s, 0.6, 0.99) == ["b", "c"]  # 5 < 6 <= 8
    assert choose_kept(s, 0.85, 0.99) == ["b", "c", "a"]  # 9 >= 8.5
    assert choose_kept(s, 0.92, 0.99) == ["b", "c", "a", "d"]  # ties in key order: d before e
    # the cap: never more than max_kept_share of the 5 keys, rounded down
    assert choose_kept(s, 0.92, 0.5) == ["b", "c"]  # 2.5 -> 2
    assert choose_kept(s, 0.92, 0.19) == []  # 0.95 -> 0
    assert choose_kept(s, 0.92, 0.2) == ["b"]  # 1.0 -> 1
    # keep_share 0 keeps nothing, whatever the cap
    assert choose_kept(s, 0.0, 0.99) == []


def test_choose_kept_cap_is_the_share_rounded_down_without_floating_point_loss():
    s = {f"k{i:03d}": 1.0 for i in range(100)}
    assert len(choose_kept(s, 0.99, 0.29)) == 29  # 29 of 100 keys is exactly 0.29: not more than the cap


# ----------------------------------------------------------------------------------------------
# 5. The calibrated export


def test_calibrated_export_keeps_the_planned_matmuls_in_float32_and_quantises_the_rest(exports):
    plan, folder = exports["plan"], exports["calibrated"]
    kept = plan["kept_float32"]
    assert set(kept) == {"image", "text"}
    n_matmuls = 0
    for tower, stem in TOWERS.items():
        fp32_nodes, fp32_inits = _fp32_matmuls(folder / f"{stem}.onnx")
        n_matmuls += len(fp32_nodes)
        assert set(kept[tower]) <= set(fp32_nodes), (tower, kept[tower])
        nbits, inits, nodes = _nbits(folder / f"{stem}.int8.onnx")
        by_output = {n.output[0]: n for n in nodes}
        for name, src in fp32_nodes.items():
            now = by_output[src.output[0]]  # the node that now computes this MatMul's output
            if name in kept[tower]:
                assert now.op_type == "MatMul" and now.name == name, (tower, name, now.op_type)
                weight = inits[now.input[1]]
                assert weight.dtype == np.float32 and np.array_equal(weight, fp32_inits[src.input[1]])
            else:
                assert now.op_type == "MatMulNBits", (tower, name, now.op_type)
                assert now.input[0] == src.input[0]
        const_matmuls = [n.name for n in nodes if n.op_type == "MatMul" and n.input[1] in inits]
        assert sorted(const_matmuls) == sorted(kept[tower]), (tower, const_matmuls)
        assert plan["quantised_matmuls"][tower] == len(fp32_nodes) - len(kept[tower])

    n_kept = len(kept["image"]) + len(kept["text"])
    cap = int(plan["max_kept_share"] * n_matmuls)
    assert 0 < n_kept <= cap, (n_kept, cap)
    assert plan["kept_sensitivity_share"] >= plan["keep_share"] or n_kept == cap, plan

    spec = json.loads((folder / "preprocess.json").read_text())
    assert spec["int8_scheme"] == "calibrated"
    assert spec["int8_plan"] == json.loads(json.dumps(plan))
    assert spec["int8_plan"]["calibration"]["images"] == len(exports["images"])


def test_calibrated_weights_keep_each_layer_closer_to_float32_on_inputs_it_was_not_calibrated_on(exports, raw):
    """The codes written into the graph are GPTQ's, in the layout the node reads, and they generalise:
    calibrated on the train split, each layer's output on the TEST split's inputs (captured from the fp32
    graph here), with the weights dequantised from the calibrated graph, is closer to float32 than with
    ONNX Runtime's round-to-nearest weights of the weight-only graph."""
    spec = json.loads((exports["calibrated"] / "preprocess.json").read_text())
    feeds = {"image": {"pixel_values": _pil_numpy_pixels(exports["test_images"], (32, 16), spec["image"]["mean"],
                                                         spec["image"]["std"])},
             "text": {"input_ids": tokenize(exports["test_captions"], 77).numpy()}}
    checked = 0
    for tower, stem in TOWERS.items():
        _, fp32_inits = _fp32_matmuls(exports["calibrated"] / f"{stem}.onnx")
        cal_nodes, cal_inits, _ = _nbits(exports["calibrated"] / f"{stem}.int8.onnx")
        wo_nodes, wo_inits, _ = _nbits(exports["weight-only"] / f"{stem}.int8.onnx")
        wo_by_output = {n.output[0]: n for n in wo_nodes}
        fp32 = onnx.load(str(exports["calibrated"] / f"{stem}.onnx"))
        inputs = sorted({n.input[0] for n in cal_nodes})
        for name in inputs:
            fp32.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        sess = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
        values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds[tower])))
        for node in cal_nodes:
            x = values[node.input[0]].astype(np.float64)
            x = x.reshape(-1, x.shape[-1])
            w = _float_weight(node, fp32_inits).astype(np.float64)
            k, _, bs, codes, scales, zeros = _node_weights(node, cal_inits)
            _, _, wo_bs, wo_codes, wo_scales, wo_zeros = _node_weights(wo_by_output[node.output[0]], wo_inits)
            cal = np.linalg.norm(x @ (w - _dequant(codes, scales, zeros, bs)).T)
            rtn = np.linalg.norm(x @ (w - _dequant(wo_codes, wo_scales, wo_zeros, wo_bs)).T)
            assert cal < 0.95 * rtn, (tower, node.name, cal, rtn)
            checked += 1
    assert checked == sum(exports["plan"]["quantised_matmuls"].values())


# ----------------------------------------------------------------------------------------------
# 6. Refusals and the CLI


def test_the_calibrated_name_alone_is_refused_saying_what_it_needs():
    with pytest.raises(OnnxExportError, match=r"'calibrated' INT8 scheme needs calibration data: pass "
                                              r"kd_trainer\.models\.onnx\.calibrated\.calibrated_int8\(images, captions\)"):
        resolve_int8_scheme("calibrated")


def test_no_calibration_data_or_a_bad_block_size_is_refused():
    with pytest.raises(OnnxExportError, match=r"needs calibration images and captions, got 0 images and 0 captions"):
        calibrated_int8([], [])
    with pytest.raises(OnnxExportError, match=r"got 3 images and 0 captions"):
        calibrated_int8(["a.png", "b.png", "c.png"], [])
    for bad in (24, 8):
        with pytest.raises(OnnxExportError, match=rf"block size that is a power of two >= 16, got {bad}$"):
            calibrated_int8(["a.png"], ["a man"], block_size=bad)


@pytest.mark.parametrize("args, says", [
    (["--int8", "--int8-scheme", "calibrated"], "--int8-scheme calibrated needs --dataset NAME"),
    (["--int8-scheme", "weight-only"], "--int8-scheme weight-only needs --int8"),
])
def test_export_onnx_refuses_a_scheme_without_what_it_needs(args, says, student, tmp_path):
    ran = run_cli("export-onnx", str(student), "--out", str(tmp_path / "o"), *args)
    assert ran.returncode == 2, (ran.returncode, ran.stderr[-2000:])
    assert "kd-trainer export-onnx: error: " in ran.stderr and says in ran.stderr, ran.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_export_onnx_calibrated_draws_its_sample_from_the_train_split_and_records_the_plan(student, data_root,
                                                                                            raw, tmp_path):
    out = tmp_path / "cal"
    ran = run_cli("export-onnx", str(student), "--out", str(out), "--int8", "--int8-scheme", "calibrated",
                  "--dataset", DATASET, "--root", str(data_root), "--calibration-samples", "8")
    assert ran.returncode == 0, ran.stderr[-3000:]
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["int8_scheme"] == "calibrated"
    plan = spec["int8_plan"]
    train = raw["train"]
    assert len(set(train["image_path"])) > 8 and len(train["caption"]) > 8, "the sample should be a part of it"
    assert plan["calibration"]["images"] == 8 and plan["calibration"]["captions"] == 8
    assert set(plan["kept_float32"]) == {"image", "text"} and plan["block_size"] == 32
    ops = {n.op_type for t in TOWERS.values() for n in onnx.load(str(out / f"{t}.int8.onnx")).graph.node}
    assert "MatMulNBits" in ops and "MatMulInteger" not in ops


def test_an_int8_graph_that_fails_the_check_points_at_the_calibrated_scheme(student, data_root, tmp_path):
    """A scheme whose INT8 graphs lose the ranking (every weight matrix drowned in seeded noise) fails
    the export's check, and the error names the scheme used and the one that keeps the ranking."""
    from kd_trainer.models.onnx import ExportVerificationError, verify_onnx_export

    rng = np.random.default_rng(0)

    def drown(fp32: Path, out: Path, tower: str) -> None:
        graph = onnx.load(str(fp32))
        for init in graph.graph.initializer:
            w = onnx.numpy_helper.to_array(init)
            if w.dtype == np.float32 and w.ndim == 2:
                noisy = w + rng.normal(0, 10 * (w.std() + 1e-3), w.shape).astype(np.float32)
                init.CopyFrom(onnx.numpy_helper.from_array(noisy, init.name))
        onnx.save(graph, str(out))

    model = model_from_checkpoint(student).eval()
    export_onnx(model, tmp_path / "drowned", int8=True, int8_scheme=drown)
    with pytest.raises(ExportVerificationError, match=r"int8: .*drop.*'custom' scheme: --int8-scheme calibrated"):
        verify_onnx_export(tmp_path / "drowned", model, dataset=DATASET, root=data_root, split="test")

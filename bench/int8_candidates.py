"""Which INT8: every candidate quantisation of a model's ONNX graphs against its PyTorch model on one
SynthPEDES split (choose on val, never on test).

    python bench/int8_candidates.py runs/demo/student_kd runs/demo/student_nokd runs/demo/teacher \
        --root ./data --split val

Per model: how many captions PyTorch's best two images nearly tie for (any rounding can swap those).
Per model and candidate: the same top-1 file (and person) as PyTorch for each caption of the split, by
``kd-trainer index`` + ``search`` (bench/int8_agreement.py); R@1 and mAP change against PyTorch
(``verify_onnx_export``); both graphs' size; median CPU latency at batch 1 (one thread, image and caption).
Static candidates and ``calibrated`` are calibrated on the TRAIN split: a seeded sample of its images and
captions (``calibrated`` draws its own, as ``kd-trainer export-onnx --int8-scheme calibrated`` does).
Nothing is written into the run folders (the model is exported by the Python API, not the CLI, which
would add a section to the run's model card).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from int8_agreement import agreement, split_gallery, top1_files  # noqa: E402

from kd_trainer.data import open_image  # noqa: E402
from kd_trainer.models.loading import model_from_checkpoint  # noqa: E402
from kd_trainer.models.onnx import (  # noqa: E402
    ExportVerificationError,
    OnnxDualEncoder,
    export_onnx,
    verify_onnx_export,
)
from kd_trainer.models.onnx.calibrated import calibrated_int8, calibration_sample  # noqa: E402
from kd_trainer.models.onnx.quantize import INT8_SCHEMES, Int8Scheme, dynamic_int8, weight_only_int8  # noqa: E402
from kd_trainer.search.encoders import load_encoder  # noqa: E402
from kd_trainer.search.index import load_index  # noqa: E402
from kd_trainer.search.query import Searcher  # noqa: E402

INPUTS = {"image": "pixel_values", "text": "input_ids"}


def static_int8(calibration: dict[str, list[np.ndarray]], method: str, activations: str = "QInt8") -> Int8Scheme:
    """QDQ static quantisation of the MatMul and Gemm nodes: per-channel int8 weights, activation ranges from
    ``calibration`` (batches of graph inputs per tower) by ``method`` (MinMax, Percentile, Entropy)."""

    def quantize(fp32: Path, out: Path, tower: str) -> None:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
        from onnxruntime.quantization import quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(calibration[tower])

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch = next(self.batches, None)
                return None if batch is None else {INPUTS[tower]: batch}

        quantize_static(fp32, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                        per_channel=True, activation_type=getattr(QuantType, activations),
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method))

    return quantize


def train_calibration(fp32_folder: Path, root: str, n: int, seed: int, batch: int = 32) -> dict[str, list[np.ndarray]]:
    """``n`` train images and ``n`` train captions, drawn with ``seed``, preprocessed from preprocess.json."""
    folder = Path(root) / "SynthPEDES"
    records = [r for r in json.loads((folder / "reid_raw.json").read_text()) if r["split"] == "train"]
    captions = [c for r in records for c in r["captions"]]
    rng = random.Random(seed)
    paths = [str(folder / "imgs" / r["file_path"]) for r in rng.sample(records, min(n, len(records)))]
    texts = rng.sample(captions, min(n, len(captions)))
    enc = OnnxDualEncoder(fp32_folder)
    pixels = enc.preprocess_images(open_image(p, "synth_pedes") for p in paths)
    ids = enc.tokenize(texts)
    return {"image": [pixels[i:i + batch] for i in range(0, len(pixels), batch)],
            "text": [ids[i:i + batch] for i in range(0, len(ids), batch)]}


def candidates(calibration: dict[str, list[np.ndarray]], sample: tuple[list[str], list[str]]) -> dict[str, Int8Scheme | None]:
    """Every scheme measured (None: the fp32 graphs, the baseline); ``sample``: the calibrated scheme's train
    images and captions (as ``kd-trainer export-onnx --int8-scheme calibrated`` draws them)."""
    return {
        "fp32 (no INT8)": None,
        "dynamic, per channel (`dynamic`)": INT8_SCHEMES["dynamic"],
        "dynamic, per tensor": dynamic_int8(per_channel=False),
        "dynamic, per channel, reduce_range": dynamic_int8(reduce_range=True),
        "dynamic, per channel, final projections fp32": dynamic_int8(exclude=["node_matmul"]),
        "weight-only, block 32, zero point (`weight-only`)": INT8_SCHEMES["weight-only"],
        "weight-only, block 32, symmetric": weight_only_int8(symmetric=True),
        "weight-only, block 128, zero point": weight_only_int8(block_size=128),
        "weight-only, block 32, int8 products (accuracy_level 4)": weight_only_int8(accuracy_level=4),
        "static QDQ, MinMax, s8 activations": static_int8(calibration, "MinMax"),
        "static QDQ, Percentile, s8 activations": static_int8(calibration, "Percentile"),
        "calibrated: GPTQ blocks of 32, sensitive MatMuls fp32 (`calibrated`)": calibrated_int8(*sample),
    }


def latency_ms(encoder: OnnxDualEncoder, tower: str, x: np.ndarray, runs: int = 50) -> float:
    run: Callable[[np.ndarray], object] = encoder.encode_image if tower == "image" else encoder.encode_text
    for _ in range(10):
        run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def measure(run: str, ns: argparse.Namespace, work: Path, gallery: Path, captions: list[str]) -> list[dict]:
    model = model_from_checkpoint(run).eval()
    base = work / Path(run).name
    export_onnx(model, base / "fp32")
    calibration = train_calibration(base / "fp32", ns.root, ns.calibration_samples, ns.seed)
    ref = top1_files(run, None, gallery, captions, base)
    hits = Searcher(load_index(base / "torch.index"), load_encoder(run)).search(captions, top=2)
    gaps = np.array([h[0].score - h[1].score for h in hits])
    print(f"<!-- {Path(run).name}: PyTorch's best and second-best image within 1e-4 cosine for "
          f"{int((gaps < 1e-4).sum())}"
          f"/{len(gaps)} captions, within 3e-4 for {int((gaps < 3e-4).sum())} -->", flush=True)
    probe = OnnxDualEncoder(base / "fp32")
    image = probe.preprocess_images([open_image(str(sorted(gallery.iterdir())[0]), "synth_pedes")])
    text = probe.tokenize(captions[:1])
    rows = []
    sample = calibration_sample("synth_pedes", ns.root, n=ns.calibration_samples, seed=ns.seed)
    for name, scheme in candidates(calibration, sample).items():
        if ns.only and not any(s in name for s in ns.only):
            continue
        folder = base / f"c{len(rows)}"
        variant = "fp32" if scheme is None else "int8"
        export_onnx(model, folder, int8=scheme is not None, int8_scheme=scheme or "dynamic")
        try:
            report = verify_onnx_export(folder, model, dataset="synth_pedes", root=ns.root, split=ns.split)
        except ExportVerificationError as e:
            report = e.report
        entry = report["variants"][variant]
        same, person = agreement(ref, top1_files(folder, variant, gallery, captions, base))
        enc = OnnxDualEncoder(folder, variant, threads=1)
        rows.append({"model": run, "scheme": name, "same": same, "person": person, "n": len(captions),
                     "d_r1": -entry["drop"]["r1"], "d_map": -entry["drop"]["mAP"],
                     "mb": sum(entry["bytes"].values()) / 2**20,
                     "ms_image": latency_ms(enc, "image", image), "ms_text": latency_ms(enc, "text", text)})
        r = rows[-1]
        print(f"| {Path(run).name} | {name} | {100 * r['same'] / r['n']:.1f} ({r['same']}/{r['n']}) | "
              f"{100 * r['person'] / r['n']:.1f} | {r['d_r1']:+.2f} / {r['d_map']:+.2f} | {r['mb']:.2f} | "
              f"{r['ms_image']:.3f} / {r['ms_text']:.3f} |", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="PyTorch models (run folders or checkpoints kd-trainer eval reads)")
    p.add_argument("--root", default="./data", help="the data root holding SynthPEDES/")
    p.add_argument("--split", default="val", choices=["val", "test"], help="compared on (choose on val)")
    p.add_argument("--calibration-samples", type=int, default=256, help="train images and captions for static")
    p.add_argument("--seed", type=int, default=0, help="draws the calibration sample")
    p.add_argument("--only", nargs="+", help="only the candidates whose name contains one of these")
    p.add_argument("--json", help="also write every row here")
    ns = p.parse_args()
    print("| model | INT8 scheme | same top-1 file % | same person % | ΔR@1 / ΔmAP | image + text graph MB | "
          "CPU ms b1, 1 thread (image / caption) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        captions = split_gallery(ns.root, ns.split, work / "gallery")
        for run in ns.models:
            rows += measure(run, ns, work, work / "gallery", captions)
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

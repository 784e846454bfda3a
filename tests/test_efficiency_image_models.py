"""Cost columns of detection and classification runs (issue 26): parameters exactly and FLOPs within
1% of a hand count of every convolution and matrix product, worked out here from the architecture
numbers alone (ResNet-18 classifiers; a ResNet-18 + FPN Faster R-CNN, whose box head runs on its
proposal cap), and ``kd-trainer report``'s markdown and HTML tables showing them.

Run folders are written by hand in the layout the trainers leave (``model.safetensors`` with the
model's tensors, a distilled student's ``mimic_head.*`` adapters among them, the model's config JSON
as ``saved_configs`` writes it, ``recipe.yaml``, ``test_results.json``).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_report_html import _parse

from kd_trainer.models.classifier import CLASSIFIER_CONFIG, Classifier
from kd_trainer.models.detector import DETECTOR_CONFIG, load_detector
from kd_trainer.report import Latency, SkippedRunWarning, write_report
from kd_trainer.report.efficiency import image_model_efficiency

CLASSES = 4
# a small Faster R-CNN: ResNet-18 body, 16-wide FPN, 32-wide box head, at most 40 proposals per image
DET_ARCH = {"depth": 18, "fpn_channels": 16, "representation_size": 32, "rpn_post_nms_top_n_test": 40}
ANCHORS = 3  # per location: one size per level, three aspect ratios

# ResNet-18: (in, out, stride) of the two basic blocks of each stage
STAGES = [[(64, 64, 1), (64, 64, 1)], [(64, 128, 2), (128, 128, 1)], [(128, 256, 2), (256, 256, 1)],
          [(256, 512, 2), (512, 512, 1)]]


def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _resnet18_body(size: int) -> tuple[int, int, list[int]]:
    """(parameters, multiply-adds, spatial size after each stage) of ResNet-18 up to layer4 (no fc),
    batch norm affine parameters included, on a ``size`` x ``size`` image."""
    params = 3 * 64 * 7 * 7 + 2 * 64
    s = _conv_out(size, 7, 2, 3)
    macs = s * s * 64 * 3 * 7 * 7
    s = _conv_out(s, 3, 2, 1)  # max pool
    after = []
    for blocks in STAGES:
        for cin, cout, stride in blocks:
            out = _conv_out(s, 3, stride, 1)
            params += cin * cout * 9 + 2 * cout + cout * cout * 9 + 2 * cout
            macs += out * out * cout * cin * 9 + out * out * cout * cout * 9
            if stride != 1 or cin != cout:  # the 1x1 downsample and its batch norm
                params += cin * cout + 2 * cout
                macs += out * out * cout * cin
            s = out
        after.append(s)
    return params, macs, after


def classifier_hand_count(size: int, classes: int) -> tuple[int, int]:
    """(parameters, FLOPs) of torchvision's ResNet-18 with a ``classes``-way fc on one image."""
    params, macs, _ = _resnet18_body(size)
    return params + 512 * classes + classes, 2 * (macs + 512 * classes)


def detector_hand_count(size: int, classes: int, proposals: int) -> tuple[int, int]:
    """(parameters, FLOPs) of the Faster R-CNN of ``DET_ARCH`` on one ``size`` x ``size`` image whose
    box head runs on ``proposals`` proposals."""
    f, r, c = DET_ARCH["fpn_channels"], DET_ARCH["representation_size"], classes + 1  # + background
    params, macs, sizes = _resnet18_body(size)
    widths = [64, 128, 256, 512]
    # FPN: a 1x1 lateral conv and a 3x3 output conv per stage, both with bias; max pool adds a level
    params += sum(w * f + f for w in widths) + 4 * (9 * f * f + f)
    macs += sum(s * s * (w * f + 9 * f * f) for s, w in zip(sizes, widths))
    levels = [*sizes, _conv_out(sizes[-1], 1, 2, 0)]
    # RPN head, shared by the five levels: 3x3 conv, objectness 1x1, box deltas 1x1 (with bias)
    params += 9 * f * f + f + f * ANCHORS + ANCHORS + f * 4 * ANCHORS + 4 * ANCHORS
    macs += sum(s * s * (9 * f * f + f * ANCHORS + f * 4 * ANCHORS) for s in levels)
    # box head (two fc layers on 7x7 RoIAlign features) and predictor (class scores, box deltas)
    params += (f * 49 * r + r) + (r * r + r) + (r * c + c) + (r * 4 * c + 4 * c)
    macs += proposals * (f * 49 * r + r * r + r * c + r * 4 * c)
    return params, 2 * macs


@pytest.mark.parametrize("size", [32, 64])
def test_classifier_parameters_exactly_and_flops_within_one_percent_of_a_hand_count(size: int) -> None:
    eff = image_model_efficiency(Classifier("resnet18", CLASSES), (size, size))
    params, flops = classifier_hand_count(size, CLASSES)
    assert eff.params == {"image": params}
    assert eff.flops["image"] == pytest.approx(flops, rel=0.01)
    assert eff.image_size == (size, size) and eff.context_length is None and eff.proposals is None
    assert eff.latency_ms is None, "latency is measured only when asked"


def test_detector_counted_at_its_proposal_cap_parameters_exactly_and_flops_within_one_percent() -> None:
    det = load_detector(DET_ARCH, num_classes=CLASSES, image_size=64).train()
    eff = image_model_efficiency(det, (64, 64))
    # 3 x (16^2 + 8^2 + 4^2 + 2^2 + 1) = 1023 anchors at 64 x 64, more than the cap: the box head gets 40
    assert eff.proposals == DET_ARCH["rpn_post_nms_top_n_test"]
    params, flops = detector_hand_count(64, CLASSES, eff.proposals)
    assert eff.params == {"image": params}
    assert eff.flops["image"] == pytest.approx(flops, rel=0.01)
    assert det.training and det.rpn.nms_thresh == 0.7, "the model is left as it was found"


def test_a_detectors_cost_does_not_depend_on_its_weights() -> None:
    """NMS would keep a number of proposals that depends on the weights; at the cap it does not."""
    costs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        costs.append(image_model_efficiency(load_detector(DET_ARCH, num_classes=CLASSES, image_size=64), (64, 64)))
    assert costs[0].flops == costs[1].flops and costs[0].proposals == costs[1].proposals == 40


# --------------------------------------------------------------------------- the report's tables
def _save(folder: Path, model: torch.nn.Module, config: tuple[str, dict], recipe: dict, results: dict) -> None:
    folder.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["mimic_head.job0.adapter.weight"] = torch.ones(16, 16)  # training-only: never loaded, never counted
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / config[0]).write_text(json.dumps(config[1]))
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "training": {"output_dir": str(folder)}}))
    (folder / "test_results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory) -> Path:
    """Two classification runs (two seeds of one ResNet-18), one on ResNet-34 without weights, and a
    detection run, under one folder."""
    root = tmp_path_factory.mktemp("image_runs")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Classifier("resnet18", CLASSES)
        _save(root / f"cls_s{seed}", model, (CLASSIFIER_CONFIG, model.to_config()),
              {"name": "cls", "method": "ResNet-18", "task": "classification", "seed": seed,
               "data": {"name": "synth_shapes", "shapes": {"num_classes": CLASSES, "image_size": 32}},
               "student": {"arch": "resnet18"}}, {"test_accuracy": 50.0 + seed})
    weightless = root / "cls34"
    weightless.mkdir()
    (weightless / "recipe.yaml").write_text(yaml.safe_dump(
        {"name": "cls34", "task": "classification", "student": {"arch": "resnet34"},
         "data": {"name": "synth_shapes", "shapes": {"num_classes": CLASSES}}, "training": {"output_dir": "x"}}))
    (weightless / "test_results.json").write_text(json.dumps({"test_accuracy": 61.0}))
    det = load_detector(DET_ARCH, num_classes=CLASSES, image_size=64)
    _save(root / "det", det, (DETECTOR_CONFIG, det.to_config()),
          {"name": "det", "method": "FPN mimic", "task": "detection", "seed": 0,
           "data": {"name": "synth_det", "det": {"num_classes": CLASSES, "image_size": 64}},
           "student": {"arch": DET_ARCH}}, {"test_AP": 12.5, "test_AP50": 30.0, "test_AP75": 10.0})
    return root


def _md_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of ``text``, rows of stripped cells, the rule left out."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            if not line.startswith("|-"):
                tables[-1].append([c.strip() for c in line.strip().strip("|").split(" | ")])
        previous = line
    return tables


def _sig3(x: float) -> float:
    return float(f"{x:.3g}")


def test_report_tables_show_the_cost_of_detectors_and_classifiers(image_runs: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedRunWarning)  # no trainer_state.json: no plots
        written = write_report([image_runs], tmp_path / "out", latency=Latency(warmup=0, iters=2), galleries=None,
                               plots=False)
    md = written["results"].read_text(encoding="utf-8")
    det_md, cls_md = _md_tables(md)[:2]  # the detection table comes before the classification one
    assert _parse(written["html"]).tables == [det_md, cls_md]
    heads = ["Params M", "GFLOPs per image", "CPU ms b1 per image"]
    expected = {"FPN mimic": (det_md, detector_hand_count(64, CLASSES, 40)),
                "ResNet-18": (cls_md, classifier_hand_count(32, CLASSES))}
    for label, (table, (params, flops)) in expected.items():
        assert table[0][-3:] == heads
        (row,) = [r for r in table[1:] if r[0] == label]
        assert row[-3] == f"{params / 1e6:.2f}"
        assert float(row[-2]) == pytest.approx(_sig3(flops / 1e9), rel=0.01)
        assert float(row[-1]) > 0
    (weightless,) = [r for r in cls_md[1:] if r[0] == "cls34"]
    assert weightless[-3:] == ["–", "–", "–"]
    assert "(n=2)" in [r for r in cls_md[1:] if r[0] == "ResNet-18"][0][1], "two seeds in one cell, one cost"
    assert "40 proposals per image" in md and "32x32 images" in md and "64x64 images" in md
    assert re.search(r"one process on .*torch threads", md) and "FlopCounterMode" in md
    assert "(image / text)" not in md, "one tower: no caption columns"


def test_latency_spread_is_the_90th_percentile_over_the_median_and_a_noisy_run_is_said(monkeypatch) -> None:
    """Ten timed calls of 1, 1, ..., 1, 1, 4 ms (by a fake clock): median 1 ms, 90th percentile (the
    9th of 10 sorted) 1 ms, so spread 1.0; with two slow calls the 9th is 4 ms: spread 4.0. The cost
    note says so above 1.5x, and not below."""
    import itertools

    from kd_trainer.report import efficiency
    from kd_trainer.report.efficiency import Efficiency, timed_ms
    from kd_trainer.report.tables import efficiency_columns

    def clock(durations):
        ticks = itertools.accumulate(itertools.chain.from_iterable((0.0, d) for d in durations))
        return lambda: next(ticks)

    def fake_run(durations) -> tuple[float, float]:
        monkeypatch.setattr(efficiency.time, "perf_counter", clock(durations))
        return timed_ms(lambda: None, latency=Latency(warmup=0, iters=len(durations)))

    assert fake_run([1e-3] * 9 + [4e-3]) == pytest.approx((1.0, 1.0))
    assert fake_run([1e-3] * 8 + [4e-3] * 2) == pytest.approx((1.0, 4.0))
    monkeypatch.undo()

    def eff(spread: float) -> Efficiency:
        return Efficiency(params={"image": 10}, flops={"image": 20}, image_size=(8, 8), latency_ms={"image": 1.0},
                          latency_spread={"image": spread})

    _, quiet = efficiency_columns([eff(1.2), eff(1.0)], "a machine")
    _, noisy = efficiency_columns([eff(1.2), eff(4.0)], "a machine")
    assert "noisy" not in quiet
    assert "the slowest tenth of one row's calls took 4.0x its median" in noisy

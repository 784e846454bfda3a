"""The detection example: SynthDet, Faster R-CNN ResNet+FPN detectors, taps by key, COCO mAP, the
detection recipes end to end, and 2 gloo processes training the adapters as 1 process does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import TrainingArguments

from kd_trainer.data.detection import SynthDetDataset, collate_detection
from kd_trainer.det_metrics import coco_detection_metrics, to_coco_detections
from kd_trainer.distill.detection import DetectionTrainer
from kd_trainer.distill.mimic import ADAPTED_KEY, MimicEngine
from kd_trainer.distill.resolved import resolve_run
from kd_trainer.models.detector import DETECTOR_CONFIG, load_detector
from kd_trainer.models.loading import CheckpointError
from kd_trainer.models.taps import Tap
from kd_trainer.recipe import RecipeError, load_recipe
from kd_trainer.recipe.mimic import MimicJob
from kd_trainer.runner.detection import run_detection
from kd_trainer.synthetic.detection import make_synth_det
from kd_trainer.synthetic.shapes import COLOURS
from tiny import gloo_env, spawn_gloo

ROOT = Path(__file__).resolve().parents[1]
FPN = ["backbone.fpn:0", "backbone.fpn:1", "backbone.fpn:2", "backbone.fpn:3", "backbone.fpn:pool"]
# Tiny detectors for 64x64 images: few proposals, narrow heads.
SMALL = {"anchor_sizes": [8, 16, 32, 64, 128], "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50,
         "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 30, "box_batch_size_per_image": 32,
         "box_detections_per_img": 10, "representation_size": 64}
TINY_DATA = "data.det={num_classes: 3, train_images: 8, test_images: 5, image_size: 64, max_objects: 3, seed: 0}"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this module runs torch on one thread (the conftest fixture)."""


@pytest.fixture(scope="module")
def synthdet(tmp_path_factory) -> Path:
    return make_synth_det(tmp_path_factory.mktemp("det") / "SynthDet", num_classes=3, train_images=8,
                          test_images=5, image_size=64, max_objects=3, seed=0)


# --------------------------------------------------------------------------- SynthDet


def test_synthdet_is_seeded_cached_and_its_boxes_hold_their_objects(tmp_path, synthdet):
    again = make_synth_det(tmp_path / "again", num_classes=3, train_images=8, test_images=5, image_size=64,
                           max_objects=3, seed=0)
    for f in sorted(p.relative_to(synthdet) for p in synthdet.rglob("*") if p.is_file()):
        assert (again / f).read_bytes() == (synthdet / f).read_bytes(), f
    stamp = (again / "train" / "0000.png").stat().st_mtime_ns
    make_synth_det(again, num_classes=3, train_images=8, test_images=5, image_size=64, max_objects=3, seed=0)
    assert (again / "train" / "0000.png").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(ValueError, match="other arguments"):
        make_synth_det(again, num_classes=3, train_images=8, test_images=5, image_size=64, max_objects=3, seed=1)
    other = make_synth_det(tmp_path / "other", num_classes=3, train_images=8, test_images=5, image_size=64,
                           max_objects=3, seed=1)
    assert (other / "train.json").read_text() != (synthdet / "train.json").read_text()

    ds = SynthDetDataset(synthdet, "train", train=False)
    counts = []
    palette = list(COLOURS.values())  # class k (1-based) of 3 classes is the k-th colour's circle
    for i in range(len(ds)):
        item = ds[i]
        pixels = np.asarray(Image.open(synthdet / ds.images[i]["file_name"]).convert("RGB")).astype(int)
        torch.testing.assert_close(item["pixel_values"], torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        counts.append(len(item["labels"]))
        for (x0, y0, x1, y1), label in zip(item["boxes"].tolist(), item["labels"].tolist()):
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and 1 <= label <= 3
            inside = pixels[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
            near = (np.abs(inside - np.array(palette[label - 1])) <= 30).all(-1)
            assert near.mean() > 0.15, f"image {i}: box {x0, y0, x1, y1} barely holds a {label} object"
    assert 1 <= min(counts) and max(counts) <= 3 and len(set(counts)) > 1


def test_flipped_training_items_flip_their_boxes(synthdet):
    plain, train = SynthDetDataset(synthdet, "train", train=False), SynthDetDataset(synthdet, "train", train=True)
    flipped = 0
    for seed in range(8):
        torch.manual_seed(seed)
        a, b = plain[0], train[0]
        if torch.equal(a["pixel_values"], b["pixel_values"]):
            torch.testing.assert_close(a["boxes"], b["boxes"])
            continue
        flipped += 1
        torch.testing.assert_close(b["pixel_values"], a["pixel_values"].flip(-1))
        x0, y0, x1, y1 = a["boxes"].unbind(1)
        torch.testing.assert_close(b["boxes"], torch.stack([64 - x1, y0, 64 - x0, y1], 1))
    assert 0 < flipped < 8
    batch = collate_detection([plain[0], plain[1]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["image_ids"].tolist() == [0, 1]
    assert [set(t) for t in batch["targets"]] == [{"boxes", "labels"}] * 2


# --------------------------------------------------------------------------- COCO metrics


def test_coco_metrics_match_hand_computed_average_precision():
    gt = {"images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500,
                           "iscrowd": 0}]}
    # One detection of IoU 0.62 with the only box: a true positive at IoU thresholds .50, .55, .60
    # (3 of 10), precision 1 at every recall there -> AP@.5 = 1, AP@[.5:.95] = 0.3, AP@.75 = 0.
    x1 = 10 + 50 * 0.62  # same top, left, height; width cut to 31: IoU = 31 * 50 / 2500 = 0.62
    det = to_coco_detections(1, torch.tensor([[10.0, 10.0, x1, 60.0]]), torch.tensor([0.9]), torch.tensor([1]))
    assert det[0]["bbox"] == pytest.approx([10, 10, 31, 50])
    m = coco_detection_metrics(gt, det)
    assert m["AP50"] == pytest.approx(1.0) and m["AP"] == pytest.approx(0.3) and m["AP75"] == pytest.approx(0.0)

    # Two boxes; a false positive ranked above one exact hit: precision 0 then 1/2 at recall 1/2.
    # 101-point interpolated AP: recall points 0.00 ... 0.50 (51 of 101) get precision 0.5 -> 0.2525.
    gt["annotations"].append({"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400,
                              "iscrowd": 0})
    dets = (to_coco_detections(1, torch.tensor([[70.0, 70.0, 90.0, 90.0]]), torch.tensor([0.95]), torch.tensor([1]))
            + to_coco_detections(2, torch.tensor([[0.0, 0.0, 20.0, 20.0]]), torch.tensor([0.5]), torch.tensor([1])))
    m = coco_detection_metrics(gt, dets)
    assert m["AP"] == pytest.approx(51 * 0.5 / 101) and m["AP50"] == pytest.approx(51 * 0.5 / 101)
    assert coco_detection_metrics(gt, [])["AP"] == 0.0
    with pytest.raises(ValueError, match=r"images \[7\]"):
        coco_detection_metrics(gt, to_coco_detections(7, torch.zeros(1, 4), torch.ones(1), torch.ones(1)))


# --------------------------------------------------------------------------- detectors and taps


def test_detectors_build_by_depth_from_random_init_without_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    for depth in (18, 34, 50, 101, 152):
        det = load_detector(f"fasterrcnn_resnet{depth}_fpn", num_classes=3, image_size=64)
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        want = sum(p.numel() for n, p in resnet.named_parameters() if not n.startswith("fc."))
        assert sum(p.numel() for p in det.backbone.body.parameters()) == want, depth
        assert det.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert not (tmp_path / "hub").exists()  # nothing was fetched
    with pytest.raises(ValueError, match="depth 20 is not one of 18, 34, 50, 101, 152"):
        load_detector({"depth": 20}, num_classes=3, image_size=64)
    with pytest.raises(ValueError, match="fasterrcnn_resnet<depth>_fpn"):
        load_detector("resnet50", num_classes=3, image_size=64)
    with pytest.raises(ValueError, match="fpn_chanels"):
        load_detector({"depth": 18, "fpn_chanels": 64}, num_classes=3, image_size=64)


def test_detector_checkpoints_load_strictly(tmp_path):
    torch.manual_seed(0)
    arch = {"depth": 18, "fpn_channels": 32, **SMALL}
    det = load_detector(arch, num_classes=3, image_size=64)
    save_file(det.state_dict(), str(tmp_path / "det.safetensors"))
    again = load_detector(arch, num_classes=3, image_size=64, checkpoint=str(tmp_path / "det.safetensors"))
    for (n, a), b in zip(det.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(b, a, msg=n)
    # A torchvision ResNet classifier's weights (an ImageNet backbone, say) fill backbone.body; fc is dropped.
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    filled = load_detector(arch, num_classes=3, image_size=64, checkpoint=str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(filled.backbone.body.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    with pytest.raises(CheckpointError, match=r"shapes differ.*roi_heads\.box_predictor"):
        load_detector(arch, num_classes=5, image_size=64, checkpoint=str(tmp_path / "det.safetensors"))
    run = tmp_path / "run"
    run.mkdir()
    save_file(det.state_dict(), str(run / "model.safetensors"))
    (run / DETECTOR_CONFIG).write_text(json.dumps(det.to_config()))
    with pytest.raises(CheckpointError, match="depth 18 vs 34"):
        load_detector({**arch, "depth": 34}, num_classes=3, image_size=64, checkpoint=str(run))


def test_taps_take_fpn_levels_and_rpn_outputs_by_key(synthdet):
    torch.manual_seed(0)
    det = load_detector({"depth": 18, "fpn_channels": 32, **SMALL}, num_classes=3, image_size=64).eval()
    x = collate_detection([SynthDetDataset(synthdet, "test", train=False)[i] for i in range(2)])["pixel_values"]
    names = [*FPN, "backbone.body.layer3", "rpn.head:0:1", "rpn.head:1:4"]
    seen = {}
    h1 = det.backbone.fpn.register_forward_hook(lambda m, i, o: seen.update(fpn=o))
    h2 = det.rpn.head.register_forward_hook(lambda m, i, o: seen.update(rpn=o))
    with Tap(det, names) as tap, torch.no_grad(), tap.capture() as got:
        det(x)
        for key in ("0", "1", "2", "3", "pool"):
            assert got[f"backbone.fpn:{key}"] is seen["fpn"][key]
        assert got["backbone.fpn:0"].shape == (2, 32, 16, 16) and got["backbone.fpn:pool"].shape == (2, 32, 1, 1)
        assert got["backbone.body.layer3"].shape == (2, 256, 4, 4)
        assert got["rpn.head:0:1"] is seen["rpn"][0][1] and got["rpn.head:0:1"].shape == (2, 3, 8, 8)
        assert got["rpn.head:1:4"] is seen["rpn"][1][4] and got["rpn.head:1:4"].shape == (2, 12, 1, 1)
    h1.remove(), h2.remove()
    for name, message in [
        ("backbone.fpn:p6", r"no key 'p6'; valid keys: '0', '1', '2', '3', 'pool'"),
        ("backbone.fpn", r"OrderedDict with keys '0', '1', '2', '3', 'pool'; name one entry, e.g. 'backbone.fpn:0'"),
        ("rpn.head:0", r"selects a list of 5, not one tensor"),
        ("rpn.head:0:5", r"index 5 is out of range, valid: 0..4"),
        ("rpn.head:objectness", r"takes an integer index, not 'objectness'"),
        ("backbone.body.layer3:0", r"returned a tensor of shape \(2, 256, 4, 4\), not a tuple, list or dict"),
    ]:
        with Tap(det, [name]) as tap, torch.no_grad(), tap.capture(), pytest.raises(ValueError, match=message):
            det(x)


# --------------------------------------------------------------------------- recipes end to end


def _common(tmp_path: Path, out: str) -> list[str]:
    return [f"data.root={tmp_path / 'data'}", TINY_DATA, "training.logging_steps=1", "training.warmup_steps=0",
            "training.per_device_train_batch_size=4", "training.per_device_eval_batch_size=4",
            f"training.output_dir={tmp_path / out}", "training.disable_tqdm=true", "training.dataloader_num_workers=0"]


def _run(recipe: Path, overrides: list[str]) -> dict[str, float]:
    r = load_recipe(recipe, overrides)
    return run_detection(r, resolve_run(r))


def _logs(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


TASK_TERMS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


@pytest.mark.slow
def test_teacher_then_fpn_mimic_student_and_the_logged_totals_recombine(tmp_path):
    metrics = _run(ROOT / "recipes" / "det_r50_fpn_teacher.yaml", [*_common(tmp_path, "teacher"),
                                                                   "training.max_steps=2"])
    assert metrics["test_samples"] == 5 and 0 <= metrics["test_AP"] <= metrics["test_AP50"] <= 100
    assert json.loads((tmp_path / "teacher" / DETECTOR_CONFIG).read_text())["depth"] == 50
    for h in _logs(tmp_path / "teacher"):
        assert h["loss"] == pytest.approx(sum(h[k] for k in TASK_TERMS), rel=1e-4)

    out = tmp_path / "student"
    metrics = _run(ROOT / "recipes" / "det_frcnn_r50_to_r18_fpn_mimic.yaml", [
        *_common(tmp_path, "student"), "training.max_steps=3", "mimic.warm_up_iters=2",
        f"teachers.teacher0.checkpoint={tmp_path / 'teacher'}"])
    assert metrics["test_samples"] == 5
    entries = _logs(out)
    assert [h["step"] for h in entries] == [1, 2, 3]
    for h in entries:
        ramp = min(1.0, (h["step"] - 1) / 2)  # warm-up on the global step, weight 1
        assert 0 < h["mimic/mimic_job0/teacher0/l2"] <= 4  # unit-normalised features: |s - t|^2 <= 4
        assert h["mimic/mimic_job0/weighted"] == pytest.approx(ramp * h["mimic/mimic_job0/teacher0/l2"], abs=2e-6)
        assert h["mimic/total"] == pytest.approx(h["mimic/mimic_job0/weighted"], abs=2e-6)
        assert h["loss"] == pytest.approx(sum(h[k] for k in TASK_TERMS) + h["mimic/total"], rel=1e-4)
    # One 1x1 conv adapter per FPN level maps the student's 128 channels to the teacher's 256.
    adapters = json.loads((out / "mimic_adapters.json").read_text())["training_only"]
    weights = load_file(str(out / "model.safetensors"))
    shapes = {k: tuple(weights[k].shape) for k in adapters if k.endswith(".weight")}
    assert shapes == {f"mimic_head.adapters.mimic_job0__teacher0__{i}.weight": (256, 128, 1, 1) for i in range(5)}
    # The saved student reloads as a detector, its training-only adapters skipped.
    cfg = json.loads((out / DETECTOR_CONFIG).read_text())
    arch = {k: v for k, v in cfg.items() if k not in ("num_classes", "min_size", "max_size")}
    reloaded = load_detector(arch, num_classes=3, image_size=64, checkpoint=str(out))
    torch.testing.assert_close(reloaded.backbone.fpn.layer_blocks[0][0].weight,
                               weights["backbone.fpn.layer_blocks.0.0.weight"])


@pytest.mark.slow
def test_two_jobs_fpn_and_rpn_objectness_from_two_teachers(tmp_path):
    out = tmp_path / "two"
    _run(ROOT / "recipes" / "det_frcnn_two_teachers_two_jobs.yaml", [
        *_common(tmp_path, "two"), "training.max_steps=2", "teachers.teacher0.checkpoint=null",
        "teachers.teacher1.checkpoint=null", "teachers.teacher0.arch.depth=18", "mimic.mimic_job0.warm_up_iters=-1",
        "mimic.mimic_job1.warm_up_iters=-1"])
    for h in _logs(out):
        assert h["mimic/mimic_job0/weighted"] == pytest.approx(h["mimic/mimic_job0/teacher0/l2"], abs=2e-6)
        mse = h["mimic/mimic_job1/teacher1/l2"]  # `mse` is logged under its canonical name, l2
        assert h["mimic/mimic_job1/weighted"] == pytest.approx(0.5 * mse, rel=1e-4)
        assert h["mimic/total"] == pytest.approx(h["mimic/mimic_job0/weighted"] + h["mimic/mimic_job1/weighted"],
                                                 rel=1e-4)
        assert h["loss"] == pytest.approx(sum(h[k] for k in TASK_TERMS) + h["mimic/total"], rel=1e-4)
    adapters = json.loads((out / "mimic_adapters.json").read_text())["training_only"]
    # FPN 128 -> 256 per level; the objectness maps (3 anchors per place on both sides) need none.
    assert sorted({k.split(".")[2] for k in adapters}) == [f"mimic_job0__teacher0__{i}" for i in range(5)]


@pytest.mark.slow
def test_real_size_r152_to_r50_recipe_builds_and_trains_a_few_steps(tmp_path):
    recipe = ROOT / "recipes" / "det_frcnn_r152_to_r50_fpn_mimic.yaml"
    r = load_recipe(recipe)
    assert (r.student.arch, r.teachers["teacher0"].arch) == ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet152_fpn")
    out = tmp_path / "real"
    metrics = _run(recipe, [*_common(tmp_path, "real"), "training.max_steps=1", "data.det.test_images=2",
                            "training.per_device_train_batch_size=2", "teachers.teacher0.checkpoint=null"])
    assert metrics["test_samples"] == 2
    (h,) = _logs(out)
    assert h["mimic/mimic_job0/teacher0/l2"] > 0
    assert h["loss"] == pytest.approx(sum(h[k] for k in TASK_TERMS) + h["mimic/total"], rel=1e-4)
    assert json.loads((out / "mimic_adapters.json").read_text())["training_only"] == []  # 256 = 256: no adapter
    cfg = json.loads((out / DETECTOR_CONFIG).read_text())
    assert (cfg["depth"], cfg["fpn_channels"], cfg["rpn_post_nms_top_n_test"]) == (50, 256, 1000)


def test_unknown_fpn_key_and_bad_detection_recipes_are_refused(tmp_path):
    recipe = ROOT / "recipes" / "det_frcnn_r50_to_r18_fpn_mimic.yaml"
    small = [*_common(tmp_path, "bad"), "teachers.teacher0.checkpoint=null", "teachers.teacher0.arch.depth=18",
             "training.max_steps=1"]
    with pytest.raises(RecipeError, match=r"backbone\.fpn:p6.*no key 'p6'; valid keys: '0', '1', '2', '3', 'pool'"):
        _run(recipe, [*small, "mimic.student.mimic_name=[backbone.fpn:p6]",
                      "mimic.teacher0.mimic_name=[backbone.fpn:0]"])
    with pytest.raises(RecipeError, match=r"student\.arch: .*depth 19"):
        _run(recipe, [*small, "student.arch.depth=19"])
    with pytest.raises(RecipeError, match="data.det"):
        _run(recipe, [*small, "data.det=null"])
    with pytest.raises(RecipeError, match="task: detection trains with its own task loss"):
        load_recipe(recipe, ["loss={terms: [{name: itc}]}"])
    assert not (tmp_path / "bad" / "model.safetensors").exists()


# --------------------------------------------------------------------------- 2 processes


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = load_detector({"depth": 18, "fpn_channels": 16, **SMALL}, num_classes=3, image_size=64)
    torch.manual_seed(1)
    teacher = load_detector({"depth": 18, "fpn_channels": 32, **SMALL}, num_classes=3, image_size=64)
    return student, teacher


JOBS = [MimicJob(name="fpn", loss={"type": "l2_loss"}, teachers={"teacher0": FPN}, student=FPN),
        MimicJob(name="rpn", loss={"type": "mse"}, loss_weight=0.5,
                 teachers={"teacher0": ["rpn.head:0:0", "rpn.head:0:1"]}, student=["rpn.head:0:0", "rpn.head:0:1"])]


def _grads(model, engine: MimicEngine, shard: dict, seed: int) -> dict[str, torch.Tensor]:
    """One shard's training step: detector losses + mimic total, backward; gradients by name.
    The RPN and ROI samplers draw at random: each shard's draws are seeded the same way in both runs."""
    model.train()
    torch.manual_seed(seed)
    with engine.capture() as cap:
        out = model(shard["pixel_values"], shard["targets"])
        engine.run_teachers(forward=lambda name, t: t(shard["pixel_values"]))
        mimic = engine.losses(cap.student, cap.teachers, step=5)
        loss = sum(v for k, v in out.items() if k != ADAPTED_KEY) + mimic["mimic/total"]
    assert len(out[ADAPTED_KEY]) == 5  # the FPN levels' adapters ran inside the (wrapped) forward
    loss.backward()
    inner = model.module if isinstance(model, DDP) else model
    return {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


def _build(student, teacher, batch) -> MimicEngine:
    engine = MimicEngine(student, {"teacher0": teacher}, JOBS)
    keys = engine.build_adapters(batch["pixel_values"][:2])
    assert keys == [f"fpn__teacher0__{i}" for i in range(5)]  # 16 -> 32 channels per level; rpn: 3 = 3 anchors
    student.mimic_head = engine.head
    engine.head.lock()
    return engine


def _worker(rank: int, world: int, port: int, root: str) -> None:
    gloo_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        data = SynthDetDataset(root, "train", train=False)
        shards = [collate_detection([data[i] for i in range(2 * r, 2 * r + 2)]) for r in range(world)]
        # One process: both shards' gradients, averaged. Not the gradient of the concatenated batch:
        # the detector normalises its losses over each process's sampled anchors and proposals and
        # batch norm sees each process's images, so what DDP computes is the mean of per-shard
        # gradients; what must match is that (adapters included, each counted once).
        student, teacher = _pair()
        engine = _build(student, teacher, shards[0])
        want: dict[str, torch.Tensor] = {}
        for r, shard in enumerate(shards):
            for n, g in _grads(student, engine, shard, seed=100 + r).items():
                want[n] = want.get(n, 0) + g / world
            student.zero_grad()
        engine.remove()

        student, teacher = _pair()
        engine = _build(student, teacher, shards[0])
        got = _grads(DDP(student, find_unused_parameters=True), engine, shards[rank], seed=100 + rank)
        adapters = [n for n in want if n.startswith("mimic_head.")]
        assert len(adapters) == 10, adapters  # weight and bias of 5 adapters
        assert set(got) == set(want)
        for name, w in want.items():
            torch.testing.assert_close(got[name], w, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        engine.remove()

        # Evaluation over 2 processes: 5 test images split 3 + 2 (one padded duplicate dropped),
        # scored once; the same metrics as the whole split detected in one process.
        test = SynthDetDataset(root, "test", train=False)
        student.eval()
        with torch.no_grad():
            found = [student(test[i]["pixel_values"][None])[0] for i in range(len(test))]
        results = [r for i, d in enumerate(found) for r in to_coco_detections(test.images[i]["id"], d["boxes"],
                                                                                 d["scores"], d["labels"])]
        one = coco_detection_metrics(test.coco, results)
        args = TrainingArguments(output_dir=os.path.join(root, f"eval{rank}"), per_device_eval_batch_size=2,
                                 use_cpu=True, report_to="none", remove_unused_columns=False, disable_tqdm=True)
        trainer = DetectionTrainer(model=student, args=args, data_collator=collate_detection, train_dataset=data,
                                   eval_dataset=test)
        metrics = trainer.evaluate(test, metric_key_prefix="test")
        assert trainer.accelerator.num_processes == 2 and metrics["test_samples"] == 5
        # (batched and single-image convolutions may differ in the last bits: a near-tie could swap)
        assert metrics["test_AP"] == pytest.approx(100 * one["AP"], abs=1e-3)
        assert metrics["test_AP50"] == pytest.approx(100 * one["AP50"], abs=1e-3)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_train_detector_adapters_as_one_process_does_and_evaluate_the_whole_split(synthdet):
    spawn_gloo(_worker, 2, str(synthdet))

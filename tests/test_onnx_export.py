"""ONNX export of a small student, checked the way a deployment would check it.

The student is the ``micro`` architecture fitted, in this file, on the SynthPEDES split the export is
checked on: the checks measure whether the graphs keep the model's rankings, and a model that ranks
well has rankings worth keeping (a random one ranks by near-ties that any rounding reorders). It is
saved as an open_clip folder with a model card, the layout every kd_trainer run leaves behind.

Independent computations here: images are preprocessed with PIL and numpy from the numbers in
preprocess.json and run through bare ``onnxruntime`` sessions; R@1 is computed with numpy (argmax over
the gallery); the PyTorch side uses torchvision's transform of the data pipeline.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_trainer.data import CLIP_MEAN, CLIP_STD, load_pedes, tokenize, with_retrieval_transforms
from kd_trainer.data.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID
from kd_trainer.models.export import CARD_END, CARD_START, export_open_clip, update_model_card
from kd_trainer.models.factory import create_model
from kd_trainer.models.loading import model_from_checkpoint
from kd_trainer.models.onnx import OnnxDualEncoder, OnnxFolderError, at_image_size, export_onnx, verify_onnx_export
from kd_trainer.models.onnx import export as onnx_export
from kd_trainer.synthetic.pedes import make_synth_pedes
from tiny import run_cli

ort = pytest.importorskip("onnxruntime", reason="the deploy extra (pip install 'kd_trainer[deploy]')")
onnx = pytest.importorskip("onnx", reason="the deploy extra (pip install 'kd_trainer[deploy]')")

DATASET = "synth_pedes"
WRONG_SIZE = (16, 32)  # micro is 32x16 (H, W): the swapped size is a plausible mistake




@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synth_pedes(root / "SynthPEDES", num_identities=24, images_per_identity=(2, 3), image_size=(64, 32),
                     seed=3, split_identities=(0.2, 0.2, 0.6))
    return root


@pytest.fixture(scope="module")
def student(tmp_path_factory, data_root) -> Path:
    """``micro`` fitted on the test split's image-caption pairs (soft targets: every caption of a pid
    matches every image of it), saved as an open_clip folder with README.md."""
    torch.manual_seed(0)
    model = create_model("micro")
    raw = load_pedes(DATASET, data_root, splits=["test"])
    views = with_retrieval_transforms(raw, image_size=model.image_size, augment=False,
                                      context_length=model.context_length)
    gallery, queries = views["test_gallery"], views["test_queries"]
    pixels = torch.stack([gallery[i]["pixel_values"] for i in range(len(gallery))])
    tokens = torch.stack([queries[i]["input_ids"] for i in range(len(queries))])
    row_of = {image_id: i for i, image_id in enumerate(raw["test_gallery"]["image_id"])}
    image_rows = torch.tensor([row_of[i] for i in raw["test_queries"]["image_id"]])
    pids = torch.tensor(raw["test_queries"]["pid"])
    same = (pids[:, None] == pids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(80):
        logits = model.encode_text(tokens) @ model.encode_image(pixels[image_rows]).t() / 0.05
        loss = -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("student") / "micro_student"
    export_open_clip(model.eval(), folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, student, data_root) -> tuple[Ran, Path]:
    out = tmp_path_factory.mktemp("onnx") / "student_onnx"
    done = run_cli("export-onnx", str(student), "--out", str(out), "--int8", "--dataset", DATASET,
                "--root", str(data_root))
    return done, out


@pytest.fixture(scope="module")
def wrong_size(tmp_path_factory, student, data_root) -> tuple[Ran, Path]:
    out = tmp_path_factory.mktemp("onnx_wrong") / "student_onnx"
    done = run_cli("export-onnx", str(student), "--out", str(out), "--image-size", *map(str, WRONG_SIZE),
                "--dataset", DATASET, "--root", str(data_root))
    return done, out


def _pil_numpy_pixels(paths: list[str], size: tuple[int, int], mean: list[float], std: list[float]) -> np.ndarray:
    """The serving-side preprocessing written from preprocess.json's words: squash resize, /255, mean/std."""
    from PIL import Image

    out = []
    for p in paths:
        im = Image.open(p).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        x = np.asarray(im, dtype=np.float64) / 255.0
        out.append(((x - np.array(mean)) / np.array(std)).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


@pytest.mark.slow
def test_export_writes_graphs_and_a_preprocess_spec_that_reproduce_the_model(exported, student, data_root):
    done, out = exported
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"image_encoder.onnx", "text_encoder.onnx", "image_encoder.int8.onnx", "text_encoder.int8.onnx",
            "preprocess.json", "export_report.json"} <= names
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["image"]["size"] == [32, 16] and spec["image"]["resize"] == "squash"
    assert spec["image"]["mean"] == pytest.approx(CLIP_MEAN) and spec["image"]["std"] == pytest.approx(CLIP_STD)
    assert (spec["text"]["context_length"], spec["text"]["sot_token_id"], spec["text"]["eot_token_id"],
            spec["text"]["pad_token_id"]) == (77, SOT_TOKEN_ID, EOT_TOKEN_ID, 0)

    # Independent path: PIL + numpy preprocessing from the spec, bare onnxruntime sessions, at two batch
    # sizes (the batch axis is dynamic) -- vs PyTorch on torchvision's transform of the same files.
    model = model_from_checkpoint(student).eval()
    raw = load_pedes(DATASET, data_root, splits=["test"])
    paths = list(raw["test_gallery"]["image_path"])[:5]
    pixels = _pil_numpy_pixels(paths, (32, 16), spec["image"]["mean"], spec["image"]["std"])
    views = with_retrieval_transforms(raw, image_size=(32, 16), augment=False, context_length=77)
    torch_pixels = torch.stack([views["test_gallery"][i]["pixel_values"] for i in range(5)])
    assert np.abs(pixels - torch_pixels.numpy()).max() < 1e-5, "preprocess.json's recipe is not the pipeline's"
    ids = torch.stack([views["test_queries"][i]["input_ids"] for i in range(5)])
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(torch_pixels).numpy(), model.encode_text(ids).numpy()
    img = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        got_img = img.run(None, {"pixel_values": pixels[:n]})[0]
        got_txt = txt.run(None, {"input_ids": ids[:n].numpy()})[0]
        assert got_img.shape == (n, model.embed_dim) and got_txt.shape == (n, model.embed_dim)
        assert np.abs(got_img - ref_img[:n]).max() < 1e-4
        assert np.abs(got_txt - ref_txt[:n]).max() < 1e-4
        assert np.allclose(np.linalg.norm(got_img, axis=1), 1, atol=1e-5), "outputs must be L2-normalised"

    report = json.loads((out / "export_report.json").read_text())
    listed = {name for files in spec["variants"].values() for name in files.values()}
    assert spec["sha256"] == {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in listed}
    assert report["sha256"] == spec["sha256"], "the report names the graphs it checked"
    assert report["passed"] and report["variants"]["fp32"]["max_abs_diff"]["image"] < 1e-4
    assert report["variants"]["fp32"]["max_abs_diff"]["text"] < 1e-4
    assert report["variants"]["int8"]["bytes"]["image"] < report["variants"]["fp32"]["bytes"]["image"]


@pytest.mark.slow
def test_int8_stays_within_tolerance_and_the_metrics_are_right(exported, data_root):
    done, out = exported
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "export_report.json").read_text())
    ref, int8 = report["reference"], report["variants"]["int8"]["metrics"]
    assert ref["r1"] > 50, "the fixture student should rank well, or the comparison says little"
    for key in ("r1", "mAP"):
        assert ref[key] - int8[key] <= 0.5, (key, ref[key], int8[key])
        assert report["variants"]["fp32"]["metrics"][key] == pytest.approx(ref[key])
    assert 0 < report["variants"]["int8"]["max_abs_diff"]["image"] < 0.1, "INT8 should differ, a little"

    # R@1 of the int8 graphs, by numpy: a query counts when its most similar gallery image has its pid.
    raw = load_pedes(DATASET, data_root, splits=["test"])
    spec = json.loads((out / "preprocess.json").read_text())
    gallery, queries = raw["test_gallery"], raw["test_queries"]
    pixels = _pil_numpy_pixels(list(gallery["image_path"]), (32, 16), spec["image"]["mean"], spec["image"]["std"])
    img = ort.InferenceSession(str(out / "image_encoder.int8.onnx"), providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(out / "text_encoder.int8.onnx"), providers=["CPUExecutionProvider"])
    g = img.run(None, {"pixel_values": pixels})[0]
    q = txt.run(None, {"input_ids": tokenize(list(queries["caption"]), 77).numpy()})[0]
    top = np.asarray(gallery["pid"])[np.argmax(q @ g.T, axis=1)]
    r1 = 100.0 * float(np.mean(top == np.asarray(queries["pid"])))
    assert int8["r1"] == pytest.approx(r1)
    assert "verification: passed" in done.stdout


@pytest.mark.slow
def test_the_run_folder_model_card_gets_the_export_once(exported, student):
    done, out = exported
    assert done.returncode == 0, done.stderr[-3000:]
    card = (student / "README.md").read_text()
    assert card.count(CARD_START) == 1 and card.count(CARD_END) == 1
    section = card.split(CARD_START)[1]
    assert "| ONNX int8 " in section and str(out) in section
    report = json.loads((out / "export_report.json").read_text())
    before = card.split(CARD_START)[0]
    update_model_card(student / "README.md", report, out)  # a second export replaces the section
    again = (student / "README.md").read_text()
    assert again.count(CARD_START) == 1 and again.split(CARD_START)[0] == before


@pytest.mark.slow
def test_an_export_at_the_wrong_image_size_fails_with_a_message(wrong_size):
    done, out = wrong_size
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "error: the ONNX export" in done.stderr and "R@1" in done.stderr and "tolerance 0.5" in done.stderr
    assert f"{WRONG_SIZE}" in done.stderr, "the message should say the graphs take another image size"
    report = json.loads((out / "export_report.json").read_text())
    assert not report["passed"] and report["export_image_size"] == list(WRONG_SIZE)
    # The graphs themselves are faithful to the resized PyTorch model: only the dataset check catches it.
    assert report["variants"]["fp32"]["max_abs_diff"]["image"] < 1e-4
    assert report["reference"]["r1"] - report["variants"]["fp32"]["metrics"]["r1"] > 0.5


@pytest.mark.slow
def test_eval_onnx_evaluates_an_exported_folder(exported, data_root, tmp_path):
    done, out = exported
    assert done.returncode == 0, done.stderr[-3000:]
    result = tmp_path / "eval.json"
    ran = run_cli("eval", "--onnx", str(out), "--onnx-variant", "int8", "--dataset", DATASET, "--root", str(data_root),
               "--output", str(result))
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads((out / "export_report.json").read_text())
    assert json.loads(result.read_text()) == pytest.approx(report["variants"]["int8"]["metrics"])
    assert "ONNX int8" in ran.stdout


@pytest.mark.slow
def test_a_graph_that_disagrees_with_preprocess_json_is_refused(exported, wrong_size, data_root, tmp_path):
    (done, out), (_, wrong) = exported, wrong_size
    assert done.returncode == 0, done.stderr[-3000:]
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy(wrong / "image_encoder.onnx", mixed / "image_encoder.onnx")  # a 16x32 graph, a 32x16 spec
    # Assembled by hand with care: the checksum recomputed and the report of the old graphs removed, so
    # only the shapes tell.
    spec = json.loads((mixed / "preprocess.json").read_text())
    spec["sha256"]["image_encoder.onnx"] = hashlib.sha256((mixed / "image_encoder.onnx").read_bytes()).hexdigest()
    (mixed / "preprocess.json").write_text(json.dumps(spec))
    (mixed / "export_report.json").unlink()
    with pytest.raises(OnnxFolderError, match=r"\(16, 32\).*\(32, 16\)"):
        OnnxDualEncoder(mixed)
    ran = run_cli("eval", "--onnx", str(mixed), "--dataset", DATASET, "--root", str(data_root))
    assert ran.returncode == 2 and "exported at another image size" in ran.stderr, ran.stderr[-3000:]


def test_missing_deploy_extra_is_named(tmp_path, monkeypatch):
    torch.manual_seed(0)
    folder = tmp_path / "m"
    export_open_clip(create_model("micro"), folder)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed: `import onnxruntime` fails
    ran = run_cli("export-onnx", str(folder), "--out", str(tmp_path / "o"))
    assert ran.returncode == 2
    assert "onnxruntime" in ran.stderr and "pip install 'kd_trainer[deploy]'" in ran.stderr
    assert not (tmp_path / "o" / "image_encoder.onnx").exists()


def test_at_image_size_regrids_positions_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = create_model("micro")  # 32x16, patch 8: a 4x2 grid
    assert at_image_size(model, None) is model and at_image_size(model, (32, 16)) is model
    before = model.clip.visual.positional_embedding.detach().clone()
    resized = at_image_size(model, (16, 32))  # a 2x4 grid
    pos = resized.clip.visual.positional_embedding
    assert resized.image_size == (16, 32) and tuple(resized.clip.visual.grid_size) == (2, 4)
    assert pos.shape == (1 + 8, before.shape[1])
    assert torch.equal(pos[0], before[0]), "the class token's position is kept"
    # Bilinear 4x2 -> 2x4 with align_corners=False: output (0, 0) samples input at (0.5, -0.25) -> clamped
    # to column 0, halfway between rows 0 and 1.
    grid = before[1:].reshape(4, 2, -1)
    assert torch.allclose(pos[1], (grid[0, 0] + grid[1, 0]) / 2, atol=1e-6)
    assert torch.equal(model.clip.visual.positional_embedding, before) and model.image_size == (32, 16)
    with torch.no_grad():
        out = resized.encode_image(torch.randn(2, 3, 16, 32))
    assert out.shape == (2, model.embed_dim)
    with pytest.raises(ValueError, match="smaller than the model's 8x8 patch"):
        at_image_size(model, (4, 16))


# ----------------------------------------------------------------------------------------------
# Whole or refused: an export folder is never scored half-replaced, damaged or mixed


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_error_line(ran: Ran) -> str:
    """The refusal: exit 2, and exactly one line on stderr that is not a log record or a warning."""
    lines = [ln for ln in ran.stderr.splitlines()
             if ln.strip() and not re.match(r"\d{4}-\d\d-\d\d ", ln) and not ln.startswith("warning:")]
    assert ran.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), ran.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def other_export(tmp_path_factory) -> Path:
    """An export (fp32, not verified) of another model of the same shape: graphs a mixed folder may hold."""
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("other") / "other_onnx"
    export_onnx(create_model("micro").eval(), out)
    return out


@pytest.mark.slow
def test_a_re_export_killed_part_way_leaves_the_previous_export_whole(exported, data_root, tmp_path, monkeypatch):
    (done, out) = exported
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "student_onnx"
    shutil.copytree(out, folder)
    before = _files(folder)
    real_trace, calls = onnx_export._trace, []

    def dies_after_one_graph(*args, **kwargs):
        calls.append(args[2])
        if len(calls) > 1:
            raise KeyboardInterrupt  # the process is stopped while the second graph is written
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "_trace", dies_after_one_graph)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(create_model("micro"), folder, int8=True)
    assert len(calls) == 2 and calls[0].parent != folder, "the new graphs are written beside the folder"
    assert _files(folder) == before, "the previous export must be left exactly as it was"
    assert not list(tmp_path.glob(".student_onnx.partial-*")), "the unfinished export is removed"
    ran = run_cli("eval", "--onnx", str(folder), "--dataset", DATASET, "--root", str(data_root),
               "--output", str(tmp_path / "eval.json"))
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads((folder / "export_report.json").read_text())
    assert json.loads((tmp_path / "eval.json").read_text()) == pytest.approx(report["variants"]["fp32"]["metrics"])


@pytest.mark.slow
def test_a_folder_mixing_graphs_of_two_exports_is_refused(exported, other_export, data_root, tmp_path):
    (done, out) = exported
    assert done.returncode == 0, done.stderr[-3000:]
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    # What an interrupted in-place re-export used to leave: one new graph beside the old ones, the old
    # preprocess.json and the old report. Same shapes, so only the checksum tells.
    shutil.copy(other_export / "image_encoder.onnx", mixed / "image_encoder.onnx")
    ran = run_cli("eval", "--onnx", str(mixed), "--dataset", DATASET, "--root", str(data_root))
    line = _one_error_line(ran)
    assert "image_encoder.onnx" in line and "checksum" in line and "another export" in line, line
    assert not list(mixed.glob("eval_*.json")), "nothing is scored"


@pytest.mark.slow
def test_damaged_unfinished_or_stale_folders_are_refused_naming_the_file(exported, wrong_size, data_root, tmp_path):
    (done, out), (_, wrong) = exported, wrong_size
    assert done.returncode == 0, done.stderr[-3000:]

    def copy(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(out, folder)
        return folder

    def eval_onnx(folder: Path, *more: str) -> str:
        return _one_error_line(run_cli("eval", "--onnx", str(folder), "--dataset", DATASET, "--root", str(data_root),
                                    *more))

    truncated = copy("truncated")
    graph = truncated / "text_encoder.int8.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # a copy that stopped half-way
    line = eval_onnx(truncated, "--onnx-variant", "int8")
    assert str(graph) in line and "truncated" in line, line
    # ... and one whose checksum was "fixed" by hand: ONNX Runtime's refusal, on one line naming the file.
    spec = json.loads((truncated / "preprocess.json").read_text())
    spec["sha256"][graph.name] = hashlib.sha256(graph.read_bytes()).hexdigest()
    (truncated / "preprocess.json").write_text(json.dumps(spec))
    (truncated / "export_report.json").unlink()
    line = eval_onnx(truncated, "--onnx-variant", "int8")
    assert str(graph) in line and "cannot be loaded by ONNX Runtime" in line, line

    unfinished = copy("unfinished")  # killed while the new export was moved in: preprocess.json goes first
    (unfinished / "preprocess.json").unlink()
    assert "did not finish" in eval_onnx(unfinished)

    stale = copy("stale")  # the graphs of one export, the report of another
    shutil.copy(wrong / "export_report.json", stale / "export_report.json")
    assert "export_report.json was not written for the graphs" in eval_onnx(stale)

    old = copy("old")  # written before graphs had checksums
    spec = json.loads((old / "preprocess.json").read_text())
    spec["format"] = "kd_trainer-onnx/1"
    del spec["sha256"]
    (old / "preprocess.json").write_text(json.dumps(spec))
    line = eval_onnx(old)
    assert "earlier format 'kd_trainer-onnx/1'" in line and "run `kd-trainer export-onnx` again" in line, line


@pytest.fixture(scope="module")
def nan_folder(tmp_path_factory) -> Path:
    """A saved model with one NaN and one inf weight (open_clip folders keep whatever they are given)."""
    torch.manual_seed(0)
    model = create_model("micro")
    with torch.no_grad():
        model.clip.visual.conv1.weight[0, 0, 0, 0] = float("nan")
        model.clip.text_projection[0, 0] = float("inf")
    folder = tmp_path_factory.mktemp("nan") / "nan_model"
    export_open_clip(model, folder)
    return folder


def test_non_finite_weights_are_refused_before_eval_or_export_computes_anything(nan_folder, data_root, tmp_path):
    ran = run_cli("eval", str(nan_folder), "--dataset", DATASET, "--root", str(data_root))
    line = _one_error_line(ran)
    assert "visual.conv1.weight" in line and "text_projection" in line and "not evaluated" in line, line
    assert "text-to-image" not in ran.stdout and not list(nan_folder.glob("eval_*.json"))

    out = tmp_path / "exports" / "nan_onnx"
    ran = run_cli("export-onnx", str(nan_folder), "--out", str(out), "--dataset", DATASET, "--root", str(data_root))
    line = _one_error_line(ran)
    assert "visual.conv1.weight" in line and "text_projection" in line and "not exported" in line, line
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir()), \
        "no graphs, no preprocess.json, no unfinished folder"


def test_eval_creates_the_folder_of_its_output(micro_folder, data_root, tmp_path):
    result = tmp_path / "new" / "deeper" / "metrics.json"
    ran = run_cli("eval", str(micro_folder), "--dataset", DATASET, "--root", str(data_root), "--output", str(result),
               "--batch-size", "16")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert set(json.loads(result.read_text())) >= {"r1", "mAP"}


@pytest.mark.parametrize("command, args, says", [
    ("eval", ["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    ("eval", ["--image-size", "0", "16"], "argument --image-size: expected a positive integer, got 0"),
    ("eval", ["--context-length", "1"], "argument --context-length: expected at least 2"),
    ("eval", ["--output", "{file}/metrics.json"], "is a file"),
    ("eval", ["--output", "{dir}"], "is a folder"),
    ("eval", ["--pairings", "teacher", "hybrid-image"], "the pairings ['hybrid-image', 'teacher'] need --teacher"),
    ("eval", ["--teacher-arch", "micro"], "--teacher-arch describe a teacher: give it with --teacher"),
    ("eval", ["--onnx", "--teacher", "{model}"], "--onnx evaluates the exported folder as it is: --teacher"),
    ("eval", ["--onnx-variant", "int8"], "--onnx-variant needs --onnx"),
    ("export-onnx", ["--out", "{tmp}/o", "--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    ("export-onnx", ["--out", "{tmp}/o", "--image-size", "32", "0"], "argument --image-size: expected a positive"),
    ("export-onnx", ["--out", "{tmp}/o", "--context-length", "1"], "argument --context-length: expected at least 2"),
    ("export-onnx", ["--out", "{file}/o"], "is under"),
    ("export-onnx", ["--out", "{file}"], "the output folder"),
    ("export-onnx", ["--out", "{tmp}/o", "--root", "{tmp}"], "--root needs --dataset"),
    ("export-onnx", ["--out", "{tmp}/o", "--tolerance", "-1"], "tolerance and atol must be >= 0"),
])
def test_bad_eval_and_export_arguments_are_usage_errors(command, args, says, micro_folder, data_root, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    fill = {"file": str(a_file), "dir": str(tmp_path), "tmp": str(tmp_path), "model": str(micro_folder)}
    args = [a.format(**fill) for a in args]
    where = ["--dataset", DATASET, "--root", str(data_root)] if command == "eval" else []
    before = sorted(p.name for p in tmp_path.iterdir())
    ran = run_cli(command, str(micro_folder), *where, *args)
    assert ran.returncode == 2, (ran.returncode, ran.stderr[-2000:])
    assert f"usage: kd-trainer {command}" in ran.stderr and f"kd-trainer {command}: error: " in ran.stderr
    assert says in ran.stderr, ran.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing is written"
    assert not list(micro_folder.glob("eval_*.json"))


# ----------------------------------------------------------------------------------------------
# INT8 schemes: which one keeps PyTorch's rankings (issue 26: the same top-1 file for >= 99% of queries)


@pytest.fixture(scope="module")
def schemes(tmp_path_factory, student) -> dict[str, Path]:
    """The fixture student exported with each named INT8 scheme (Python API; the CLI's default is dynamic)."""
    model = model_from_checkpoint(student).eval()
    out = {}
    for scheme in ("dynamic", "weight-only"):
        out[scheme] = tmp_path_factory.mktemp("int8") / scheme
        export_onnx(model, out[scheme], int8=True, int8_scheme=scheme)
    return out


def _top1_agreement(folder: Path, model, raw) -> tuple[int, int]:
    """Captions whose most similar gallery image is the same under the INT8 graphs (bare onnxruntime, PIL +
    numpy preprocessing) as under PyTorch (torchvision's transform), and how many captions there are."""
    gallery, queries = raw["test_gallery"], raw["test_queries"]
    spec = json.loads((folder / "preprocess.json").read_text())
    pixels = _pil_numpy_pixels(list(gallery["image_path"]), (32, 16), spec["image"]["mean"], spec["image"]["std"])
    ids = tokenize(list(queries["caption"]), 77).numpy()
    img = ort.InferenceSession(str(folder / "image_encoder.int8.onnx"), providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(folder / "text_encoder.int8.onnx"), providers=["CPUExecutionProvider"])
    got = np.argmax(txt.run(None, {"input_ids": ids})[0] @ img.run(None, {"pixel_values": pixels})[0].T, axis=1)
    views = with_retrieval_transforms(raw, image_size=(32, 16), augment=False, context_length=77)
    with torch.no_grad():
        g = model.encode_image(torch.stack([views["test_gallery"][i]["pixel_values"] for i in range(len(gallery))]))
        q = model.encode_text(torch.from_numpy(ids))
    ref = np.argmax((q @ g.T).numpy(), axis=1)
    return int((got == ref).sum()), len(ref)


@pytest.mark.slow
def test_weight_only_int8_keeps_the_top1_file_at_least_as_often_as_dynamic(schemes, student, data_root):
    model = model_from_checkpoint(student).eval()
    raw = load_pedes(DATASET, data_root, splits=["test"])
    assert len(raw["test_gallery"]) > len(set(raw["test_gallery"]["pid"])), "the gallery needs several images a person"
    dynamic, n = _top1_agreement(schemes["dynamic"], model, raw)
    weight_only, _ = _top1_agreement(schemes["weight-only"], model, raw)
    print(f"same top-1 file as PyTorch: weight-only {weight_only}/{n}, dynamic {dynamic}/{n}")
    assert weight_only >= dynamic, (weight_only, dynamic, n)
    report = verify_onnx_export(schemes["weight-only"], model, dataset=DATASET, root=data_root)
    assert report["passed"], report["failures"]
    assert json.loads((schemes["weight-only"] / "preprocess.json").read_text())["int8_scheme"] == "weight-only"


@pytest.mark.slow
def test_the_schemes_write_the_graphs_they_name(schemes, student):
    """dynamic: integer products of activations quantised per call; weight-only: MatMulNBits with 8-bit
    blocks of 32 whose dequantised values are the fp32 weights rounded to the nearest of 256 levels."""
    ops = {s: {n.op_type for n in onnx.load(str(f / "image_encoder.int8.onnx")).graph.node} for s, f in schemes.items()}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops["dynamic"] and "MatMulNBits" not in ops["dynamic"]
    assert "MatMulNBits" in ops["weight-only"] and not {"DynamicQuantizeLinear", "MatMulInteger"} & ops["weight-only"]

    for tower in ("image", "text"):
        fp32 = onnx.load(str(schemes["weight-only"] / f"{tower}_encoder.onnx")).graph
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in fp32.initializer}
        # every constant matrix of the fp32 graph as (K, N): MatMul's as stored, Gemm's (transB=1) transposed
        originals = [inits[n.input[1]] if n.op_type == "MatMul" else inits[n.input[1]].T
                     for n in fp32.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
        graph = onnx.load(str(schemes["weight-only"] / f"{tower}_encoder.int8.onnx")).graph
        qinits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        matched = []
        for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attrs["bits"], attrs["block_size"]) == (8, 32)
            k, n_out, blocks = attrs["K"], attrs["N"], -(-attrs["K"] // 32)
            q = qinits[node.input[1]].reshape(n_out, blocks, 32).astype(np.float64)
            scale = qinits[node.input[2]].reshape(n_out, blocks, 1).astype(np.float64)
            zero = (qinits[node.input[3]].reshape(n_out, blocks, 1).astype(np.float64)
                    if len(node.input) > 3 and node.input[3] else 128.0)  # MatMulNBits' default: 2^(bits-1)
            deq = ((q - zero) * scale).reshape(n_out, -1)[:, :k].T  # (K, N), as the fp32 MatMul multiplies
            half_step = np.repeat(scale[:, :, 0], 32, axis=1)[:, :k].T / 2
            # rounded to the nearest level: within half a step of exactly one fp32 matrix
            hits = [i for i, w in enumerate(originals)
                    if w.shape == deq.shape and np.all(np.abs(w - deq) <= half_step + 1e-7)]
            assert len(hits) == 1, (tower, node.name, hits)
            matched += hits
        assert sorted(matched) == list(range(len(originals))), f"{tower}: every matrix quantised, once"


def test_an_unknown_int8_scheme_or_block_size_is_refused_before_anything_is_written(tmp_path):
    from kd_trainer.models.onnx import OnnxExportError
    from kd_trainer.models.onnx.quantize import weight_only_int8

    with pytest.raises(OnnxExportError,
                       match=r"unknown INT8 scheme 'int4': expected one of \['calibrated', 'dynamic', 'weight-only'\]"):
        export_onnx(create_model("micro"), tmp_path / "out", int8=True, int8_scheme="int4")
    assert not (tmp_path / "out").exists()
    with pytest.raises(OnnxExportError, match="power of two >= 16, got 24"):
        weight_only_int8(block_size=24)


def test_export_onnx_int8_scheme_flag_writes_weight_only_graphs(tmp_path, student):
    """`--int8-scheme weight-only` reaches the quantiser: the INT8 graphs hold 8-bit weight blocks
    (MatMulNBits) and no integer MatMul of quantised activations, and preprocess.json names the scheme."""
    out = tmp_path / "wo"
    ran = run_cli("export-onnx", str(student), "--out", str(out), "--int8", "--int8-scheme", "weight-only")
    assert ran.returncode == 0, ran.stderr
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["int8_scheme"] == "weight-only"
    ops = {n.op_type for f in out.glob("*int8*.onnx") for n in onnx.load(str(f)).graph.node}
    assert "MatMulNBits" in ops and "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops

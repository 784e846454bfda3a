"""`kd-trainer index` / `kd-trainer search` over a generated SynthPEDES test gallery.

The gallery is a folder holding the test split's images; the model is ``micro`` fitted on that split
(tests/tiny.py), saved as an open_clip folder like every run leaves behind. The reference ranking is the
evaluation's: the split embedded the way ``kd-trainer eval`` embeds it (the data pipeline's views and
:func:`kd_trainer.evaluation.embed_dataset`), ranked by :func:`kd_trainer.evaluation.top_k`, the ranking
:func:`~kd_trainer.evaluation.rank_metrics` scores (tests/test_metrics.py checks that they agree).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from browser import open_page
from kd_trainer.data import collate_retrieval, load_pedes, with_retrieval_transforms
from kd_trainer.evaluation import embed_dataset, rank_metrics, top_k
from kd_trainer.models.export import export_open_clip
from kd_trainer.models.factory import create_model
from kd_trainer.models.loading import model_from_checkpoint
from kd_trainer.models.onnx import export_onnx
from kd_trainer.search import build_index, load_encoder, load_index
from kd_trainer.synthetic.pedes import make_synth_pedes
from tiny import fitted_micro, run_cli

DATASET = "synth_pedes"




def _ranked(stdout: str) -> list[list[tuple[str, float]]]:
    """The printed ranking: per query, (file, score) in rank order."""
    out: list[list[tuple[str, float]]] = []
    for line in stdout.splitlines():
        if line.startswith("query: "):
            out.append([])
        elif out and line.strip() and line.split()[0].isdigit():
            rank, score, file = line.split(maxsplit=2)
            assert int(rank) == len(out[-1]) + 1
            out[-1].append((file, float(score)))
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synth_pedes(root / "SynthPEDES", num_identities=60, images_per_identity=(2, 3), image_size=(64, 32),
                     seed=3, split_identities=(0.2, 0.2, 0.6))
    return root


@pytest.fixture(scope="module")
def raw(data_root):
    return load_pedes(DATASET, data_root, splits=["test"])


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, raw) -> Path:
    """A folder with exactly the test split's gallery images (their names kept)."""
    folder = tmp_path_factory.mktemp("gallery") / "photos"
    folder.mkdir()
    for path in raw["test_gallery"]["image_path"]:
        shutil.copy2(path, folder / Path(path).name)
    return folder


@pytest.fixture(scope="module")
def student(tmp_path_factory, data_root) -> Path:
    """``micro`` fitted on the test split (about a minute on 2 busy cores): its rankings mean something."""
    folder = tmp_path_factory.mktemp("student") / "micro_student"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP spin-waiting on shared cores makes 2 threads slower than 1
    try:
        export_open_clip(fitted_micro(data_root, DATASET), folder)
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """An untrained ``micro``, for what does not depend on ranking well (staleness, refusals, the page)."""
    folder = tmp_path_factory.mktemp("plain") / "micro_plain"
    torch.manual_seed(7)
    export_open_clip(create_model("micro").eval(), folder)
    return folder


def _index(model: Path, gallery: Path, out: Path, *extra: str) -> Path:
    done = run_cli("index", str(model), "--gallery", str(gallery), "--out", str(out), "--batch-size", "16", *extra)
    assert done.returncode == 0, done.stderr
    assert f"indexed {len(os.listdir(gallery))} images" in done.stdout
    return out


@pytest.fixture(scope="module")
def index(tmp_path_factory, student, gallery) -> Path:
    return _index(student, gallery, tmp_path_factory.mktemp("index") / "photos.index")


@pytest.fixture(scope="module")
def plain_index(tmp_path_factory, plain, gallery) -> Path:
    return _index(plain, gallery, tmp_path_factory.mktemp("plain_index") / "photos.index")


def _evaluation_top10(model_dir: Path, raw) -> tuple[list[list[str]], dict[str, float], torch.Tensor]:
    """What `kd-trainer eval` ranks: its model, its views of the split, its embedding, its ranking."""
    model = model_from_checkpoint(str(model_dir)).eval()
    views = with_retrieval_transforms(raw, image_size=model.image_size, augment=False,
                                      context_length=model.context_length, dataset_name=DATASET)
    g, g_pids = embed_dataset(model.encode_image, views["test_gallery"], "pixel_values", device=torch.device("cpu"),
                              batch_size=64, collate_fn=collate_retrieval, progress=False)
    q, q_pids = embed_dataset(model.encode_text, views["test_queries"], "input_ids", device=torch.device("cpu"),
                              batch_size=64, collate_fn=collate_retrieval, progress=False)
    idx, scores = top_k(q, g, 10)
    names = [Path(p).name for p in raw["test_gallery"]["image_path"]]
    return [[names[i] for i in row] for row in idx.tolist()], rank_metrics(q, g, q_pids, g_pids), scores


@pytest.mark.slow
def test_search_returns_the_evaluations_top10_for_every_test_caption(index, student, gallery, raw):
    captions = list(raw["test_queries"]["caption"])
    done = run_cli("search", str(index), *captions, "--top", "10")
    assert done.returncode == 0, done.stderr
    found = _ranked(done.stdout)
    assert len(found) == len(captions) and all(len(row) == 10 for row in found)
    want, metrics, want_scores = _evaluation_top10(student, raw)
    got = [[Path(f).name for f, _ in row] for row in found]
    assert got == want
    assert all(Path(f).parent == gallery for row in found for f, _ in row)  # printed as files on disk
    assert torch.tensor([[s for _, s in row] for row in found]) == pytest.approx(want_scores, abs=1e-4)
    # The fitted model ranks well, so the agreement says something: R@1 from the printed lists is
    # the evaluation's R@1.
    pid_of = {Path(p).name: pid for p, pid in zip(raw["test_gallery"]["image_path"], raw["test_gallery"]["pid"])}
    r1 = 100.0 * sum(pid_of[row[0]] == pid for row, pid in zip(got, raw["test_queries"]["pid"])) / len(got)
    assert r1 == pytest.approx(metrics["r1"]) and metrics["r1"] > 50


def test_the_index_holds_the_files_the_model_and_one_embedding_per_file(plain_index, plain, gallery):
    index = plain_index
    meta = json.loads((index / "index.json").read_text())
    assert meta["model"]["kind"] == "pytorch" and meta["model"]["path"] == str(plain.resolve())
    assert meta["model"]["fingerprint"] == load_encoder(plain).describe()["fingerprint"]
    assert [f[0] for f in meta["files"]] == sorted(os.listdir(gallery))
    assert all(f[1] == (gallery / f[0]).stat().st_size for f in meta["files"])
    loaded = load_index(index)
    assert loaded.embeddings.shape == (len(meta["files"]), meta["model"]["embed_dim"])
    assert not list(index.parent.glob(".photos.index.*")), "no temporary folder left behind"


def _small_copy(gallery: Path, to: Path, n: int = 6) -> Path:
    to.mkdir(parents=True)
    for name in sorted(os.listdir(gallery))[:n]:
        shutil.copy2(gallery / name, to / name)
    return to


@pytest.mark.parametrize("change", ["added", "removed", "changed"])
def test_a_stale_index_is_refused_with_one_line(tmp_path, plain, gallery, change):
    photos = _small_copy(gallery, tmp_path / "photos")
    out = tmp_path / "photos.index"
    build_index(load_encoder(plain), photos, out)
    assert run_cli("search", str(out), "a man in a blue shirt", "--top", "3").returncode == 0
    first = sorted(os.listdir(photos))[0]
    if change == "added":
        shutil.copy2(gallery / sorted(os.listdir(gallery))[-1], photos / "new.png")
    elif change == "removed":
        (photos / first).unlink()
    else:
        with open(photos / first, "ab") as f:
            f.write(b"\0")
    done = run_cli("search", str(out), "a man in a blue shirt", "--top", "3")
    assert done.returncode == 2 and done.stdout == ""
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    named = "new.png" if change == "added" else first
    assert f"is stale: in its gallery {str(photos)!r}, 1 file was {change} since it was built ({named}); " in line
    assert "files were" not in line
    assert "kd-trainer index" in line  # says how to rebuild it


def test_a_stale_index_counts_files_in_words_one_file_and_several(tmp_path, plain, gallery):
    photos = _small_copy(gallery, tmp_path / "photos", n=8)
    out = tmp_path / "photos.index"
    build_index(load_encoder(plain), photos, out)
    names = sorted(os.listdir(photos))
    for name in names[:7]:
        (photos / name).unlink()
    shutil.copy2(gallery / sorted(os.listdir(gallery))[-1], photos / "new2.png")
    done = run_cli("search", str(out), "a man in a blue shirt")
    assert done.returncode == 2 and done.stdout == ""
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    # The first kind found says since when; more than five names end in "...".
    assert (f"in its gallery {str(photos)!r}, 1 file was added since it was built (new2.png); "
            f"7 files were removed ({', '.join(names[:5])}, ...); rebuild it with `kd-trainer index ") in line
    assert "1 files" not in line and "file were" not in line and "files was" not in line
    # One of each kind, in the order added, removed, changed; "since it was built" said once.
    kept = names[7]
    build_index(load_encoder(plain), photos, out)
    with open(photos / kept, "ab") as f:
        f.write(b"\0")
    (photos / "new2.png").rename(photos / "new3.png")
    line = run_cli("search", str(out), "a man").stderr.strip()
    assert (f"1 file was added since it was built (new3.png); 1 file was removed (new2.png); "
            f"1 file was changed ({kept}); rebuild") in line
    assert line.count("since it was built") == 1


def test_a_gallery_that_holds_no_images_now_is_named_with_the_folder_expected(tmp_path, plain, gallery):
    photos = _small_copy(gallery, tmp_path / "photos", n=3)
    out = tmp_path / "photos.index"
    build_index(load_encoder(plain), photos, out)
    empty = tmp_path / "emptydir"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    # Given with --gallery: an empty folder is not the gallery; rebuilding from it is not the fix.
    done = run_cli("search", str(out), "a man", "--gallery", str(empty))
    assert done.returncode == 2 and done.stdout == ""
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"the gallery folder {str(empty)!r} holds no images now" in line
    assert f"expected a folder of images, the one the index was built from ({str(photos.resolve())!r}" in line
    assert "kd-trainer index" not in line and "stale" not in line and "removed" not in line
    # The recorded folder emptied: the same, naming it.
    for name in os.listdir(photos):
        (photos / name).unlink()
    done = run_cli("search", str(out), "a man")
    line = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in line
    assert f"the gallery folder {str(photos.resolve())!r} holds no images now (the index" in line
    assert "lists 3)" in line and "kd-trainer index" not in line


def test_index_checks_the_gallery_before_it_loads_the_model(tmp_path, plain, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_file = tmp_path / "one.png"
    one_file.write_bytes(b"\x89PNG")
    cases = {"empty": (empty, "has no images"), "absent": (tmp_path / "absent", "is not a folder"),
             "a file": (one_file, "is not a folder")}
    no_model = tmp_path / "no_such_model"  # loading it would fail with a message about the model
    for what, (folder, says) in cases.items():
        done = run_cli("index", str(no_model), "--gallery", str(folder), "--out", str(tmp_path / "i"))
        assert done.returncode == 2, what
        line = done.stderr.strip()
        assert f"gallery {str(folder)!r} {says}" in line and "\n" not in line, (what, line)
        assert "no_such_model" not in line, (what, line)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the gallery was checked")

    monkeypatch.setattr("kd_trainer.cli.load_encoder", no_loading)
    for what, (folder, says) in cases.items():
        done = run_cli("index", str(plain), "--gallery", str(folder), "--out", str(tmp_path / "i"))
        assert done.returncode == 2 and says in done.stderr, (what, done.stderr)
    assert not (tmp_path / "i").exists()


def test_a_foreign_index_is_refused_and_the_same_model_moved_is_not(tmp_path, plain, gallery):
    student = plain
    photos = _small_copy(gallery, tmp_path / "photos")
    out = tmp_path / "photos.index"
    build_index(load_encoder(student), photos, out)
    torch.manual_seed(123)
    other = tmp_path / "other_model"
    export_open_clip(create_model("micro").eval(), other)
    done = run_cli("search", str(out), "a woman with a red bag", "--model", str(other))
    assert done.returncode == 2 and "was built with another model" in done.stderr
    assert str(other.resolve()) in done.stderr and len(done.stderr.strip().splitlines()) == 1
    moved = tmp_path / "moved_student"
    shutil.copytree(student, moved)
    done = run_cli("search", str(out), "a woman with a red bag", "--model", str(moved), "--top", "2")
    assert done.returncode == 0, done.stderr
    assert len(_ranked(done.stdout)[0]) == 2


def test_bad_input_gets_one_line_and_exit_2(tmp_path, plain, gallery):
    student = plain
    not_index = tmp_path / "nothing"
    not_index.mkdir()
    cases = {
        "not an index": (("search", str(not_index), "a man"), "is not a search index"),
        "empty gallery": (("index", str(student), "--gallery", str(not_index), "--out", str(tmp_path / "i")),
                          "has no images"),
        "no gallery": (("index", str(student), "--gallery", str(tmp_path / "absent"), "--out", str(tmp_path / "i")),
                       "is not a folder"),
        "variant of a torch model": (("index", str(student), "--gallery", str(gallery), "--out", str(tmp_path / "i"),
                                      "--onnx-variant", "int8"), "applies to an ONNX export"),
    }
    for what, (args, says) in cases.items():
        done = run_cli(*args)
        assert done.returncode == 2, what
        assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, (what, done.stderr)
    broken = _small_copy(gallery, tmp_path / "broken", n=3)
    (broken / "cut.png").write_bytes((broken / sorted(os.listdir(broken))[0]).read_bytes()[:60])
    done = run_cli("index", str(student), "--gallery", str(broken), "--out", str(tmp_path / "b"))
    assert done.returncode == 2 and "1 of 4 images" in done.stderr and "cut.png (truncated)" in done.stderr
    assert not (tmp_path / "b").exists()
    assert run_cli("search", str(not_index), "x", "--top", "0").returncode == 2  # argparse: a positive integer
    # An empty sentence; a model that is gone (the index names where it was and how to say where it is).
    moved = tmp_path / "model_that_moves"
    shutil.copytree(student, moved)
    photos = _small_copy(gallery, tmp_path / "photos", n=2)
    build_index(load_encoder(moved), photos, tmp_path / "p.index")
    done = run_cli("search", str(tmp_path / "p.index"), "  ")
    assert done.returncode == 2 and "non-empty sentence" in done.stderr
    shutil.rmtree(moved)
    done = run_cli("search", str(tmp_path / "p.index"), "a man")
    assert done.returncode == 2 and "is not there any more" in done.stderr and "--model" in done.stderr


@pytest.mark.slow
def test_onnx_int8_index_and_search_agree_with_pytorch_on_top1(tmp_path, index, student, gallery, raw):
    """INT8 against the PyTorch model it was exported from: the same top-1 file for >= 99% of the test
    captions where each person has one image; where a person has several, INT8 may swap two of them
    (their scores differ by a few thousandths), so there the check is on the person."""
    pytest.importorskip("onnxruntime", reason="the deploy extra (pip install 'kd_trainer[deploy]')")
    export_onnx(model_from_checkpoint(str(student)).eval(), tmp_path / "onnx", int8=True)
    captions = list(raw["test_queries"]["caption"])
    pid_of = {Path(p).name: pid for p, pid in zip(raw["test_gallery"]["image_path"], raw["test_gallery"]["pid"])}
    one_each = tmp_path / "one_each"
    one_each.mkdir()
    for name in sorted(pid_of):
        if not any(pid_of[other] == pid_of[name] for other in os.listdir(one_each)):
            shutil.copy2(gallery / name, one_each / name)

    def top1(model: Path, folder: Path, *extra: str) -> list[str]:
        out = _index(model, folder, tmp_path / f"{folder.name}.{model.name}.index", *extra)
        done = run_cli("search", str(out), *captions, "--top", "1")
        assert done.returncode == 0, done.stderr
        return [Path(row[0][0]).name for row in _ranked(done.stdout)]

    onnx = tmp_path / "onnx"
    for folder, same in ((one_each, lambda a, b: a == b), (gallery, lambda a, b: pid_of[a] == pid_of[b])):
        int8, fp32 = top1(onnx, folder, "--onnx-variant", "int8"), top1(student, folder)
        assert len(int8) == len(fp32) == len(captions) >= 100
        agree = sum(same(a, b) for a, b in zip(int8, fp32))
        assert agree >= 0.99 * len(captions), f"{folder.name}: INT8 agrees with PyTorch on {agree} of {len(captions)}"
    meta = json.loads((tmp_path / f"one_each.onnx.index" / "index.json").read_text())
    assert meta["model"]["kind"] == "onnx" and meta["model"]["variant"] == "int8"
    # An INT8 index is another model's: the PyTorch model may not search it.
    done = run_cli("search", str(tmp_path / "one_each.onnx.index"), captions[0], "--model", str(student))
    assert done.returncode == 2 and "another model" in done.stderr


@pytest.mark.slow  # two Chromium runs: 12 s on a quiet machine
def test_the_search_page_shows_every_image_in_a_browser(tmp_path, plain_index, raw):
    index = plain_index
    captions = list(raw["test_queries"]["caption"])[:3]
    page = tmp_path / "page" / "search.html"
    done = run_cli("search", str(index), *captions, "--top", "5", "--html", str(page))
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    shown = open_page(page, screenshot=tmp_path / "search.png")
    assert len(shown.images) == 15 and not shown.broken, shown.broken
    assert shown.count("section") == 3
    # The page lists what the command printed, in order.
    printed = [Path(f).name for row in _ranked(done.stdout) for f, _ in row]
    assert [img.src.startswith("data:image/jpeg;base64,") for img in shown.images] == [True] * 15
    assert printed == [Path(p).name for p in _paths_in(text)]


def _paths_in(html_text: str) -> list[str]:
    return [part.split('"', 1)[0] for part in html_text.split('data-path="')[1:]]

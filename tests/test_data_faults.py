"""Bad input at the data layer: unreadable images of every kind, empty splits, empty caption
lists, repeated records, and errors raised inside DataLoader workers. Real files on disk."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from kd_trainer.data import (
    DatasetFormatError,
    collate_retrieval,
    last_skipped,
    load_pedes,
    open_image,
    summarize,
    with_retrieval_transforms,
)
from kd_trainer.data.errors import unwrap_worker_error
from kd_trainer.data.images import find_unreadable

SIZE = (16, 8)  # (H, W) the models would see; the files are 24x12 noise


def _png_bytes(seed: int) -> bytes:
    # Noise compresses badly, so half of the file is really half of the pixel data.
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _records(rows: list[tuple[str, int, str, list[str]]]) -> list[dict]:
    return [{"file_path": fp, "id": pid, "split": split, "captions": caps} for fp, pid, split, caps in rows]


def _write(root: Path, records: list[dict]) -> Path:
    """A CUHK-PEDES layout under ``root`` with a real noise PNG for every distinct record image."""
    ds = root / "CUHK-PEDES"
    for i, rec in enumerate(records):
        path = ds / "imgs" / rec["file_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(_png_bytes(i))
    (ds / "reid_raw.json").write_text(json.dumps(records))
    return ds / "imgs"


def _base_rows() -> list[tuple[str, int, str, list[str]]]:
    rows = [(f"train/{i}.png", 1 + i // 2, "train", [f"train person {1 + i // 2} view {i} a", f"view {i} b"])
            for i in range(8)]
    rows += [(f"val/{i}.png", 20 + i // 2, "val", [f"val image {i}"]) for i in range(4)]
    rows += [(f"test/{i}.png", 30 + i // 2, "test", [f"test image {i} a", f"test image {i} b"]) for i in range(4)]
    return rows


def _spoil(path: Path, kind: str) -> None:
    """Make ``path`` unreadable in the way a real copy goes wrong."""
    if kind == "missing":
        path.unlink()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not an image":
        path.write_bytes(random.Random(path.name).randbytes(300))
    elif kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        raise AssertionError(kind)


def _col(ds, name: str) -> list:
    return list(ds.with_format(None)[name])


# ----------------------------------------------------------------------------- unreadable images


KINDS = ("missing", "empty", "not an image", "truncated")


def test_skip_unreadable_drops_every_kind_and_counts_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = _base_rows()
    imgs = _write(tmp_path, _records(rows))
    bad_train = {"train/1.png": "missing", "train/2.png": "empty", "train/4.png": "not an image",
                 "train/7.png": "truncated"}
    for rel, kind in {**bad_train, "test/3.png": "truncated"}.items():
        _spoil(imgs / rel, kind)

    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", tmp_path, skip_unreadable=True)  # no verify_images: skipping implies it

    assert sorted(Path(p).relative_to(imgs.resolve()).as_posix() for p in dsd.skipped_images) == sorted(
        [*bad_train, "test/3.png"])
    assert dsd.load_report.skipped_by_kind() == {"missing": 1, "empty": 1, "not an image": 1, "truncated": 2}
    assert last_skipped() == 5
    assert "skipped 5 of 16 images" in caplog.text
    assert "1 missing, 1 empty, 1 not an image, 2 truncated" in caplog.text
    assert "data.skip_unreadable: true" in caplog.text
    assert "(5 unreadable images skipped at load (1 missing, 1 empty, 1 not an image, 2 truncated))" in summarize(dsd)

    # What is left is exactly the good records, numbered as if the bad ones never existed.
    good_train = [r for r in rows if r[2] == "train" and r[0] not in bad_train]
    assert _col(dsd["train"], "caption") == [c for r in good_train for c in r[3]]
    ids = sorted({r[1] for r in good_train})
    assert _col(dsd["train"], "pid") == [ids.index(r[1]) for r in good_train for _ in r[3]]
    assert _col(dsd["train"], "image_id") == [i for i, r in enumerate(good_train) for _ in r[3]]
    assert dsd["test_gallery"].num_rows == 3 and dsd["test_queries"].num_rows == 6
    # ... and every row of every split can be read by the training transform.
    views = with_retrieval_transforms(dsd, image_size=SIZE, augment=True)
    for split in ("train", "val_gallery", "test_gallery"):
        batch = next(iter(DataLoader(views[split], batch_size=64, collate_fn=collate_retrieval)))
        assert batch["pixel_values"].shape == (views[split].num_rows, 3, *SIZE)


def test_unreadable_without_skip_lists_all_and_names_the_recipe_key(tmp_path: Path) -> None:
    rows = [(f"train/{i:02d}.png", i, "train", [f"c{i}"]) for i in range(14)]
    rows += [("test/0.png", 99, "test", ["t"]), ("val/0.png", 98, "val", ["v"])]
    imgs = _write(tmp_path, _records(rows))
    kinds = ["missing", "empty", "not an image", "truncated"] * 3  # 12 bad train images
    for i, kind in enumerate(kinds):
        _spoil(imgs / f"train/{i:02d}.png", kind)

    with pytest.raises(DatasetFormatError) as e:
        load_pedes("cuhk_pedes", tmp_path, verify_images=True)
    msg = str(e.value)
    assert msg.startswith("CUHK-PEDES: 12 of 16 images listed in ")
    assert "(3 missing, 3 empty, 3 not an image, 3 truncated)" in msg
    listed = [line for line in msg.splitlines() if line.startswith("  record ")]
    assert len(listed) == 10 and "  ... and 2 more" in msg.splitlines()
    assert listed[0].startswith("  record 0 (file_path='train/00.png', split train): missing: ")
    assert listed[1].startswith("  record 1 (file_path='train/01.png', split train): empty: ")
    assert listed[2].startswith("  record 2 (file_path='train/02.png', split train): not an image: ")
    assert listed[3].startswith("  record 3 (file_path='train/03.png', split train): truncated: ")
    assert "data.skip_unreadable: true" in msg
    assert "skip_unreadable=True" not in msg and "verify_images=True" not in msg


@pytest.mark.parametrize("kind", KINDS[1:])
def test_item_error_is_one_line_and_names_the_recipe_keys(tmp_path: Path, kind: str) -> None:
    imgs = _write(tmp_path, _records(_base_rows()))
    bad = imgs / "train/3.png"
    _spoil(bad, kind)
    with pytest.raises(DatasetFormatError) as e:
        open_image(bad, "CUHK-PEDES")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"CUHK-PEDES: cannot decode image {bad} ({kind}: ")
    assert "data.verify_images: true" in msg and "data.skip_unreadable: true" in msg
    assert "load_pedes(" not in msg and "=True" not in msg


def test_find_unreadable_agrees_with_decoding_each_file(tmp_path: Path) -> None:
    paths = []
    for i in range(40):
        p = tmp_path / f"{i}.png"
        p.write_bytes(_png_bytes(i))
        paths.append(str(p))
    spoiled = {3: "empty", 17: "not an image", 18: "truncated", 39: "missing"}
    for i, kind in spoiled.items():
        _spoil(Path(paths[i]), kind)

    def decodes(path: str) -> bool:  # the independent check: PIL directly, one file at a time
        try:
            with Image.open(path) as im:
                im.load()
            return True
        except (OSError, SyntaxError):
            return False

    found = find_unreadable(paths, max_workers=4)
    assert sorted(found) == [i for i, p in enumerate(paths) if not decodes(p)] == sorted(spoiled)
    assert {i: kind for i, (kind, _detail) in found.items()} == spoiled


# ----------------------------------------------------------------------------- verification at load


def test_eval_images_are_always_decoded_at_load(tmp_path: Path) -> None:
    imgs = _write(tmp_path, _records(_base_rows()))
    _spoil(imgs / "test/2.png", "truncated")
    with pytest.raises(DatasetFormatError) as e:
        load_pedes("cuhk_pedes", tmp_path)  # no flag: evaluation images are checked anyway
    msg = str(e.value)
    assert msg.startswith("CUHK-PEDES: 1 of 16 images listed in ") and "(1 truncated)" in msg
    assert "record 14 (file_path='test/2.png', split test): truncated: " in msg
    # The train split alone does not read test images.
    assert set(load_pedes("cuhk_pedes", tmp_path, splits=["train"])) == {"train"}


def test_train_images_are_decoded_only_when_asked(tmp_path: Path) -> None:
    imgs = _write(tmp_path, _records(_base_rows()))
    _spoil(imgs / "train/5.png", "truncated")
    dsd = load_pedes("cuhk_pedes", tmp_path)  # off by default for train: the full sets are large
    assert dsd["train"].num_rows == 16 and dsd.load_report.decoded_splits == ("val", "test")
    with pytest.raises(DatasetFormatError, match=r"record 5 \(file_path='train/5.png', split train\): truncated"):
        load_pedes("cuhk_pedes", tmp_path, verify_images=True)
    dsd = load_pedes("cuhk_pedes", tmp_path, verify_images=True, skip_unreadable=True)
    assert dsd["train"].num_rows == 14 and dsd.load_report.decoded_splits == ("train", "val", "test")
    assert dsd.load_report.skipped_by_kind() == {"truncated": 1}


def test_splits_argument(tmp_path: Path) -> None:
    _write(tmp_path, _records(_base_rows()))
    assert set(load_pedes("cuhk_pedes", tmp_path, splits=("test", "train"))) == {
        "train", "test_gallery", "test_queries"}
    assert set(load_pedes("cuhk_pedes", tmp_path, splits="val")) == {"val_gallery", "val_queries"}
    with pytest.raises(ValueError, match=r"unknown split name\(s\) \['tset'\]"):
        load_pedes("cuhk_pedes", tmp_path, splits=["train", "tset"])
    icfg = tmp_path / "icfg"
    (icfg / "ICFG-PEDES" / "imgs").mkdir(parents=True)
    (icfg / "ICFG-PEDES" / "imgs" / "a.png").write_bytes(_png_bytes(0))
    (icfg / "ICFG-PEDES" / "ICFG-PEDES.json").write_text(json.dumps(
        [{"file_path": "a.png", "id": 1, "split": "train", "captions": ["x"]},
         {"file_path": "a.png", "id": 2, "split": "test", "captions": ["y"]}]))
    # ICFG-PEDES has no val: asked for, it is left out (the trainer falls back to test).
    assert set(load_pedes("icfg_pedes", icfg, splits=("train", "val", "test"))) == {
        "train", "test_gallery", "test_queries"}
    with pytest.raises(DatasetFormatError, match=r"ICFG-PEDES has none of the splits asked for \(\['val'\]\)"):
        load_pedes("icfg_pedes", icfg, splits=("val",))


# ----------------------------------------------------------------------------- empty splits


def _without_split(rows, split):
    return [r for r in rows if r[2] != split]


@pytest.mark.parametrize("case,split,why", [
    ("no val records", "val", "no record in the file has split 'val'"),
    ("no train records", "train", "no record in the file has split 'train'"),
    ("all test images unreadable", "test", "all 4 of its images are unreadable and were skipped (1 missing, "
                                           "1 empty, 1 not an image, 1 truncated)"),
    ("all train captions empty", "train", "all 8 of its remaining records have an empty caption list, so there "
                                          "is nothing to train on"),
    ("all test captions empty", "test", "all 4 of its remaining records have an empty caption list, so there is "
                                        "no query to evaluate"),
])
def test_empty_split_is_an_error_at_load(tmp_path: Path, case: str, split: str, why: str) -> None:
    rows = _base_rows()
    if case.startswith("no "):
        rows = _without_split(rows, split)
    if "captions empty" in case:
        rows = [(fp, pid, s, [] if s == split else caps) for fp, pid, s, caps in rows]
    imgs = _write(tmp_path, _records(rows))
    if "unreadable" in case:
        for i in range(4):
            _spoil(imgs / f"test/{i}.png", KINDS[i])
    with pytest.raises(DatasetFormatError) as e:
        load_pedes("cuhk_pedes", tmp_path, skip_unreadable=True)
    msg = str(e.value)
    assert msg.startswith("CUHK-PEDES: 1 of the splits asked for (train, val, test) would be empty after loading ")
    part = "train" if split == "train" else f"{split} (gallery/queries)"
    assert f"  the {part} split is empty: {why}" in msg.splitlines()


def test_a_split_not_asked_for_may_be_empty(tmp_path: Path) -> None:
    _write(tmp_path, _records(_without_split(_base_rows(), "val")))
    dsd = load_pedes("cuhk_pedes", tmp_path, splits=("train", "test"))
    assert dsd["test_queries"].num_rows == 8


def test_two_empty_splits_in_one_error(tmp_path: Path) -> None:
    _write(tmp_path, _records([r for r in _base_rows() if r[2] == "train"]))
    with pytest.raises(DatasetFormatError) as e:
        load_pedes("cuhk_pedes", tmp_path)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("CUHK-PEDES: 2 of the splits asked for (train, val, test) would be empty")
    assert lines[1:3] == ["  the val (gallery/queries) split is empty: no record in the file has split 'val'",
                          "  the test (gallery/queries) split is empty: no record in the file has split 'test'"]


# ----------------------------------------------------------------------------- empty caption lists


def test_empty_caption_lists_are_reported_with_their_effect(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = _base_rows()
    rows[2] = (rows[2][0], rows[2][1], "train", [])  # train image 2: nothing to pair it with
    rows[5] = (rows[5][0], rows[5][1], "train", [])
    rows[13] = (rows[13][0], rows[13][1], "test", [])  # test image 1: in the gallery, no query
    _write(tmp_path, _records(rows))
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", tmp_path)
    assert "3 records in" in caplog.text and "have an empty caption list" in caplog.text
    assert "2 in train (their images are left out of training" in caplog.text
    assert "1 in test (kept in the gallery as images no query describes" in caplog.text
    assert "record 2 (file_path='train/2.png', split train)" in caplog.text
    assert dsd.load_report.empty_captions == {"train": 2, "test": 1}
    assert "(records with an empty caption list: 2 in train, 1 in test)" in summarize(dsd)

    kept = [r for r in rows if r[2] == "train" and r[3]]
    assert _col(dsd["train"], "image_id") == [i for i, r in enumerate(kept) for _ in r[3]]  # contiguous
    assert not any(p.endswith("train/2.png") for p in _col(dsd["train"], "image_path"))
    assert dsd["test_gallery"].num_rows == 4 and dsd["test_queries"].num_rows == 6
    assert 1 in _col(dsd["test_gallery"], "image_id") and 1 not in _col(dsd["test_queries"], "image_id")


def test_clean_files_log_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, _records(_base_rows()))
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", tmp_path)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("kd_trainer")] == []
    assert dsd.load_report.notes() == []


# ----------------------------------------------------------------------------- repeated records


def _with_repeats() -> tuple[list, list]:
    """(rows with repeats, the same rows without them)."""
    clean = _base_rows()
    rows = list(clean)
    rows.insert(3, clean[1])  # a train record listed twice
    rows[0] = (rows[0][0], rows[0][1], "train", [*rows[0][3], "  TRAIN person 1 view 0 A "])  # same after tokenising
    rows.append(clean[13])  # a test record listed twice: one more gallery image and two more queries
    return rows, clean


def test_duplicates_warn_by_default_and_are_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows, _clean = _with_repeats()
    _write(tmp_path, _records(rows))
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", tmp_path)
    assert "5 (image, caption) pairs in" in caplog.text and "record 3 repeats record 1 (" in caplog.text
    assert "(3 in train, 2 in test; 2 records repeat an earlier record entirely)" in caplog.text
    assert "record 0 lists a caption twice (file_path='train/0.png'" in caplog.text
    assert "data.duplicates: drop" in caplog.text and "data.duplicates: error" in caplog.text
    assert dsd.load_report.duplicates == {"train": 3, "test": 2}
    assert dsd["train"].num_rows == sum(len(r[3]) for r in rows if r[2] == "train")
    assert dsd["test_gallery"].num_rows == 5 and dsd["test_queries"].num_rows == 10


def test_duplicates_error(tmp_path: Path) -> None:
    rows, _clean = _with_repeats()
    _write(tmp_path, _records(rows))
    with pytest.raises(DatasetFormatError) as e:
        load_pedes("cuhk_pedes", tmp_path, duplicates="error")
    msg = str(e.value)
    assert msg.startswith("CUHK-PEDES: 5 (image, caption) pairs in ")
    assert "data.duplicates: drop" in msg and "data.duplicates: warn" in msg
    with pytest.raises(ValueError, match=r"duplicates must be one of \['warn', 'error', 'drop'\], got 'ignore'"):
        load_pedes("cuhk_pedes", tmp_path, duplicates="ignore")


def test_duplicates_drop_gives_the_clean_dataset(tmp_path: Path) -> None:
    rows, clean = _with_repeats()
    _write(tmp_path / "dup", _records(rows))
    _write(tmp_path / "clean", _records(clean))
    dropped = load_pedes("cuhk_pedes", tmp_path / "dup", duplicates="drop")
    reference = load_pedes("cuhk_pedes", tmp_path / "clean")
    assert dropped.load_report.duplicates == {"train": 3, "test": 2}
    assert dropped.load_report.duplicates_policy == "drop"
    for split in reference:
        for column in ("caption", "pid", "image_id"):
            if column in reference[split].column_names:
                assert _col(dropped[split], column) == _col(reference[split], column), (split, column)
        if "image_path" in reference[split].column_names:
            rel = [Path(p).relative_to(tmp_path / "dup") for p in _col(dropped[split], "image_path")]
            assert rel == [Path(p).relative_to(tmp_path / "clean") for p in _col(reference[split], "image_path")]


# ----------------------------------------------------------------------------- DataLoader workers


def test_worker_error_unwraps_to_the_one_line_message(tmp_path: Path) -> None:
    imgs = _write(tmp_path, _records(_base_rows()))
    _spoil(imgs / "train/1.png", "truncated")  # rows 2 and 3 of the train split
    views = with_retrieval_transforms(load_pedes("cuhk_pedes", tmp_path), image_size=SIZE, augment=False)
    with pytest.raises(DatasetFormatError) as direct:
        views["train"][2]
    expected = str(direct.value)
    assert "\n" not in expected and "truncated" in expected

    loader = DataLoader(views["train"], batch_size=4, num_workers=1, collate_fn=collate_retrieval)
    with pytest.raises(DatasetFormatError) as wrapped:
        list(loader)
    # What torch hands back: the worker's traceback as the message, the user's line at its end.
    assert str(wrapped.value).startswith("Caught DatasetFormatError in DataLoader worker process 0.")
    assert "Traceback (most recent call last)" in str(wrapped.value)

    unwrapped = unwrap_worker_error(wrapped.value)
    assert isinstance(unwrapped, DatasetFormatError)
    assert str(unwrapped) == expected
    assert unwrapped.__cause__ is wrapped.value

    # Re-raised by something else, it is still found; in-process errors come back as they are.
    try:
        raise RuntimeError("training step failed") from wrapped.value
    except RuntimeError as outer:
        assert str(unwrap_worker_error(outer)) == expected
    assert unwrap_worker_error(direct.value) is direct.value
    assert unwrap_worker_error(RuntimeError("not a data problem")) is None


# ----------------------------------------------------------------------------- caption text, tiny images, leakage


def test_a_caption_that_cannot_be_encoded_is_one_line_naming_the_record(tmp_path: Path) -> None:
    rows = _base_rows()
    rows[5] = (rows[5][0], rows[5][1], "train", ["fine", "bad \ud800 escape"])  # json.dumps writes "\ud800"
    rows[13] = (rows[13][0], rows[13][1], "test", ["\udfff"])
    _write(tmp_path, _records(rows))
    with pytest.raises(DatasetFormatError) as e:  # today: a UnicodeEncodeError traceback from pyarrow
        load_pedes("cuhk_pedes", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("CUHK-PEDES: caption 1 of record 5 (file_path='train/5.png', split train) in ")
    assert "cannot be encoded as UTF-8: surrogates not allowed ('\\ud800' at character 4)" in msg
    assert "2 such captions in all (also records [13])" in msg and "data.skip_unreadable: true" in msg


def test_skip_unreadable_drops_captions_that_cannot_be_encoded_and_counts_them(tmp_path, caplog) -> None:
    rows = _base_rows()
    rows[5] = (rows[5][0], rows[5][1], "train", ["fine", "bad \ud800 escape"])
    rows[13] = (rows[13][0], rows[13][1], "test", ["\udfff", "test image 1 b"])
    _write(tmp_path, _records(rows))
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", tmp_path, skip_unreadable=True)
    assert dsd.load_report.unencodable_captions == {"train": 1, "test": 1}
    assert "Dropped 2 such captions (data.skip_unreadable: true): 1 in train, 1 in test" in caplog.text
    assert "fine" in _col(dsd["train"], "caption") and dsd["train"].num_rows == 15
    assert dsd["test_queries"].num_rows == 7 and dsd["test_gallery"].num_rows == 4
    assert "(captions that cannot be encoded (dropped): 1 in train, 1 in test)" in summarize(dsd)


def test_blank_captions_are_warned_about_naming_the_records(tmp_path, caplog) -> None:
    rows = _base_rows()
    rows[2] = (rows[2][0], rows[2][1], "train", ["a person", "   "])
    rows[14] = (rows[14][0], rows[14][1], "test", ["", "\t\n"])
    _write(tmp_path, _records(rows))
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", tmp_path)
    assert "3 captions in" in caplog.text and "are empty or only whitespace (1 in train, 2 in test)" in caplog.text
    assert "caption 1 of record 2 (file_path='train/2.png', split train)" in caplog.text
    assert "caption 0 of record 14 (file_path='test/2.png', split test)" in caplog.text
    assert dsd.load_report.blank_captions == {"train": 1, "test": 2}
    assert dsd["train"].num_rows == 16  # kept, as reported


def test_tiny_images_are_warned_about_when_decoded(tmp_path, caplog) -> None:
    imgs = _write(tmp_path, _records(_base_rows()))
    Image.new("RGB", (1, 1), (9, 9, 9)).save(imgs / "test/1.png")
    Image.new("RGB", (12, 2), (9, 9, 9)).save(imgs / "train/3.png")
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", tmp_path)  # train images are not decoded: only the test one is seen
    assert dsd.load_report.tiny_images == {"test": 1}
    assert "1 images listed in" in caplog.text and "smaller than 4 pixels on a side (1 in test)" in caplog.text
    assert "record 13 (file_path='test/1.png', split test): 1x1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", tmp_path, verify_images=True)
    assert dsd.load_report.tiny_images == {"train": 1, "test": 1}
    assert "record 3 (file_path='train/3.png', split train): 12x2" in caplog.text


def test_an_image_in_train_and_test_is_reported_at_load(tmp_path, caplog) -> None:
    rows = _base_rows()
    rows[14] = ("train/6.png", 77, "test", ["the same picture again"])  # train image 6, listed in test too
    rows[9] = ("train/0.png", 21, "val", ["val copy"])
    _write(tmp_path, _records(rows))
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", tmp_path)
    assert dsd.load_report.leaked_images == {"val": 1, "test": 1}
    assert "2 images in" in caplog.text and "are both in train and in an evaluation split (1 in val, 1 in test)" \
        in caplog.text
    assert "record 14 (split test) and record 6 (split train) both list file_path='train/6.png'" in caplog.text
    assert "(images also listed in train (train/evaluation leakage): 1 in val, 1 in test)" in summarize(dsd)
    # Only the splits loaded are compared: evaluating test alone cannot see train.
    assert load_pedes("cuhk_pedes", tmp_path, splits=["test"]).load_report.leaked_images == {}


def test_an_annotation_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    _write(tmp_path, _records(_base_rows()))
    ann = tmp_path / "CUHK-PEDES" / "reid_raw.json"
    ann.write_bytes(b"\xef\xbb\xbf" + ann.read_bytes())  # as Windows editors save UTF-8
    assert load_pedes("cuhk_pedes", tmp_path)["train"].num_rows == 16  # today: "is not valid JSON (... BOM ...)"


def test_a_root_that_is_a_file_is_reported_as_a_file(tmp_path: Path) -> None:
    _write(tmp_path, _records(_base_rows()))
    root = tmp_path / "CUHK-PEDES" / "reid_raw.json"
    with pytest.raises(DatasetFormatError, match=rf"; {root} is a file, not a folder\. Expected "):
        load_pedes("cuhk_pedes", root)  # today: "... does not exist either"


def test_a_copy_of_a_train_image_in_test_is_found_by_its_bytes_when_images_are_decoded(tmp_path, caplog) -> None:
    rows = _base_rows()
    imgs = _write(tmp_path, _records(rows))
    (imgs / "test/3.png").write_bytes((imgs / "train/5.png").read_bytes())  # the same picture under a test name
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        assert load_pedes("cuhk_pedes", tmp_path).load_report.leaked_images == {}  # by path only: not decoded
        dsd = load_pedes("cuhk_pedes", tmp_path, verify_images=True)
    assert dsd.load_report.leaked_images == {"test": 1}
    assert ("record 15 (split test) and record 5 (split train) hold the same bytes: 'test/3.png' and 'train/5.png'"
            in caplog.text)

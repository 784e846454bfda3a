"""Loaders, transforms, tokeniser and collator on small copies of each real layout, on disk."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from kd_trainer.data import (
    CLIP_MEAN,
    CLIP_STD,
    DATASETS,
    DatasetFormatError,
    build_image_transform,
    canonical_dataset_name,
    collate_retrieval,
    last_skipped,
    load_pedes,
    summarize,
    tokenize,
    with_retrieval_transforms,
)

# ----------------------------------------------------------------------------- fixtures


def _write(root: Path, folder: str, ann_name: str, records: list[dict], image_key: str) -> Path:
    """Write ``records`` as the annotation file and a tiny real image for each record."""
    ds = root / folder
    for i, rec in enumerate(records):
        path = ds / "imgs" / rec[image_key]
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = ((37 * i) % 256, (91 * i) % 256, (53 * i + 20) % 256)
        Image.new("RGB", (6, 12), colour).save(path)
    (ds / ann_name).write_text(json.dumps(records))
    return ds


def _cuhk_records() -> list[dict]:
    # (file_path, id, split, n_captions): train ids 1..3 contiguous, val 4..5, test 6..7.
    rows = [
        ("CUHK01/0363004.png", 3, "train", 2),
        ("CUHK01/0363001.png", 1, "train", 2),
        ("cam_a/000_45.png", 1, "train", 3),  # a few real records have three captions
        ("cam_b/002_90.png", 2, "train", 2),
        ("CUHK03/4_1.png", 4, "val", 2),
        ("CUHK03/4_2.png", 4, "val", 2),
        ("test_query/p5_s1.png", 5, "val", 2),
        ("train_query/p6_s1.png", 6, "test", 2),
        ("Market/0007_c1.jpg", 7, "test", 2),
    ]
    return [
        {"split": s, "captions": [f"person {pid} caption {k} of {fp}" for k in range(n)], "file_path": fp,
         "processed_tokens": [[["person"], ["caption"]] for _ in range(n)], "id": pid}
        for fp, pid, s, n in rows
    ]


def _icfg_records() -> list[dict]:
    rows = [("train/0001/0001_001_01.jpg", 1, "train"), ("train/0001/0001_002_01.jpg", 1, "train"),
            ("train/0003/0003_001_01.jpg", 3, "train"), ("test/0501/0501_001_01.jpg", 501, "test"),
            ("test/0502/0502_001_01.jpg", 502, "test")]
    return [{"file_path": fp, "id": pid, "split": s, "captions": [f"a person with id {pid}"],
             "processed_tokens": [["a", "person"]]} for fp, pid, s in rows]


def _rstp_records() -> list[dict]:
    # 0-based ids with gaps in train: remapped by rank (2 -> 0, 5 -> 1, 9 -> 2).
    rows = [("0005_c14_0011.jpg", 5, "train"), ("0002_c3_0001.jpg", 2, "train"), ("0002_c5_0002.jpg", 2, "train"),
            ("0009_c1_0004.jpg", 9, "train"), ("0100_c2_0001.jpg", 100, "val"), ("0101_c2_0001.jpg", 101, "val"),
            ("0200_c7_0003.jpg", 200, "test")]
    return [{"id": pid, "img_path": fp, "captions": [f"first {fp}", f"second {fp}"], "split": s}
            for fp, pid, s in rows]


@pytest.fixture
def cuhk(tmp_path: Path) -> Path:
    _write(tmp_path, "CUHK-PEDES", "reid_raw.json", _cuhk_records(), "file_path")
    return tmp_path


def _col(ds, name):
    return list(ds.with_format(None)[name])


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("spelling,key", [
    ("CUHK-PEDES", "cuhk_pedes"), ("cuhk-pedes", "cuhk_pedes"), ("cuhk_pedes", "cuhk_pedes"),
    ("ICFG-PEDES", "icfg_pedes"), ("icfg_pedes", "icfg_pedes"), ("RSTPReid", "rstpreid"),
    ("rstp_reid", "rstpreid"), ("SynthPEDES", "synth_pedes"), ("synth_pedes", "synth_pedes"),
])
def test_canonical_dataset_name(spelling: str, key: str) -> None:
    assert canonical_dataset_name(spelling) == key
    assert key in DATASETS


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Market-1501") as e:
        canonical_dataset_name("Market-1501")
    for key in DATASETS:
        assert key in str(e.value)


# ----------------------------------------------------------------------------- loading


def test_cuhk_pedes_splits_pids_and_pairing(cuhk: Path) -> None:
    dsd = load_pedes("CUHK-PEDES", cuhk)
    assert set(dsd) == {"train", "val_gallery", "val_queries", "test_gallery", "test_queries"}
    assert {s: dsd[s].num_rows for s in dsd} == {
        "train": 9, "val_gallery": 3, "val_queries": 6, "test_gallery": 2, "test_queries": 4}

    train = dsd["train"]
    assert train.column_names == ["image_path", "caption", "pid", "image_id"]
    assert {k: v.dtype for k, v in train.features.items()} == {
        "image_path": "string", "caption": "string", "pid": "int64", "image_id": "int64"}
    assert _col(train, "pid") == [2, 2, 0, 0, 0, 0, 0, 1, 1]  # id - 1
    assert _col(train, "image_id") == [0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert _col(train, "caption")[4] == "person 1 caption 0 of cam_a/000_45.png"
    for p in _col(train, "image_path"):
        assert Path(p).is_absolute() and Path(p).is_file()
    assert _col(train, "image_path")[0] == str(cuhk.resolve() / "CUHK-PEDES/imgs/CUHK01/0363004.png")

    for s in ("val", "test"):
        g, q = dsd[f"{s}_gallery"], dsd[f"{s}_queries"]
        assert g.column_names == ["image_path", "pid", "image_id"]
        assert q.column_names == ["caption", "pid", "image_id"]
        assert g.features["pid"].dtype == q.features["image_id"].dtype == "int64"
        assert _col(g, "image_id") == list(range(g.num_rows))
        pid_of_image = dict(zip(_col(g, "image_id"), _col(g, "pid")))
        for pid, image_id, caption in zip(_col(q, "pid"), _col(q, "image_id"), _col(q, "caption")):
            assert pid == pid_of_image[image_id]  # each query carries the pid of its image
            assert caption.startswith(f"person {pid} ")  # original ids are kept in eval splits
    assert _col(dsd["val_gallery"], "pid") == [4, 4, 5]
    assert last_skipped() == 0 and dsd.skipped_images == []

    table = summarize(dsd)
    assert "CUHK-PEDES" in table
    assert [line.split() for line in table.splitlines()[1:]] == [
        ["train", "3", "4", "9"], ["val", "2", "3", "6"], ["test", "2", "2", "4"]]


@pytest.mark.parametrize("ann_name", ["ICFG-PEDES.json", "ICFG_PEDES.json"])
def test_icfg_pedes_has_train_and_test_only(tmp_path: Path, ann_name: str) -> None:
    _write(tmp_path, "ICFG-PEDES", ann_name, _icfg_records(), "file_path")
    dsd = load_pedes("ICFG-PEDES", tmp_path)
    assert set(dsd) == {"train", "test_gallery", "test_queries"}
    assert _col(dsd["train"], "pid") == [0, 0, 1]
    assert _col(dsd["train"], "image_id") == [0, 1, 2]
    assert dsd["test_gallery"].num_rows == dsd["test_queries"].num_rows == 2
    assert _col(dsd["test_queries"], "pid") == [501, 502]
    assert _col(dsd["train"], "image_path")[0].endswith("ICFG-PEDES/imgs/train/0001/0001_001_01.jpg")


def test_rstpreid_img_path_and_rank_remap(tmp_path: Path) -> None:
    _write(tmp_path, "RSTPReid", "data_captions.json", _rstp_records(), "img_path")
    dsd = load_pedes("rstpreid", tmp_path)
    assert _col(dsd["train"], "pid") == [1, 1, 0, 0, 0, 0, 2, 2]
    assert _col(dsd["train"], "image_id") == [0, 0, 1, 1, 2, 2, 3, 3]
    assert dsd["val_gallery"].num_rows == 2 and dsd["val_queries"].num_rows == 4
    assert _col(dsd["val_queries"], "image_id") == [0, 0, 1, 1]
    assert _col(dsd["test_queries"], "pid") == [200, 200]


def test_synth_pedes_uses_cuhk_layout(tmp_path: Path) -> None:
    _write(tmp_path, "SynthPEDES", "reid_raw.json", _cuhk_records(), "file_path")
    dsd = load_pedes("SynthPEDES", tmp_path)
    assert dsd["train"].num_rows == 9 and dsd["test_gallery"].num_rows == 2
    assert dsd["train"].info.dataset_name == "SynthPEDES"


# ----------------------------------------------------------------------------- bad data


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match=r"CUHK-PEDES: dataset folder .*CUHK-PEDES not found") as e:
        load_pedes("cuhk_pedes", tmp_path)
    assert "reid_raw.json" in str(e.value) and "imgs/" in str(e.value)


def test_missing_annotation_names_files_looked_for(tmp_path: Path) -> None:
    (tmp_path / "ICFG-PEDES" / "imgs").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match="ICFG-PEDES: no annotation file") as e:
        load_pedes("ICFG-PEDES", tmp_path)
    assert "ICFG-PEDES.json" in str(e.value) and "ICFG_PEDES.json" in str(e.value)


def test_missing_imgs_folder(tmp_path: Path) -> None:
    (tmp_path / "RSTPReid").mkdir()
    (tmp_path / "RSTPReid" / "data_captions.json").write_text("[]")
    with pytest.raises(DatasetFormatError, match=r"RSTPReid: image folder .*RSTPReid/imgs not found"):
        load_pedes("RSTPReid", tmp_path)


def test_invalid_json_and_wrong_top_level(cuhk: Path) -> None:
    ann = cuhk / "CUHK-PEDES" / "reid_raw.json"
    ann.write_text("[{")
    with pytest.raises(DatasetFormatError, match="CUHK-PEDES: annotation file .*reid_raw.json is not valid JSON"):
        load_pedes("cuhk_pedes", cuhk)
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetFormatError, match="holds a JSON dict, expected a list of records"):
        load_pedes("cuhk_pedes", cuhk)


def _rewrite(root: Path, edit) -> None:
    ann = root / "CUHK-PEDES" / "reid_raw.json"
    recs = json.loads(ann.read_text())
    edit(recs)
    ann.write_text(json.dumps(recs))


def test_record_missing_key(cuhk: Path) -> None:
    _rewrite(cuhk, lambda recs: recs[3].pop("captions"))
    with pytest.raises(DatasetFormatError) as e:
        load_pedes("cuhk_pedes", cuhk)
    msg = str(e.value)
    assert msg.startswith("CUHK-PEDES: record 3 of ") and "reid_raw.json" in msg
    assert "missing key 'captions'" in msg
    assert "['file_path', 'id', 'captions', 'split']" in msg


def test_rstpreid_record_with_cuhk_key_is_reported(tmp_path: Path) -> None:
    recs = _rstp_records()
    recs[1]["file_path"] = recs[1].pop("img_path")
    _write(tmp_path, "RSTPReid", "data_captions.json", recs[:1], "img_path")
    (tmp_path / "RSTPReid" / "data_captions.json").write_text(json.dumps(recs))
    with pytest.raises(DatasetFormatError, match=r"RSTPReid: record 1 of .*data_captions.json: missing key 'img_path'"):
        load_pedes("RSTPReid", tmp_path)


@pytest.mark.parametrize("key,value,expected", [
    ("captions", "a single string", "expected a list of strings"),
    ("captions", ["ok", 3], "expected a list of strings"),
    ("id", "12", "expected an int"),
    ("id", 1.0, "expected an int"),
    ("file_path", None, "expected a non-empty image path"),
    ("split", "training", "unknown split 'training'"),
])
def test_record_wrong_type_or_value(cuhk: Path, key: str, value, expected: str) -> None:
    _rewrite(cuhk, lambda recs: recs[5].__setitem__(key, value))
    with pytest.raises(DatasetFormatError, match=f"CUHK-PEDES: record 5 of .*reid_raw.json: .*{expected}"):
        load_pedes("cuhk_pedes", cuhk)


def test_icfg_val_split_is_unknown(tmp_path: Path) -> None:
    recs = _icfg_records()
    recs[4]["split"] = "val"
    _write(tmp_path, "ICFG-PEDES", "ICFG-PEDES.json", recs, "file_path")
    with pytest.raises(DatasetFormatError, match=r"record 4 .*unknown split 'val'.*has no val split"):
        load_pedes("ICFG-PEDES", tmp_path)


def test_missing_images_are_all_reported(tmp_path: Path) -> None:
    recs = [{"file_path": f"cam_a/{i:03d}.png", "id": 1 + i // 2, "split": "train", "captions": ["c"]}
            for i in range(16)]
    ds = _write(tmp_path, "CUHK-PEDES", "reid_raw.json", recs, "file_path")
    for i in range(2, 14):  # 12 missing: the first 10 listed, the rest counted
        (ds / "imgs" / f"cam_a/{i:03d}.png").unlink()
    with pytest.raises(DatasetFormatError) as e:
        load_pedes("cuhk_pedes", tmp_path, splits=["train"])
    msg = str(e.value)
    assert msg.startswith("CUHK-PEDES: 12 of 16 images listed in ") and "cannot be read (12 missing)" in msg
    assert f"record 2 (file_path='cam_a/002.png', split train): missing: {ds.resolve() / 'imgs/cam_a/002.png'}" in msg
    assert "record 11 " in msg and "record 12 " not in msg
    assert "... and 2 more" in msg and "data.skip_unreadable: true" in msg


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")


def test_skip_unreadable_drops_and_reports(cuhk: Path, caplog: pytest.LogCaptureFixture) -> None:
    imgs = cuhk / "CUHK-PEDES" / "imgs"
    (imgs / "CUHK01/0363001.png").unlink()  # train, id 1 (the only other id-1 image stays)
    _corrupt(imgs / "cam_b/002_90.png")  # train, id 2: its identity disappears
    (imgs / "Market/0007_c1.jpg").unlink()  # test

    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", cuhk, skip_unreadable=True)
    # Skipping decodes the train images too: the undecodable one is dropped with the missing ones.
    assert last_skipped() == 3
    assert any(p.endswith("cam_b/002_90.png") for p in dsd.skipped_images)
    assert "CUHK-PEDES: skipped 3 of 9 images" in caplog.text and "2 missing, 1 truncated" in caplog.text
    assert "CUHK01/0363001.png" in caplog.text
    assert dsd["test_gallery"].num_rows == 1
    assert _col(dsd["train"], "pid") == [1, 1, 0, 0, 0]  # ids 3 and 1 left: still contiguous
    assert _col(dsd["train"], "image_id") == [0, 0, 1, 1, 1]
    assert "3 unreadable images skipped" in dsd["train"].info.description
    assert "3 unreadable images skipped" in summarize(dsd)


def test_undecodable_image_with_verify(cuhk: Path) -> None:
    _corrupt(cuhk / "CUHK-PEDES" / "imgs" / "cam_a/000_45.png")
    load_pedes("cuhk_pedes", cuhk)  # train images are not decoded unless asked
    with pytest.raises(DatasetFormatError) as e:
        load_pedes("cuhk_pedes", cuhk, verify_images=True)
    msg = str(e.value)
    assert msg.startswith("CUHK-PEDES: 1 of 9 images listed in") and "cannot be read (1 truncated)" in msg
    assert "record 2 (file_path='cam_a/000_45.png', split train): truncated: " in msg
    assert "OSError: Truncated File Read" in msg


def test_undecodable_image_surfaces_at_transform_time(cuhk: Path) -> None:
    bad = cuhk / "CUHK-PEDES" / "imgs" / "cam_a/000_45.png"
    _corrupt(bad)
    dsd = with_retrieval_transforms(load_pedes("cuhk_pedes", cuhk), image_size=(16, 8), augment=False)
    dsd["train"][0]  # the good rows still work
    with pytest.raises(DatasetFormatError) as e:
        dsd["train"][4]
    msg = str(e.value)
    assert msg.startswith("CUHK-PEDES: cannot decode image") and str(bad.resolve()) in msg
    assert "expected an image file" in msg


# ----------------------------------------------------------------------------- transforms


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])


def test_eval_transform_shape_and_normalisation() -> None:
    rgb = (200, 40, 120)
    tf = build_image_transform((24, 8), train=False)
    x = tf(Image.new("RGB", (13, 30), rgb))
    assert x.shape == (3, 24, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x, _normalised(rgb)[:, None, None].expand(3, 24, 8), atol=1e-5, rtol=0)
    # Grey-scale and palette images become RGB first.
    assert tf(Image.new("L", (5, 9), 128)).shape == (3, 24, 8)
    torch.testing.assert_close(tf(Image.new("L", (5, 9), 128))[:, 0, 0], _normalised((128, 128, 128)))


def test_train_transform_steps_depend_on_augment() -> None:
    def kinds(tf):
        return [type(t) for t in tf.transforms]

    aug = kinds(build_image_transform((24, 8), train=True, augment=True))
    plain = kinds(build_image_transform((24, 8), train=True, augment=False))
    ev = kinds(build_image_transform((24, 8), train=False, augment=True))
    assert aug[1:] == [T.Resize, T.RandomHorizontalFlip, T.Pad, T.RandomCrop, T.ToTensor, T.Normalize,
                       T.RandomErasing]
    assert plain[1:] == [T.Resize, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert ev[1:] == [T.Resize, T.ToTensor, T.Normalize]


def test_augment_changes_pixels_only_when_on() -> None:
    rgb = (10, 200, 90)
    img = Image.new("RGB", (8, 24), rgb)
    const = _normalised(rgb)[:, None, None].expand(3, 24, 8)
    torch.manual_seed(0)
    plain = build_image_transform((24, 8), train=True, augment=False)
    for _ in range(10):  # a flip leaves a constant image unchanged
        torch.testing.assert_close(plain(img), const, atol=1e-5, rtol=0)
    aug = build_image_transform((24, 8), train=True, augment=True)
    outs = [aug(img) for _ in range(30)]
    assert all(o.shape == (3, 24, 8) for o in outs)
    changed = [not torch.allclose(o, const, atol=1e-5) for o in outs]
    assert sum(changed) >= 20  # pad+crop shows black borders and/or erasing paints a box
    black = _normalised((0, 0, 0))
    assert any(torch.allclose(o[:, 0, 0], black, atol=1e-5) or torch.allclose(o[:, -1, -1], black, atol=1e-5)
               for o in outs)
    erased = torch.tensor(CLIP_MEAN)  # IRRA erases with value=mean after Normalize
    assert any((o == erased[:, None, None]).all(0).any() for o in outs)


# ----------------------------------------------------------------------------- tokeniser


def test_tokenize_rules() -> None:
    sot, eot = 49406, 49407
    ids = tokenize("A woman in a red coat.")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    n = int((ids[0] != 0).sum())
    assert ids[0, 0] == sot and ids[0, n - 1] == eot and (ids[0, n:] == 0).all()
    assert n == 2 + 7  # a woman in a red coat .
    assert ids[0].argmax() == n - 1  # end-of-text is the largest id: CLIP pools there

    batch = tokenize(["a man", "a man walking a dog"], context_length=12)
    assert batch.shape == (2, 12)
    assert batch[0, :4].tolist() == [sot, batch[0, 1].item(), batch[0, 2].item(), eot]
    assert batch[0, 1:3].tolist() == batch[1, 1:3].tolist()  # same words, same ids

    long = tokenize(" ".join(["word"] * 200), context_length=16)
    assert long.shape == (1, 16) and long[0, 0] == sot and long[0, -1] == eot
    assert (long[0, 1:-1] != 0).all() and (long[0, 1:-1] != eot).all()
    exact = tokenize(" ".join(["word"] * 14), context_length=16)  # 14 + 2 fits exactly
    assert exact[0, -1] == eot and (exact[0] != 0).all()
    assert tokenize("", context_length=5)[0].tolist() == [sot, eot, 0, 0, 0]


# ----------------------------------------------------------------------------- pipeline


def test_with_retrieval_transforms_items_and_batches(cuhk: Path) -> None:
    raw = load_pedes("cuhk_pedes", cuhk)
    dsd = with_retrieval_transforms(raw, image_size=(16, 8), augment=True, context_length=20)

    item = dsd["train"][0]
    assert set(item) == {"pixel_values", "input_ids", "pids", "image_ids"}
    assert item["pixel_values"].shape == (3, 16, 8) and item["pixel_values"].dtype == torch.float32
    assert item["input_ids"].shape == (20,) and item["input_ids"].dtype == torch.int64
    assert item["pids"].dtype == torch.int64 and item["pids"].ndim == 0 and item["pids"].item() == 2
    assert item["image_ids"].item() == 0

    g = dsd["test_gallery"][1]
    assert set(g) == {"pixel_values", "pids", "image_ids"} and g["pids"].item() == 7
    q = dsd["val_queries"][5]
    assert set(q) == {"input_ids", "pids", "image_ids"}
    assert q["pids"].item() == 5 and q["image_ids"].item() == 2
    # Gallery images are not augmented: the same tensor every time.
    torch.testing.assert_close(dsd["val_gallery"][0]["pixel_values"], dsd["val_gallery"][0]["pixel_values"])

    batch = next(iter(DataLoader(dsd["train"], batch_size=4, collate_fn=collate_retrieval)))
    assert batch["pixel_values"].shape == (4, 3, 16, 8)
    assert batch["input_ids"].shape == (4, 20)
    assert batch["pids"].tolist() == [2, 2, 0, 0] and batch["image_ids"].tolist() == [0, 0, 1, 1]
    sliced = dsd["val_queries"][:3]  # batched access goes through the same transform
    assert sliced["input_ids"].shape == (3, 20)
    assert summarize(dsd) == summarize(raw)  # raw columns stay readable under the transform


def test_collate_retrieval() -> None:
    feats = [{"pixel_values": torch.full((3, 4, 2), float(i)), "input_ids": torch.arange(5) + i,
              "pids": torch.tensor(i), "image_ids": 10 + i} for i in range(3)]
    batch = collate_retrieval(feats)
    assert batch["pixel_values"].shape == (3, 3, 4, 2) and batch["pixel_values"][2].eq(2).all()
    assert batch["input_ids"].shape == (3, 5) and batch["input_ids"][1, 0] == 1
    assert batch["pids"].tolist() == [0, 1, 2] and batch["pids"].dtype == torch.int64
    assert batch["image_ids"].tolist() == [10, 11, 12]
    with pytest.raises(ValueError, match="item 1 has keys"):
        collate_retrieval([{"pids": 1}, {"image_ids": 2}])


def test_seeded_augmentation_depends_only_on_seed_epoch_and_row(cuhk: Path) -> None:
    from kd_trainer.data.pipeline import set_augmentation_epoch

    raw = load_pedes("cuhk_pedes", cuhk)
    a = with_retrieval_transforms(raw, image_size=(64, 32), augment=True, seed=7)["train"]
    b = with_retrieval_transforms(raw, image_size=(64, 32), augment=True, seed=7)["train"]
    torch.manual_seed(0)
    first = a[1]["pixel_values"]
    torch.manual_seed(123)  # the global RNG no longer matters ...
    assert torch.equal(b[1]["pixel_values"], first)
    assert torch.equal(b[1]["pixel_values"], first)  # ... nor how often the row was read
    assert set_augmentation_epoch(a, 1)
    assert not torch.equal(a[1]["pixel_values"], first), "a new epoch draws a new augmentation"
    assert set_augmentation_epoch(a, 0) and torch.equal(a[1]["pixel_values"], first)
    unseeded = with_retrieval_transforms(raw, image_size=(64, 32), augment=True)["train"]
    assert not set_augmentation_epoch(unseeded, 1)
    assert "row_index" not in a[1]  # a key for the transform, not a model input

"""Every PIL mode an image file may hold becomes the RGB image it shows, or is refused in one line
(issue 24): 16-bit grayscale is scaled from its full range (``convert("RGB")`` turned it white),
floats in [0, 1] are scaled, transparency is composited onto white. Real files on disk; the
expected pixels are worked out here with numpy, not with the code under test."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_trainer.data import DatasetFormatError, load_pedes, open_image
from kd_trainer.data.images import find_unreadable
from kd_trainer.data.shapes import ShapesDataset
from kd_trainer.data.transforms import ToRGB


def _saved(tmp_path: Path, image: Image.Image, name: str, **kw) -> Path:
    path = tmp_path / name
    image.save(path, **kw)
    return path


def _rgb(path: Path) -> np.ndarray:
    image = open_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def _gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


SIXTEEN = np.array([[0, 257, 1000, 20000], [32768, 50000, 65000, 65535]], dtype=np.uint16)
SIXTEEN_AS_8 = np.array([[0, 1, 4, 78], [128, 195, 253, 255]])  # round(v * 255 / 65535), by hand


@pytest.mark.parametrize("name, mode", [("g16.png", "I;16"), ("g16.tif", "I;16"), ("g16b.tif", "I;16B")])
def test_16_bit_grayscale_is_scaled_from_its_full_range(tmp_path, name, mode):
    image = Image.fromarray(SIXTEEN)  # I;16
    if mode == "I;16B":
        image = Image.frombytes("I;16B", image.size, SIXTEEN.astype(">u2").tobytes())
    path = _saved(tmp_path, image, name)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    assert np.array_equal(_rgb(path), _gray3(SIXTEEN_AS_8))  # convert("RGB") gave 255 almost everywhere


def test_32_bit_integers_are_read_as_8_or_16_bit_by_their_range(tmp_path):
    sixteen = _saved(tmp_path, Image.fromarray(SIXTEEN.astype(np.int32)), "i16.tif")
    assert np.array_equal(_rgb(sixteen), _gray3(SIXTEEN_AS_8))
    eight = np.array([[0, 7, 128, 255]], dtype=np.int32)
    assert np.array_equal(_rgb(_saved(tmp_path, Image.fromarray(eight), "i8.tif")), _gray3(eight))
    for values, name in (([[-5, 100]], "neg.tif"), ([[0, 70000]], "big.tif")):
        path = _saved(tmp_path, Image.fromarray(np.array(values, dtype=np.int32)), name)
        with pytest.raises(DatasetFormatError) as e:
            open_image(path, "CUHK-PEDES")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"CUHK-PEDES: cannot use image {path} (unsupported: ")
        assert "mode I" in msg and "expected 8-bit (0..255) or 16-bit (0..65535)" in msg


def test_floats_in_0_1_are_scaled_and_in_0_255_kept(tmp_path):
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    assert np.array_equal(_rgb(_saved(tmp_path, Image.fromarray(unit), "unit.tif")),
                          _gray3(np.array([[0, 64, 128, 255]])))  # convert("RGB") gave all black
    bytes_ = np.array([[0.0, 3.0, 200.0, 255.0]], dtype=np.float32)
    assert np.array_equal(_rgb(_saved(tmp_path, Image.fromarray(bytes_), "bytes.tif")), _gray3(bytes_.astype(int)))
    for values, name, shown in (([[0.0, 900.0]], "depth.tif", "values 0..900"),
                                ([[-1.0, 0.5]], "signed.tif", "values -1..0.5"),
                                ([[np.nan, 0.5]], "nan.tif", "non-finite values")):
        path = _saved(tmp_path, Image.fromarray(np.array(values, dtype=np.float32)), name)
        with pytest.raises(DatasetFormatError, match=rf"mode F\) with {shown}; expected values in \[0, 1\] or "):
            open_image(path)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None] / 255
    return rgb * a + 255 * (1 - a)


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 128], [0, 0, 0, 0], [10, 200, 30, 64]]], dtype=np.uint8)
    got = _rgb(_saved(tmp_path, Image.fromarray(rgba), "rgba.png"))
    assert np.abs(got - _over_white(rgba[..., :3].astype(float), rgba[..., 3].astype(float))).max() <= 1
    assert got[0, 2].tolist() == [255, 255, 255]  # convert("RGB") showed the black stored under alpha 0

    la = np.array([[[100, 255], [100, 0], [40, 128]]], dtype=np.uint8)
    got = _rgb(_saved(tmp_path, Image.fromarray(la, "LA"), "la.png"))
    assert np.abs(got - _gray3(_over_white(la[..., :1].astype(float), la[..., 1].astype(float))[..., 0])).max() <= 1

    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    path = _saved(tmp_path, palette, "p.png", transparency=1)  # palette entry 1 (blue) is transparent
    assert _rgb(path).tolist() == [[[255, 0, 0], [255, 255, 255], [255, 0, 0]]]

    gray = Image.fromarray(np.array([[7, 90]], dtype=np.uint8))
    assert _rgb(_saved(tmp_path, gray, "l.png", transparency=7)).tolist() == [[[255, 255, 255], [90, 90, 90]]]


def test_cmyk_bilevel_and_palette_use_the_colours_they_show(tmp_path):
    cmyk = Image.new("CMYK", (3, 1))
    for x, ink in enumerate([(0, 0, 0, 0), (0, 255, 0, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), ink)
    assert _rgb(_saved(tmp_path, cmyk, "cmyk.tif")).tolist() == [[[255, 255, 255], [255, 0, 255], [0, 0, 0]]]
    bilevel = Image.fromarray(np.array([[0, 255, 255]], dtype=np.uint8)).convert("1")
    assert _rgb(_saved(tmp_path, bilevel, "one.png")).tolist() == [[[0, 0, 0], [255, 255, 255], [255, 255, 255]]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert _rgb(_saved(tmp_path, palette, "p_opaque.png")).tolist() == [[[10, 20, 30], [40, 50, 60]]]


def test_the_training_transform_reads_modes_by_the_same_rule():
    image = Image.fromarray(SIXTEEN)
    assert np.array_equal(np.asarray(ToRGB()(image)).astype(int), _gray3(SIXTEEN_AS_8))


def test_an_unsupported_image_is_a_kind_that_skip_unreadable_drops(tmp_path, caplog):
    imgs = tmp_path / "CUHK-PEDES" / "imgs"
    imgs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i, split in enumerate(["train", "train", "train", "val", "test"]):
        Image.fromarray(rng.integers(0, 256, (24, 12, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
        records.append({"file_path": f"{i}.png", "id": i, "split": split, "captions": [f"person {i}"]})
    depth = Image.fromarray(np.full((24, 12), 900.0, dtype=np.float32))
    depth.save(imgs / "1.tif")
    records[1]["file_path"] = "1.tif"
    (tmp_path / "CUHK-PEDES" / "reid_raw.json").write_text(json.dumps(records))
    assert find_unreadable([str(imgs / "1.tif"), str(imgs / "0.png")]) == {
        0: ("unsupported", "UnsupportedImageMode: a float image (mode F) with values 900..900; expected values "
                           "in [0, 1] or [0, 255]")}
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        dsd = load_pedes("cuhk_pedes", tmp_path, skip_unreadable=True)
    assert dsd.load_report.skipped_by_kind() == {"unsupported": 1}
    assert dsd["train"].num_rows == 2 and "1 unsupported" in caplog.text


def test_the_example_datasets_read_images_by_the_same_rule(tmp_path):
    """SynthShapes items go through open_image: a 16-bit image is scaled, a damaged one is one line naming it."""
    folder = tmp_path / "SynthShapes" / "test" / "red_circle"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(folder / "0000.png")
    (folder / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    ds = ShapesDataset(tmp_path / "SynthShapes", "test", train=False)
    x = ds[0]["pixel_values"]  # normalised with mean 0.5, std 0.25: 128/255 -> ~0.008
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-6)  # convert("RGB"): 2.0, white
    with pytest.raises(DatasetFormatError, match=rf"^SynthShapes: cannot decode image {folder / '0001.png'} \("):
        ds[1]

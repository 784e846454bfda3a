"""Named architectures and strict checkpoint loading."""

from __future__ import annotations

import json

import open_clip
import pytest
import safetensors.torch
import torch

from kd_trainer.models.loading import CheckpointError, load_model, load_weights
from kd_trainer.models.factory import create_model, get_architecture, list_architectures


def test_shipped_architectures_and_the_published_shapes():
    assert {"clip-vit-b16", "tinyclip-xsmall", "tinyclip-medium", "tiny-teacher", "tiny-student"} <= set(
        list_architectures())
    x = get_architecture("tinyclip-xsmall")
    assert (x["vision_cfg"]["layers"], x["vision_cfg"]["width"], x["vision_cfg"]["head_width"],
            x["vision_cfg"]["patch_size"]) == (10, 256, 64, 16)
    assert (x["text_cfg"]["layers"], x["text_cfg"]["width"], x["embed_dim"]) == (3, 256, 512)


def test_non_square_images_give_a_tall_position_grid_and_unit_embeddings():
    m = create_model("micro", image_size=(48, 16))
    assert m.clip.visual.grid_size == (6, 2)
    assert m.clip.visual.positional_embedding.shape[0] == 6 * 2 + 1
    img = m.encode_image(torch.randn(3, 3, 48, 16))
    txt = m.encode_text(open_clip.tokenize(["a man in a red coat", "a woman"]))
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_unknown_architecture_and_bad_size_are_explained():
    with pytest.raises(ValueError, match="Did you mean 'tinyclip-xsmall'"):
        create_model("tinyclip-xsmal")
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        create_model("micro", image_size=(30, 16))


def _outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 32, 16, generator=g)
    return model.encode_image(images), model.encode_text(open_clip.tokenize(["red jacket", "blue jeans"]))


@pytest.mark.parametrize("fmt", ["safetensors", "pth_plain", "pth_nested"])
def test_weights_roundtrip_in_each_format(tmp_path, fmt):
    torch.manual_seed(0)
    src = create_model("micro")
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        safetensors.torch.save_file(src.state_dict(), str(path))
    elif fmt == "pth_plain":  # open_clip / OpenAI key names, no "clip." prefix
        path = tmp_path / "w.pth"
        torch.save(src.clip.state_dict(), path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": src.clip.state_dict(), "epoch": 3}, path)
    torch.manual_seed(1)
    dst = create_model("micro")
    report = load_weights(dst, path)
    assert report.loaded == len(src.state_dict())
    for a, b in zip(_outputs(src), _outputs(dst)):
        assert torch.equal(a, b)


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    src = create_model("micro")
    sd = src.clip.state_dict()
    sd["extra_head.weight"] = torch.zeros(3)
    del sd["ln_final.weight"]
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_weights(create_model("micro"), path)
    msg = str(e.value)
    assert "missing (1): clip.ln_final.weight" in msg and "unexpected (1): clip.extra_head.weight" in msg


def test_wrong_image_size_is_reported_as_a_shape_mismatch(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(create_model("micro", image_size=(32, 16)).state_dict(), str(path))
    with pytest.raises(CheckpointError, match="wrong shape: clip.visual.positional_embedding"):
        load_weights(create_model("micro", image_size=(64, 16)), path)


def test_truncated_and_missing_files_are_clear(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(create_model("micro").state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(create_model("micro"), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(create_model("micro"), tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="No weights in folder"):
        load_weights(create_model("micro"), tmp_path)


def test_training_projection_is_dropped_with_a_report_when_loading_as_teacher(tmp_path):
    torch.manual_seed(0)
    student = create_model("micro", projection_dim=64)
    safetensors.torch.save_file(student.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "kd_trainer_model.json").write_text(json.dumps(
        {"arch": "micro", "image_size": [32, 16], "context_length": 77, "projection_dim": None}))
    loaded = load_model(tmp_path)  # rebuilt without projections, as a teacher would be
    assert loaded.image_proj is None
    report = load_weights(create_model("micro"), tmp_path)
    assert sorted(report.dropped) == ["image_proj.bias", "image_proj.weight", "text_proj.bias", "text_proj.weight"]
    for a, b in zip(_outputs(student), _outputs(loaded)):
        assert torch.equal(a, b)

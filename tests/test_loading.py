"""Checkpoint loading faults (issue 13): a run folder is read from its training weights, a file that
is not a checkpoint is called one, and a Hugging Face CLIP pooled differently is warned about."""

from __future__ import annotations

import argparse
import json
import logging
import os

import pytest
import safetensors.torch
import torch
import yaml
from transformers import CLIPConfig, CLIPModel

from kd_trainer.models.export import WEIGHTS_FILE, export_open_clip
from kd_trainer.models.factory import create_model
from kd_trainer.models.loading import (
    MODEL_CONFIG_NAME,
    NOT_A_CHECKPOINT,
    CheckpointError,
    ModelSpec,
    load_model,
    load_weights,
    model_config,
    model_from_checkpoint,
    model_from_hf_clip,
    read_state_dict,
)
from kd_trainer.recipe import load_recipe
from kd_trainer.runner import run
from kd_trainer.synthetic.pedes import make_synth_pedes


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor moved off its initial value, so a tensor left at its init cannot pass for a loaded one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _finished_run(folder, model):
    """A run's output folder as a finished run leaves it: the Trainer's ``model.safetensors`` (the whole
    student), ``kd_trainer_model.json`` (written beside it by the trainer's save) and the open_clip export."""
    folder.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / MODEL_CONFIG_NAME).write_text(json.dumps(model_config(model)))
    export_open_clip(model, folder)
    return folder


@pytest.fixture
def student_run(tmp_path):
    """A micro student (embed 32) trained against a 64-wide teacher: it carries image_proj/text_proj."""
    torch.manual_seed(0)
    student = _perturbed(create_model("micro", projection_dim=64)).eval()
    return student, _finished_run(tmp_path / "runs" / "student", student)


# --------------------------------------------------------------------------------------------
# 13.2: a run folder is read from model.safetensors, never from its open_clip export


def test_run_folder_with_projections_continues_as_student_checkpoint(student_run):
    student, run = student_run
    assert "image_proj.weight" not in safetensors.torch.load_file(str(run / WEIGHTS_FILE))  # the export lacks them
    # What run.py does for `student.checkpoint: runs/<run>`: the recipe's model, projections included.
    model = create_model("micro", image_size=(32, 16), context_length=77, projection_dim=64)
    report = load_weights(model, run)
    assert report.format == "kd_trainer" and report.source == str(run)
    assert report.loaded == len(student.state_dict()) == len(model.state_dict())
    for k, v in student.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

    again = load_model(run)  # rebuilt from kd_trainer_model.json, projections included
    assert again.image_proj is not None and again.image_proj.out_features == 64
    assert torch.equal(again.text_proj.weight, student.text_proj.weight)
    assert again.arch == "micro"


def test_truncated_training_weights_are_an_error_not_a_fallback_to_the_export(student_run):
    _, run = student_run
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    for load in (lambda: load_weights(create_model("micro"), run),  # no projections: the export would fit
                 lambda: load_model(run),
                 lambda: model_from_checkpoint(run)):
        with pytest.raises(CheckpointError, match="may be truncated") as e:
            load()
        assert "model.safetensors" in str(e.value)


def test_run_folder_without_training_weights_is_refused(student_run):
    _, run = student_run
    os.remove(run / "model.safetensors")
    with pytest.raises(CheckpointError, match="without its training weights") as e:
        load_weights(create_model("micro"), run)
    assert "model.safetensors" in str(e.value) and "open_clip export" in str(e.value)


def test_run_folder_at_another_size_is_resized_only_when_asked(student_run):
    student, run = student_run
    with pytest.raises(CheckpointError, match="wrong shape: clip.visual.positional_embedding"):
        load_weights(create_model("micro", image_size=(48, 16)), run)  # a recipe at another size: a mistake
    tall = model_from_checkpoint(run, image_size=(48, 16))  # `kd-trainer eval --image-size 48 16`: asked
    assert tall.image_size == (48, 16) and tall.image_proj is not None
    assert tall.load_report.resized == ["clip.visual.positional_embedding"]
    assert "4x2 -> 6x2" in tall.load_report.summary()
    assert torch.equal(tall.clip.visual.conv1.weight, student.clip.visual.conv1.weight)


def test_model_spec_builds_what_a_recipe_block_describes(student_run):
    student, run = student_run
    teacher = load_model(ModelSpec(checkpoint=run, arch="micro", image_size=(32, 16)))  # reused as a teacher
    assert teacher.image_proj is None
    assert sorted(teacher.load_report.dropped) == ["image_proj.bias", "image_proj.weight", "text_proj.bias",
                                                   "text_proj.weight"]
    assert torch.equal(teacher.clip.visual.proj, student.clip.visual.proj)
    fresh = load_model(ModelSpec(arch="micro", projection_dim=64))
    assert fresh.image_proj.out_features == 64 and not hasattr(fresh, "load_report")
    with pytest.raises(CheckpointError, match="without the checkpoint it describes"):
        load_model(ModelSpec(arch="micro", config=run / "configs.yaml"))


# --------------------------------------------------------------------------------------------
# 13.9: a file that is not a checkpoint is called one; trust advice only for real pickles of objects


def test_random_bytes_are_not_a_checkpoint_and_get_no_trust_advice(tmp_path):
    path = tmp_path / "best.pth"
    path.write_bytes(bytes(range(7, 256)) * 40)  # no format's magic bytes
    for trusted in (False, True):
        with pytest.raises(CheckpointError) as e:
            read_state_dict(path, trusted=trusted)
        msg = str(e.value)
        assert NOT_A_CHECKPOINT in msg and "not a checkpoint (could not be read as torch.save / safetensors / " \
            "TorchScript)" in msg
        assert "trust" not in msg.lower() and "Python objects" not in msg
        with pytest.raises(CheckpointError, match="not a checkpoint"):
            load_weights(create_model("micro"), path, trusted=trusted)


def test_bytes_that_start_like_a_pickle_but_are_not_one_get_no_trust_advice(tmp_path):
    path = tmp_path / "model.pth"
    g = torch.Generator().manual_seed(0)
    path.write_bytes(b"\x80\x02" + bytes(torch.randint(0, 256, (4000,), generator=g, dtype=torch.uint8).tolist()))
    for trusted in (False, True):
        with pytest.raises(CheckpointError, match="not a checkpoint") as e:
            read_state_dict(path, trusted=trusted)
        assert "--trust-pickle" not in str(e.value)


def test_empty_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\).*not a checkpoint"):
        read_state_dict(path)


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_a_real_pickle_of_python_objects_gets_the_trust_advice_and_loads_when_trusted(tmp_path, zipfile_format):
    weights = create_model("micro").state_dict()
    path = tmp_path / "best.pth"
    torch.save({"model": weights, "args": argparse.Namespace(lr=1e-5)}, path,  # IRRA-style: args saved with it
               _use_new_zipfile_serialization=zipfile_format)
    with pytest.raises(CheckpointError, match="holds Python objects besides tensors") as e:
        read_state_dict(path)
    assert "--trust-pickle" in str(e.value) and "not a checkpoint" not in str(e.value)
    loaded = read_state_dict(path, trusted=True)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_a_safetensors_file_is_recognised_by_its_bytes_not_its_name(tmp_path):
    weights = create_model("micro").state_dict()
    path = tmp_path / "weights.bin"  # misnamed: safetensors content
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    loaded = read_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


# --------------------------------------------------------------------------------------------
# HF CLIPModel whose EOS is not the highest token id: pooled differently, so warned about


def _hf_clip(tmp_path, eos_token_id):
    config = CLIPConfig(
        text_config={"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                     "num_hidden_layers": 1, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": eos_token_id,
                     "pad_token_id": 0},
        vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_attention_heads": 2, "num_hidden_layers": 1},
        projection_dim=16)
    torch.manual_seed(0)
    hf = _perturbed(CLIPModel(config)).eval()
    hf.save_pretrained(tmp_path / f"hf_eos{eos_token_id}")
    return hf, tmp_path / f"hf_eos{eos_token_id}"


def _hf_text(hf, ids):
    out = hf.get_text_features(input_ids=ids)
    return getattr(out, "pooler_output", out)  # a tensor in transformers 4, an output in 5


def test_hf_clip_with_eos_below_the_highest_id_warns_what_differs_and_what_to_do(tmp_path, caplog):
    hf, folder = _hf_clip(tmp_path, eos_token_id=50)
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        model = model_from_hf_clip(folder).eval()
    warnings = [r for r in caplog.records if r.name == "kd_trainer" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "eos_token_id (50)" in msg and "highest token id" in msg  # what differs
    assert "above 50" in msg and "tokenizer whose EOS is the highest id" in msg  # when, and what to do

    # The warning is true: with a token above EOS the embeddings differ, without one they agree.
    ids = torch.tensor([[3, 7, 12, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        [3, 80, 12, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        ours, theirs = model.encode_text(ids, normalize=False), _hf_text(hf, ids)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    assert (ours[1] - theirs[1]).abs().max() > 1e-2


def test_hf_clip_with_eos_the_highest_id_loads_without_warning(tmp_path, caplog):
    _, folder = _hf_clip(tmp_path, eos_token_id=99)
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        model_from_hf_clip(folder)
    assert not [r for r in caplog.records if r.name == "kd_trainer" and r.levelno >= logging.WARNING]


@pytest.mark.slow
def test_a_real_run_with_projections_is_continued_from(tmp_path):
    """Issue 13.2 end to end: a micro student (embed 32) distilled with motis from a 128-wide teacher trains
    image_proj/text_proj; a second recipe continues from that run folder with its projections."""
    data = tmp_path / "data"
    make_synth_pedes(data / "SynthPEDES", num_identities=8, images_per_identity=(2, 2), image_size=(64, 32), seed=0)

    def recipe(name, student):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "seed": 0,
            "data": {"name": "synth_pedes", "root": str(data), "image_size": [32, 16], "context_length": 32},
            "student": student, "teacher": {"arch": "tiny-teacher"},
            "loss": {"terms": [{"name": "motis"}]},
            "training": {"output_dir": str(tmp_path / name), "max_steps": 2, "per_device_train_batch_size": 8,
                         "learning_rate": 1e-3, "report_to": "none", "disable_tqdm": True, "use_cpu": True}}))
        return load_recipe(path)

    run(recipe("first", {"arch": "micro"}))
    first = tmp_path / "first"
    saved = safetensors.torch.load_file(str(first / "model.safetensors"))
    assert saved["image_proj.weight"].shape == (128, 32)  # the training weights hold the projections
    assert (first / WEIGHTS_FILE).is_file()  # and the export sits beside them, without

    run(recipe("second", {"arch": "micro", "checkpoint": str(first)}))
    assert load_model(tmp_path / "second").image_proj.out_features == 128

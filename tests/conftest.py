"""Fixtures shared by the test modules (the builders themselves live in ``tests/tiny.py``)."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from tiny import batch_items as _batch_items
from tiny import micro_pair as _micro_pair


@pytest.fixture
def tiny_pair():
    """(student, teacher): two ``micro`` dual encoders with different seeds."""
    return _micro_pair()


@pytest.fixture
def tiny_batch():
    """Eight retrieval items (32x16 images, two captions per pid)."""
    return _batch_items(8)


@pytest.fixture
def tiny_args(tmp_path):
    """TrainingArguments for a few deterministic CPU steps; keyword overrides are applied."""
    def make(**kw):
        base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                    learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    report_to="none", save_strategy="no", logging_steps=1, seed=0, remove_unused_columns=False,
                    use_cpu=True, disable_tqdm=True)
        return TrainingArguments(**{**base, **kw})
    return make


@pytest.fixture
def one_torch_thread():
    """ResNets on 2 busy cores: OpenMP spin-waiting makes 2 threads far slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    """A retrieval model eval and export-onnx can load: an open_clip folder of ``micro`` (seed 0)."""
    from kd_trainer.models.export import export_open_clip
    from kd_trainer.models.factory import create_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("micro") / "micro"
    export_open_clip(create_model("micro"), folder)
    return folder

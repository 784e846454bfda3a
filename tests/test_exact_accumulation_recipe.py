"""`contrastive_accumulation: exact` through a recipe: k micro-batches of b end where one batch of k*b does,
and plain accumulation does not (so the comparison can fail)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kd_trainer.recipe import RecipeError, parse_recipe
from kd_trainer.runner import run


def _recipe(tmp_path, name: str, **training):
    return parse_recipe({
        "name": name, "seed": 3,
        "data": {"name": "synth_pedes", "root": str(tmp_path / "data"), "image_size": [32, 16],
                 "context_length": 64, "test_split": None,
                 "synth": {"num_identities": 24, "images_per_identity": [3, 4], "image_size": [48, 24]}},
        "student": {"arch": "micro"},
        "loss": {"terms": [{"name": "itc", "temperature": 0.05}, {"name": "sdm", "temperature": 0.05}]},
        "training": {"output_dir": str(tmp_path / name), "max_steps": 2, "learning_rate": 0.05, "optim": "sgd",
                     "lr_scheduler_type": "constant", "eval_strategy": "no", "save_strategy": "no",
                     "disable_tqdm": True, "report_to": "none", **training},
        **({"contrastive_accumulation": "exact"} if name == "exact" else {}),
    })


@pytest.mark.slow
def test_exact_accumulation_equals_one_big_batch(tmp_path):
    def weights(name: str, **training) -> dict[str, torch.Tensor]:
        run(_recipe(tmp_path, name, **training))
        return load_file(str(tmp_path / name / "model.safetensors"))

    big = weights("big", per_device_train_batch_size=8)
    exact = weights("exact", per_device_train_batch_size=2, gradient_accumulation_steps=4)
    plain = weights("plain", per_device_train_batch_size=2, gradient_accumulation_steps=4)
    for k, v in big.items():
        torch.testing.assert_close(exact[k], v, atol=1e-5, rtol=1e-4, msg=k)
    assert max((plain[k] - v).abs().max().item() for k, v in big.items()) > 1e-4


def test_exact_accumulation_with_mimic_jobs_is_refused(tmp_path):
    raw = _recipe(tmp_path, "exact").model_dump(mode="json")
    raw.update(teacher={"arch": "micro"}, mimic={"jobs": [{"loss": {"type": "l2"}, "teachers": {
        "teacher": ["clip.visual"]}, "student": ["clip.visual"]}]})
    with pytest.raises(RecipeError, match="cannot be combined with mimic"):
        parse_recipe(raw)

"""A dataset with no val records trains when evaluation is off (issue 24): the split evaluated during
training is read only when the Trainer evaluates; with evaluation on, its absence is still refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_trainer.cli import main
from kd_trainer.distill.resolved import resolve_run
from kd_trainer.recipe import load_recipe
from kd_trainer.runner.retrieval import prepare_data
from kd_trainer.synthetic.pedes import make_synth_pedes


@pytest.fixture(scope="module")
def no_val(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("no_val")
    make_synth_pedes(root / "SynthPEDES", num_identities=10, images_per_identity=(2, 2), image_size=(32, 16),
                     split_identities=(0.6, 0.0, 0.4), seed=0)
    return root


def _recipe(tmp_path: Path, root: Path, **training) -> Path:
    recipe = {"name": "no_val", "seed": 0,
              "data": {"name": "synth_pedes", "root": str(root), "image_size": [32, 16], "context_length": 16},
              "student": {"arch": "micro"}, "loss": {"terms": [{"name": "itc"}]},
              "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 4,
                           "use_cpu": True, "report_to": "none", "disable_tqdm": True, **training}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_eval_split_is_loaded_only_when_evaluating(tmp_path, no_val):
    data = prepare_data(resolve_run(load_recipe(_recipe(tmp_path, no_val))))
    assert set(data.splits) == {"train", "test_gallery", "test_queries"}
    with pytest.raises(ValueError, match=r"the val \(gallery/queries\) split is empty: no record in the file has "
                                         r"split 'val'"):
        prepare_data(resolve_run(load_recipe(_recipe(tmp_path, no_val, eval_strategy="epoch"))))


@pytest.mark.slow
def test_a_run_without_val_records_trains_and_tests_with_evaluation_off(tmp_path, no_val, capsys):
    main(["train", str(_recipe(tmp_path, no_val))])  # today: refused, "the val split is empty"
    assert (tmp_path / "out" / "test_results.json").is_file()

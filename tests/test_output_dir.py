"""A run never replaces another run's folder by mistake: an output_dir that holds an earlier run's
weights, state, results or checkpoints is refused before anything is loaded (one line, exit 2),
unless the run resumes it or says ``training.overwrite_output_dir: true``. Also: pinned memory only
with an accelerator (without one torch warns on every DataLoader)."""

from __future__ import annotations

import logging

import pytest
import yaml

from kd_trainer.cli import main
from kd_trainer.distill.resolved import resolve_run
from kd_trainer.recipe import RecipeError, parse_recipe
from kd_trainer.runner.preflight import earlier_run, preflight

# Data that is not there: the check must come before any data or model is loaded.
BASE = {"name": "x", "data": {"name": "synth_pedes", "root": "nowhere"}, "student": {"arch": "micro"},
        "loss": {"terms": [{"name": "itc"}]}, "training": {"max_steps": 1}}


def _recipe(out, **training):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["training"].update(output_dir=str(out), **training)
    return parse_recipe(raw)


@pytest.mark.parametrize("left", ["model.safetensors", "trainer_state.json", "test_results.json", "checkpoint-3/"])
def test_a_folder_with_an_earlier_run_is_refused_and_kept(tmp_path, capsys, left):
    out = tmp_path / "teacher"
    (out / left).parent.mkdir(parents=True, exist_ok=True)
    if left.endswith("/"):
        (out / left).mkdir()
    else:
        (out / left).write_bytes(b"the earlier run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**BASE, "training": {"max_steps": 1, "output_dir": str(out)}}))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit) as e:
        main([str(recipe)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert f"training.output_dir: {out} already holds a run ({left.rstrip('/')})" in err
    for way in ("another training.output_dir", "training.resume_from_checkpoint=true",
                "training.overwrite_output_dir=true"):
        assert way in err
    assert sorted(p.name for p in out.iterdir()) == before, "nothing is written into the folder"
    if not left.endswith("/"):
        assert (out / left).read_bytes() == b"the earlier run"


def test_an_empty_folder_or_one_without_a_run_is_used(tmp_path):
    out = tmp_path / "fresh"
    preflight(resolve_run(_recipe(out)))  # missing: made
    (out / "recipe.yaml").write_text("name: x\n")  # a run that stopped before it saved anything
    assert earlier_run(out) == []
    preflight(resolve_run(_recipe(out)))


def test_resume_or_overwrite_may_write_there(tmp_path, caplog):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"w")
    assert earlier_run(out) == ["model.safetensors", "checkpoint-2"]
    with pytest.raises(RecipeError, match="already holds a run"):
        preflight(resolve_run(_recipe(out)))
    preflight(resolve_run(_recipe(out, resume_from_checkpoint=True)))
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        resolved = resolve_run(_recipe(out, overwrite_output_dir=True))
        preflight(resolved)
    assert resolved.overwrite and resolved.describe()["overwrite_output_dir"] is True
    from kd_trainer.plan_view import format_plan, plan_report

    said = "(replaces a run already there: training.overwrite_output_dir)"
    assert said in format_plan(plan_report(_recipe(out, overwrite_output_dir=True)))
    assert said not in format_plan(plan_report(_recipe(out)))
    assert "replaces the run in" in caplog.text and "model.safetensors, checkpoint-2" in caplog.text
    # kd_trainer's own key: TrainingArguments never sees it.
    assert not hasattr(resolved.args, "overwrite_output_dir")


def test_pinned_memory_only_with_an_accelerator(tmp_path, monkeypatch):
    import torch

    from kd_trainer.distill import resolved as module

    for has in (False, True):
        monkeypatch.setattr(module, "_has_accelerator", lambda has=has: has)
        assert resolve_run(_recipe(tmp_path)).args.dataloader_pin_memory is has
    monkeypatch.setattr(module, "_has_accelerator", lambda: False)
    assert resolve_run(_recipe(tmp_path, dataloader_pin_memory=True)).args.dataloader_pin_memory is True, \
        "the recipe's own setting wins"
    accelerator = getattr(torch, "accelerator", None)
    expected = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    assert module._has_accelerator() is bool(expected)


def test_a_run_folder_is_not_a_checkpoint_to_resume_from(tmp_path):
    """A finished run's folder holds trainer_state.json too; resuming from it would start past the new
    run's end and train nothing. Its checkpoints are named instead, in step order."""
    done = tmp_path / "done"
    for step in (2, 10):
        (done / f"checkpoint-{step}").mkdir(parents=True)
    (done / "trainer_state.json").write_text("{}")
    (done / "test_results.json").write_text("{}")
    with pytest.raises(RecipeError) as e:
        preflight(resolve_run(_recipe(tmp_path / "new", resume_from_checkpoint=str(done))))
    msg = str(e.value)
    assert f"{done} is a run folder, not a checkpoint" in msg
    assert "one of its checkpoint folders (checkpoint-2, checkpoint-10)" in msg
    assert f"training.output_dir={done} training.resume_from_checkpoint=true" in msg
    bare = tmp_path / "bare"  # a run that saved no checkpoint
    bare.mkdir()
    (bare / "trainer_state.json").write_text("{}")
    (bare / "test_results.json").write_text("{}")
    with pytest.raises(RecipeError, match=r"this run saved none: training\.save_strategy"):
        preflight(resolve_run(_recipe(tmp_path / "new", resume_from_checkpoint=str(bare))))
    # One of its checkpoints is accepted.
    (done / "checkpoint-10" / "trainer_state.json").write_text("{}")
    preflight(resolve_run(_recipe(tmp_path / "new", resume_from_checkpoint=str(done / "checkpoint-10"))))


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    from kd_trainer.runner.errors import one_line_errors

    with pytest.raises(SystemExit) as e, one_line_errors():
        raise KeyboardInterrupt
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted (Ctrl-C)") and err.count("\n") == 1 and "Traceback" not in err


def test_plan_notes_a_checkpoint_that_is_not_here(tmp_path):
    from kd_trainer.plan_view import format_plan, plan_report

    raw = {**BASE, "teacher": {"arch": "micro", "checkpoint": str(tmp_path / "gone")}}
    raw["loss"] = {"terms": [{"name": "itc"}, {"name": "cross_kd"}]}
    text = format_plan(plan_report(parse_recipe(raw)))
    assert f"teacher model: micro from {tmp_path / 'gone'} (not found from here: the run refuses it)" in text
    (tmp_path / "gone").mkdir()
    assert "not found from here" not in format_plan(plan_report(parse_recipe(raw)))

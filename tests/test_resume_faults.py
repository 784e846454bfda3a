"""Resume, lock, NaN stop and disk-full faults end in one true line, and nothing is lost (issue 24).

A resumed run refuses a recipe that changed what it trains (unless the change is accepted by
name, and then the record says what changed, at which step); a complete checkpoint with a
corrupt file is named, and `resume_from_checkpoint: true` falls back past it; a checkpoint of
another architecture names both; a lock nobody can read is stale; the NaN stop says whether a
checkpoint was kept; a full disk during a save is one line, with the last complete checkpoint intact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from kd_trainer.distill.core import COMPLETE_MARKER, NonFiniteLossError, last_complete_checkpoint
from kd_trainer.distill.plan import RunPlan
from kd_trainer.distill.retrieval import RetrievalTrainer
from kd_trainer.models.factory import create_model
from kd_trainer.models.loading import CheckpointError
from kd_trainer.recipe import LossConfig, TermConfig
from kd_trainer.runner import main
from kd_trainer.runner.lock import LOCK_FILE, output_lock

from tiny import batch_items, micro_pair

ROOT = Path(__file__).resolve().parent.parent


def _args(out: Path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="linear", report_to="none", save_strategy="steps", save_steps=2, seed=0,
                remove_unused_columns=False, use_cpu=True, disable_tqdm=True, logging_steps=1)
    return TrainingArguments(**{**base, **kw})


def _trainer(out: Path, student: torch.nn.Module | None = None, **kw) -> RetrievalTrainer:
    args = kw.pop("args", None) or _args(out)
    return RetrievalTrainer(model=student if student is not None else micro_pair()[0], args=args,
                            plan=RunPlan.single(LossConfig(terms=[TermConfig(name="itc")])),
                            train_dataset=batch_items(8), **kw)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A 4-step micro run with complete checkpoints at steps 2 and 4 (each test copies it)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    _trainer(out).train()
    return out


@pytest.fixture
def run_copy(saved_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


# --- a complete checkpoint holding a corrupt file ---------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not what this file should hold\xff" * 4)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", _truncate), ("model.safetensors", _garbage), ("optimizer.pt", _truncate),
    ("optimizer.pt", _garbage), ("scheduler.pt", _empty), ("rng_state.pth", _garbage),
    ("trainer_state.json", _truncate),
])
def test_a_corrupt_file_in_a_complete_checkpoint_is_named_in_one_line(run_copy, name, damage):
    checkpoint = run_copy / "checkpoint-4"
    assert (checkpoint / COMPLETE_MARKER).is_file()
    damage(checkpoint / name)
    with pytest.raises(CheckpointError) as e:
        _trainer(run_copy).train(resume_from_checkpoint=str(checkpoint))
    msg = str(e.value)
    assert name in msg and str(checkpoint) in msg and "\n" not in msg, msg


def test_resume_true_falls_back_past_a_corrupt_checkpoint_and_says_so(run_copy, saved_run, caplog):
    _truncate(run_copy / "checkpoint-4" / "optimizer.pt")
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        assert last_complete_checkpoint(str(run_copy)) == str(run_copy / "checkpoint-2")
    assert any("checkpoint-4" in r.message and "optimizer.pt" in r.message for r in caplog.records), caplog.text
    resumed = _trainer(run_copy)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    # Resumed from step 2, it ends where the uninterrupted run ended.
    want = load_file(str(saved_run / "checkpoint-4" / "model.safetensors"))
    got = resumed.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_a_checkpoint_of_another_architecture_names_both(run_copy):
    student = create_model("tiny-student", image_size=(32, 16))
    with pytest.raises(CheckpointError) as e:
        _trainer(run_copy, student=student).train(resume_from_checkpoint=str(run_copy / "checkpoint-2"))
    msg = str(e.value)
    assert "micro" in msg and "tiny-student" in msg and "checkpoint-2" in msg, msg


# --- the NaN stop says what is true -----------------------------------------------------------

class _PoisonAfterSave(TrainerCallback):
    """Weights become NaN right after the checkpoint of ``step`` is saved: the next loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            with torch.no_grad():
                model.clip.visual.proj.fill_(float("nan"))


def test_the_nan_stop_names_the_checkpoint_it_kept(tmp_path):
    trainer = _trainer(tmp_path / "run", callbacks=[_PoisonAfterSave(2)])
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    assert "step 2" in msg and str(tmp_path / "run" / "checkpoint-2") in msg, msg


def test_the_nan_stop_without_a_checkpoint_says_none_was_kept(tmp_path):
    student, _ = micro_pair()
    with torch.no_grad():
        student.clip.visual.proj.fill_(float("nan"))
    trainer = _trainer(tmp_path / "run", student=student, args=_args(tmp_path / "run", save_strategy="no"))
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    assert "last checkpoint holds" not in msg and "no checkpoint" in msg, msg


# --- the output folder's lock -----------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"{\"pid\": 12", b"\xff\xfe not json"])
def test_an_empty_or_unreadable_lock_is_stale_and_taken_over_with_a_warning(tmp_path, content, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="kd_trainer"):
        with output_lock(str(out)):
            assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()
    assert any(LOCK_FILE in r.message and "stale" in r.message for r in caplog.records), caplog.text


# --- whole runs: recipe changes on resume, a full disk ----------------------------------------

def _recipe(folder: Path, out: Path, data: Path) -> Path:
    path = folder / "r.yaml"
    path.write_text(textwrap.dedent(f"""
        name: r
        seed: 0
        data: {{name: synth_pedes, root: {data}, image_size: [32, 16], context_length: 16, test_split: null,
               synth: {{num_identities: 8, images_per_identity: [2, 2], image_size: [32, 16]}}}}
        student: {{arch: micro}}
        loss: {{terms: [{{name: itc}}]}}
        training: {{output_dir: {out}, max_steps: 4, per_device_train_batch_size: 4, learning_rate: 0.001,
                   save_strategy: steps, save_steps: 2, report_to: none, disable_tqdm: true, use_cpu: true,
                   logging_steps: 1}}
    """))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Where the runs' recipe generates its tiny SynthPEDES (once; later runs reuse it)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root) -> tuple[Path, Path]:
    """(recipe, output folder) of a finished 4-step run with checkpoints at steps 2 and 4."""
    work = tmp_path_factory.mktemp("finished")
    path = _recipe(work, work / "out", data_root)
    main([str(path)])
    return path, work / "out"


@pytest.fixture
def resumable(finished_run, tmp_path) -> tuple[Path, Path]:
    path, out = finished_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return path, copy


def _resume(path: Path, out: Path, *overrides: str) -> None:
    main([str(path), f"training.output_dir={out}", f"training.resume_from_checkpoint={out / 'checkpoint-2'}",
          *overrides])


@pytest.mark.slow
def test_resuming_with_a_changed_recipe_is_refused_listing_the_keys(resumable, capsys):
    path, out = resumable
    before = (out / "recipe.yaml").read_text()
    with pytest.raises(SystemExit) as e:
        _resume(path, out, "training.learning_rate=0.01", "loss.terms.0.temperature=0.5")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "training.learning_rate" in err[0] and "loss.terms.0.temperature" in err[0], err
    assert "resume_changes" in err[0], err  # how to accept them
    assert (out / "recipe.yaml").read_text() == before  # the record is untouched


@pytest.mark.slow
def test_resuming_with_only_bookkeeping_changes_runs_and_keeps_the_record(resumable):
    path, out = resumable
    before = (out / "recipe.yaml").read_text()
    _resume(path, out, "training.logging_steps=2")
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "recipe.yaml").read_text() == before


@pytest.mark.slow
def test_an_accepted_change_is_recorded_and_the_recipe_record_is_not_rewritten(resumable):
    path, out = resumable
    before = (out / "recipe.yaml").read_text()
    _resume(path, out, "training.max_steps=6", "resume_changes=[training.max_steps]")
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    # recipe.yaml still says what the run started with; the change, and from which step, is recorded beside it.
    assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["max_steps"] == 4
    assert (out / "recipe.yaml").read_text() == before
    resumes = json.loads((out / "resumes.json").read_text())
    assert resumes[-1]["step"] == 2 and resumes[-1]["checkpoint"] == str(out / "checkpoint-2")
    assert resumes[-1]["changed"] == {"training.max_steps": {"was": 4, "now": 6}}, resumes


def _disk_full_at_step(monkeypatch, step: int, how: str) -> None:
    """Make the optimizer save of ``step`` fail the way a full disk fails it."""
    import transformers.trainer as hf_trainer

    real_save = hf_trainer.torch.save

    def save(obj, f, *a, **kw):
        if os.path.basename(str(f)) == "optimizer.pt" and f"checkpoint-{step}" in str(f):
            Path(f).write_bytes(b"\x00" * 100)  # a partial file, as a full disk leaves
            if how == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            # torch's zip writer reports a short write without errno; the disk has nothing left
            monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 283008 vs 282900")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(hf_trainer.torch, "save", save)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["oserror", "short_write"])
def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(tmp_path, monkeypatch, capsys, data_root, how):
    out = tmp_path / "out"
    path = _recipe(tmp_path, out, data_root)
    _disk_full_at_step(monkeypatch, 4, how)
    with pytest.raises(SystemExit) as e:
        main([str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk" in err[0] and "checkpoint-2" in err[0], err
    # The last complete checkpoint is intact; the half-written one is never resumed from.
    assert (out / "checkpoint-2" / COMPLETE_MARKER).is_file()
    assert not (out / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")


# --- under accelerate launch ------------------------------------------------------------------

@pytest.mark.slow
def test_a_bad_input_under_accelerate_launch_is_each_ranks_line_and_the_launchers_exit_1(tmp_path):
    """Each rank prints its one line and exits 2; the launcher exits 1, and with --quiet it prints
    torch's failure summary, naming that line as the root cause, without its own traceback."""
    path = _recipe(tmp_path, tmp_path / "out", tmp_path / "data")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "--quiet", "--config_file", "recipes/accelerate/cpu_2proc.yaml",
                           "kd_trainer/run.py", str(path), "training.learning_rat=0.1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    before_summary = proc.stderr.split("FAILED")[0]
    assert before_summary.count("error: Invalid recipe") == 2, proc.stderr[-3000:]  # each rank's own message
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert "exitcode  : 2" in root_cause and "error: " in root_cause and "learning_rat" in root_cause, root_cause

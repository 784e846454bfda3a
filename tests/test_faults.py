"""Faults during a run end in one clear message, and nothing bad is kept or shipped (issue 13):
non-finite losses, a save killed half-way, two runs in one folder, an unwritable folder, a bad
resume path, a push that cannot happen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_trainer.distill.core import COMPLETE_MARKER, NonFiniteLossError, last_complete_checkpoint
from kd_trainer.distill.resolved import resolve_run
from kd_trainer.distill.retrieval import RetrievalTrainer
from kd_trainer.recipe import RecipeError, TermConfig, parse_recipe
from kd_trainer.runner.errors import RunFault
from kd_trainer.runner.export import export_student
from kd_trainer.runner.lock import LOCK_FILE, output_lock
from kd_trainer.runner.preflight import preflight

from tiny import batch_items, plan_of

ROOT = Path(__file__).resolve().parent.parent


def _poison(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.clip.visual.proj.fill_(float("nan"))


def test_nonfinite_loss_stops_naming_term_and_step(tiny_pair, tiny_args):
    student, _ = tiny_pair
    _poison(student)
    trainer = RetrievalTrainer(model=student, args=tiny_args(), plan=plan_of([TermConfig(name="itc")]),
                               train_dataset=batch_items(8))
    with pytest.raises(NonFiniteLossError, match=r"step 0.*'itc'"):
        trainer.train()


def test_nonfinite_skips_leave_the_weights_alone_then_stop(tiny_pair, tiny_args):
    student, _ = tiny_pair
    _poison(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = RetrievalTrainer(model=student, args=tiny_args(max_steps=3), plan=plan_of([TermConfig(name="itc")]),
                               train_dataset=batch_items(8), max_nonfinite_skips=2)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        trainer.train()
    assert trainer.nonfinite_skipped == 2
    after = student.state_dict()
    # Skipped steps give no gradient: every finite weight is exactly where it was.
    for k, v in before.items():
        finite = torch.isfinite(v)
        assert torch.equal(after[k][finite], v[finite]), k


def test_nonfinite_weights_are_never_exported(tmp_path, tiny_pair, tiny_args):
    student, _ = tiny_pair
    _poison(student)
    recipe = parse_recipe({"name": "x", "data": {"name": "synth_pedes"}, "student": {"arch": "micro"},
                           "loss": {"terms": [{"name": "itc"}]}, "training": {"output_dir": str(tmp_path / "o")}})
    trainer = RetrievalTrainer(model=student, args=tiny_args(output_dir=str(tmp_path / "o")),
                               plan=plan_of([TermConfig(name="itc")]),
                               train_dataset=batch_items(8))
    with pytest.raises(RunFault, match="non-finite weights"):
        export_student(trainer, resolve_run(recipe))
    assert not (tmp_path / "o" / "open_clip_model.safetensors").exists()


# --- a save killed half-way -------------------------------------------------------------------

_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from transformers import TrainingArguments
    from kd_trainer.distill.retrieval import RetrievalTrainer
    from kd_trainer.recipe import TermConfig
    from tiny import batch_items, micro_pair, plan_of

    class KilledDuringSave(RetrievalTrainer):
        def _save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)  # the model file is written, the rest is not
            super()._save_optimizer_and_scheduler(output_dir)

    student, teacher = micro_pair()
    args = TrainingArguments(output_dir={out!r}, per_device_train_batch_size=4, max_steps=6, learning_rate=0.1,
                             optim="sgd", lr_scheduler_type="constant", report_to="none", save_strategy="steps",
                             save_steps=2, seed=0, remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    KilledDuringSave(model=student, args=args, plan=plan_of([TermConfig(name="itc"), TermConfig(name="cross_kd")]),
                     teacher=teacher, train_dataset=batch_items(8)).train()
""")


def _trainer(out: Path, **kw):
    from transformers import TrainingArguments

    from tiny import micro_pair

    student, teacher = micro_pair()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=0.1,
                             optim="sgd", lr_scheduler_type="constant", report_to="none", save_strategy="steps",
                             save_steps=2, seed=0, remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    terms = [TermConfig(name="itc"), TermConfig(name="cross_kd")]
    return RetrievalTrainer(model=student, args=args, plan=plan_of(terms), teacher=teacher,
                            train_dataset=batch_items(8), **kw)


@pytest.mark.slow
def test_resume_true_after_a_kill_during_save_matches_an_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "full")
    full.train()
    expected = {k: v.clone() for k, v in full.model.state_dict().items()}

    out = tmp_path / "killed"
    script = _KILLED_RUN.format(tests=str(ROOT / "tests"), kill_at=4, out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")

    resumed = _trainer(out)
    resumed.train(resume_from_checkpoint=True)
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    weights = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    assert torch.equal(weights["clip.visual.proj"], expected["clip.visual.proj"])


def test_resume_true_without_a_complete_checkpoint_is_a_recipe_error(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()  # a save that never finished
    with pytest.raises(RecipeError, match="no complete checkpoint"):
        last_complete_checkpoint(str(tmp_path))


# --- the output folder ------------------------------------------------------------------------

def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(RunFault, match=rf"in use by another run \(process {sleeper.pid}.*delete"):
            with output_lock(str(out)):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone: its lock is stale, taken over, and released at the end.
    with output_lock(str(out)):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_preflight_lists_every_problem_with_its_key(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = parse_recipe({
        "name": "x", "data": {"name": "synth_pedes"}, "student": {"arch": "micro"},
        "loss": {"terms": [{"name": "itc"}]},
        "training": {"output_dir": str(blocker / "run"), "resume_from_checkpoint": str(tmp_path / "nowhere"),
                     "push_to_hub": True, "hub_model_id": "me/student", "hub_token": "hf_x"},
    })
    with pytest.raises(RecipeError) as e:
        preflight(resolve_run(recipe))
    msg = str(e.value)
    assert "training.output_dir" in msg and "not writable" in msg
    assert "training.resume_from_checkpoint" in msg and "nowhere" in msg
    assert "training.push_to_hub" in msg and "HF_HUB_OFFLINE" in msg


def test_cli_reports_a_busy_output_dir_in_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: busy
        data: {{name: synth_pedes, root: {tmp_path / 'data'}}}
        student: {{arch: micro}}
        loss: {{terms: [{{name: itc}}]}}
        training: {{output_dir: {out}, max_steps: 1}}
    """))
    proc = subprocess.run([sys.executable, "-m", "kd_trainer", str(recipe)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "in use by another run" in proc.stderr and "Traceback" not in proc.stderr

"""What a run checks before it loads any data or model, so it fails in seconds, not after an epoch."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import get_token

from kd_trainer.distill.resolved import ResolvedRun
from kd_trainer.recipe import RecipeError

__all__ = ["preflight"]


def preflight(run: ResolvedRun) -> None:
    """What can be checked before any data or model is loaded: the output folder is writable, a
    resume path is a checkpoint, and a push has a token and a network to go to. All problems are
    reported together, each with its key."""
    problems = []
    out = Path(run.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kd_trainer.write-test.{os.getpid()}"  # one per process: they probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        problems.append(f"training.output_dir: {out} is not writable ({e.strerror or e})")
    resume = run.resume
    if isinstance(resume, str) and resume:
        path = Path(resume)
        if not path.is_dir():
            problems.append(f"training.resume_from_checkpoint: {resume} is not a folder (expected a checkpoint-N "
                            "folder written by an earlier run of this recipe, or true for the latest one)")
        elif not (path / "trainer_state.json").is_file():
            problems.append(f"training.resume_from_checkpoint: {resume} holds no trainer_state.json, so it is not "
                            "a complete checkpoint-N folder")
    if run.hub is not None and run.hub.push:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            problems.append("training.push_to_hub: HF_HUB_OFFLINE is set, so the push at the end would fail; "
                            "unset it, or train without pushing and upload the run folder later")
        if not (run.hub.token or get_token()):
            problems.append("training.push_to_hub: no Hugging Face token (run `huggingface-cli login`, set HF_TOKEN, "
                            "or give training.hub_token)")
    if problems:
        raise RecipeError("the run cannot start:\n  - " + "\n  - ".join(problems))

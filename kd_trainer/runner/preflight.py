"""What a run checks before it loads any data or model, so it fails in seconds, not after an epoch."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import get_token

from kd_trainer.distill.core import checkpoint_folders
from kd_trainer.distill.resolved import ResolvedRun
from kd_trainer.recipe import RecipeError

__all__ = ["preflight", "RUN_MARKERS", "earlier_run"]

logger = logging.getLogger("kd_trainer")

# What a run leaves in its output folder that another run there would replace or mix with.
RUN_MARKERS = ("model.safetensors", "trainer_state.json", "test_results.json", "all_results.json")


def earlier_run(folder: Path) -> list[str]:
    """The names in ``folder`` that show an earlier run wrote there: its weights, state or results,
    or its checkpoint-N folders (empty when there are none)."""
    if not folder.is_dir():
        return []
    return [name for name in RUN_MARKERS if (folder / name).is_file()] + checkpoint_folders(folder)


def preflight(run: ResolvedRun) -> None:
    """What can be checked before any data or model is loaded: the output folder holds no earlier
    run (unless the run resumes it or ``training.overwrite_output_dir`` is set) and is writable, a
    resume path is a checkpoint, and a push has a token and a network to go to. All problems are
    reported together, each with its key."""
    problems = []
    out = Path(run.output_dir)
    earlier = earlier_run(out)
    if earlier and not run.resume and not run.overwrite:
        shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        problems.append(f"training.output_dir: {out} already holds a run ({shown}); give this run another "
                        "training.output_dir, continue that run with training.resume_from_checkpoint=true, or "
                        "replace it with training.overwrite_output_dir=true")
    elif earlier and run.overwrite and not run.resume:
        logger.warning("training.overwrite_output_dir: this run replaces the run in %s (%s)", out, ", ".join(earlier))
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
        elif (path / "test_results.json").is_file() or checkpoint_folders(path):
            inside = checkpoint_folders(path)
            which = (f"one of its checkpoint folders ({', '.join(inside[-3:])})" if inside else
                     "a checkpoint-N folder (this run saved none: training.save_strategy)")
            problems.append(f"training.resume_from_checkpoint: {resume} is a run folder, not a checkpoint; give "
                            f"{which}, or continue that run in its own folder with training.output_dir={resume} "
                            "training.resume_from_checkpoint=true")
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

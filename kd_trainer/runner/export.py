"""How a retrieval student leaves the run: open_clip's Hub layout in output_dir, pushed when asked."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import Trainer

from kd_trainer.distill.resolved import ResolvedRun
from kd_trainer.models.export import ModelCardInfo, export_open_clip, push_export_to_hub
from kd_trainer.models.finite import non_finite_tensors
from kd_trainer.runner.errors import RunFault

__all__ = ["export_student"]

logger = logging.getLogger("kd_trainer")


def export_student(trainer: Trainer, run: ResolvedRun) -> list[Path]:
    """Write the student into ``output_dir`` in open_clip's Hub layout (config, safetensors, model
    card naming the run's teacher) and push that folder when the run's Hub target says so
    (``training.push_to_hub``)."""
    out, hub, spec = trainer.args.output_dir, run.hub, run.teacher.model
    teacher = None
    if spec is not None:
        teacher = spec.arch if isinstance(spec.arch, str) else "custom architecture"
        if spec.checkpoint:
            teacher += f" ({spec.checkpoint})"
    repo_id = hub.repo_id if hub is not None else None
    model = trainer.accelerator.unwrap_model(trainer.model)
    bad = non_finite_tensors(model)  # the one rule eval and export-onnx apply too
    if bad:
        raise RunFault(f"the trained student has non-finite weights ({len(bad)} tensors, e.g. {bad[:3]}); "
                       f"nothing was exported or pushed from {out}")
    card = ModelCardInfo.from_run_dir(out, teacher=teacher, repo_id=repo_id)
    files = export_open_clip(model, out, card=card)
    if hub is not None and hub.push:
        try:
            url = push_export_to_hub(out, repo_id, token=hub.token, private=hub.private, revision=hub.revision)
        except Exception as e:  # network, token, permissions: the exported folder is complete either way
            raise RunFault(f"the run finished and {out} holds the exported student, but pushing it to "
                           f"{repo_id!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                           f"Push it later with: huggingface-cli upload {repo_id} {out}") from None
        logger.info("pushed %s to %s", out, url)
    return files

"""May a run resume from its checkpoint with this recipe, and what does its record say?

A resumed run takes its weights, optimizer, LR-scheduler state and data position from the
checkpoint, and everything else from the recipe it is started with. When that recipe changed a
key that shapes training since the run's ``recipe.yaml`` was written, the run would mix the two
(the saved LR schedule with a new learning rate, say) while a rewritten ``recipe.yaml`` claimed
the new value. So such a change is refused, listing the keys, unless ``resume_changes`` names
them; ``recipe.yaml`` always keeps the recipe the run started with, and each resume is appended
to ``resumes.json``: its step, its checkpoint and every accepted change (was, now).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from kd_trainer.recipe import Recipe, RecipeError, dump_recipe, parse_recipe

__all__ = ["BOOKKEEPING_KEYS", "RECIPE_FILE", "RESUMES_FILE", "changed_keys", "record_recipe", "resume_changes"]

logger = logging.getLogger("kd_trainer")

RECIPE_FILE = "recipe.yaml"
RESUMES_FILE = "resumes.json"

# Keys that say where a run writes, how it logs and reports, and what it does after training;
# they do not change the trained weights, so a resume may change them freely.
BOOKKEEPING_KEYS = frozenset({
    "name", "method", "resume_changes", "data.test_split",
    *(f"training.{k}" for k in (
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "run_name", "project", "trackio_space_id",
        "report_to", "disable_tqdm", "logging_dir", "logging_strategy", "logging_steps", "logging_first_step",
        "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node", "save_strategy",
        "save_steps", "save_total_limit", "save_on_each_node", "save_only_model", "per_device_eval_batch_size",
        "eval_accumulation_steps", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_prefetch_factor",
        "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "hub_revision", "hub_strategy",
        "hub_always_push")),
})


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a.b.0.c': leaf}``: mappings and lists of mappings by key and index; other lists are leaves."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every key whose value differs (``{'was', 'now'}``, None where a side lacks it), bookkeeping aside."""
    a, b = _flat(saved), _flat(now)
    return {k: {"was": a.get(k), "now": b.get(k)} for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in BOOKKEEPING_KEYS}


def _accepted(key: str, accepted: list[str]) -> bool:
    return any(a == "*" or key == a or key.startswith(a + ".") for a in accepted)


def _saved_recipe(out: Path, checkpoint: Path) -> tuple[Path, str] | None:
    """The ``recipe.yaml`` of the run that wrote ``checkpoint`` (beside it), else of ``out``."""
    for folder in dict.fromkeys((checkpoint.resolve().parent, out.resolve())):
        path = folder / RECIPE_FILE
        if path.is_file():
            return path, path.read_text()
    return None


def _as_saved(text: str, path: Path) -> dict[str, Any]:
    """A saved recipe as plain data, with today's defaults filled in where it still parses."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"training.resume_from_checkpoint: {path} cannot be read ({e}), so this recipe cannot be "
                          "checked against the one the run started with; restore it, or accept any change with "
                          "resume_changes='[\"*\"]'") from None
    try:
        return parse_recipe(raw, str(path)).model_dump(mode="json")
    except RecipeError:
        return raw if isinstance(raw, dict) else {}


def resume_changes(recipe: Recipe, out: str, checkpoint: str) -> dict[str, dict[str, Any]]:
    """The changes since the run's saved recipe that ``resume_changes`` accepts; a change to a key
    that shapes training that it does not accept is refused (:class:`RecipeError`, every key listed)."""
    saved = _saved_recipe(Path(out), Path(checkpoint))
    if saved is None:
        logger.warning("no %s beside %s: this recipe cannot be checked against the one the run started with",
                       RECIPE_FILE, checkpoint)
        return {}
    path, text = saved
    changes = changed_keys(_as_saved(text, path), recipe.model_dump(mode="json"))
    refused = [k for k in changes if not _accepted(k, recipe.resume_changes)]
    unused = [a for a in recipe.resume_changes if a != "*" and not any(_accepted(k, [a]) for k in changes)]
    if unused:
        logger.warning("resume_changes names %s, which did not change since %s", unused, path)
    if refused:
        listed = ", ".join(f"{k} ({changes[k]['was']!r} -> {changes[k]['now']!r})" for k in refused)
        raise RecipeError(
            f"training.resume_from_checkpoint: the recipe changed since {path} was written, in keys that shape "
            f"training: {listed}. A resumed run takes its weights, optimizer and LR-scheduler state from "
            f"{checkpoint} and the rest from this recipe, so it would mix the two. Resume with the recipe as it "
            "was, start a new run (another training.output_dir; student.checkpoint to start from these weights), "
            f"or accept the changes: resume_changes='[{', '.join(refused)}]'")
    return changes


def record_recipe(recipe: Recipe, out: str, checkpoint: str | None, changes: dict[str, dict[str, Any]]) -> None:
    """Write what the run does: a fresh run's recipe as ``recipe.yaml``; a resumed run keeps the
    recipe it started with there and appends this resume (step, checkpoint, accepted changes) to
    ``resumes.json``."""
    folder = Path(out)
    if checkpoint is None:
        (folder / RECIPE_FILE).write_text(dump_recipe(recipe))
        return
    saved = _saved_recipe(folder, Path(checkpoint))
    if not (folder / RECIPE_FILE).is_file() or (saved is not None and saved[0].parent != folder.resolve()):
        # Resumed into another folder: it records the recipe the checkpoint's run started with.
        (folder / RECIPE_FILE).write_text(saved[1] if saved is not None else dump_recipe(recipe))
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    entry = {"step": state.get("global_step"), "checkpoint": str(checkpoint), "changed": changes}
    log = folder / RESUMES_FILE
    history = json.loads(log.read_text()) if log.is_file() else []
    log.write_text(json.dumps([*history, entry], indent=2))
    if changes:
        logger.warning("resuming at step %s with accepted changes %s (recorded in %s; %s keeps the recipe the run "
                       "started with). The optimizer and LR-scheduler state, base learning rates included, come "
                       "from the checkpoint", entry["step"], ", ".join(changes), log, RECIPE_FILE)

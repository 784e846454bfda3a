"""The strict rules: every checkpoint key is loaded, or explained by a named rule, or the load stops.

The original research code printed mismatched keys and carried on; here every key is accounted
for in a :class:`LoadReport`. The rules any :class:`~.source.Source` goes through, in order:

- keys its format module dropped (IRRA's heads, OpenAI's TorchScript metadata, Hugging Face's
  ``position_ids``), each with the rule's text;
- a patch stride other than the patch size (IRRA's ``stride_size``) is set on the model;
- kd_trainer's training-only ``image_proj``/``text_proj``/``mimic_head`` tensors are dropped when the
  model has none (e.g. a student reused as a teacher);
- tensors the format lacks by design are filled (IRRA's ``logit_scale`` from its temperature);
- position embeddings that differ only in length are resized (:mod:`.positions`): for every format
  but kd_trainer's own, whose checkpoints were trained at the recipe's size, so a different size is
  more likely a recipe mistake than an intent;
- anything else missing, unexpected or reshaped stops the load with a :class:`CheckpointError`
  naming the keys and both shapes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kd_trainer.models.factory import RetrievalModel
from kd_trainer.models.loading.errors import CheckpointError
from kd_trainer.models.loading.positions import resize_text_positions, resize_visual_positions
from kd_trainer.models.loading.source import KD_TRAINER, Source, count_blocks
from kd_trainer.models.loading.stride import apply_irra_stride

logger = logging.getLogger("kd_trainer")

PROJECTION_PREFIXES = ("image_proj.", "text_proj.", "mimic_head.")  # training-only: projections, mimic adapters
RULE_PROJECTION = "training-only projection or mimic adapter tensors"

VISUAL_POS = "clip.visual.positional_embedding"
TEXT_POS = "clip.positional_embedding"


@dataclass
class LoadReport:
    """What a load did with every key: loaded, or explained by a named rule (``rules[key]``)."""

    source: str
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)  # checkpoint keys explained by a rule and not loaded
    format: str = KD_TRAINER  # the detected checkpoint format (see kd_trainer.models.loading.detect)
    resized: list[str] = field(default_factory=list)  # model keys whose checkpoint tensor a rule resized
    filled: list[str] = field(default_factory=list)  # model keys absent from the checkpoint, set by a rule
    rules: dict[str, str] = field(default_factory=dict)  # key -> the rule that explained it
    notes: list[str] = field(default_factory=list)  # changes made to the model itself (e.g. patch stride)

    @property
    def ignored(self) -> list[str]:
        """Alias of :attr:`dropped`: checkpoint keys a rule explained and left out."""
        return self.dropped

    def summary(self) -> str:
        """One line per kind of event, each naming the rule, so a log shows why keys moved."""
        s = f"loaded {self.loaded} tensors from {self.source} ({self.format})"
        by_rule: dict[str, list[str]] = {}
        for k in self.dropped:
            by_rule.setdefault(self.rules.get(k, "training-only projection tensors"), []).append(k)
        for rule, keys in by_rule.items():
            s += f"; dropped {len(keys)} {rule} ({show_keys(keys, 6)})"
        for k in self.resized:
            s += f"; resized {k}: {self.rules.get(k, '')}"
        for k in self.filled:
            s += f"; filled {k}: {self.rules.get(k, '')}"
        for note in self.notes:
            s += f"; {note}"
        return s


def show_keys(keys: list[str], n: int = 12) -> str:
    """The first ``n`` keys, and how many more, for a message that stays readable."""
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_source(model: RetrievalModel, src: Source, resize_positions: bool | None = None) -> LoadReport:
    """Apply the rules to a read source, check every key, and load into ``model`` (in place).

    ``resize_positions``: resize position embeddings that differ in length (default: for every
    format but kd_trainer's own)."""
    report = LoadReport(source=str(src.path), format=src.format, notes=list(src.notes))
    for k, rule in src.dropped.items():
        report.dropped.append(k)
        report.rules[k] = rule
    if src.stride_size is not None:
        report.notes += apply_irra_stride(model, src.stride_size)
    sd = src.model_keys
    expected = model.state_dict()
    _drop_projections(sd, expected, report)
    _fill(sd, expected, src, report)
    if resize_positions if resize_positions is not None else src.format != KD_TRAINER:
        _resize_positions(model, sd, expected, src, report)
    _check_strict(model, sd, expected, src.path)
    model.load_state_dict(sd, strict=True)
    report.loaded = len(sd)
    logger.info(report.summary())
    return report


def _drop_projections(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], report: LoadReport) -> None:
    """A student's image_proj/text_proj map into its teacher's space during training only; a model built
    without them (e.g. the student reused as a teacher) has no use for them."""
    for k in list(sd):
        if k.startswith(PROJECTION_PREFIXES) and k not in expected:
            report.dropped.append(k)
            report.rules[k] = RULE_PROJECTION
            del sd[k]


def _fill(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], src: Source, report: LoadReport) -> None:
    """Tensors the model has and the format lacks by design, each set by its rule."""
    for k, fill in src.fills.items():
        if k in expected and k not in sd:
            sd[k] = torch.full_like(expected[k], fill.value)
            report.filled.append(k)
            report.rules[k] = fill.rule


def _square_grid(n: int, src: Source) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"{str(src.path)!r}: visual.positional_embedding has {n} grid positions, not a square "
                              "grid, and the checkpoint does not say its image size; load it at its own size.")
    return side, side


def _resize_positions(model: RetrievalModel, sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                      src: Source, report: LoadReport) -> None:
    """Resize position embeddings that differ only in length; any other difference is left to the shape check."""
    pos = sd.get(VISUAL_POS)
    if pos is not None and VISUAL_POS in expected and pos.shape != expected[VISUAL_POS].shape \
            and pos.ndim == 2 and pos.shape[1:] == expected[VISUAL_POS].shape[1:]:
        old = src.visual_grid or _square_grid(pos.shape[0] - 1, src)
        new = tuple(model.clip.visual.grid_size)
        if old[0] * old[1] + 1 == pos.shape[0] and new[0] * new[1] + 1 == expected[VISUAL_POS].shape[0]:
            sd[VISUAL_POS] = resize_visual_positions(pos, old, new)
            report.resized.append(VISUAL_POS)
            report.rules[VISUAL_POS] = (f"visual grid {old[0]}x{old[1]} -> {new[0]}x{new[1]} "
                                        "(bilinear, class token kept)")
    pos = sd.get(TEXT_POS)
    if pos is not None and TEXT_POS in expected and pos.shape != expected[TEXT_POS].shape \
            and pos.ndim == 2 and pos.shape[1:] == expected[TEXT_POS].shape[1:]:
        n = expected[TEXT_POS].shape[0]
        sd[TEXT_POS] = resize_text_positions(pos, n)
        report.resized.append(TEXT_POS)
        how = "truncated" if n < pos.shape[0] else "linear interpolation"
        report.rules[TEXT_POS] = f"text positions {pos.shape[0]} -> {n} ({how})"


def _tower_summary(sd: dict[str, torch.Tensor]) -> str | None:
    """Depth, width and patch of both towers, to say in one line why hundreds of keys differ."""
    conv, ln = sd.get("clip.visual.conv1.weight"), sd.get("clip.ln_final.weight")
    if conv is None or ln is None or conv.ndim != 4:
        return None
    return (f"vision {count_blocks(sd, 'clip.visual.transformer.resblocks.')} layers x {conv.shape[0]} "
            f"(patch {conv.shape[-1]}), text {count_blocks(sd, 'clip.transformer.resblocks.')} layers x {ln.shape[0]}")


def _check_strict(model: RetrievalModel, sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  path: Path) -> None:
    """Every key the rules left must match the model exactly; the error names the rest, with both shapes."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    reshaped = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if not (missing or unexpected or reshaped):
        return
    arch = model.arch if not isinstance(model.arch, dict) else "custom architecture"
    lines = [f"Checkpoint {str(path)!r} does not match the model ({arch!r}):"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {show_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {show_keys(unexpected)}")
    if reshaped:
        lines.append("  wrong shape: " + show_keys([f"{k} checkpoint {tuple(sd[k].shape)} vs model "
                                                     f"{tuple(expected[k].shape)}" for k in reshaped]))
    ours, theirs = _tower_summary(expected), _tower_summary(sd)
    if ours and theirs and ours != theirs:
        lines.append(f"  a different architecture: the checkpoint has {theirs}, the model {ours}.")
    lines.append("Check the architecture and image_size in the recipe against the checkpoint.")
    raise CheckpointError("\n".join(lines))

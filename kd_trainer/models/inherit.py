"""Students initialised from their teacher: weight inheritance across depth and width.

The original research code built its ``CLIP_6L`` students by loading the ViT-B/16 state dict
into the smaller model and dropping, without a word, every key the student lacked: layers
0..n-1 survived, and shape mismatches were printed and ignored. TinyCLIP (Wu et al., ICCV 2023)
made inheritance a method: keep every k-th layer, and keep the first channels of every tensor,
splitting the packed q/k/v projection so that the first heads of each of q, k and v survive.

Here both are rules with names, and every tensor is accounted for:

- **Depth**, per tower (:func:`select_layers`): ``first`` (layers ``0..n-1``, the original's),
  ``uniform`` (TinyCLIP: ``k = N // n``, layers ``0, k, 2k, ...``), ``uniform_last`` (``n`` layers
  evenly spaced from the first to the last, rounded half up), or an explicit list of source layers.
- **Width**: the first channels of the residual stream, MLP and embedding; whole heads for
  attention (the first heads of each of q, k and v, and the matching input columns of the output
  projection), so the head width must match; LayerNorms, class and token embeddings and projections
  cut to the same channels, which keeps the residual stream of the student a slice of the teacher's.
- **Positions**: the visual grid is resized bilinearly (class token kept) when the image size or
  stride differs, the text positions truncated or stretched, with the checkpoint importers'
  functions, then cut to the student's width.
- **Training-only projections and adapters** (``image_proj``/``text_proj``/``mimic_head``, student ->
  teacher space) are inherited when the source has the same ones and keep their initialisation
  otherwise; the source's own, when the student has none, are not inherited.

Anything else (a student tensor no rule fills, a shape a rule cannot produce, a source tensor of a
selected layer the student has no place for, or a different activation or pooling) stops with an
:class:`InheritanceError` listing every such tensor. The :class:`InheritReport` says, per student
tensor, where it came from and what was cut.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from kd_trainer.models.factory import RetrievalModel
from kd_trainer.models.loading.errors import CheckpointError
from kd_trainer.models.loading.positions import resize_text_positions, resize_visual_positions
from kd_trainer.models.loading.rules import PROJECTION_PREFIXES

logger = logging.getLogger("kd_trainer")

__all__ = [
    "SELECTION_RULES",
    "TOWERS",
    "InheritanceError",
    "InheritReport",
    "InheritedTensor",
    "LayerMap",
    "LayerSelection",
    "inherit_weights",
    "plan_inheritance",
    "select_layers",
]

LayerSelection = str | Sequence[int]
SELECTION_RULES = ("first", "uniform", "uniform_last")
# tower -> the state-dict prefix of its transformer blocks
TOWERS = {"vision": "clip.visual.transformer.resblocks.", "text": "clip.transformer.resblocks."}
_BLOCK_KEY = re.compile(r"^(clip\.visual\.transformer\.resblocks\.|clip\.transformer\.resblocks\.)(\d+)\.(.+)$")

RULE_PROJECTION_KEPT = ("training-only projection or adapter (student -> teacher space) the source has no "
                        "counterpart for: keeps its initialisation")
RULE_PROJECTION_UNUSED = "training-only projection or adapter of the source; the student has none"

# Axis kinds. Width axes keep their first channels; fixed axes must match; the rest have their own rule.
_FIXED = ("rgb", "patch", "vocabulary", "projection output")
_GRID, _CTX = "vision grid", "text positions"


def _tower_axes(tower: str) -> dict[str, str]:
    return {"W": f"{tower} width", "MLP": f"{tower} mlp", "QKV": f"{tower} q/k/v", "HEADS": f"{tower} heads"}


# Tensors of one transformer block (open_clip ResidualAttentionBlock), by axis.
_BLOCK_RULES: dict[str, tuple[str, ...]] = {
    "ln_1.weight": ("W",), "ln_1.bias": ("W",),
    "attn.in_proj_weight": ("QKV", "W"), "attn.in_proj_bias": ("QKV",),
    # out_proj's input columns are the heads, concatenated: the first heads are the first columns.
    "attn.out_proj.weight": ("W", "HEADS"), "attn.out_proj.bias": ("W",),
    "ls_1.gamma": ("W",), "ls_2.gamma": ("W",),
    "ln_2.weight": ("W",), "ln_2.bias": ("W",),
    "mlp.c_fc.weight": ("MLP", "W"), "mlp.c_fc.bias": ("MLP",),
    "mlp.c_proj.weight": ("W", "MLP"), "mlp.c_proj.bias": ("W",),
}
_V, _T = _tower_axes("vision"), _tower_axes("text")
# Every other tensor of a ViT open_clip CLIP in a RetrievalModel, by axis.
_GLOBAL_RULES: dict[str, tuple[str, ...]] = {
    "clip.visual.class_embedding": (_V["W"],),
    "clip.visual.positional_embedding": (_GRID, _V["W"]),
    "clip.visual.conv1.weight": (_V["W"], "rgb", "patch", "patch"),
    "clip.visual.ln_pre.weight": (_V["W"],), "clip.visual.ln_pre.bias": (_V["W"],),
    "clip.visual.ln_post.weight": (_V["W"],), "clip.visual.ln_post.bias": (_V["W"],),
    "clip.visual.proj": (_V["W"], "embed"),
    "clip.token_embedding.weight": ("vocabulary", _T["W"]),
    "clip.positional_embedding": (_CTX, _T["W"]),
    "clip.ln_final.weight": (_T["W"],), "clip.ln_final.bias": (_T["W"],),
    "clip.text_projection": (_T["W"], "embed"),
    "clip.logit_scale": (), "clip.logit_bias": (),
    "image_proj.weight": ("projection output", "embed"), "image_proj.bias": ("projection output",),
    "text_proj.weight": ("projection output", "embed"), "text_proj.bias": ("projection output",),
}


class InheritanceError(CheckpointError):
    """A student that cannot be filled from the source by the inheritance rules; the message lists every
    tensor no rule explains, and why."""


# --------------------------------------------------------------------------------------------
# Depth


def select_layers(selection: LayerSelection, source_layers: int, student_layers: int, *,
                  tower: str = "tower") -> list[int]:
    """The source layer each student layer inherits, in student order.

    ``first``: ``0..n-1``. ``uniform`` (TinyCLIP's interval rule): ``k = N // n``, ``0, k, ..., (n-1)k``.
    ``uniform_last``: ``round_half_up(i (N-1) / (n-1))``, so the first and the last layer are kept (``[N-1]``
    when ``n == 1``). A list: the source layer of each student layer, as given (repeats allowed, so a list
    can also make a deeper student). The three rules only drop layers.
    """
    n, big_n = int(student_layers), int(source_layers)
    if isinstance(selection, str):
        if selection not in SELECTION_RULES:
            close = difflib.get_close_matches(selection, SELECTION_RULES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InheritanceError(f"Unknown {tower} layer selection {selection!r}.{hint} Valid: "
                                   f"{', '.join(SELECTION_RULES)}, or a list of source layer indices.")
        if n > big_n:
            raise InheritanceError(f"The student's {tower} tower has {n} layers, the source's {big_n}: "
                                   f"{selection!r} only drops layers. Give an explicit list of {n} source layers "
                                   "(repeats allowed) to make a deeper student.")
        if selection == "first":
            return list(range(n))
        if selection == "uniform":
            k = big_n // n
            return [i * k for i in range(n)]
        if n == 1:
            return [big_n - 1]
        return [(2 * i * (big_n - 1) + (n - 1)) // (2 * (n - 1)) for i in range(n)]
    if isinstance(selection, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in selection):
        idx = list(selection)
        if len(idx) != n:
            raise InheritanceError(f"The {tower} layer list {idx} has {len(idx)} entries; the student's {tower} "
                                   f"tower has {n} layers, one source layer each.")
        bad = [i for i in idx if not 0 <= i < big_n]
        if bad:
            raise InheritanceError(f"The {tower} layer list {idx} names layers {bad} the source lacks; its "
                                   f"{tower} tower has layers 0..{big_n - 1}.")
        return idx
    raise InheritanceError(f"A {tower} layer selection is one of {', '.join(SELECTION_RULES)} or a list of "
                           f"integers, got {selection!r}.")


@dataclass(frozen=True)
class LayerMap:
    """Which source layer each student layer of one tower inherits."""

    tower: str
    rule: str  # first / uniform / uniform_last / explicit
    source_layers: int
    selected: tuple[int, ...]  # selected[i]: the source layer of student layer i

    @property
    def dropped(self) -> tuple[int, ...]:
        """Source layers no student layer inherits."""
        return tuple(j for j in range(self.source_layers) if j not in self.selected)

    def describe(self) -> str:
        pairs = ", ".join(f"{i}<-{j}" for i, j in enumerate(self.selected))
        dropped = ", ".join(map(str, self.dropped)) or "none"
        return (f"{self.tower} layers ({self.rule}, {len(self.selected)} of {self.source_layers}): {pairs}; "
                f"source layers dropped: {dropped}")


def _layer_maps(student: RetrievalModel, source: RetrievalModel,
                layers: LayerSelection | Mapping[str, LayerSelection]) -> dict[str, LayerMap]:
    if isinstance(layers, Mapping):
        unknown = sorted(set(layers) - set(TOWERS))
        if unknown:
            raise InheritanceError(f"Layer selection for unknown towers {unknown}; the towers are "
                                   f"{', '.join(TOWERS)}.")
        per_tower = {t: layers.get(t, "first") for t in TOWERS}
    else:
        per_tower = {t: layers for t in TOWERS}
    maps = {}
    for tower, sel in per_tower.items():
        n, big_n = _depth(student, tower, "student"), _depth(source, tower, "source")
        idx = select_layers(sel, big_n, n, tower=tower)
        maps[tower] = LayerMap(tower, sel if isinstance(sel, str) else "explicit", big_n, tuple(idx))
    return maps


def _blocks(model: RetrievalModel, tower: str) -> nn.ModuleList | None:
    owner = model.clip.visual if tower == "vision" else model.clip
    transformer = getattr(owner, "transformer", None)
    return getattr(transformer, "resblocks", None)


def _depth(model: RetrievalModel, tower: str, role: str) -> int:
    blocks = _blocks(model, tower)
    if blocks is None:
        raise InheritanceError(f"The {role}'s {tower} tower is not a transformer (no resblocks): inheritance "
                               "covers ViT dual encoders.")
    return len(blocks)


# --------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class InheritedTensor:
    """One student tensor: its source tensor and what was done to it (empty ``how``: copied unchanged)."""

    key: str
    source_key: str
    shape: tuple[int, ...]
    source_shape: tuple[int, ...]
    how: tuple[str, ...] = ()

    def describe(self) -> str:
        same = self.source_key == self.key
        src = "same key" if same else self.source_key
        what = "; ".join(self.how) if self.how else "copied"
        return f"{self.key} {list(self.shape)} <- {src} {list(self.source_shape)}: {what}"


@dataclass
class InheritReport:
    """What inheritance did with every student tensor, and with every source tensor it left out."""

    source: str
    layers: dict[str, LayerMap]
    tensors: list[InheritedTensor] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # student key -> why it keeps its initialisation
    unused: dict[str, str] = field(default_factory=dict)  # source key -> why no student tensor took it
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)  # axis -> (source size, student size)
    notes: list[str] = field(default_factory=list)

    @property
    def cut(self) -> list[InheritedTensor]:
        """Student tensors that are not a plain copy of their source tensor."""
        return [t for t in self.tensors if t.how]

    def summary(self) -> str:
        """A few lines: the layer maps, the widths kept, and counts; what ``kd-trainer plan`` shows."""
        n_cut = len(self.cut)
        lines = [f"inherited {len(self.tensors)} tensors from {self.source}: {len(self.tensors) - n_cut} copied, "
                 f"{n_cut} cut or resized; {len(self.kept)} kept their initialisation; {len(self.unused)} source "
                 "tensors not inherited"]
        lines += [f"  {m.describe()}" for m in self.layers.values()]
        changed = [f"{axis} {s} -> {d}" for axis, (s, d) in self.widths.items() if s != d]
        lines.append("  widths: " + (", ".join(changed) + " (first channels; first heads of each of q, k, v)"
                                     if changed else "unchanged"))
        for t in self.tensors:
            lines += [f"  resized {t.key}: {h}" for h in t.how if h.startswith(("grid", "positions"))]
        for k, why in self.kept.items():
            lines.append(f"  kept {k}: {why}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def table(self) -> str:
        """One line per student tensor: its source tensor and what was cut."""
        return "\n".join(t.describe() for t in self.tensors)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()


# --------------------------------------------------------------------------------------------
# Width


@dataclass
class _Heads:
    """Head count and width of one attention module, of the student and of its source."""

    student: tuple[int, int]
    source: tuple[int, int]


def _attn_heads(model: RetrievalModel, state_key_prefix: str) -> tuple[int, int]:
    attn = model.get_submodule(state_key_prefix)
    return int(attn.num_heads), int(attn.head_dim)


def _cut(value: torch.Tensor, shape: tuple[int, ...], axes: tuple[str, ...], *, heads: _Heads | None,
         grids: tuple[tuple[int, int], tuple[int, int]], widths: dict[str, tuple[int, int]]
         ) -> tuple[torch.Tensor, list[str], list[str]]:
    """``value`` cut to ``shape`` axis by axis; returns the tensor, what was done, and what no rule explains."""
    how: list[str] = []
    problems: list[str] = []
    if value.ndim != len(axes) or len(shape) != len(axes):
        return value, how, [f"{value.ndim} dims in the source, {len(shape)} in the student, {len(axes)} expected"]
    for dim, axis in enumerate(axes):
        s, d = value.shape[dim], shape[dim]
        if axis in _FIXED:
            if s != d:
                problems.append(f"{axis} {s} in the source, {d} in the student (no rule changes it)")
        elif axis == _GRID:
            (sh, sw), (dh, dw) = grids
            if s != 1 + sh * sw or d != 1 + dh * dw:
                problems.append(f"{s} and {d} positions do not fit the grids {sh}x{sw} and {dh}x{dw} plus a class "
                                "token")
            elif (sh, sw) != (dh, dw):
                value = resize_visual_positions(value, (sh, sw), (dh, dw))
                how.append(f"grid {sh}x{sw} -> {dh}x{dw} (bilinear, class token kept)")
        elif axis == _CTX:
            if s != d:
                value = resize_text_positions(value, d)
                how.append(f"positions {s} -> {d} ({'truncated' if d < s else 'linear interpolation'})")
        elif axis.endswith(("q/k/v", "heads")):
            value = _cut_heads(value, dim, axis, d, heads, how, problems, widths)
        elif d > s:
            problems.append(f"{axis} {d} in the student is wider than the source's {s}")
        else:
            widths.setdefault(axis, (s, d))
            if d < s:
                value = value.narrow(dim, 0, d)
                how.append(f"first {d} of {s} {axis} channels")
    if not problems and tuple(value.shape) != tuple(shape):
        problems.append(f"the rules give {tuple(value.shape)}, the student has {tuple(shape)}")
    return value, how, problems


def _cut_heads(value: torch.Tensor, dim: int, axis: str, size: int, heads: _Heads | None, how: list[str],
               problems: list[str], widths: dict[str, tuple[int, int]]) -> torch.Tensor:
    """Keep the first heads: of each of q, k and v for the packed projection, of the concatenated heads for
    the output projection's input columns. Whole heads only, so head widths must match."""
    packed = axis.endswith("q/k/v")
    if heads is None:
        problems.append(f"{axis} outside an attention module")
        return value
    (n_dst, w_dst), (n_src, w_src) = heads.student, heads.source
    parts = 3 if packed else 1
    if value.shape[dim] != parts * n_src * w_src or size != parts * n_dst * w_dst:
        problems.append(f"{axis} sizes {value.shape[dim]} / {size} are not {parts} x heads x head width")
        return value
    if w_dst != w_src:
        problems.append(f"head width {w_src} in the source, {w_dst} in the student: inheritance keeps whole heads, "
                        "so the head widths must match (derive the student with the source's head width)")
        return value
    if n_dst > n_src:
        problems.append(f"{n_dst} heads in the student, {n_src} in the source")
        return value
    widths.setdefault(axis.replace("q/k/v", "heads"), (n_src, n_dst))
    if n_dst < n_src:
        shape = value.shape
        split = value.reshape(*shape[:dim], parts, n_src, w_src, *shape[dim + 1:])
        value = split.narrow(dim + 1, 0, n_dst).reshape(*shape[:dim], parts * n_dst * w_src, *shape[dim + 1:])
        what = "q, k, v: first" if packed else "input columns of the first"
        how.append(f"{what} {n_dst} of {n_src} heads (head width {w_src})")
    return value


# --------------------------------------------------------------------------------------------
# Behaviour that lives outside tensors


def _behaviour(model: RetrievalModel) -> dict[str, str]:
    """Settings that change what the weights compute but are not tensors, so no tensor rule sees them."""
    clip = model.clip
    out = {
        "text pooling": str(getattr(clip, "text_pool_type", None)),
        "vision pooling": str(getattr(clip.visual, "pool_type", None)),
        "vision final LayerNorm after pooling": str(getattr(clip.visual, "final_ln_after_pool", None)),
        "causal text mask": str(getattr(clip, "attn_mask", None) is not None),
    }
    for tower in TOWERS:
        blocks = _blocks(model, tower)
        if blocks is not None and len(blocks):
            out[f"{tower} activation"] = type(blocks[0].mlp.gelu).__name__
    return out


def _behaviour_problems(student: RetrievalModel, source: RetrievalModel) -> list[str]:
    a, b = _behaviour(student), _behaviour(source)
    return [f"{k}: {b[k]} in the source, {a[k]} in the student (the inherited weights would compute another "
            "function; derive the student from the source's architecture)" for k in a if k in b and a[k] != b[k]]


def _notes(student: RetrievalModel, source: RetrievalModel) -> list[str]:
    """Differences the rules accept but a reader should know of: the patch stride and the dtype."""
    notes = []
    s, d = tuple(source.clip.visual.conv1.stride), tuple(student.clip.visual.conv1.stride)
    if s != d:
        notes.append(f"patch stride {s[0]}x{s[1]} in the source, {d[0]}x{d[1]} in the student: the patch filters "
                     "are inherited, the student keeps its stride and its position grid is resized")
    s_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in source.parameters()})
    d_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in student.parameters()})
    if s_dtypes != d_dtypes:
        notes.append(f"source weights in {'/'.join(s_dtypes)}, student in {'/'.join(d_dtypes)}: values are cast")
    return notes


# --------------------------------------------------------------------------------------------
# Inheritance


def _source_of(key: str, maps: dict[str, LayerMap]) -> tuple[str, tuple[str, ...] | None, tuple[str, str] | None]:
    """The source key of a student key, its axes (None: no rule), and for attention tensors the student's
    and the source's attention modules (whose head counts and widths the cut needs)."""
    m = _BLOCK_KEY.match(key)
    if m is None:
        return key, _GLOBAL_RULES.get(key), None
    prefix, i, rest = m.group(1), int(m.group(2)), m.group(3)
    tower = "vision" if prefix == TOWERS["vision"] else "text"
    rule = _BLOCK_RULES.get(rest)
    axes = tuple(_tower_axes(tower)[a] for a in rule) if rule is not None else None
    j = maps[tower].selected[i]
    attn = (f"{prefix}{i}.attn", f"{prefix}{j}.attn") if rest.startswith("attn.") else None
    return f"{prefix}{j}.{rest}", axes, attn


def _build(student: RetrievalModel, source: RetrievalModel, layers: LayerSelection | Mapping[str, LayerSelection],
           source_name: str | None) -> tuple[dict[str, torch.Tensor], InheritReport]:
    maps = _layer_maps(student, source, layers)
    name = source_name or (source.arch if isinstance(source.arch, str) else "source model")
    report = InheritReport(source=name, layers=maps, notes=_notes(student, source))
    grids = (tuple(source.clip.visual.grid_size), tuple(student.clip.visual.grid_size))
    src_sd, dst_sd = source.state_dict(), student.state_dict()
    problems = _behaviour_problems(student, source)
    filled: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, target in dst_sd.items():
        src_key, axes, attn = _source_of(key, maps)
        if key.startswith(PROJECTION_PREFIXES) and (axes is None or src_key not in src_sd):
            report.kept[key] = RULE_PROJECTION_KEPT
            continue
        if axes is None:
            problems.append(f"{key}: no inheritance rule for this tensor")
            continue
        if src_key not in src_sd:
            problems.append(f"{key}: the source has no {src_key}")
            continue
        used.add(src_key)
        heads = None if attn is None else _Heads(_attn_heads(student, attn[0]), _attn_heads(source, attn[1]))
        value, how, bad = _cut(src_sd[src_key], tuple(target.shape), axes, heads=heads, grids=grids,
                               widths=report.widths)
        if bad:
            problems += [f"{key} <- {src_key}: {b}" for b in bad]
            continue
        filled[key] = value
        report.tensors.append(InheritedTensor(key, src_key, tuple(target.shape), tuple(src_sd[src_key].shape),
                                              tuple(how)))
    for key in src_sd:
        if key in used:
            continue
        m = _BLOCK_KEY.match(key)
        tower = None if m is None else ("vision" if m.group(1) == TOWERS["vision"] else "text")
        if tower is not None and int(m.group(2)) not in maps[tower].selected:
            report.unused[key] = f"{tower} layer {m.group(2)} not selected ({maps[tower].rule})"
        elif key.startswith(PROJECTION_PREFIXES):
            report.unused[key] = RULE_PROJECTION_UNUSED
        else:
            problems.append(f"{key}: a source tensor the student has no place for")
    if problems:
        lines = [f"Cannot inherit the student from {name}: {len(problems)} tensors or settings the inheritance "
                 "rules do not explain:"]
        lines += [f"  {p}" for p in problems]
        lines.append("The rules: layers by the selection; first channels of every width; whole heads (same head "
                     "width); positions resized; patch size, vocabulary and block structure must match.")
        raise InheritanceError("\n".join(lines))
    return filled, report


def plan_inheritance(student: RetrievalModel, source: RetrievalModel, *,
                     layers: LayerSelection | Mapping[str, LayerSelection] = "first",
                     source_name: str | None = None) -> InheritReport:
    """What :func:`inherit_weights` would do, without changing the student; raises the same errors.

    Works on models built on the ``meta`` device (shapes only), so a plan can show the map for a
    ViT-B/16 teacher without allocating it.
    """
    return _build(student, source, layers, source_name)[1]


def inherit_weights(student: RetrievalModel, source: RetrievalModel, *,
                    layers: LayerSelection | Mapping[str, LayerSelection] = "first",
                    source_name: str | None = None) -> InheritReport:
    """Fill every tensor of ``student`` from ``source`` by the inheritance rules, strictly.

    ``layers`` is one selection for both towers or ``{"vision": ..., "text": ...}`` (a tower left out
    uses ``first``); a selection is ``first``, ``uniform``, ``uniform_last`` or a list of source layer
    indices (:func:`select_layers`). ``source_name`` names the source in the report (default: its
    architecture name). Values are cast to the student's dtype and device; ``source`` is not modified.
    Raises :class:`InheritanceError` listing every tensor the rules cannot fill, before changing anything.
    """
    filled, report = _build(student, source, layers, source_name)
    state = student.state_dict()
    state.update(filled)
    student.load_state_dict(state, strict=True)
    logger.info(report.summary())
    return report

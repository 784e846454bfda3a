"""Capture intermediate features of any ``nn.Module`` by dotted module path.

Intermediate-layer distillation (UP/EOD ``mimic_name``, TinyBERT hidden states, MiniLM
attention and value relations) needs the outputs of named submodules during an ordinary
forward, without editing the model's code. :class:`FeatureTap` registers forward hooks on
``model.get_submodule(path)`` and stores what they see only while a capture is open, so
features never leak from one step into the next and no tensor outlives the loss.

Feature names (the strings in ``mimic_name`` lists)::

    layer3                                   the module's output
    ""                                       the model's own output (UP's convention)
    encoder.block:1                          element 1 of a tuple/list output
                                             (without ``:K`` a tuple output gives element 0)
    clip.transformer.resblocks.3@attn        attention probabilities, B x heads x L x S
    clip.transformer.resblocks.3@value       MiniLM value relation, B x heads x S x S
    clip.transformer.resblocks.3@value:4     the same with 4 relation heads (MiniLM-v2),
                                             so student and teacher with different head
                                             counts can be compared

``@attn``/``@value`` accept an ``nn.MultiheadAttention`` or a block whose ``.attn`` is one
(open_clip's ``ResidualAttentionBlock``). open_clip calls its attention with
``need_weights=False`` (the fused kernel returns no weights), so both maps are recomputed from
the *inputs* the attention receives, caught by a forward pre-hook together with the
``attn_mask``/``key_padding_mask``/``is_causal`` it is called with (the text tower's causal
mask); the result equals ``need_weights=True, average_attn_weights=False`` on the same call.
The hook only records those inputs; the maps are computed when the feature is first read
(outside the forward), under the grad mode the forward ran with: differentiable for the
student, graph-free for a teacher run under ``torch.no_grad()``. Computing them inside the
forward would add saved tensors to a gradient-checkpointed block that its recomputation does
not reproduce (``CheckpointError``). They are computed in float32 from the module's weights
(also under autocast), and without attention dropout (the maps are the pre-dropout
distributions). With open_clip's non-reentrant checkpointing, gradients reach the student
through them; with reentrant checkpointing the recorded inputs carry no graph.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FeatureSpec",
    "FeatureTap",
    "CapturedFeatures",
    "parse_feature_name",
    "resolve_names",
    "attention_maps",
    "value_relations",
    "layer_map",
    "mapped_names",
    "num_children",
    "DEFAULT_PREFIXES",
]

# Wrappers that prefix every module name: DDP/DataParallel (``module.``) and torch.compile
# (``_orig_mod.``). A recipe names modules of the bare model and still works on a wrapped one.
DEFAULT_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")

_KINDS = ("output", "attn", "value")


@dataclass(frozen=True)
class FeatureSpec:
    """One parsed feature name: which module, and what to take from it."""

    name: str  # as the user wrote it; the key in captured dicts
    path: str  # dotted module path as written (before wrapper-prefix resolution)
    kind: str = "output"  # output | attn | value
    index: int | None = None  # tuple element for kind == "output"
    heads: int | None = None  # relation heads for kind == "value" (None: the module's heads)


def parse_feature_name(name: str) -> FeatureSpec:
    """Parse ``path``, ``path:K``, ``path@attn``, ``path@value`` or ``path@value:H``."""
    if not isinstance(name, str):
        raise TypeError(f"feature name must be a string, got {type(name).__name__}: {name!r}")
    if "@" in name:
        path, _, kind = name.rpartition("@")
        heads: int | None = None
        if ":" in kind:
            kind, _, h = kind.partition(":")
            if kind != "value":
                raise ValueError(f"feature {name!r}: only '@value' takes a head count (':H')")
            try:
                heads = int(h)
            except ValueError:
                raise ValueError(f"feature {name!r}: relation head count {h!r} is not an integer") from None
            if heads <= 0:
                raise ValueError(f"feature {name!r}: relation head count must be positive")
        if kind not in ("attn", "value"):
            raise ValueError(f"feature {name!r}: unknown kind '@{kind}'; valid kinds: '@attn', '@value', '@value:H'")
        if ":" in path:
            raise ValueError(f"feature {name!r}: ':K' tuple indexing cannot be combined with '@{kind}'")
        return FeatureSpec(name=name, path=path, kind=kind, heads=heads)
    if ":" in name:
        path, _, idx = name.rpartition(":")
        try:
            index = int(idx)
        except ValueError:
            raise ValueError(f"feature {name!r}: tuple index {idx!r} after ':' is not an integer") from None
        return FeatureSpec(name=name, path=path, index=index)
    return FeatureSpec(name=name, path=name)


def resolve_names(
    model: nn.Module, names: Sequence[str], prefixes: Sequence[str] = DEFAULT_PREFIXES
) -> dict[str, str]:
    """Map each dotted module path to the path that exists in ``model``.

    A path is taken as written, else behind one of the wrapper ``prefixes`` (``module.`` of
    DDP), so a recipe written for the bare model also works on the wrapped one. An unknown
    path raises ``ValueError`` listing the closest valid names, because a typo in a layer name
    is the most common mistake in a mimic config and the model has hundreds of names.
    """
    valid = [n for n, _ in model.named_modules()]
    valid_set = set(valid)
    out: dict[str, str] = {}
    for name in names:
        candidates = [name] + [p + name if name else p.rstrip(".") for p in prefixes]
        hit = next((c for c in candidates if c in valid_set), None)
        if hit is None:
            close = difflib.get_close_matches(name, valid, n=6, cutoff=0.6)
            if not close:  # a name relative to a prefix that the user dropped or added
                stripped = [v.split(".", 1)[1] for v in valid if "." in v]
                close = difflib.get_close_matches(name, stripped, n=6, cutoff=0.6)
            hint = f" Closest valid names: {', '.join(repr(c) for c in close)}." if close else ""
            top = [n for n, _ in model.named_children()]
            raise ValueError(
                f"unknown module name {name!r} in {type(model).__name__}.{hint} "
                f"Top-level modules: {', '.join(top) or '(none)'}."
            )
        out[name] = hit
    return out


def num_children(model: nn.Module, path: str) -> int:
    """How many children the container at ``path`` has (e.g. the blocks of a transformer),
    so layer mappings can be computed from the models themselves."""
    return len(list(model.get_submodule(path).children()))


# --------------------------------------------------------------------------- attention


def _mha_of(module: nn.Module, name: str) -> nn.MultiheadAttention:
    if isinstance(module, nn.MultiheadAttention):
        return module
    attn = getattr(module, "attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        return attn
    raise ValueError(
        f"feature {name!r}: '@attn'/'@value' need an nn.MultiheadAttention or a block whose .attn is one; "
        f"got {type(module).__name__} (open_clip's custom attention blocks are not supported)"
    )


def _projections(mha: nn.MultiheadAttention) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
    """(weight, bias) of the q, k and v input projections, packed or separate."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight
        ws = (w[:e], w[e : 2 * e], w[2 * e :])
    else:
        ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    b = mha.in_proj_bias
    bs = (b[:e], b[e : 2 * e], b[2 * e :]) if b is not None else (None, None, None)
    return tuple(zip(ws, bs))  # type: ignore[return-value]


def _check_supported(mha: nn.MultiheadAttention) -> None:
    if mha.bias_k is not None or mha.add_zero_attn:
        raise NotImplementedError("attention maps for nn.MultiheadAttention with add_bias_kv/add_zero_attn")


def _batch_first(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Inputs as B x L x E whatever the module's layout (and unbatched L x E)."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x if mha.batch_first else x.transpose(0, 1)


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # float32 whatever autocast or the weights say: the maps are targets/losses, not activations
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, e = x.shape
    if e % heads:
        raise ValueError(f"width {e} is not divisible into {heads} heads")
    return x.reshape(b, n, heads, e // heads).transpose(1, 2)  # B x H x N x d


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:  # True = not allowed to attend (PyTorch's convention)
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def attention_maps(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor | None = None,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Per-head attention probabilities ``softmax(Q K^T / sqrt(d) + mask)``, B x H x L x S.

    Recomputed from the module's own input projections, because open_clip (and most fused
    attention) never materialises them. Masks follow ``nn.MultiheadAttention``: ``attn_mask``
    is L x S or (B*H) x L x S, boolean (True = blocked) or additive; ``key_padding_mask`` is
    B x S. Computed in float32, so bf16/fp16 models still give valid distributions.
    """
    _check_supported(mha)
    key = query if key is None else key
    (wq, bq), (wk, bk), _ = _projections(mha)
    q = _heads(_project(_batch_first(mha, query), wq, bq), mha.num_heads)
    k = _heads(_project(_batch_first(mha, key), wk, bk), mha.num_heads)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    b, h, n_q, n_k = scores.shape
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        m = _additive(attn_mask, scores.dtype)
        scores = scores + (m.view(b, h, n_q, n_k) if m.dim() == 3 else m)
    if key_padding_mask is not None:
        scores = scores + _additive(key_padding_mask, scores.dtype).view(b, 1, 1, n_k)
    return scores.softmax(dim=-1)


def value_relations(mha: nn.MultiheadAttention, value: torch.Tensor, *, heads: int | None = None) -> torch.Tensor:
    """MiniLM value relation ``softmax(V V^T / sqrt(d))`` per head, B x H x S x S.

    ``V`` is the module's value projection of its value input, split into ``heads`` relation
    heads (default: the module's attention heads, MiniLM-v1; any divisor of the width,
    MiniLM-v2, so a 12-head teacher and a 4-head student can be compared on 4 relation heads).
    Unmasked, as in MiniLM: the relation is between value vectors, not an attention pattern.
    """
    _check_supported(mha)
    _, _, (wv, bv) = _projections(mha)
    v = _heads(_project(_batch_first(mha, value), wv, bv), heads or mha.num_heads)
    return ((v @ v.transpose(-2, -1)) / math.sqrt(v.shape[-1])).softmax(dim=-1)


# --------------------------------------------------------------------------- the tap


@dataclass
class _Pending:
    """A feature recorded by a hook but computed on first read (see the module docstring)."""

    compute: Callable[[], torch.Tensor]
    grad_enabled: bool


class CapturedFeatures(MutableMapping[str, torch.Tensor]):
    """name -> tensor of one capture. Attention/relation maps are computed on first read,
    under the grad mode their forward ran with, and then kept."""

    def __init__(self) -> None:
        self._data: dict[str, torch.Tensor | _Pending] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        v = self._data[name]
        if isinstance(v, _Pending):
            with torch.set_grad_enabled(v.grad_enabled):
                v = v.compute()
            self._data[name] = v
        return v

    def __setitem__(self, name: str, value: torch.Tensor | _Pending) -> None:  # type: ignore[override]
        self._data[name] = value

    def __delitem__(self, name: str) -> None:
        del self._data[name]

    def __contains__(self, name: object) -> bool:  # without computing a pending map
        return name in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        self._data.clear()

    def __repr__(self) -> str:
        return f"CapturedFeatures({sorted(self._data)})"


class FeatureTap:
    """Forward hooks on named submodules; features are kept only inside :meth:`capture`.

    ``with tap.capture() as feats: model(x)`` fills ``feats`` (name -> tensor) during the
    forward and empties the same dict when the block exits, so compute the loss inside the
    block. Outside a capture the hooks store nothing, which also makes them harmless during
    gradient-checkpointing recomputation in backward. A module that runs twice inside one
    capture raises, because silently keeping either call would distil the wrong tensor.
    ``remove()`` (or leaving ``with FeatureTap(...)``) takes the hooks off the model.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, prefixes: Sequence[str] = DEFAULT_PREFIXES):
        self.model = model
        self.specs: list[FeatureSpec] = []
        seen: set[str] = set()
        for n in names:
            if n not in seen:
                seen.add(n)
                self.specs.append(parse_feature_name(n))
        resolved = resolve_names(model, [s.path for s in self.specs], prefixes)
        self.paths: dict[str, str] = {s.name: resolved[s.path] for s in self.specs}
        self._store = CapturedFeatures()
        self._active = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for spec in self.specs:
            module = model.get_submodule(self.paths[spec.name])
            if spec.kind == "output":
                self._handles.append(module.register_forward_hook(self._output_hook(spec)))
            else:
                mha = _mha_of(module, spec.name)
                _check_supported(mha)
                self._handles.append(mha.register_forward_pre_hook(self._attention_hook(spec, mha), with_kwargs=True))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def active(self) -> bool:
        return self._active

    def _put(self, name: str, value: torch.Tensor | _Pending) -> None:
        if name in self._store:
            raise RuntimeError(
                f"feature {name!r} ({self.paths[name]}) was produced twice inside one capture; a module that "
                "runs more than once per forward cannot be tapped unambiguously"
            )
        self._store[name] = value

    def _output_hook(self, spec: FeatureSpec):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active:
                return
            out = output
            if isinstance(out, (tuple, list)):
                out = out[spec.index if spec.index is not None else 0]
            elif spec.index is not None:
                raise TypeError(f"feature {spec.name!r}: ':{spec.index}' given but {spec.path} returned "
                                f"{type(output).__name__}, not a tuple")
            self._put(spec.name, out)

        return hook

    def _attention_hook(self, spec: FeatureSpec, mha: nn.MultiheadAttention):
        signature = inspect.signature(mha.forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._active:
                return
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            a = dict(call.arguments)  # references only: no tensor op inside the forward
            if spec.kind == "attn":
                def compute() -> torch.Tensor:
                    return attention_maps(mha, a["query"], a["key"], attn_mask=a.get("attn_mask"),
                                          key_padding_mask=a.get("key_padding_mask"),
                                          is_causal=bool(a.get("is_causal", False)))
            else:
                def compute() -> torch.Tensor:
                    return value_relations(mha, a["value"], heads=spec.heads)
            self._put(spec.name, _Pending(compute, torch.is_grad_enabled()))

        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[CapturedFeatures]:
        """Store features of the forwards run inside the block; clear them on exit."""
        if self._active:
            raise RuntimeError("this FeatureTap is already capturing; captures do not nest")
        if not self._handles and self.specs:
            raise RuntimeError("this FeatureTap was removed")
        self._store.clear()
        self._active = True
        try:
            yield self._store
        finally:
            self._active = False
            self._store.clear()

    def pop(self) -> dict[str, torch.Tensor]:
        """Return what has been captured so far and forget it (the tap keeps no reference)."""
        out = {name: self._store[name] for name in list(self._store)}
        self._store.clear()
        return out

    def remove(self) -> None:
        """Take every hook off the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()
        self._active = False

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# --------------------------------------------------------------------------- layer mappings


def layer_map(
    n_student: int, n_teacher: int, mode: str | Sequence[int | None] | Sequence[Sequence[int]]
) -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)`` to distil, 0-based.

    - ``"last"``: ``[(L_s - 1, L_t - 1)]`` (the original's ``last_layer``).
    - ``"uniform"``: student layer ``i`` <- teacher layer ``i * k + k - 1``, ``k = L_t // L_s``
      (TinyBERT's mapping; every student layer, the last one meets the teacher's last). When
      ``L_t`` is not a multiple of ``L_s`` this raises instead of silently rounding, because a
      rounded mapping would no longer end at the teacher's last layer.
    - a list of ``L_s`` teacher indices (student layer ``i`` <- ``mode[i]``, ``None``/-1 skips
      ``i``), or a list of explicit ``(student, teacher)`` pairs. Negative teacher indices count
      from the end, as in Python.
    """
    if n_student <= 0 or n_teacher <= 0:
        raise ValueError(f"layer counts must be positive, got student {n_student}, teacher {n_teacher}")
    if isinstance(mode, str):
        if mode in ("last", "last_layer"):
            return [(n_student - 1, n_teacher - 1)]
        if mode == "uniform":
            if n_teacher % n_student:
                raise ValueError(f"uniform layer mapping needs the teacher's {n_teacher} layers to be a multiple of "
                                 f"the student's {n_student}; give an explicit list instead")
            k = n_teacher // n_student
            return [(i, i * k + k - 1) for i in range(n_student)]
        raise ValueError(f"unknown layer mapping {mode!r}; valid: 'last', 'uniform', or an explicit list")
    items = list(mode)
    pairs: list[tuple[int, int]] = []
    if items and all(isinstance(p, (list, tuple)) for p in items):
        pairs = [(int(s), int(t)) for s, t in items]
    else:
        if len(items) != n_student:
            raise ValueError(f"explicit layer mapping has {len(items)} entries for {n_student} student layers")
        pairs = [(i, int(t)) for i, t in enumerate(items) if t is not None and t != -1]
    out = []
    for s, t in pairs:
        t = t + n_teacher if t < 0 else t
        if not (0 <= s < n_student and 0 <= t < n_teacher):
            raise ValueError(f"layer pair ({s}, {t}) is out of range for {n_student} student / "
                             f"{n_teacher} teacher layers")
        out.append((s, t))
    return out


def mapped_names(
    student_fmt: str, teacher_fmt: str, n_student: int, n_teacher: int, mode: str | Sequence[Any] = "uniform"
) -> tuple[list[str], list[str]]:
    """Paired ``mimic_name`` lists from templates, e.g.
    ``mapped_names("clip.transformer.resblocks.{}@attn", "clip.transformer.resblocks.{}@attn", 4, 12)``."""
    pairs = layer_map(n_student, n_teacher, mode)
    return [student_fmt.format(s) for s, _ in pairs], [teacher_fmt.format(t) for _, t in pairs]

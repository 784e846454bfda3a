"""Taps: read the outputs of any ``nn.Module``'s named submodules during an ordinary forward.

Intermediate-layer distillation (UP/EOD ``mimic_name``, TinyBERT hidden states, MiniLM
attention and value relations) needs the outputs of named submodules without editing the
model's code. A :class:`Tap` registers forward hooks on ``model.get_submodule(path)`` and keeps
what they see only while a capture is open, so no tapped output leaks from one step into the
next and no tensor outlives the loss. The word is used in one sense throughout: a *tap name*
says what to read, a :class:`Tap` reads it, and a capture yields the *tapped outputs*
(:class:`TappedOutputs`).

Tap names (the strings in ``mimic_name`` lists)::

    layer3                                   the module's output
    ""                                       the model's own output (UP's convention)
    encoder.block:1                          element 1 of a tuple/list output
                                             (without ``:K`` a tuple output gives element 0)
    backbone.fpn:0                           entry ``"0"`` of a dict output (an FPN level);
    backbone.fpn:pool                        a dict output must name its entry, and an unknown
                                             key is refused with the valid ones
    rpn.head:0:2                             keys chain into nested outputs: element 0 of the
                                             tuple (a list of levels), then its element 2
    clip.transformer.resblocks.3@attn        attention probabilities, B x heads x L x S
    clip.transformer.resblocks.3@value       MiniLM value relation, B x heads x S x S
    clip.transformer.resblocks.3@value:4     the same with 4 relation heads (MiniLM-v2),
                                             so student and teacher with different head
                                             counts can be compared

``@attn``/``@value`` accept an ``nn.MultiheadAttention`` or a block whose ``.attn`` is one
(open_clip's ``ResidualAttentionBlock``). open_clip calls its attention with
``need_weights=False`` (the fused kernel returns no weights), so both maps are recomputed
(:mod:`kd_trainer.models.attention`) from the *inputs* the attention receives, caught by a
forward pre-hook together with the ``attn_mask``/``key_padding_mask``/``is_causal`` it is called
with (the text tower's causal mask). The hook only records those inputs; the maps are computed
when the tapped output is first read (outside the forward), under the grad mode the forward ran
with: differentiable for the student, graph-free for a teacher run under ``torch.no_grad()``.
Computing them inside the forward would add saved tensors to a gradient-checkpointed block that
its recomputation does not reproduce (``CheckpointError``). With open_clip's non-reentrant
checkpointing, gradients reach the student through them; with reentrant checkpointing the
recorded inputs carry no graph.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kd_trainer.models.attention import attention_maps, require_plain_attention, value_relations

__all__ = [
    "TapSpec",
    "Tap",
    "TappedOutputs",
    "parse_tap_name",
    "resolve_names",
    "select_output",
    "WRAPPER_PREFIXES",
]

# Wrappers that prefix every module name: DDP/DataParallel (``module.``) and torch.compile
# (``_orig_mod.``). A recipe names modules of the bare model and still works on a wrapped one.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")

@dataclass(frozen=True)
class TapSpec:
    """One parsed tap name: which module, and what to take from it."""

    name: str  # as the user wrote it; the key in the tapped outputs
    path: str  # dotted module path as written (before wrapper-prefix resolution)
    kind: str = "output"  # output | attn | value
    keys: tuple[str, ...] = ()  # kind == "output": tuple/list indices or dict keys, outermost first
    heads: int | None = None  # relation heads for kind == "value" (None: the module's heads)


def parse_tap_name(name: str) -> TapSpec:
    """Parse ``path``, ``path:K[:K2...]``, ``path@attn``, ``path@value`` or ``path@value:H``.

    A key ``K`` is a tuple/list index or a dict key; which one is only known when the module's
    output is seen, so keys are kept as written and checked by :func:`select_output`.
    """
    if not isinstance(name, str):
        raise TypeError(f"tap name must be a string, got {type(name).__name__}: {name!r}")
    if "@" in name:
        path, _, kind = name.rpartition("@")
        heads: int | None = None
        if ":" in kind:
            kind, _, h = kind.partition(":")
            if kind != "value":
                raise ValueError(f"tap {name!r}: only '@value' takes a head count (':H')")
            try:
                heads = int(h)
            except ValueError:
                raise ValueError(f"tap {name!r}: relation head count {h!r} is not an integer") from None
            if heads <= 0:
                raise ValueError(f"tap {name!r}: relation head count must be positive")
        if kind not in ("attn", "value"):
            raise ValueError(f"tap {name!r}: unknown kind '@{kind}'; valid kinds: '@attn', '@value', '@value:H'")
        if ":" in path:
            raise ValueError(f"tap {name!r}: ':K' tuple indexing cannot be combined with '@{kind}'")
        return TapSpec(name=name, path=path, kind=kind, heads=heads)
    if ":" in name:
        path, *keys = name.split(":")  # module paths never hold ':'
        if not all(keys):
            raise ValueError(f"tap {name!r}: an empty key after ':'; write path:K with K a tuple index or dict key")
        return TapSpec(name=name, path=path, keys=tuple(keys))
    return TapSpec(name=name, path=name)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    kind = type(value).__name__
    kind = f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"
    if isinstance(value, Mapping):
        return f"{kind} with keys {', '.join(repr(str(k)) for k in value)}"
    if isinstance(value, (tuple, list)):
        return f"{kind} of {len(value)}"
    return kind


def select_output(spec: TapSpec, output: Any) -> Any:
    """What ``spec`` takes from a module's ``output``: walk its keys (tuple/list index, dict key).

    Without keys a tuple/list output gives its element 0 (a module returning ``(out, extra)``),
    and a dict output is refused: which entry (which FPN level) is meant must be written. A key
    that the output does not have is refused with the keys it has, and so is a selection that
    ends on a list or dict instead of one tensor.
    """
    value = output
    if not spec.keys:
        if isinstance(value, (tuple, list)):
            value = value[0]
        if isinstance(value, Mapping):
            raise ValueError(f"tap {spec.name!r}: {spec.path or 'the model'} returned {_describe(value)}; name one "
                             f"entry, e.g. '{spec.name}:{next(iter(value), 'KEY')}'")
        return value
    for depth, key in enumerate(spec.keys):
        where = ":".join((spec.path, *spec.keys[:depth])) if depth else spec.path
        if isinstance(value, Mapping):
            found = [k for k in value if str(k) == key]
            if not found:
                raise ValueError(f"tap {spec.name!r}: {where} returned {_describe(value)}, and no key {key!r}; "
                                 f"valid keys: {', '.join(repr(str(k)) for k in value)}")
            value = value[found[0]]
        elif isinstance(value, (tuple, list)):
            try:
                index = int(key)
            except ValueError:
                raise ValueError(f"tap {spec.name!r}: {where} returned {_describe(value)}, which takes an integer "
                                 f"index, not {key!r}; valid: 0..{len(value) - 1}") from None
            if not -len(value) <= index < len(value):
                raise ValueError(f"tap {spec.name!r}: {where} returned {_describe(value)}; index {index} is out of "
                                 f"range, valid: 0..{len(value) - 1}")
            value = value[index]
        else:
            raise ValueError(f"tap {spec.name!r}: ':{key}' given but {where} returned {_describe(value)}, not a "
                             "tuple, list or dict")
    if isinstance(value, (tuple, list, Mapping)):
        raise ValueError(f"tap {spec.name!r} selects {_describe(value)}, not one tensor; add a key "
                         f"(e.g. '{spec.name}:{next(iter(value), 0) if isinstance(value, Mapping) else 0}')")
    return value


def resolve_names(
    model: nn.Module, names: Sequence[str], prefixes: Sequence[str] = WRAPPER_PREFIXES
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


def _mha_of(module: nn.Module, name: str) -> nn.MultiheadAttention:
    """The attention module an ``@attn``/``@value`` tap reads: the module itself or its ``.attn``."""
    if isinstance(module, nn.MultiheadAttention):
        return module
    attn = getattr(module, "attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        return attn
    raise ValueError(
        f"tap {name!r}: '@attn'/'@value' need an nn.MultiheadAttention or a block whose .attn is one; "
        f"got {type(module).__name__} (open_clip's custom attention blocks are not supported)"
    )


@dataclass
class _Pending:
    """An attention map recorded by a hook but computed on first read (see the module docstring)."""

    compute: Callable[[], torch.Tensor]
    grad_enabled: bool


class TappedOutputs(MutableMapping[str, torch.Tensor]):
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
        return f"TappedOutputs({sorted(self._data)})"


class Tap:
    """Forward hooks on named submodules; their outputs are kept only inside :meth:`capture`.

    ``with tap.capture() as outs: model(x)`` fills ``outs`` (tap name -> tensor) during the
    forward and empties the same mapping when the block exits, so compute the loss inside the
    block. Outside a capture the hooks store nothing, which also makes them harmless during
    gradient-checkpointing recomputation in backward. A module that runs twice inside one
    capture raises, because silently keeping either call would distil the wrong tensor.
    ``remove()`` (or leaving ``with Tap(...)``) takes the hooks off the model.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, prefixes: Sequence[str] = WRAPPER_PREFIXES) -> None:
        self.model = model
        self.specs: list[TapSpec] = []
        seen: set[str] = set()
        for n in names:
            if n not in seen:
                seen.add(n)
                self.specs.append(parse_tap_name(n))
        resolved = resolve_names(model, [s.path for s in self.specs], prefixes)
        self.paths: dict[str, str] = {s.name: resolved[s.path] for s in self.specs}
        self._store = TappedOutputs()
        self._active = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for spec in self.specs:
            module = model.get_submodule(self.paths[spec.name])
            if spec.kind == "output":
                self._handles.append(module.register_forward_hook(self._output_hook(spec)))
            else:
                mha = _mha_of(module, spec.name)
                require_plain_attention(mha)
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
                f"tap {name!r} ({self.paths[name]}) was produced twice inside one capture; a module that "
                "runs more than once per forward cannot be tapped unambiguously"
            )
        self._store[name] = value

    def _output_hook(self, spec: TapSpec) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active:
                return
            self._put(spec.name, select_output(spec, output))

        return hook

    def _attention_hook(self, spec: TapSpec, mha: nn.MultiheadAttention) -> Callable[..., None]:
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
    def capture(self) -> Iterator[TappedOutputs]:
        """Store the tapped outputs of the forwards run inside the block; clear them on exit."""
        if self._active:
            raise RuntimeError("this Tap is already capturing; captures do not nest")
        if not self._handles and self.specs:
            raise RuntimeError("this Tap was removed")
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

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

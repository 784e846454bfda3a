"""Mimic losses: one student tapped output against one teacher tapped output (UP/EOD's mimic).

The second table of named losses beside :mod:`kd_trainer.losses.registry`'s terms, kept in the
same style: pure functions registered by the names users type, a read-only table
(:data:`MIMIC_LOSSES`, as ``TERMS``), and a lookup that names the closest valid name and lists
all of them. Terms read a batch's embeddings (``Features``) and know which ones per side; mimic
losses read two tensors of one shape, ``fn(s, t, **kwargs) -> scalar``, which is why they are a
table of their own. An unknown name raises :class:`UnknownMimicLossError`, an
``UnknownTermError``, so one ``except`` catches an unknown loss name from either table.

UP/EOD's names (``l2_loss``, ``kl_loss``, ``kd_loss``, ``ce_loss``) are accepted as aliases and
bring UP's defaults with them, so a UP config computes what UP computed:

- ``l2_loss`` -> ``l2`` with ``normalize=True, batch_mean=True`` (UP's ``base`` mimicker
  registers its ``l2_loss`` with ``feat_norm: True, batch_mean: True`` and merges the
  config's kwargs over them); UP's ``feat_norm`` is accepted for ``normalize``.
- ``kl_loss`` -> ``kl`` with ``relu=True`` (UP's ``KLLoss`` applies ReLU before the softmax;
  only its ``norm: softmax`` variant is offered).
- ``kd_loss``/``ce_loss`` -> ``kd``/``ce``; UP's ``T`` is accepted for ``temperature``.
- ``loss_weight`` in the kwargs (UP's per-loss multiplier) is split off by :func:`build_loss`
  into :attr:`BuiltLoss.scale`; the engine multiplies it into the job weight, so logged
  per-teacher values stay unweighted.

Channel dimension: 1 for 4-D maps ``N x C x H x W``, the last dimension otherwise (``N x C``
logits, ``N x L x C`` tokens); ``dim`` overrides it. UP always used dim 1, which equals ours
except for token outputs, where dim 1 would be the sequence.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from kd_trainer.losses.registry import UnknownTermError

__all__ = [
    "MIMIC_LOSSES",
    "MimicLossSpec",
    "UnknownMimicLossError",
    "BuiltLoss",
    "register_mimic_loss",
    "get_mimic_loss",
    "available_mimic_losses",
    "build_loss",
    "canonical_loss_name",
    "l2",
    "l1",
    "smooth_l1",
    "cosine",
    "kl",
    "kd",
    "ce",
    "kld",
]


@dataclass(frozen=True)
class MimicLossSpec:
    """A registered loss: its function, the kwarg spellings it also accepts, and its aliases
    with the defaults each alias implies."""

    name: str
    fn: Callable[..., torch.Tensor]
    kwarg_aliases: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # alias -> implied defaults


@dataclass(frozen=True)
class BuiltLoss:
    """A loss bound to its kwargs: ``loss(s, t)``; ``scale`` is UP's ``kwargs.loss_weight``."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    kwargs: Mapping[str, Any]
    scale: float = 1.0

    def __call__(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(s, t)


class UnknownMimicLossError(UnknownTermError):
    """An unknown mimic loss name (a ``KeyError`` for lookups, a ``ValueError`` for validators)."""


_REGISTRY: dict[str, MimicLossSpec] = {}
_ALIASES: dict[str, tuple[str, Mapping[str, Any]]] = {}
MIMIC_LOSSES: Mapping[str, MimicLossSpec] = MappingProxyType(_REGISTRY)
"""Read-only view of every registered mimic loss, by our name (aliases resolve through :func:`get_mimic_loss`)."""


def register_mimic_loss(
    name: str, *, aliases: Mapping[str, Mapping[str, Any]] | None = None, kwarg_aliases: Mapping[str, str] | None = None
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn(s, t, **kwargs)`` under ``name`` (and ``aliases``, each with the defaults
    it implies), so a config picks it by the name its users already type."""

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        for n in (name, *(aliases or {})):
            if n in _REGISTRY or n in _ALIASES:
                raise ValueError(f"mimic loss name {n!r} is registered twice")
        spec = MimicLossSpec(name, fn, dict(kwarg_aliases or {}), dict(aliases or {}))
        _REGISTRY[name] = spec
        for a, defaults in (aliases or {}).items():
            _ALIASES[a] = (name, dict(defaults))
        return fn

    return deco


def available_mimic_losses() -> list[str]:
    """Every name ``loss.type`` accepts (ours and UP's aliases), sorted."""
    return sorted([*_REGISTRY, *_ALIASES])


def _unknown(name: str) -> UnknownMimicLossError:
    valid = available_mimic_losses()
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownMimicLossError(f"unknown mimic loss {name!r}.{hint} Valid: {', '.join(valid)}.")


def canonical_loss_name(name: str) -> str:
    """Our name for ``name`` (``l2_loss`` -> ``l2``); raises :class:`UnknownMimicLossError` listing valid names."""
    if name in _REGISTRY:
        return name
    if name in _ALIASES:
        return _ALIASES[name][0]
    raise _unknown(name)


def get_mimic_loss(name: str) -> MimicLossSpec:
    """The registered spec for ``name`` or one of its aliases."""
    return _REGISTRY[canonical_loss_name(name)]


def build_loss(name: str, kwargs: Mapping[str, Any] | None = None) -> BuiltLoss:
    """Bind a loss to its config kwargs, validating them now rather than at the first step.

    Alias defaults apply first, then the given kwargs (with UP spellings renamed); an unknown
    kwarg raises ``ValueError`` listing the accepted ones.
    """
    spec = get_mimic_loss(name)
    merged: dict[str, Any] = dict(_ALIASES[name][1]) if name in _ALIASES else {}
    given = dict(kwargs or {})
    scale = float(given.pop("loss_weight", 1.0))
    if name == "kl_loss":  # UP's KLLoss(norm='softmax'|'l2'): only the softmax form is offered
        norm = given.pop("norm", "softmax")
        if norm != "softmax":
            raise ValueError(f"kl_loss: only norm 'softmax' is supported, got {norm!r}")
    for k, v in given.items():
        merged[spec.kwarg_aliases.get(k, k)] = v
    params = inspect.signature(spec.fn).parameters
    accepted = [p for p in list(params)[2:]]
    bad = [k for k in merged if k not in accepted]
    if bad:
        raise ValueError(f"mimic loss {name!r} got unknown kwargs {bad}; it accepts {accepted + ['loss_weight']}"
                         + (f" (UP spellings: {dict(spec.kwarg_aliases)})" if spec.kwarg_aliases else ""))
    return BuiltLoss(spec.name, functools.partial(spec.fn, **merged), merged, scale)


def _cdim(x: torch.Tensor, dim: int | None) -> int:
    if dim is not None:
        return dim
    return 1 if x.dim() == 4 else -1


def _check(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape != t.shape:
        raise ValueError(f"student output {tuple(s.shape)} and teacher output {tuple(t.shape)} differ in shape")


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.reshape(x.shape[0], -1), dim=1)


@register_mimic_loss(
    "l2",
    aliases={"l2_loss": {"normalize": True, "batch_mean": True}, "mse": {}},
    kwarg_aliases={"feat_norm": "normalize"},
)
def l2(s: torch.Tensor, t: torch.Tensor, normalize: bool = False, batch_mean: bool = False) -> torch.Tensor:
    """UP's ``l2_loss``: ``sum((s - t)^2) / Z``.

    ``Z`` is the number of elements (so the default is plain MSE, mean over elements), or the
    batch size ``N`` with ``batch_mean``. ``normalize`` first flattens each sample and scales it
    to unit L2 norm (UP's ``feat_norm``), which makes the loss insensitive to feature scale.
    The alias ``l2_loss`` defaults to ``normalize=True, batch_mean=True`` as UP's base mimic did.
    """
    _check(s, t)
    if normalize:
        s, t = _unit_rows(s), _unit_rows(t)
    total = (s - t).pow(2).sum()
    return total / s.shape[0] if batch_mean else total / s.numel()


@register_mimic_loss("l1")
def l1(s: torch.Tensor, t: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``mean |s - t|`` over all elements (``normalize``: unit-norm each flattened sample first)."""
    _check(s, t)
    if normalize:
        s, t = _unit_rows(s), _unit_rows(t)
    return (s - t).abs().mean()


@register_mimic_loss("smooth_l1")
def smooth_l1(s: torch.Tensor, t: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Huber-style ``mean_e h(s_e - t_e)``, ``h(d) = d^2 / (2 beta)`` if ``|d| < beta`` else
    ``|d| - beta / 2``; mean over all elements (``F.smooth_l1_loss``)."""
    _check(s, t)
    return F.smooth_l1_loss(s, t, beta=beta, reduction="mean")


@register_mimic_loss("cosine")
def cosine(s: torch.Tensor, t: torch.Tensor, dim: int | None = None, eps: float = 1e-8) -> torch.Tensor:
    """``mean (1 - cos(s, t))``, cosine along the channel dimension, mean over every other
    position (samples, tokens, pixels). Hidden-state distillation of the original code."""
    _check(s, t)
    return (1 - F.cosine_similarity(s, t, dim=_cdim(s, dim), eps=eps)).mean()


def _kl_sum(log_p_t: torch.Tensor, log_p_s: torch.Tensor, dim: int) -> torch.Tensor:
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim)


@register_mimic_loss("kl", aliases={"kl_loss": {"relu": True}})
def kl(
    s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, relu: bool = False, dim: int | None = None
) -> torch.Tensor:
    """``(1/N) sum KL(softmax(f(t)/T) || softmax(f(s)/T))``, softmax over channels.

    Summed over channels and every other position, divided by the batch size ``N``
    (``KLDivLoss(reduction='batchmean')``, as UP). ``f`` is the identity by default
    (``relu=False``); ``relu=True`` is UP's ``kl_loss``, which applies ReLU to both features
    before the softmax (and is the default of the ``kl_loss`` alias). No ``T^2`` factor
    (UP's ``kl_loss`` has no temperature at all); use ``kd`` for Hinton's scaling.
    """
    _check(s, t)
    d = _cdim(s, dim)
    if relu:
        s, t = F.relu(s), F.relu(t)
    return _kl_sum(F.log_softmax(t / temperature, d), F.log_softmax(s / temperature, d), d).sum() / s.shape[0]


@register_mimic_loss("kd", aliases={"kd_loss": {}}, kwarg_aliases={"T": "temperature"})
def kd(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, dim: int | None = None) -> torch.Tensor:
    """Hinton: ``T^2 (1/N) sum KL(softmax(t/T) || softmax(s/T))``, softmax over channels,
    summed over channels and positions, divided by the batch size (batchmean, as UP's
    ``kd_loss``). ``T^2`` keeps the gradient scale independent of the temperature."""
    _check(s, t)
    d = _cdim(s, dim)
    kl_ = _kl_sum(F.log_softmax(t / temperature, d), F.log_softmax(s / temperature, d), d)
    return temperature**2 * kl_.sum() / s.shape[0]


@register_mimic_loss("ce", aliases={"ce_loss": {}}, kwarg_aliases={"T": "temperature"})
def ce(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, dim: int | None = None) -> torch.Tensor:
    """Soft cross-entropy ``mean_pos sum_c -softmax(t/T)_c log softmax(s/T)_c``: summed over
    channels, mean over samples and positions (UP's ``ce_loss``; no ``T^2``). Equals ``kd``
    at ``T = 1`` plus the teacher's entropy, a constant for the student."""
    _check(s, t)
    d = _cdim(s, dim)
    return -(F.softmax(t / temperature, d) * F.log_softmax(s / temperature, d)).sum(d).mean()


@register_mimic_loss("kld", aliases={"attention_kl": {}})
def kld(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL between distributions given as *probabilities* along the last dimension
    (``@attn`` maps, ``@value`` relations): ``mean_{b,h,i} sum_j t_ij (log t_ij - log s_ij)``,
    mean over samples, heads and query positions as MiniLM. ``0 log 0 = 0``, so masked
    (causal) entries contribute nothing; the student's probabilities are clamped at the
    smallest positive float so an underflowed entry gives a large, finite loss."""
    _check(s, t)
    tiny = torch.finfo(s.dtype).tiny
    return (torch.xlogy(t, t) - torch.xlogy(t, s.clamp_min(tiny))).sum(-1).mean()

"""Per-head attention probabilities and MiniLM value relations of an ``nn.MultiheadAttention``,
recomputed from the inputs it was called with.

open_clip (and most fused attention) calls its attention with ``need_weights=False``, so the
maps intermediate-layer distillation compares are never materialised. These functions compute
them again from the module's own input projections: :func:`attention_maps` equals
``need_weights=True, average_attn_weights=False`` on the same call (masks included), and
:func:`value_relations` is MiniLM's ``softmax(V V^T / sqrt(d))``. Both work in float32 whatever
the weights or autocast say, because they are distillation targets, not activations, and both
are pure functions of the module and its inputs (no hooks, no state).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["attention_maps", "require_plain_attention", "value_relations"]


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


def require_plain_attention(mha: nn.MultiheadAttention) -> None:
    """Refuse the ``add_bias_kv``/``add_zero_attn`` variants, whose extra key column the maps below
    do not reproduce (no silent approximation)."""
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
    require_plain_attention(mha)
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
    require_plain_attention(mha)
    _, _, (wv, bv) = _projections(mha)
    v = _heads(_project(_batch_first(mha, value), wv, bv), heads or mha.num_heads)
    return ((v @ v.transpose(-2, -1)) / math.sqrt(v.shape[-1])).softmax(dim=-1)

"""``precision: irra_fp16``: the fp16 *weights* of IRRA's code (not mixed precision), for student and teacher.

The original run (IRRA's code, which the seed commands ran) builds every CLIP (teacher IRRA and
student) through OpenAI CLIP's ``convert_weights`` and trains the student in those weights, with
Adam's eps raised to 1e-3 to survive them. What that function converts, and what
:func:`convert_to_irra_fp16` therefore converts:

- ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Linear``: weight and bias (this includes the attention output
  projection, ``nn.MultiheadAttention.out_proj``, a ``Linear``);
- ``nn.MultiheadAttention``: ``in_proj_weight``, ``q/k/v_proj_weight``, ``in_proj_bias``,
  ``bias_k``, ``bias_v`` (whichever exist);
- any module's tensor attribute named ``text_projection`` or ``proj`` (the text and visual
  projection matrices, plain ``nn.Parameter``\\ s).

Everything else stays fp32: LayerNorm gains and biases, the token embedding, both positional
embeddings, the visual class embedding, ``logit_scale``. open_clip's own ``convert_weights_to_lp``
is the same rule (``open_clip/model.py``), with type checks in place of the name test.

How such a model runs forward, on CPU as on CUDA/NPU (torch 2.x has fp16 kernels for matmul,
conv, attention, GELU and softmax on CPU too):

- The image is cast to the patch convolution's dtype on entry, as OpenAI CLIP's
  ``encode_image`` does (``image.type(self.dtype)``): a forward pre-hook on each open_clip
  ``VisionTransformer`` (open_clip itself leaves the cast to its training loop).
- The text path casts the fp32 token and positional embeddings to the transformer's dtype
  (open_clip's ``encode_text`` already does: ``get_cast_dtype``).
- LayerNorm computes in fp32 and returns the input's dtype, as OpenAI CLIP's ``LayerNorm`` does:
  every LayerNorm becomes open_clip's ``LayerNormFp32`` (what open_clip builds for fp16 weights;
  same parameters and state dict, only the forward casts), so the result does not depend on
  whether a backend accepts fp16 input with fp32 gains.
- The towers return fp16 embeddings; the original casts them to fp32 before its losses, which
  :func:`float32_embeddings` does for a dict of outputs.

Gradients of fp16 weights are fp16 and Adam keeps fp16 moments for them, as in the original; this
is not ``training.fp16`` (AMP with fp32 master weights and a loss scaler), which must stay off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from open_clip.transformer import LayerNormFp32, VisionTransformer
from torch import nn

# What OpenAI CLIP's convert_weights converts inside nn.MultiheadAttention, and by attribute name anywhere.
MHA_TENSORS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v")
PROJECTION_NAMES = ("text_projection", "proj")


@dataclass
class PrecisionReport:
    """What :func:`convert_to_irra_fp16` changed, by parameter and module name."""

    converted: list[str] = field(default_factory=list)  # parameters (and buffers) now fp16
    kept: list[str] = field(default_factory=list)  # floating parameters left in fp32
    layer_norms: list[str] = field(default_factory=list)  # LayerNorms that now compute in fp32
    input_casts: list[str] = field(default_factory=list)  # visual towers that cast their input

    def summary(self) -> str:
        return (f"fp16 weights: {len(self.converted)} tensors converted, {len(self.kept)} kept fp32 "
                f"({', '.join(self.kept[:6])}{', ...' if len(self.kept) > 6 else ''}); "
                f"{len(self.layer_norms)} LayerNorms compute in fp32; image input cast in {self.input_casts}")


def _cast_image_input(module: VisionTransformer, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: the image goes in at the patch convolution's dtype (OpenAI CLIP's cast)."""
    dtype = module.conv1.weight.dtype
    if args and torch.is_tensor(args[0]) and args[0].is_floating_point() and args[0].dtype != dtype:
        return (args[0].to(dtype), *args[1:])
    return None


def convert_to_irra_fp16(model: nn.Module, dtype: torch.dtype = torch.float16) -> PrecisionReport:
    """Convert ``model`` in place as the original's ``convert_weights`` does; returns what changed.

    Parameters keep their identity (``.data`` is replaced, as in the original), so convert before
    building the optimiser; converting twice changes nothing more. Also makes every LayerNorm
    compute in fp32 and every open_clip ``VisionTransformer`` cast its input image (see the module
    docstring). ``dtype=torch.bfloat16`` gives the same layout in bf16.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"convert_to_irra_fp16 needs a floating dtype, got {dtype}")
    targets: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            targets[id(module.weight)] = module.weight
            if module.bias is not None:
                targets[id(module.bias)] = module.bias
        if isinstance(module, nn.MultiheadAttention):
            for attr in MHA_TENSORS:
                tensor = getattr(module, attr, None)
                if tensor is not None:
                    targets[id(tensor)] = tensor
        for attr in PROJECTION_NAMES:
            tensor = getattr(module, attr, None)
            if isinstance(tensor, torch.Tensor):  # a module named `proj` is converted by its own type
                targets[id(tensor)] = tensor

    report = PrecisionReport()
    named = {id(t): n for n, t in model.named_parameters(remove_duplicate=False)}
    named.update({id(t): n for n, t in model.named_buffers(remove_duplicate=False)})
    for key, tensor in targets.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{named.get(key, 'a tensor')} is {tensor.dtype}, not a float: the original "
                             "converts only floating weights; this model is not a CLIP of the expected layout")
        if tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)
            report.converted.append(named.get(key, f"<unnamed {tuple(tensor.shape)}>"))
    report.kept = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]

    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and not isinstance(module, LayerNormFp32):
            if type(module).forward is not nn.LayerNorm.forward and type(module).__module__ != "open_clip.transformer":
                raise ValueError(f"LayerNorm {name!r} is a {type(module).__qualname__} with its own forward; "
                                 "it cannot be made to compute in fp32 without changing what it does")
            module.__class__ = LayerNormFp32
            report.layer_norms.append(name)
        if isinstance(module, VisionTransformer):
            hooks = module._forward_pre_hooks.values()
            if _cast_image_input not in hooks:
                module.register_forward_pre_hook(_cast_image_input)
            report.input_casts.append(name)
    return report


def float32_embeddings(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``outputs`` with every fp16/bf16 tensor cast to fp32 (others unchanged), before the losses.

    The original computes its losses on ``.float()`` embeddings of its fp16 towers; the cast is
    differentiable, so the gradient flows back into the fp16 weights.
    """
    return {k: v.float() if torch.is_tensor(v) and v.dtype in (torch.float16, torch.bfloat16) else v
            for k, v in outputs.items()}

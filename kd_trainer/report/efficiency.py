"""What a retrieval model costs at inference: parameters per tower, FLOPs per image and per caption,
CPU latency at batch 1, and the machine the latency was measured on.

    eff = model_efficiency(model, latency=Latency(warmup=2, iters=10))
    eff.params        # {"image": 20320, "text": 1598560}
    eff.flops         # {"image": 331904, "text": 2653312}   (FLOPs = 2 x multiply-adds)
    eff.latency_ms    # {"image": 0.41, "text": 0.93}, or None when not measured
    machine()         # "x86_64 Linux-6.1 ..., AMD EPYC 7B13, 2 torch threads"

* **Parameters** are those of the deployable dual encoder (``model.clip``), split by the tower
  prefixes of :data:`kd_trainer.models.towers.TOWER_PREFIXES`; ``logit_scale`` is in neither, and
  the projections a KD student trains beside it (``image_proj``/``text_proj``) are not deployed.
* **FLOPs** are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one forward pass
  at the model's input size (its ``image_size``; a caption is always ``context_length`` tokens,
  because the text tower runs over the whole padded context). Two gaps of the counter are closed
  here, both checked against a hand count of every matmul (tests/test_report_html.py):
  ``nn.MultiheadAttention``'s inference fast path is one fused op the counter does not see into,
  so the pass runs with autograd on (the regular path: linear layers and SDPA); and PyTorch's CPU
  SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no formula in the counter, so
  it is given the counter's own SDPA formula.
* **Latency** is the median wall time of ``iters`` calls at batch 1 under ``torch.inference_mode``
  (the fast path a deployment takes), after ``warmup`` calls, with the process's torch thread count.
  Only numbers measured in one process, one after another, are comparable: a report measures every
  row itself, and names the machine.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from kd_trainer.models.towers import TOWER_PREFIXES

__all__ = ["TOWERS", "Latency", "Efficiency", "tower_parameters", "count_flops", "model_efficiency", "measure_ms",
           "machine", "efficiency_key"]

TOWERS = ("image", "text")
DEPLOYED = "clip."  # the dual encoder inside a RetrievalModel; what an export ships


@dataclass(frozen=True)
class Latency:
    """How latency is measured: ``warmup`` untimed calls, then the median of ``iters`` timed ones."""

    warmup: int = 3
    iters: int = 20

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.iters < 1:
            raise ValueError(f"latency needs warmup >= 0 and iters >= 1, got warmup={self.warmup}, iters={self.iters}")


@dataclass(frozen=True)
class Efficiency:
    """One model's inference cost (per image = image tower, per caption = text tower)."""

    params: dict[str, int]  # {"image": n, "text": n}
    flops: dict[str, int]  # one image / one caption, batch 1
    image_size: tuple[int, int]  # (H, W) the FLOPs and latency were measured at
    context_length: int  # tokens per caption
    latency_ms: dict[str, float] | None = None  # median ms at batch 1; None: not measured

    @property
    def gflops(self) -> dict[str, float]:
        return {t: f / 1e9 for t, f in self.flops.items()}


def tower_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter count of each tower of the deployed encoder (``model.clip.*``), by ``TOWER_PREFIXES``."""
    out = {t: 0 for t in TOWERS}
    for name, p in model.named_parameters():
        if not name.startswith(DEPLOYED):
            continue
        for tower in TOWERS:
            if name.startswith(TOWER_PREFIXES[tower]):
                out[tower] += p.numel()
    return out


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    """The counter's SDPA formula for the CPU kernel it has none for (two batched matmuls)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops


def count_flops(fn: Callable[..., Any], *inputs: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of ``fn(*inputs)`` as :class:`FlopCounterMode` counts them.

    Runs with autograd enabled so that ``nn.MultiheadAttention`` takes its regular path, whose
    matmuls the counter sees (the fused inference kernel it does not); the output is discarded.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with torch.enable_grad(), counter:
        fn(*inputs)
    return int(counter.get_total_flops())


def measure_ms(fn: Callable[..., Any], *inputs: torch.Tensor, latency: Latency) -> float:
    """Median milliseconds of ``fn(*inputs)`` under ``torch.inference_mode``."""
    times = []
    with torch.inference_mode():
        for i in range(latency.warmup + latency.iters):
            start = time.perf_counter()
            fn(*inputs)
            if i >= latency.warmup:
                times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _inputs(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    image = torch.zeros(1, 3, *model.image_size, device=device)
    caption = torch.zeros(1, model.context_length, dtype=torch.long, device=device)
    caption[0, 0], caption[0, 1] = 49406, 49407  # <start> <end>: the pooled token exists
    return image, caption


def model_efficiency(model: Any, *, latency: Latency | None = None) -> Efficiency:
    """Parameters, FLOPs and (when ``latency`` is given) CPU latency of a retrieval model.

    ``model`` is a :class:`~kd_trainer.models.factory.RetrievalModel` (``encode_image``,
    ``encode_text``, ``image_size``, ``context_length``). Latency is measured on the CPU: a model
    elsewhere is measured on a CPU copy, so the numbers of every row mean the same thing.
    """
    was_training = model.training
    model.eval()
    try:
        image, caption = _inputs(model)
        flops = {"image": count_flops(model.encode_image, image), "text": count_flops(model.encode_text, caption)}
        ms = None
        if latency is not None:
            cpu = model if image.device.type == "cpu" else _cpu_copy(model)
            image, caption = _inputs(cpu)
            ms = {"image": measure_ms(cpu.encode_image, image, latency=latency),
                  "text": measure_ms(cpu.encode_text, caption, latency=latency)}
    finally:
        model.train(was_training)
    return Efficiency(params=tower_parameters(model), flops=flops, image_size=tuple(model.image_size),
                      context_length=int(model.context_length), latency_ms=ms)


def _cpu_copy(model: Any) -> Any:
    return copy.deepcopy(model).to("cpu").eval()


def efficiency_key(model: Any) -> tuple:
    """What the cost depends on: the parameter shapes and the input size. Runs sharing it (seeds of
    one configuration) are measured once, so a table row does not differ by timing noise alone."""
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters() if n.startswith(DEPLOYED))
    return shapes, tuple(model.image_size), int(model.context_length)


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "processor\t: ")) and ":" in line:
                    name = line.split(":", 1)[1].strip()
                    if name and not name.isdigit():
                        return name
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """The machine latency was measured on: CPU model, OS, logical cores and torch threads."""
    return (f"{_cpu_model_name()}, {platform.system()} {platform.machine()}, {os.cpu_count()} logical cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__.split('+')[0]}")

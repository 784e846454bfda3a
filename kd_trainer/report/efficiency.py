"""What a model costs at inference: parameters per tower, FLOPs per image (and per caption), CPU
latency at batch 1, and the machine the latency was measured on.

    eff = model_efficiency(model, latency=Latency(warmup=2, iters=10))   # a retrieval dual encoder
    eff.params        # {"image": 20320, "text": 1598560}
    eff.flops         # {"image": 331904, "text": 2653312}   (FLOPs = 2 x multiply-adds)
    eff.latency_ms    # {"image": 0.41, "text": 0.93}, or None when not measured
    machine()         # "x86_64 Linux-6.1 ..., AMD EPYC 7B13, 2 torch threads"
    image_model_efficiency(classifier, (32, 32))   # one tower: {"image": ...} in each field

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

A classifier or a detector (:func:`image_model_efficiency`) has one tower, the image model, called
as ``model(pixel_values)`` on one image at the run's input size; its parameters are all of the
loaded model's (the mimic adapters a distilled student trains beside it are not loaded). A
detector's cost depends on how many proposals its RPN keeps: NMS keeps a number that changes with
the image and the weights, so the count and the timing are made with NMS keeping every proposal up
to the test-time cap (``rpn_post_nms_top_n_test``), the most work one image can take; the
proposals used are recorded (``Efficiency.proposals``). RoIAlign, NMS and box decoding do no matrix
products and are not counted.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from kd_trainer.models.detector import Detector
from kd_trainer.models.towers import TOWER_PREFIXES

__all__ = ["TOWERS", "Latency", "Efficiency", "tower_parameters", "count_flops", "model_efficiency", "measure_ms",
           "machine", "efficiency_key", "image_model_efficiency", "image_model_key"]

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
    """One model's inference cost (per image = image tower, per caption = text tower).

    A dual encoder has the towers ``image`` and ``text``; a classifier or detector ``image`` alone."""

    params: dict[str, int]  # {"image": n, "text": n}, or {"image": n}
    flops: dict[str, int]  # one image / one caption, batch 1
    image_size: tuple[int, int]  # (H, W) the FLOPs and latency were measured at
    context_length: int | None = None  # tokens per caption; None: no text tower
    latency_ms: dict[str, float] | None = None  # median ms at batch 1; None: not measured
    # the 90th percentile over the median of the timed calls, per tower: near 1 on an idle machine
    latency_spread: dict[str, float] | None = None
    proposals: int | None = None  # a detector: the proposals per image its box head ran on

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(self.params)

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
    return timed_ms(fn, *inputs, latency=latency)[0]


def timed_ms(fn: Callable[..., Any], *inputs: torch.Tensor, latency: Latency) -> tuple[float, float]:
    """Median milliseconds of ``fn(*inputs)`` under ``torch.inference_mode``, and the 90th percentile of
    the timed calls over that median (how much the slow calls stray: other work on the CPU shows here)."""
    times = []
    with torch.inference_mode():
        for i in range(latency.warmup + latency.iters):
            start = time.perf_counter()
            fn(*inputs)
            if i >= latency.warmup:
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
    return 1000.0 * median, p90 / median if median > 0 else 1.0


def _inputs(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    image = torch.zeros(1, 3, *model.image_size, device=device)
    caption = torch.zeros(1, model.context_length, dtype=torch.long, device=device)
    caption[0, 0], caption[0, 1] = 49406, 49407  # <start> <end>: the pooled token exists
    return image, caption


Calls = Callable[[Any], dict[str, tuple[Callable[..., Any], torch.Tensor]]]


def _flops_and_ms(model: Any, calls: Calls, latency: Latency | None
                  ) -> tuple[dict[str, int], dict[str, float] | None, dict[str, float] | None]:
    """FLOPs and (when ``latency`` is given) CPU latency of each tower of ``model``; ``calls(m)`` gives
    ``{tower: (function, one input)}`` for ``m``, ``model`` or its CPU copy. Latency is measured on the
    CPU: a model elsewhere is measured on a CPU copy, so the numbers of every row mean the same thing.
    Returns the FLOPs, the median ms and the spread of the timed calls (:func:`timed_ms`) per tower."""
    was_training = model.training
    model.eval()
    try:
        flops = {t: count_flops(fn, x) for t, (fn, x) in calls(model).items()}
        ms = spread = None
        if latency is not None:
            on_cpu = next(model.parameters()).device.type == "cpu"
            cpu = model if on_cpu else _cpu_copy(model)
            timed = {t: timed_ms(fn, x, latency=latency) for t, (fn, x) in calls(cpu).items()}
            ms, spread = {t: m for t, (m, _) in timed.items()}, {t: s for t, (_, s) in timed.items()}
    finally:
        model.train(was_training)
    return flops, ms, spread


def model_efficiency(model: Any, *, latency: Latency | None = None) -> Efficiency:
    """Parameters, FLOPs and (when ``latency`` is given) CPU latency of a retrieval model.

    ``model`` is a :class:`~kd_trainer.models.factory.RetrievalModel` (``encode_image``,
    ``encode_text``, ``image_size``, ``context_length``), measured on the CPU (see :func:`_flops_and_ms`).
    """
    def calls(m: Any) -> dict[str, tuple[Callable[..., Any], torch.Tensor]]:
        image, caption = _inputs(m)
        return {"image": (m.encode_image, image), "text": (m.encode_text, caption)}

    flops, ms, spread = _flops_and_ms(model, calls, latency)
    return Efficiency(params=tower_parameters(model), flops=flops, image_size=tuple(model.image_size),
                      context_length=int(model.context_length), latency_ms=ms, latency_spread=spread)


@contextmanager
def _every_proposal(model: torch.nn.Module, seen: list[int]) -> Iterator[None]:
    """A :class:`Detector` keeps every proposal up to its test-time cap (NMS at IoU 1.0 drops none:
    it drops a box whose IoU with a kept one is above the threshold); ``seen`` gets the count the
    RPN hands the box head on each call. Anything else runs as it is."""
    if not isinstance(model, Detector):
        yield
        return
    rpn = model.rpn
    saved = rpn.nms_thresh
    hook = rpn.register_forward_hook(lambda _m, _i, out: seen.append(len(out[0][0])))
    rpn.nms_thresh = 1.0
    try:
        yield
    finally:
        rpn.nms_thresh = saved
        hook.remove()


def image_model_efficiency(model: torch.nn.Module, image_size: tuple[int, int] | list[int], *,
                           latency: Latency | None = None) -> Efficiency:
    """Parameters, FLOPs and (when ``latency`` is given) CPU latency of a one-tower image model (a
    :class:`~kd_trainer.models.classifier.Classifier`, a :class:`Detector`), called as
    ``model(pixel_values)`` on one ``image_size`` (H, W) image; a detector at its proposal cap
    (module docstring)."""
    size = (int(image_size[0]), int(image_size[1]))

    def calls(m: torch.nn.Module) -> dict[str, tuple[Callable[..., Any], torch.Tensor]]:
        return {"image": (m, torch.zeros(1, 3, *size, device=next(m.parameters()).device))}

    seen: list[int] = []
    with _every_proposal(model, seen):
        flops, ms, spread = _flops_and_ms(model, calls, latency)
    return Efficiency(params={"image": sum(p.numel() for p in model.parameters())}, flops=flops, image_size=size,
                      latency_ms=ms, latency_spread=spread, proposals=seen[0] if seen else None)


def _cpu_copy(model: Any) -> Any:
    return copy.deepcopy(model).to("cpu").eval()


def _shapes(model: torch.nn.Module, prefix: str = "") -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters() if n.startswith(prefix))


def efficiency_key(model: Any) -> tuple:
    """What the cost depends on: the parameter shapes and the input size. Runs sharing it (seeds of
    one configuration) are measured once, so a table row does not differ by timing noise alone."""
    return _shapes(model, DEPLOYED), tuple(model.image_size), int(model.context_length)


def image_model_key(model: torch.nn.Module, image_size: tuple[int, int] | list[int]) -> tuple:
    """:func:`efficiency_key` of a one-tower image model: its parameter shapes, the input size and its
    config (``to_config()``: a detector's proposal counts are in it, not in any shape)."""
    config = model.to_config() if callable(getattr(model, "to_config", None)) else None
    return _shapes(model), tuple(int(x) for x in image_size), json.dumps(config, sort_keys=True)


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

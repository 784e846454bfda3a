"""The CPU allocator peak that ``make bench-accum`` judges issue 17's memory target on.

``bench/bench_accumulation.py`` has no CUDA ``max_memory_allocated`` on the CPU; it rebuilds that
figure from the profiler's record of every CPU-allocator allocation and free during one step. Here
the step's tensors are sized by hand, so the peak it must report is known exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_accumulation  # noqa: E402

MiB = 2**20


def test_allocator_peak_is_the_bytes_held_plus_the_step_high_water_mark() -> None:
    held_before = torch.zeros(4 * MiB, dtype=torch.uint8)  # held by "weights" before the step
    view = held_before[: MiB]  # a view shares its storage: counted once

    def step() -> None:
        a = torch.ones(MiB, dtype=torch.uint8)
        b = torch.ones(2 * MiB, dtype=torch.uint8)  # a + b = 3 MiB: the high-water mark
        del a
        c = torch.ones(MiB // 2, dtype=torch.uint8)  # 2.5 MiB: below the mark
        del b, c

    def held() -> int:
        return bench_accumulation.storage_bytes([held_before, view])

    assert held() == 4 * MiB
    assert bench_accumulation.allocator_peak(step, held) == 7 * MiB


@pytest.mark.parametrize("text, parsed", [("8x8", ("exact", 8, 8)), ("1x64", ("plain", 1, 64)),
                                          ("plain:8x8", ("plain", 8, 8))])
def test_configs_parse(text: str, parsed: tuple[str, int, int]) -> None:
    assert bench_accumulation.parse_config(text) == parsed

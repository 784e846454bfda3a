"""Shared builders for the tests: tiny retrieval batches and model pairs, and a gloo launcher.

Plain functions (not fixtures) so that worker processes spawned by :func:`spawn_gloo` can import
them too; ``conftest.py`` exposes the same things as fixtures.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_trainer.models.factory import RetrievalModel, create_model


def batch_items(n: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` retrieval items at 32x16 with 5-token captions, two per pid."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        ids = torch.zeros(77, dtype=torch.long)
        ids[0], ids[1:6], ids[6] = 49406, torch.randint(300, 4000, (5,), generator=g), 49407
        items.append({"pixel_values": torch.randn(3, 32, 16, generator=g), "input_ids": ids,
                      "pids": torch.tensor(i // 2), "image_ids": torch.tensor(i)})
    return items


def micro_pair(seed: int = 0, arch: str = "micro") -> tuple[RetrievalModel, RetrievalModel]:
    """A student and a teacher of the ``micro`` architecture, seeded differently."""
    torch.manual_seed(seed)
    student = create_model(arch)
    torch.manual_seed(seed + 1)
    teacher = create_model(arch)
    return student, teacher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_env(rank: int, world: int, port: int) -> None:
    """The environment a process of a ``world``-process gloo group needs (call first in a worker)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), ACCELERATE_USE_CPU="1")


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join the ``world``-process gloo group directly (no accelerate), one thread per process."""
    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def spawn_gloo(worker: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``worker(rank, world, port, *args)`` in ``world`` processes (a module-level function)."""
    mp.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=True)

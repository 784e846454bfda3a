"""Global-batch terms: 2 gloo processes optimise exactly what 1 process does on the whole batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_trainer.distill.gather import gather_features
from kd_trainer.losses import TERMS, Features, compute_term

BATCH_DEPENDENT = sorted(n for n, s in TERMS.items() if s.batch_dependent)


def make_problem(total: int):
    """A tiny 'student' (one linear map per tower) and fixed teacher embeddings for ``total`` samples."""
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(total, 6, generator=g), torch.randn(total, 5, generator=g)
    teacher_image, teacher_text = torch.randn(total, 4, generator=g), torch.randn(total, 4, generator=g)
    pids = torch.tensor([i // 2 for i in range(total)])
    torch.manual_seed(1)
    student = torch.nn.ModuleDict({"image": torch.nn.Linear(6, 4), "text": torch.nn.Linear(5, 4)})
    return student, images, texts, teacher_image, teacher_text, pids


def loss_and_grads(name, student, images, texts, ti, tt, pids, gather: bool):
    student.zero_grad()
    feats = Features(student_image=student["image"](images), student_text=student["text"](texts),
                     teacher_image=ti, teacher_text=tt, pids=pids)
    if gather:
        feats = gather_features(feats)
    spec = TERMS[name]
    kwargs = {"temperature": spec.default_temperature, "side": spec.sides[-1]}
    loss = compute_term(name, feats, **kwargs)
    loss.backward()
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in student.parameters()]


def _worker(rank: int, world: int, init_file: str, sizes: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert dist.get_world_size() == 2
        student, images, texts, ti, tt, pids = make_problem(sum(sizes))
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        for name in BATCH_DEPENDENT:
            want_loss, want_grads = loss_and_grads(name, student, images, texts, ti, tt, pids, gather=False)
            loss, grads = loss_and_grads(name, student, images[lo:hi], texts[lo:hi], ti[lo:hi], tt[lo:hi],
                                         pids[lo:hi], gather=True)
            for g in grads:  # what DDP does with the parameter gradients: average over processes
                dist.all_reduce(g)
                g /= world
            torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5, msg=f"{name}: loss")
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: gradient {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[4, 4], [5, 3]], ids=["even", "uneven"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path, sizes):
    assert {"itc", "sdm", "cross_kd", "motis", "inter_ss_kl"} <= set(BATCH_DEPENDENT)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), sizes), nprocs=2, join=True)


def test_single_process_is_a_no_op():
    f = Features(student_image=torch.ones(2, 3))
    assert gather_features(f) is f

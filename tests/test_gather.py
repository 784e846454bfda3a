"""Global-batch terms: N gloo processes optimise exactly what 1 process does on the whole batch.

Both ways of splitting the work (``distill/gather.py``): local rows (each process computes its
own rows against the gathered columns; the default) and the whole batch on every process. For
every batch-dependent term and each of its sides, the loss (averaged over processes, as the
trainer logs it) and the parameter gradients (averaged over processes, as DDP does) must equal
one process's on the concatenated batch. In float64, to 1e-9: the split is exact, not merely
close. (In float32 the two computations round differently: ``sdm`` at its temperature of 0.02,
whose per-row KL against ``log 1e-8`` is large, then differs by ~2e-5 in its gradients while
float64 agrees to 1e-15.)
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from kd_trainer.distill.gather import gather_features
from kd_trainer.losses import TERMS, Features, LocalRows, compute_term, register_term
from kd_trainer.models.factory import create_model

from tiny import init_gloo, spawn_gloo

BATCH_DEPENDENT = sorted(n for n, s in TERMS.items() if s.batch_dependent)
# Every (term, side), and crd with a teacher temperature of its own. The per-sample fd too: given
# the gathered batch it computes its own rows, which stays exact for uneven shards.
CASES = [(n, side, {}) for n in sorted(TERMS) for side in TERMS[n].sides] + [
    ("crd", "both", {"teacher_temperature": 0.2})
]
TOL = {"atol": 1e-9, "rtol": 1e-9}


def make_problem(total: int):
    """A tiny 'student' (one linear map per tower) and fixed teacher embeddings for ``total`` samples."""
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(total, d, generator=g, dtype=torch.float64)
         for k, d in (("i", 6), ("t", 5), ("vt", 4), ("tt", 4))}
    pids = torch.tensor([i // 2 for i in range(total)])
    torch.manual_seed(1)
    student = torch.nn.ModuleDict({"image": torch.nn.Linear(6, 4), "text": torch.nn.Linear(5, 4)}).double()
    return student, x["i"], x["t"], x["vt"], x["tt"], pids


def embed(student, images, texts, ti, tt, pids, gather: str | None = None) -> Features:
    """The student's embeddings beside the teacher's; ``gather``: None, "local" or "whole" rows."""
    feats = Features(student_image=student["image"](images), student_text=student["text"](texts),
                     teacher_image=ti, teacher_text=tt, pids=pids)
    return feats if gather is None else gather_features(feats, local_rows=gather == "local")


def loss_and_grads(case, student, feats: Features) -> torch.Tensor:
    """The term's value and the student's parameter gradients, in one vector (one all-reduce
    then averages them all). The graph is kept: the next term reuses the same features."""
    name, side, kwargs = case
    loss = compute_term(name, feats, temperature=TERMS[name].default_temperature, side=side, **kwargs)
    params = list(student.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    grads = [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]
    return torch.cat([loss.detach().reshape(1), *grads])


def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    """What DDP does with parameter gradients, and the trainer's logs with term values."""
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def whole_batch_itc(features: Features, *, temperature: float, side: str = "both") -> torch.Tensor:
    """A term that does not declare local rows: it ignores ``features.rows``. Registered only
    inside the spawned workers, so the test session's registry stays the project's."""
    return compute_term("itc", dataclasses.replace(features, rows=None), temperature=temperature)


def _worker(rank: int, world: int, port: int, sizes: list[int]) -> None:
    init_gloo(rank, world, port)
    try:
        register_term("whole_batch_itc", kind="task", reads={"both": ("student_image", "student_text")})(
            whole_batch_itc
        )
        student, images, texts, ti, tt, pids = make_problem(sum(sizes))
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        mine = (images[lo:hi], texts[lo:hi], ti[lo:hi], tt[lo:hi], pids[lo:hi])
        one = embed(student, images, texts, ti, tt, pids)  # one process, the concatenated batch
        split = {mode: embed(student, *mine, gather=mode) for mode in ("local", "whole")}
        assert split["local"].rows == LocalRows(lo, hi, sum(sizes), world) and split["whole"].rows is None
        for case in CASES + [("whole_batch_itc", "both", {})]:
            want = loss_and_grads(case, student, one)
            for mode, feats in split.items():
                got = loss_and_grads(case, student, feats)
                torch.testing.assert_close(mean_over_processes(got), want, **TOL,
                                           msg=lambda m: f"{case} ({mode} rows, rank {rank}): {m}")
                # Each process computes its own share when the term declares local rows, so the
                # value differs from the global loss; otherwise it is the global loss itself.
                shared = mode == "local" and TERMS[case[0]].local_rows
                assert torch.isclose(got[0], want[0], **TOL).item() != shared, (case, mode)

        # Local rows need the summed backward: with the whole-batch gather's (this shard's
        # gradient times N, no communication) the gradients that other processes' rows send
        # to this process's columns are lost, and the check above would fail.
        case = ("itc", "both", {})
        want = loss_and_grads(case, student, one)
        mixed = dataclasses.replace(split["whole"], rows=split["local"].rows)
        got = mean_over_processes(loss_and_grads(case, student, mixed))
        assert torch.isclose(got[0], want[0], **TOL)  # the loss is right...
        assert (got - want).abs().max() > 1e-3  # ...its gradient is not
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "sizes",
    [[4, 4], [5, 3], pytest.param([2, 4, 3], marks=pytest.mark.slow)],  # 3 processes: a middle shard
    ids=["even", "uneven", "three-uneven"],
)
def test_processes_equal_one_process_on_the_concatenated_batch(sizes):
    assert {"itc", "sdm", "cross_kd", "motis", "inter_ss_kl", "crd", "affinity", "icl"} <= set(BATCH_DEPENDENT)
    assert all(TERMS[n].local_rows for n in BATCH_DEPENDENT)  # the default for every one of them
    spawn_gloo(_worker, len(sizes), sizes)


def test_single_process_is_a_no_op():
    f = Features(student_image=torch.ones(2, 3))
    assert gather_features(f) is f
    assert gather_features(f, local_rows=False) is f


def test_gathering_twice_is_refused():
    f = Features(student_image=torch.ones(2, 3), rows=LocalRows(0, 2, 2, 1))
    with pytest.raises(ValueError, match="already a gathered batch"):
        gather_features(f)


# --- the real DDP wrapper around a tiny CLIP, with the trainer's two gathers -----------------------


def trainer_step(model, batch: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], gather: bool):
    """One step's loss as ``DistillationTrainer.compute_loss`` builds it: plain and projected
    student embeddings gathered separately (local rows, the default), every term on the gathered
    features (the per-sample ``fd`` too, exact with uneven shards)."""
    out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"])
    plain = Features(student_image=out["image_embeds"], student_text=out["text_embeds"], pids=batch["pids"],
                     **teacher)
    projected = Features(student_image=out["image_embeds_proj"], student_text=out["text_embeds_proj"],
                         pids=batch["pids"], **teacher)
    plain_global, projected_global = plain, projected
    if gather:
        plain_global = gather_features(plain)
        proj = gather_features(Features(student_image=projected.student_image, student_text=projected.student_text))
        projected_global = Features(**{**vars(plain_global), "student_image": proj.student_image,
                                       "student_text": proj.student_text})
        assert plain_global.rows is not None and projected_global.rows == plain_global.rows
    loss = (compute_term("itc", plain_global) + compute_term("cross_kd", plain_global, temperature=0.5)
            + compute_term("motis", projected_global, temperature=0.5) + compute_term("fd", projected_global))
    loss.backward()
    inner = model.module if isinstance(model, DDP) else model
    return {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world: int, port: int, sizes: list[int]) -> None:
    init_gloo(rank, world, port)
    try:
        total, ctx = sum(sizes), 16
        g = torch.Generator().manual_seed(2)
        batch = {"pixel_values": torch.randn(total, 3, 32, 16, generator=g, dtype=torch.float64),
                 "input_ids": torch.randint(1, 400, (total, ctx), generator=g),
                 "pids": torch.tensor([i // 2 for i in range(total)])}
        teacher = {"teacher_image": torch.randn(total, 48, generator=g, dtype=torch.float64),
                   "teacher_text": torch.randn(total, 48, generator=g, dtype=torch.float64)}
        torch.manual_seed(0)
        student = create_model("micro", context_length=ctx, projection_dim=48).double()
        want = trainer_step(copy.deepcopy(student), batch, teacher, gather=False)

        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        ddp = DDP(student, find_unused_parameters=True)  # the Trainer's default
        got = trainer_step(ddp, {k: v[lo:hi] for k, v in batch.items()},
                           {k: v[lo:hi] for k, v in teacher.items()}, gather=True)  # averaged by DDP
        assert set(got) == set(want) and len(want) > 10
        for name, w in want.items():
            torch.testing.assert_close(got[name], w, **TOL, msg=lambda m: f"{name} (rank {rank}): {m}")
    finally:
        dist.destroy_process_group()


def test_ddp_with_the_trainers_gathers_equals_one_process():
    """Backward's all-reduce of the gathered gradient runs beside DDP's own bucket all-reduces."""
    spawn_gloo(_ddp_worker, 2, [4, 2])

"""Mimic jobs under DDP: 2 gloo processes train the adapters and the student as 1 process does.

Adapters are trainable parameters of the student (``mimic_head``). DDP with
``find_unused_parameters=True`` (the Trainer's default) counts as used only the parameters its
forward's outputs depend on; adapters applied after the wrapped forward then receive their
gradient "twice" and the backward fails. The engine applies them inside the student's forward,
so this test runs the real DDP wrapper, not an imitation of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from kd_trainer.distill.mimic import ADAPTED_KEY, MimicEngine
from kd_trainer.models.factory import create_model, get_architecture
from kd_trainer.recipe.mimic import MimicJob

from tiny import init_gloo, spawn_gloo

CTX = 16
TOTAL = 6
JOBS = [
    # text block 0: student width 32 -> teacher width 64 (a linear adapter is needed)
    MimicJob(name="hidden", loss={"type": "mse"}, teachers={"teacher0": ["clip.transformer.resblocks.0"]},
             student=["clip.transformer.resblocks.0"]),
    # image block 0 through a forced linear adapter (32 -> 64 as well), with a warm-up
    MimicJob(name="visual", loss={"type": "smooth_l1"}, warm_up_iters=4, adapter="linear",
             teachers={"teacher0": ["clip.visual.transformer.resblocks.0"]},
             student=["clip.visual.transformer.resblocks.0"]),
]


def make_pair():
    torch.manual_seed(0)
    student = create_model("micro", context_length=CTX)
    arch = get_architecture("micro")
    arch["vision_cfg"]["width"] = 64
    arch["text_cfg"].update(width=64, heads=4)
    torch.manual_seed(1)
    teacher = create_model(arch, context_length=CTX)
    return student, teacher


def make_batch():
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(TOTAL, 3, 32, 16, generator=g),
            "input_ids": torch.randint(1, 400, (TOTAL, CTX), generator=g)}


def step_grads(model, engine: MimicEngine, batch) -> dict[str, torch.Tensor]:
    """One training step's gradients: student forward (possibly DDP-wrapped), teacher, mimic loss.

    A per-sample task term on the final embeddings joins the mimic loss, as in training: DDP
    needs every parameter its outputs depend on to receive a gradient.
    """
    model.train()
    with engine.capture() as cap:
        out = model(**batch)
        engine.run_teachers(batch)
        task = (out["image_embeds"] * out["text_embeds"]).sum(1).mean()
        loss = task + engine.losses(cap.student, cap.teachers, step=2)["mimic/total"]
    loss.backward()
    assert ADAPTED_KEY in out and len(out[ADAPTED_KEY]) == 2
    inner = model.module if isinstance(model, DDP) else model
    return {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


def build(student, teacher, batch) -> MimicEngine:
    engine = MimicEngine(student, {"teacher0": teacher}, JOBS)
    keys = engine.build_adapters({k: v[:2] for k, v in batch.items()})
    assert len(keys) == 2
    student.mimic_head = engine.head
    engine.head.lock()
    return engine


def _worker(rank: int, world: int, port: int) -> None:
    init_gloo(rank, world, port)
    try:
        batch = make_batch()
        student, teacher = make_pair()
        want = step_grads(student, build(student, teacher, batch), batch)

        student, teacher = make_pair()
        engine = build(student, teacher, batch)
        ddp = DDP(student, find_unused_parameters=True)
        per = TOTAL // world
        shard = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
        got = step_grads(ddp, engine, shard)  # DDP has averaged these over the 2 processes
        adapters = [n for n in want if n.startswith("mimic_head.")]
        assert len(adapters) == 4, adapters  # weight and bias of both adapters
        assert set(got) == set(want)
        for name, w in want.items():
            torch.testing.assert_close(got[name], w, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


def test_two_processes_train_adapters_and_student_as_one_process_does():
    spawn_gloo(_worker, 2)

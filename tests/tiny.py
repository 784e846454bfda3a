"""Shared builders for the tests: tiny retrieval batches and model pairs, and a gloo launcher.

Plain functions (not fixtures) so that worker processes spawned by :func:`spawn_gloo` can import
them too; ``conftest.py`` exposes the same things as fixtures.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import TrainerCallback, TrainingArguments

from kd_trainer.cli import main as cli_main
from kd_trainer.data import load_pedes, with_retrieval_transforms
from kd_trainer.distill.plan import RunPlan
from kd_trainer.distill.retrieval import RetrievalTrainer
from kd_trainer.models.factory import RetrievalModel, create_model
from kd_trainer.models.precision import convert_to_irra_fp16
from kd_trainer.recipe import LossConfig, Recipe, StageConfig, TermConfig


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


def fp16_micro_trainer(recipe: Recipe, out: str | os.PathLike, callbacks: Sequence[TrainerCallback] = (),
                       save_steps: int = 1) -> RetrievalTrainer:
    """A ``RetrievalTrainer`` running ``recipe``'s plan on :func:`micro_pair` (seed 0), both models
    in IRRA's fp16 weights (``precision: irra_fp16``, as the run converts them), over
    :func:`batch_items` (8) in batches of 4 on the CPU: no gradient clipping, no evaluation, a log
    line and (``save_steps`` > 0) a checkpoint every ``save_steps`` steps into ``out``."""
    student, teacher = micro_pair(0)
    for model in (student, teacher):
        convert_to_irra_fp16(model)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_grad_norm=0.0,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             eval_strategy="no", logging_steps=1, seed=0, data_seed=0, report_to="none",
                             remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    return RetrievalTrainer(model=student, args=args, plan=RunPlan.from_recipe(recipe), teacher=teacher,
                            train_dataset=batch_items(8), callbacks=list(callbacks))


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


def plan_of(terms: list[TermConfig] | None = None, stages: list[StageConfig] | None = None) -> RunPlan:
    """The plan a retrieval recipe with these ``terms`` (one stage) or ``stages`` (with a teacher)
    resolves to, for a trainer built without a recipe file. A new one each call: a trainer binds it."""
    if stages is not None:
        return RunPlan.from_configs(stages, has_teacher=True)
    return RunPlan.single(LossConfig(terms=list(terms or [])))


def spawn_gloo(worker: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``worker(rank, world, port, *args)`` in ``world`` processes (a module-level function)."""
    mp.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=True)


def fitted_micro(root: str | os.PathLike, dataset: str = "synth_pedes", split: str = "test", *, steps: int = 80,
                 seed: int = 0, lr: float = 2e-3) -> RetrievalModel:
    """``micro`` fitted on one split's image-caption pairs (soft targets: every caption of a pid matches
    every image of it). A model that ranks well has rankings worth comparing: a random one ranks by
    near-ties that any rounding (INT8, another batch size) reorders."""
    torch.manual_seed(seed)
    model = create_model("micro")
    raw = load_pedes(dataset, root, splits=[split])
    views = with_retrieval_transforms(raw, image_size=model.image_size, augment=False,
                                      context_length=model.context_length)
    gallery, queries = views[f"{split}_gallery"], views[f"{split}_queries"]
    pixels = torch.stack([gallery[i]["pixel_values"] for i in range(len(gallery))])
    tokens = torch.stack([queries[i]["input_ids"] for i in range(len(queries))])
    row_of = {image_id: i for i, image_id in enumerate(raw[f"{split}_gallery"]["image_id"])}
    image_rows = torch.tensor([row_of[i] for i in raw[f"{split}_queries"]["image_id"]])
    pids = torch.tensor(raw[f"{split}_queries"]["pid"])
    same = (pids[:, None] == pids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        logits = model.encode_text(tokens) @ model.encode_image(pixels)[image_rows].t() / 0.05
        loss = -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@dataclass
class Ran:
    """What one ``kd-trainer`` command printed, and its exit code."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> Ran:
    """``kd-trainer ARGS``, in this process (its exit code is what SystemExit carries)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(list(args))
        except SystemExit as e:
            if isinstance(e.code, str):  # what the interpreter would print before exiting 1
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else 1
    return Ran(code, out.getvalue(), err.getvalue())

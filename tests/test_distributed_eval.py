"""Distributed evaluation: 2 CPU processes give exactly the single-process metrics."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator

from kd_trainer.data.collator import collate_retrieval
from kd_trainer.evaluation import embed_dataset, evaluate_retrieval
from kd_trainer.models.factory import create_model

from tiny import batch_items, gloo_env, spawn_gloo


def split(n_gallery: int, n_queries: int):
    items = batch_items(max(n_gallery, n_queries), seed=3)
    gallery = [{"pixel_values": it["pixel_values"], "pids": torch.tensor(i % 3)} for i, it in
               enumerate(items[:n_gallery])]
    queries = [{"input_ids": it["input_ids"], "pids": torch.tensor(i % 3)} for i, it in enumerate(items[:n_queries])]
    return gallery, queries


def _worker(rank: int, world: int, port: int, out: str) -> None:
    gloo_env(rank, world, port)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.state
    torch.manual_seed(0)
    model = create_model("micro")
    gallery, queries = split(11, 7)  # neither divides by 2, nor by the batch size of 3
    metrics = evaluate_retrieval(model, gallery, queries, batch_size=3, collate_fn=collate_retrieval,
                                 accelerator=accelerator, progress=False)
    feats, pids = embed_dataset(model.encode_image, gallery, "pixel_values", device=torch.device("cpu"),
                                batch_size=3, collate_fn=collate_retrieval, accelerator=accelerator, progress=False)
    assert len(feats) == 11 and pids.tolist() == [i % 3 for i in range(11)]  # each once, in order
    with open(f"{out}.{rank}", "w") as f:
        json.dump(metrics, f)
    accelerator.wait_for_everyone()


def test_two_process_evaluation_equals_one_process(tmp_path):
    out = str(tmp_path / "metrics")
    spawn_gloo(_worker, 2, out)
    torch.manual_seed(0)
    model = create_model("micro")
    gallery, queries = split(11, 7)
    want = evaluate_retrieval(model, gallery, queries, batch_size=3, collate_fn=collate_retrieval, progress=False)
    for rank in range(2):
        got = json.loads(open(f"{out}.{rank}").read())
        assert got == want, f"rank {rank}: {got} != {want}"

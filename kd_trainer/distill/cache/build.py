"""Building a teacher cache: one pass of the frozen teacher over the train split.

Every embedding-level loss term reads only the teacher's *final* embeddings, and the teacher is
frozen, so its forward in every training step recomputes numbers that are the same every epoch
except for the image augmentation. With replayable augmentation (:mod:`kd_trainer.data.replay`:
K seeded draws per image) there are only ``K x images`` image embeddings and ``captions`` text
embeddings to compute; after that, distillation costs a student step plus a table lookup
(:mod:`.store`).

Embeddings are raw (unnormalised) ``teacher.clip.encode_image/encode_text`` outputs in float32,
what the retrieval trainer's teacher forward produces; every term normalises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm

from kd_trainer.data.images import open_image
from kd_trainer.data.replay import ReplayConfig, TrainRows
from kd_trainer.data.tokenizer import tokenize
from kd_trainer.distill.cache.fingerprint import fingerprints
from kd_trainer.distill.cache.store import reset_cache_dir, write_cache

__all__ = ["build_teacher_cache"]

logger = logging.getLogger("kd_trainer")


class _ImageDraws(torch.utils.data.Dataset):
    """Item p: the K replayed draws of the p-th distinct image (decoded once), ``K x 3 x H x W``."""

    def __init__(self, rows: TrainRows, config: ReplayConfig, dataset_name: str) -> None:
        self.paths, self.ids = rows.image_paths, rows.images
        self.replay, self.num_draws, self.dataset_name = config.replay_transform(), config.num_draws, dataset_name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, p: int) -> tuple[int, torch.Tensor]:
        image = open_image(self.paths[p], self.dataset_name)
        return p, torch.stack([self.replay(image, self.ids[p], k) for k in range(self.num_draws)])


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on an accelerator; fp32 (exact) on CPU or when asked."""
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else (
            "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _embed_texts(teacher: nn.Module, rows: TrainRows, config: ReplayConfig, device: torch.device,
                 batch_size: int, amp: Any, progress: bool) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(rows), batch_size), desc="teacher cache: captions", disable=not progress):
        ids = tokenize(rows.caption[start:start + batch_size], config.context_length).to(device)
        with amp:
            chunks.append(teacher.clip.encode_text(ids).float().cpu())
    return torch.cat(chunks)


def _embed_images(teacher: nn.Module, rows: TrainRows, config: ReplayConfig, device: torch.device,
                  batch_size: int, amp: Any, progress: bool, num_workers: int, dataset_name: str) -> torch.Tensor:
    """``K x M x D``: every draw of every image; each image decoded once, its K draws in one batch."""
    k = config.num_draws
    loader = torch.utils.data.DataLoader(_ImageDraws(rows, config, dataset_name), batch_size=max(1, batch_size // k),
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    out: torch.Tensor | None = None
    for pos, pixels in tqdm(loader, desc="teacher cache: images", disable=not progress):
        b = pixels.shape[0]
        with amp:
            emb = teacher.clip.encode_image(pixels.flatten(0, 1).to(device, non_blocking=True)).float().cpu()
        if out is None:
            out = torch.empty(k, rows.num_images, emb.shape[1], dtype=torch.float32)
        out[:, pos] = emb.view(b, k, -1).transpose(0, 1)
    assert out is not None, "the train split has no images"
    return out


def build_teacher_cache(
    teacher: nn.Module,
    train_dataset_raw: datasets.Dataset,
    out_dir: str | os.PathLike,
    *,
    image_size: tuple[int, int],
    augment: bool,
    context_length: int = 77,
    num_draws: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    dataset_name: str = "",
    progress: bool = False,
    num_workers: int = 0,
    precision: str = "auto",
) -> Path:
    """One pass of the frozen teacher over the train split; returns ``out_dir``.

    Text: one embedding per caption row (captions are not augmented, so exact). Images: K
    replayed draws per distinct image (:class:`~kd_trainer.data.replay.ReplayTransform`,
    seeded by (image_id, k, seed)). ``batch_size`` counts images/captions per forward.
    ``precision``: ``auto`` = fp32 on CPU, bf16 autocast on GPU (match the run's mixed
    precision for the smallest cached-vs-online difference); stored as float32 either way.
    The teacher is put back on its device and in its train/eval mode afterwards.
    """
    out = Path(out_dir)
    config = ReplayConfig(tuple(image_size), bool(augment), int(context_length), int(num_draws), int(seed))
    rows = TrainRows.from_dataset(train_dataset_raw)
    name = dataset_name or (train_dataset_raw.info.dataset_name or "")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built_for = fingerprints(teacher, rows, config)
    reset_cache_dir(out)
    was_training, home = teacher.training, next(teacher.parameters()).device
    start = time.perf_counter()
    try:
        teacher.eval().to(dev)
        with torch.inference_mode():
            text = _embed_texts(teacher, rows, config, dev, batch_size, _autocast(dev, precision), progress)
            images = _embed_images(teacher, rows, config, dev, batch_size, _autocast(dev, precision), progress,
                                   num_workers, name)
    finally:
        teacher.to(home).train(was_training)
    write_cache(out, text, images, rows, built_for, config,
                build={"device": str(dev), "precision": precision, "seconds": round(time.perf_counter() - start, 2),
                       "torch": torch.__version__, "dataset_name": name, "batch_size": batch_size})
    logger.info("teacher cache: %d captions, %d images x %d draws -> %s", len(rows), rows.num_images, num_draws, out)
    return out

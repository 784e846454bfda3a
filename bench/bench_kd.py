"""Distillation at the cost of fine-tuning: time student-only fine-tuning, online KD, cached KD,
teacher inference, evaluation and data loading in one process, and check the targets.

    .venv/bin/python bench/bench_kd.py [--quick] [--batch-size N] [--device cpu|cuda] [--workers 0,2,8]

The pair is the realistic one: a ViT-B/16 teacher and a TinyCLIP-xsmall student at 384x128
(random weights: speed does not depend on them). One training step is forward, loss, backward
and an AdamW step of the student:

- student-only: ``itc``;
- online KD: ``itc + cross_kd + motis`` with the teacher's forward in the step, through the
  trainer's own ``teacher_embeddings`` (``torch.inference_mode``) and in the trainer's order
  (teacher, then student);
- cached KD: the same terms with the teacher embeddings from an in-memory ``TeacherCache``
  (``cache.lookup(batch)``, tables on the training device, as the trainer should hold them);
- teacher inference: the teacher's image and text forward alone;
- diagnostics: the KD terms with the teacher embeddings handed in (no lookup), which splits
  cached KD's extra time into the terms' cost and the lookup's; on a GPU, cached KD with the
  tables left on the CPU.

Evaluation: student images/s and captions/s, and ``rank_metrics`` on 20,000 x 20,000 (as
bench_ranking.py). Data loading: samples/s of the IRRA training transform on JPEG files
written at person-crop size, for the online pipeline (``with_retrieval_transforms``) and the
replayed one (``ReplayDataset``), per ``num_workers``. Times are medians over ``--iters``
iterations after ``--warmup``, the steps interleaved so that every ratio sees the same load;
on a GPU the step runs under bf16 autocast (``--precision``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch
from PIL import Image

from kd_trainer.data.collator import collate_retrieval
from kd_trainer.data.pipeline import with_retrieval_transforms
from kd_trainer.data.replay import CACHE_IMAGE_ROW, CACHE_TEXT_ROW, ReplayConfig, ReplayDataset
from kd_trainer.data.tokenizer import tokenize
from kd_trainer.distill.cache import TeacherCache
from kd_trainer.distill.retrieval import teacher_embeddings
from kd_trainer.evaluation import rank_metrics
from kd_trainer.losses import Features, compute_term
from kd_trainer.losses.registry import TEACHER_EMBEDDINGS
from kd_trainer.models.factory import RetrievalModel, create_model

SIZE = (384, 128)
CAPTIONS = [
    "A woman wearing a white shirt, dark blue jeans and black shoes, carrying a red handbag on her left arm.",
    "The man has short black hair and wears a grey jacket over a white t-shirt, black trousers and sneakers.",
    "A young person in a long green coat with a brown backpack, walking forward, wearing white shoes.",
    "She has long hair tied back and is wearing a yellow dress with a black belt and sandals.",
]
KD_TERMS = ("itc", "cross_kd", "motis")


# ----------------------------------------------------------------------------- plumbing


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few iterations (a smoke run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (default 8 CPU, 128 GPU; 4 quick)")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="default: 2 x batch size")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="autocast dtype; auto = bf16 on GPU, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--workers", default=None,
                        help="num_workers values for the loader bench, e.g. 0,2,8 (default: 0, then powers of "
                             "two below the CPU count, then the CPU count minus 2: one core for the training "
                             "process and one to spare)")
    parser.add_argument("--loader-samples", type=int, default=None, help="samples timed per loader setting")
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=list(SIZE), metavar=("H", "W"))
    parser.add_argument("--ranking-size", type=int, default=20_000, help="queries = gallery = this")
    parser.add_argument("--cache-images", type=int, default=None, help="images in the in-memory cache")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target fails")
    args = parser.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = dev
    gpu = dev.type != "cpu"
    args.batch_size = args.batch_size or (4 if args.quick else 128 if gpu else 8)
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.iters = args.iters or (3 if args.quick else 10)
    args.loader_samples = args.loader_samples or (48 if args.quick else max(512, 8 * args.batch_size))
    args.cache_images = args.cache_images or (2_000 if args.quick else 34_054)  # CUHK-PEDES train images
    args.precision = ("bf16" if gpu else "fp32") if args.precision == "auto" else args.precision
    args.workers = default_workers() if args.workers is None else [int(w) for w in str(args.workers).split(",") if w]
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def default_workers() -> list[int]:
    cpus = os.cpu_count() or 1
    workers = {0, *(w for w in (1, 2, 4, 8, 16, 32, 64) if w < cpus)}
    if cpus > 4:
        workers.add(cpus - 2)
    return sorted(workers)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"{dev.type} ({torch.get_num_threads()} torch threads)"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def amp(dev: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16)


def median_times(fns: dict[str, Callable[[], Any]], dev: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median wall time (s) of each function, the device synchronised around each call.

    Interleaved (one call of each per round) so that every ratio compares calls made under the
    same background load: on a shared machine, timing one function after the other would not.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            sync(dev)
            start = time.perf_counter()
            fn()
            sync(dev)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_time(fn: Callable[[], Any], dev: torch.device, warmup: int, iters: int) -> float:
    return median_times({"fn": fn}, dev, warmup, iters)["fn"]


# ----------------------------------------------------------------------------- training steps


def make_batch(batch_size: int, dev: torch.device, cache_images: int, num_draws: int, gen: torch.Generator) -> dict:
    """A training batch as the Trainer hands it to compute_loss (already on the device)."""
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    image_pos = torch.randperm(cache_images, generator=gen)[:batch_size]
    draws = torch.randint(0, num_draws, (batch_size,), generator=gen)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, *SIZE, generator=gen),
        "input_ids": tokenize(captions, 77),
        "pids": torch.arange(batch_size) // 2,
        CACHE_IMAGE_ROW: draws * cache_images + image_pos,
        CACHE_TEXT_ROW: 2 * image_pos,
    }
    return {k: v.to(dev) for k, v in batch.items()}


def make_cache(teacher: RetrievalModel, batch: dict, cache_images: int, num_draws: int, dev: torch.device,
               gen: torch.Generator) -> TeacherCache:
    """A CUHK-PEDES-sized in-memory cache (random rows) holding the teacher's real embeddings of the batch."""
    dim = teacher.embed_dim
    images = torch.randn(num_draws * cache_images, dim, generator=gen)
    texts = torch.randn(2 * cache_images, dim, generator=gen)
    with torch.inference_mode():
        images[batch[CACHE_IMAGE_ROW].cpu()] = teacher.clip.encode_image(batch["pixel_values"]).float().cpu()
        texts[batch[CACHE_TEXT_ROW].cpu()] = teacher.clip.encode_text(batch["input_ids"]).float().cpu()
    return TeacherCache(images, texts, num_draws=num_draws).to(dev)


def loss_of(out: dict, teacher: dict, pids: torch.Tensor, terms: tuple[str, ...]) -> torch.Tensor:
    """The trainer's loss: plain features for itc, projected student features for direct comparisons."""
    plain = Features(student_image=out["image_embeds"], student_text=out["text_embeds"], pids=pids, **teacher)
    proj = Features(student_image=out.get("image_embeds_proj", out["image_embeds"]),
                    student_text=out.get("text_embeds_proj", out["text_embeds"]), pids=pids, **teacher)
    total = None
    for name in terms:
        value = compute_term(name, proj if name in ("motis", "fd") else plain)
        total = value if total is None else total + value
    return total


def make_step(student: RetrievalModel, opt: torch.optim.Optimizer, batch: dict, terms: tuple[str, ...],
              teacher_source: Callable[[dict], dict] | None, ctx: Callable[[], Any]) -> Callable[[], None]:
    """One optimizer step of the student, its teacher embeddings from ``teacher_source``."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with ctx():
            # Teacher first, then the student, as DistillationTrainer.compute_loss runs them.
            teacher = teacher_source(batch) if teacher_source is not None else {}
            out = student(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"])
            loss = loss_of(out, teacher, batch["pids"], terms)
        loss.backward()
        opt.step()

    return step


def bench_training(args: argparse.Namespace) -> tuple[dict[str, float], RetrievalModel]:
    dev = args.device
    ctx = lambda: amp(dev, args.precision)  # noqa: E731
    torch.manual_seed(0)
    teacher = create_model("clip-vit-b16", image_size=SIZE).to(dev).eval().requires_grad_(False)
    student = create_model("tinyclip-xsmall", image_size=SIZE, projection_dim=teacher.embed_dim).to(dev).train()
    fused = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, **fused)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(args.batch_size, dev, args.cache_images, 8, gen)
    cache = make_cache(teacher, batch, args.cache_images, 8, dev, gen)

    def online(b: dict) -> dict:  # the trainer's own teacher call
        return teacher_embeddings(teacher, b, TEACHER_EMBEDDINGS)

    def teacher_only() -> None:
        with ctx():
            online(batch)

    fixed = cache.lookup(batch)
    steps = {
        "student-only step (itc)": make_step(student, opt, batch, ("itc",), None, ctx),
        "KD terms, teacher given": make_step(student, opt, batch, KD_TERMS, lambda b: fixed, ctx),
        "online KD step": make_step(student, opt, batch, KD_TERMS, online, ctx),
        "cached KD step": make_step(student, opt, batch, KD_TERMS, cache.lookup, ctx),
        "teacher inference": teacher_only,
    }
    if dev.type != "cpu":
        cpu_cache = TeacherCache(cache.image_embeds.cpu(), cache.text_embeds.cpu(), num_draws=8)
        steps["cached KD step, tables on CPU"] = make_step(student, opt, batch, KD_TERMS, cpu_cache.lookup, ctx)
    times = median_times(steps, dev, args.warmup, args.iters)
    for name in steps:
        print(f"  {name:<30} {times[name] * 1e3:9.1f} ms   {args.batch_size / times[name]:9.1f} samples/s", flush=True)
    del teacher, cache
    return times, student


# ----------------------------------------------------------------------------- evaluation


def bench_eval(args: argparse.Namespace, student: RetrievalModel) -> dict[str, float]:
    dev, bs = args.device, args.eval_batch_size
    student.eval()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(bs, 3, *SIZE, generator=gen).to(dev)
    ids = tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(bs)], 77).to(dev)

    def images() -> None:
        with torch.inference_mode(), amp(dev, args.precision):
            student.encode_image(pixels)

    def texts() -> None:
        with torch.inference_mode(), amp(dev, args.precision):
            student.encode_text(ids)

    out = {"images/s": bs / median_time(images, dev, args.warmup, args.iters),
           "captions/s": bs / median_time(texts, dev, args.warmup, args.iters)}
    n = args.ranking_size
    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=1)
    gallery_pids = torch.arange(n)[torch.randperm(n, generator=g)] % 1000
    query_pids = torch.randint(0, 1000, (n,), generator=g)
    rank = lambda: rank_metrics(queries, gallery, query_pids, gallery_pids)  # noqa: E731
    out["ranking s"] = median_time(rank, torch.device("cpu"), 0, 1 if args.quick else 3)
    print(f"  student embedding: {out['images/s']:.1f} images/s, {out['captions/s']:.1f} captions/s (batch {bs})")
    print(f"  rank_metrics {n} x {n}: {out['ranking s']:.2f} s", flush=True)
    return out


# ----------------------------------------------------------------------------- data loading


def write_jpegs(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """Person-crop-sized JPEGs (quality 95): smooth colour fields plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    paths = []
    for i in range(count):
        coarse = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        paths.append(str(root / f"{i:05d}.jpg"))
        Image.fromarray(img).save(paths[-1], quality=95)
    return paths


def loader_batches(samples: int, batch_size: int, workers: int) -> tuple[int, int]:
    """(batches skipped, batches timed). The first ``workers`` batches are skipped: the workers
    start together, so their first batches arrive in one burst that says nothing about the
    steady rate (and start-up is paid once per epoch). At least 4 rounds of all workers are timed."""
    skip = max(1, workers)
    return skip, max(-(-samples // batch_size), 4 * skip)


def loader_rate(dataset: Any, batch_size: int, workers: int, samples: int, pin: bool) -> float:
    """Steady samples/s of a shuffled DataLoader, as the Trainer builds it (collate_retrieval, pinning)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=collate_retrieval, pin_memory=pin, drop_last=True)
    skip, timed = loader_batches(samples, batch_size, workers)
    it = iter(loader)
    for _ in range(skip):
        next(it)
    start = time.perf_counter()
    seen = sum(next(it)["pixel_values"].shape[0] for _ in range(timed))
    return seen / (time.perf_counter() - start)


def bench_loader(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    most = max(sum(loader_batches(args.loader_samples, args.batch_size, w)) for w in args.workers)
    rows = most * args.batch_size + 2 * args.batch_size  # two captions per image, as CUHK-PEDES
    with tempfile.TemporaryDirectory() as tmp:
        # Up to 512 distinct files, reused by later rows: decoding costs the same, the disk cache holds them.
        paths = write_jpegs(Path(tmp), min(512, (rows + 1) // 2), tuple(args.jpeg_size))
        images = (rows + 1) // 2
        raw = datasets.Dataset.from_dict({
            "image_path": [paths[i % len(paths)] for i in range(images) for _ in range(2)],
            "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(2 * images)],
            "pid": [i // 4 for i in range(2 * images)],
            "image_id": [i // 2 for i in range(2 * images)],
        })
        pipelines = {
            "online (with_retrieval_transforms)":
                with_retrieval_transforms(datasets.DatasetDict(train=raw), image_size=SIZE, augment=True)["train"],
            "replayed (ReplayDataset)": ReplayDataset(raw, ReplayConfig(SIZE, True, 77, 8, 0)),
        }
        out: dict[str, dict[int, float]] = {}
        pin = args.device.type == "cuda"
        for name, ds in pipelines.items():
            out[name] = {}
            for w in args.workers:
                out[name][w] = loader_rate(ds, args.batch_size, w, args.loader_samples, pin)
                print(f"  {name:<36} num_workers={w:<3} {out[name][w]:9.1f} samples/s", flush=True)
    return out


# ----------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(args: argparse.Namespace, times: dict[str, float], ev: dict[str, float],
           loads: dict[str, dict[int, float]]) -> list[tuple[str, float, str, bool | None]]:
    student, online = times["student-only step (itc)"], times["online KD step"]
    cached, teacher = times["cached KD step"], times["teacher inference"]
    train_rate = args.batch_size / min(student, cached)  # the fastest step the loader must keep up with
    best_workers = {name: max(r, key=r.get) for name, r in loads.items()}
    given = times["KD terms, teacher given"]
    rows: list[tuple[str, float, str, bool | None]] = [
        ("online KD / student-only", online / student, "", None),
        ("KD terms, teacher given / student-only (the terms' cost)", given / student, "", None),
        ("cached KD / KD terms, teacher given (the lookup's cost)", cached / given, "", None),
        ("cached KD / student-only", cached / student, "<= 1.10", cached / student <= 1.10),
        ("online KD / (student + teacher inference)", online / (student + teacher), "<= 1.05",
         online / (student + teacher) <= 1.05),
        (f"ranking {args.ranking_size} x {args.ranking_size} (s)", ev["ranking s"], "< 5 s", ev["ranking s"] < 5.0),
    ]
    for name, rates in loads.items():
        w = best_workers[name]
        ratio = rates[w] / train_rate
        rows.append((f"loader {name.split()[0]} (workers={w}) / training samples/s", ratio, ">= 1.00", ratio >= 1.0))
    print(f"\nRatios (training rate = fastest step, {train_rate:.1f} samples/s):")
    for label, value, target, ok in rows:
        status = "" if ok is None else verdict(ok)
        print(f"  {label:<58} {value:8.3f}   {('target ' + target) if target else '':<16} {status}")
    return rows


def main() -> None:
    args = parse_args()
    dev = args.device
    print(f"bench_kd on {device_name(dev)}; torch {torch.__version__}, "
          f"torch.get_num_threads()={torch.get_num_threads()}")
    print(f"teacher clip-vit-b16, student tinyclip-xsmall, {SIZE[0]}x{SIZE[1]}, batch {args.batch_size}, "
          f"precision {args.precision}, median of {args.iters} after {args.warmup} warm-up"
          f"{', QUICK' if args.quick else ''}\n\nTraining:", flush=True)
    times, student = bench_training(args)
    print("Evaluation:")
    ev = bench_eval(args, student)
    h, w = args.jpeg_size
    print(f"Data loading (JPEG {h}x{w} -> IRRA train transform, batch {args.batch_size}):")
    loads = bench_loader(args)
    rows = report(args, times, ev, loads)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device_name(dev), "batch_size": args.batch_size, "precision": args.precision,
            "threads": torch.get_num_threads(), "times_s": times, "eval": ev,
            "loader_samples_per_s": loads, "ratios": [list(r) for r in rows]}, indent=2))
    if args.strict and any(ok is False for *_, ok in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Exact accumulation's price: peak memory and step time of one global batch, whole or in micro-batches.

    .venv/bin/python bench/bench_accumulation.py [--quick] [--device cpu|cuda] [--global-batch 64]
                                                 [--configs 1x64,4x16,8x8,plain:8x8]

The realistic pair of ``bench_kd.py`` (ViT-B/16 teacher, TinyCLIP-xsmall student, 384x128, random
weights) and its loss (``itc + cross_kd + motis``), one optimizer step (AdamW) over a global batch
computed as:

- ``1x64``: one batch of 64, the plain step (teacher, student, loss, backward);
- ``4x16``, ``8x8``: k micro-batches with exact accumulation (``distill/grad_cache.py``: every
  term over the whole group, one extra student forward per micro-batch);
- ``plain:8x8``: plain accumulation (each micro-batch its own loss, 1/k of it backpropagated),
  the cheaper step that optimises another objective, for comparison.

Each configuration runs in a fresh process so that its peak is its own. The memory target is
judged on the allocator's peak, what PyTorch's tensors hold at the step's highest point (weights,
AdamW state, gradients, activations): on CUDA ``torch.cuda.max_memory_allocated``; on the CPU
the same quantity from the profiler's record of every CPU-allocator allocation and free during
one extra, untimed step, plus the bytes the tensors held when it began. The CPU's resident-set
high-water mark (``getrusage``'s ``ru_maxrss``) is printed beside it: it also counts the
interpreter's and the libraries' pages, which no training scheme can shrink, and is also given
above what the process held before its first step. Times are medians of ``--iters`` steps after ``--warmup``; the
configurations run one after the other, ``--rounds`` times in turn, and a configuration's time is
the median over its rounds. On a GPU the step's time is its wall time (the device synchronised).
On the CPU it is also the process's CPU time (user + system, all threads): on a shared machine
the wall time measures the other jobs as much as the step, the CPU time the step's own work
(run it with ``--threads 1``, or OpenMP threads spinning at barriers count as work). Targets
(issue 17): 8x8 exact at most 40% of 1x64's peak memory and 1.5x its time (CPU time on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from bench_kd import CAPTIONS, KD_TERMS, SIZE, amp, device_name, loss_of, sync
from kd_trainer.data.tokenizer import tokenize
from kd_trainer.distill.grad_cache import accumulate_exactly, split_group
from kd_trainer.distill.retrieval import teacher_embeddings
from kd_trainer.losses.registry import TEACHER_EMBEDDINGS
from kd_trainer.models.factory import create_model
from kd_trainer.models.precision import float32_embeddings

MEMORY_TARGET = 0.40  # 8x8 exact / 1x64 peak memory
TIME_TARGET = 1.5  # 8x8 exact / 1x64 step time


def parse_config(text: str) -> tuple[str, int, int]:
    """``KxB`` (exact when K > 1) or ``plain:KxB`` -> (mode, k, b)."""
    mode, _, shape = text.rpartition(":")
    k, _, b = shape.partition("x")
    if not (k.isdigit() and b.isdigit() and int(k) >= 1 and int(b) >= 1) or mode not in ("", "plain"):
        raise SystemExit(f"--configs: {text!r} is not KxB or plain:KxB (e.g. 8x8, plain:8x8)")
    k_, b_ = int(k), int(b)
    return ("plain" if mode == "plain" or k_ == 1 else "exact"), k_, b_


def label(mode: str, k: int, b: int) -> str:
    return f"{k}x{b}" + (" exact" if mode == "exact" else " plain" if k > 1 else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="global batch 8 (1x8, 2x4, 4x2), 1 iteration: a smoke run")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--global-batch", type=int, default=None, help="samples per optimizer step (default 64)")
    parser.add_argument("--configs", default=None, help="comma-separated KxB (exact for K > 1) or plain:KxB; "
                                                        "default 1xG,4x(G/4),8x(G/8),plain:8x(G/8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per round (default 3 CPU, 10 GPU)")
    parser.add_argument("--rounds", type=int, default=None, help="times each configuration runs, in turn (default 2)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="autocast dtype; auto = bf16 on GPU, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each worker")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target fails")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one configuration, in this process
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type != "cpu"
    g = args.global_batch = args.global_batch or (8 if args.quick else 64)
    args.configs = args.configs or (f"1x{g},2x{g // 2},4x{g // 4}" if args.quick
                                    else f"1x{g},4x{g // 4},8x{g // 8},plain:8x{g // 8}")
    args.parsed = [parse_config(c) for c in args.configs.split(",") if c]
    bad = [label(*c) for c in args.parsed if c[1] * c[2] != g]
    if bad:
        raise SystemExit(f"--configs {bad} do not make the global batch of {g}")
    args.warmup = 1 if args.warmup is None else args.warmup
    args.iters = args.iters or (1 if args.quick else 10 if gpu else 3)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.precision = ("bf16" if gpu else "fp32") if args.precision == "auto" else args.precision
    return args


# ----------------------------------------------------------------------------- one configuration


def make_batch(n: int, dev: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(n, 3, *SIZE, generator=gen),
             "input_ids": tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(n)], 77),
             "pids": torch.arange(n) // 2}
    return {k: v.to(dev) for k, v in batch.items()}


def make_step(mode: str, k: int, b: int,
              args: argparse.Namespace) -> tuple[Callable[[], None], Callable[[], int], Callable[[], None]]:
    """One optimizer step of the student over the global batch, as ``mode`` computes it; a count of
    the bytes its tensors hold between steps (weights, gradients, AdamW state, batch); and the
    step's first act, freeing the gradients, to run before a profiled step (``allocator_peak``)."""
    dev = args.device
    torch.manual_seed(0)
    teacher = create_model("clip-vit-b16", image_size=SIZE).to(dev).eval().requires_grad_(False)
    student = create_model("tinyclip-xsmall", image_size=SIZE, projection_dim=teacher.embed_dim).to(dev).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, **({"fused": True} if dev.type == "cuda" else {}))
    batch = make_batch(k * b, dev)
    ctx = lambda: amp(dev, args.precision)  # noqa: E731

    def teach(mb: dict) -> dict:  # the trainer's own teacher call (inference mode)
        return teacher_embeddings(teacher, mb, TEACHER_EMBEDDINGS)

    def embed(mb: dict) -> dict:  # the retrieval trainer's student_outputs
        return float32_embeddings(student(pixel_values=mb["pixel_values"], input_ids=mb["input_ids"]))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with ctx():
            if mode == "exact":
                accumulate_exactly(split_group(batch, b), teacher=teach, student=embed, device=dev,
                                   loss=lambda s, t: loss_of(s, t, batch["pids"], KD_TERMS))
            else:  # one batch (k = 1), or plain accumulation: each micro-batch's own loss
                for mb in split_group(batch, b):
                    t = teach(mb)
                    (loss_of(embed(mb), t, mb["pids"], KD_TERMS) / k).backward()
        opt.step()

    def held() -> int:
        tensors = [*teacher.parameters(), *teacher.buffers(), *student.parameters(), *student.buffers(),
                   *(p.grad for p in student.parameters() if p.grad is not None), *batch.values(),
                   *(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))]
        return storage_bytes(tensors)

    return step, held, lambda: opt.zero_grad(set_to_none=True)


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def allocator_peak(step: Callable[[], None], held: Callable[[], int]) -> int:
    """Peak bytes PyTorch's CPU allocator holds during one ``step``: the CPU counterpart of
    ``torch.cuda.max_memory_allocated``, without the library pages a resident set counts.

    The profiler reports every allocation and free of the CPU allocator; their running sum from
    the step's start, at its highest, plus what the tensors held when the step began, is the peak.
    It cannot see the free of a block allocated before it started (PyTorch warns "Memory block of
    unknown size"), which would overstate the peak by that block: the step must free nothing it
    did not allocate, so the bench frees the previous step's gradients before calling this.
    """
    start = held()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.profiler.DeviceType.CPU)
    current = highest = 0
    for _, nbytes in events:
        current += nbytes
        highest = max(highest, current)
    return start + highest


def rss_kb() -> int:
    """Resident set size now (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up and time one configuration; its memory peaks in this process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    mode, k, b = parse_config(args.worker)
    dev = args.device
    step, held, free_gradients = make_step(mode, k, b, args)
    sync(dev)
    if dev.type == "cuda":
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        before = rss_kb() * 1024
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, cpu_times = [], []
    for i in range(args.warmup + args.iters):
        sync(dev)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    allocator = None
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if peak <= maxrss_before:
            print(f"warning: {args.worker}: the steps never exceeded the process's earlier peak; the figure is "
                  "that earlier peak", file=sys.stderr)
        # One more, untimed step, after the RSS peak is read (the profiler's own records take memory):
        # its allocator peak, in the steady state of the timed steps.
        free_gradients()
        allocator = allocator_peak(step, held)
    return {"config": args.worker, "mode": mode, "k": k, "b": b, "time_s": statistics.median(times),
            "cpu_s": statistics.median(cpu_times), "peak_bytes": peak, "before_bytes": before,
            "allocator_peak_bytes": allocator, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver


def worker_command(args: argparse.Namespace, config: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--device", str(args.device),
           "--global-batch", str(args.global_batch), "--configs", config, "--warmup", str(args.warmup),
           "--iters", str(args.iters), "--precision", args.precision]
    return cmd + (["--threads", str(args.threads)] if args.threads else [])


def measure(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for mode, k, b in args.parsed:
            config = ("plain:" if mode == "plain" and k > 1 else "") + f"{k}x{b}"
            proc = subprocess.run(worker_command(args, config), capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"configuration {config} failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.setdefault(config, []).append(out)
            print(f"  round {r + 1}: {label(mode, k, b):<12} {out['time_s'] * 1e3:10.1f} ms wall "
                  f"{out['cpu_s'] * 1e3:10.1f} ms CPU   peak {out['peak_bytes'] / 2**20:9.1f} MiB"
                  + (f", allocator {out['allocator_peak_bytes'] / 2**20:9.1f} MiB" if out["allocator_peak_bytes"] else ""),
                  flush=True)
    return {c: {**rs[0], "time_s": statistics.median(x["time_s"] for x in rs),
                "cpu_s": statistics.median(x["cpu_s"] for x in rs),
                "peak_bytes": max(x["peak_bytes"] for x in rs), "before_bytes": min(x["before_bytes"] for x in rs),
                "allocator_peak_bytes": max((x["allocator_peak_bytes"] or 0) for x in rs),
                "times_s": [x["time_s"] for x in rs], "cpu_times_s": [x["cpu_s"] for x in rs]}
            for c, rs in runs.items()}


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[tuple[str, float, str, bool | None]]:
    """Print the table and the ratios to 1xG; the memory target is judged on the allocator's peak
    (CUDA's ``max_memory_allocated``, the profiled CPU allocator's), which counts what PyTorch holds:
    weights, gradients, optimizer state, activations. The CPU's peak RSS is printed beside it: it
    also counts the interpreter's and the libraries' pages, which no training scheme can shrink."""
    g = args.global_batch
    base = results.get(f"1x{g}")
    cpu = args.device.type == "cpu"
    kind = "allocator peak" if cpu else "max_memory_allocated"
    cost = "cpu_s" if cpu else "time_s"  # what the time target is judged on

    def memory(r: dict[str, Any]) -> float:
        return r["allocator_peak_bytes"] if cpu else r["peak_bytes"]

    print(f"\n{'configuration':<14} {'wall ms':>10} {'CPU ms':>10} {kind + ' MiB':>26}"
          + (f" {'peak RSS MiB':>13} {'RSS above start':>16}" if cpu else f" {'above start MiB':>16}")
          + f" {'wall / 1x' + str(g):>11} {'CPU / 1x' + str(g):>10} {'memory / 1x' + str(g):>12}"
          + (f" {'RSS / 1x' + str(g):>10}" if cpu else ""))
    for c, r in results.items():
        above = (r["peak_bytes"] - r["before_bytes"]) / 2**20
        ratio = lambda x: f"{x(r) / x(base):.3f}" if base else "-"  # noqa: E731
        print(f"{label(r['mode'], r['k'], r['b']):<14} {r['time_s'] * 1e3:10.1f} {r['cpu_s'] * 1e3:10.1f} "
              f"{memory(r) / 2**20:26.1f}" + (f" {r['peak_bytes'] / 2**20:13.1f}" if cpu else "")
              + f" {above:16.1f} {ratio(lambda x: x['time_s']):>11} {ratio(lambda x: x['cpu_s']):>10} "
              f"{ratio(memory):>12}" + (f" {ratio(lambda x: x['peak_bytes']):>10}" if cpu else ""))
    rows: list[tuple[str, float, str, bool | None]] = []
    for c, r in results.items():
        if base is None or r["mode"] != "exact":
            continue
        tr, mr = r[cost] / base[cost], memory(r) / memory(base)
        target = r["k"] == 8 and not args.quick
        rows += [(f"{c} exact / 1x{g} step {'CPU' if cpu else 'wall'} time", tr,
                  f"<= {TIME_TARGET}" if target else "", tr <= TIME_TARGET if target else None),
                 (f"{c} exact / 1x{g} peak memory ({kind})", mr, f"<= {MEMORY_TARGET}" if target else "",
                  mr <= MEMORY_TARGET if target else None)]
        if cpu:
            above = (r["peak_bytes"] - r["before_bytes"]) / max(base["peak_bytes"] - base["before_bytes"], 1)
            rows += [(f"{c} exact / 1x{g} peak RSS (libraries included)", r["peak_bytes"] / base["peak_bytes"],
                      "", None),
                     (f"{c} exact / 1x{g} peak RSS above start", above, "", None)]
        plain = results.get(f"plain:{c}")
        if plain is not None:
            rows.append((f"{c} exact / {c} plain step {'CPU' if cpu else 'wall'} time (the cache's cost)",
                         r[cost] / plain[cost], "", None))
    print("\nRatios:")
    for name, value, target, ok in rows:
        print(f"  {name:<62} {value:7.3f}   {('target ' + target) if target else '':<14} "
              f"{'' if ok is None else 'PASS' if ok else 'FAIL'}")
    return rows


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"bench_accumulation on {device_name(args.device)}; torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs" + (f", load average {load[0]:.1f}" if load else ""))
    print(f"teacher clip-vit-b16, student tinyclip-xsmall, {SIZE[0]}x{SIZE[1]}, terms {'+'.join(KD_TERMS)}, "
          f"global batch {args.global_batch}, precision {args.precision}, median of {args.iters} after "
          f"{args.warmup} warm-up, {args.rounds} round(s){', QUICK' if args.quick else ''}\n", flush=True)
    results = measure(args)
    rows = report(args, results)
    if load:
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (at the start {load[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device_name(args.device), "precision": args.precision, "global_batch": args.global_batch,
            "load_average": [load[0] if load else None, os.getloadavg()[0] if load else None],
            "results": results, "ratios": [list(r) for r in rows]}, indent=2))
    if args.strict and any(ok is False for *_, ok in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

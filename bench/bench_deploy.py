"""What the student buys at deployment: teacher and student in PyTorch fp32, ONNX Runtime fp32 and
ONNX Runtime INT8, side by side, and the ratios between them.

    .venv/bin/python bench/bench_deploy.py [--quick] [--threads N] [--json out.json]
                                           [--teacher ARCH] [--student ARCH] [--image-size H W]

The pair is the realistic one by default: a ViT-B/16 teacher (``clip-vit-b16``) and a TinyCLIP-xsmall
student (``tinyclip-xsmall``), both at 384x128 with random weights (speed and size do not depend on them). Each
model is exported once with ``kd_trainer.models.onnx.export_onnx(int8=True)``, exactly as
``kd-trainer export-onnx --int8`` does. For every (model, runtime) pair it measures:

- parameters and file size (PyTorch: the open_clip safetensors weights; ONNX: both graphs);
- image and text encoder latency at batch 1 (median, ms);
- throughput at batch 32 (images/s, captions/s; median);
- peak memory: the peak resident set size above the process's size before the model was loaded
  (on CUDA, PyTorch's peak allocated device memory).

Each pair runs in its own child process, one after the other, so a peak is that pair's alone (a freed
PyTorch model leaves memory in the allocator that would hide ONNX Runtime's). Runtimes: CPU always;
CUDA as well when torch sees a GPU (PyTorch) and ONNX Runtime has its CUDA provider (ORT fp32).
Both runtimes get the same thread count (``--threads``, default: every CPU). On a shared machine the
ratios move with the load: run it when the machine is calm, and read ``--quick`` numbers as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors.torch
import torch

from kd_trainer.data.tokenizer import tokenize
from kd_trainer.models.factory import create_model
from kd_trainer.models.onnx import OnnxDualEncoder, export_onnx

SIZE = (384, 128)
TEACHER, STUDENT = "clip-vit-b16", "tinyclip-xsmall"
ROLES = ("teacher", "student")
CAPTION = "A woman wearing a white shirt, dark blue jeans and black shoes, carrying a red handbag on her left arm."
CPU_RUNTIMES = ("pytorch-fp32", "ort-fp32", "ort-int8")
LABELS = {"pytorch-fp32": "PyTorch fp32", "ort-fp32": "ORT fp32", "ort-int8": "ORT INT8"}
TARGET = 0.10  # INT8 student image latency at batch 1 / PyTorch fp32 teacher's, on CPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run; noisy ratios)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for PyTorch and ONNX Runtime alike (default: every CPU)")
    parser.add_argument("--json", help="also write every measurement here")
    parser.add_argument("--teacher", default=TEACHER, help=f"teacher architecture (default {TEACHER})")
    parser.add_argument("--student", default=STUDENT, help=f"student architecture (default {STUDENT})")
    parser.add_argument("--image-size", type=int, nargs=2, default=list(SIZE), metavar=("H", "W"))
    parser.add_argument("--child", nargs=4, metavar=("WORK", "ROLE", "RUNTIME", "DEVICE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def repetitions(quick: bool) -> dict[str, tuple[int, int]]:
    """(warmup, timed) calls per batch size."""
    return {"b1": (2, 5), "b32": (0, 1)} if quick else {"b1": (3, 20), "b32": (1, 2)}


# ----------------------------------------------------------------------------- measuring (child side)


def _proc_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """The peak resident set size while it runs, above the size when it started.

    Linux keeps the peak (VmHWM) itself; writing 5 to /proc/self/clear_refs resets it to the current
    size, so the peak read at the end is this block's. Where that is not allowed, RSS is sampled every
    2 ms instead (which can miss a short spike).
    """

    def __init__(self) -> None:
        self.start = _proc_kb("VmRSS")
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kernel_peak = True
        except OSError:
            self.kernel_peak = False

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _proc_kb("VmRSS"))

    def __enter__(self) -> "PeakRss":
        if not self.kernel_peak:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kernel_peak:
            self.peak = _proc_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()

    @property
    def added_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def median_seconds(fn: Callable[[], Any], warmup: int, timed: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_child(work: Path, role: str, runtime: str, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """One (model, runtime, device): load, time, and report the peak memory it added."""
    quick, threads, size = args.quick, args.threads, tuple(args.image_size)
    torch.set_num_threads(threads)
    arch = getattr(args, role)
    folder = work / role
    reps = repetitions(quick)
    gen = torch.Generator().manual_seed(0)
    pixels = {b: torch.randn(b, 3, *size, generator=gen) for b in (1, 32)}
    ids = {b: tokenize([CAPTION] * b, 77) for b in (1, 32)}
    sync: Callable[[], None] = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as peak:
        if runtime == "pytorch-fp32":
            model = create_model(arch, image_size=size).eval()
            safetensors.torch.load_model(model.clip, str(folder / "open_clip_model.safetensors"))
            model.to(device)
            pixels = {b: x.to(device) for b, x in pixels.items()}
            ids = {b: x.to(device) for b, x in ids.items()}

            def image(b: int) -> Any:
                with torch.inference_mode():
                    return model.encode_image(pixels[b])

            def text(b: int) -> Any:
                with torch.inference_mode():
                    return model.encode_text(ids[b])
        else:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else None
            encoder = OnnxDualEncoder(folder, runtime.split("-")[1], providers=providers, threads=threads)
            np_pixels = {b: x.numpy() for b, x in pixels.items()}
            np_ids = {b: x.numpy() for b, x in ids.items()}

            def image(b: int) -> Any:
                return encoder.encode_image(np_pixels[b])

            def text(b: int) -> Any:
                return encoder.encode_text(np_ids[b])

        result = {
            "image_b1_ms": 1000 * median_seconds(lambda: image(1), *reps["b1"], sync),
            "text_b1_ms": 1000 * median_seconds(lambda: text(1), *reps["b1"], sync),
            "images_per_s_b32": 32 / median_seconds(lambda: image(32), *reps["b32"], sync),
            "texts_per_s_b32": 32 / median_seconds(lambda: text(32), *reps["b32"], sync),
        }
    result["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" and runtime == "pytorch-fp32"
                         else peak.added_mb)
    result["peak_kind"] = "device" if device == "cuda" and runtime == "pytorch-fp32" else "rss"
    return result


# ----------------------------------------------------------------------------- orchestration (parent side)


def prepare(work: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Build each model (seeded random weights), save its weights and export its ONNX graphs."""
    info: dict[str, dict[str, Any]] = {}
    for key in ROLES:
        arch = getattr(args, key)
        torch.manual_seed(0)
        model = create_model(arch, image_size=tuple(args.image_size)).eval()
        folder = work / key
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / "open_clip_model.safetensors"
        safetensors.torch.save_model(model.clip, str(weights))
        t0 = time.perf_counter()
        export = export_onnx(model, folder, int8=True)
        visual = sum(p.numel() for p in model.clip.visual.parameters())
        total = sum(p.numel() for p in model.clip.parameters())
        info[key] = {
            "arch": arch, "export_s": time.perf_counter() - t0,
            "params_m": {"image": visual / 1e6, "text": (total - visual) / 1e6, "total": total / 1e6},
            "file_mb": {"pytorch-fp32": weights.stat().st_size / 2**20,
                        **{f"ort-{v}": sum(p.stat().st_size for p in export.files[v].values()) / 2**20
                           for v in ("fp32", "int8")}},
        }
        print(f"{key}: {arch}, {total / 1e6:.1f}M parameters, exported in {info[key]['export_s']:.0f} s", flush=True)
        del model
    return info


def runtimes() -> list[tuple[str, str]]:
    out = [(r, "cpu") for r in CPU_RUNTIMES]
    if torch.cuda.is_available():
        out.append(("pytorch-fp32", "cuda"))
        import onnxruntime  # optional dependency, present whenever export_onnx ran

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            out.append(("ort-fp32", "cuda"))
    return out


def measure(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for key in ROLES:
        for runtime, device in runtimes():
            cmd = [sys.executable, __file__, "--child", str(work), key, runtime, device, "--threads", str(args.threads),
                   "--teacher", args.teacher, "--student", args.student, "--image-size", *map(str, args.image_size)]
            if args.quick:
                cmd.append("--quick")
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{key} {runtime} on {device} failed:\n{done.stderr[-4000:]}")
            row = {"model": key, "runtime": runtime, "device": device, **json.loads(done.stdout.strip().splitlines()[-1])}
            print(f"  {key:8s} {LABELS[runtime]:13s} {device}: image b1 {row['image_b1_ms']:.1f} ms, "
                  f"text b1 {row['text_b1_ms']:.1f} ms", flush=True)
            rows.append(row)
    return rows


def table(info: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = ["| model | runtime | device | params (M) | file (MB) | image b1 (ms) | text b1 (ms) | images/s b32 "
             "| texts/s b32 | peak memory (MB) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        i = info[r["model"]]
        peak = f"{r['peak_mb']:.0f}" + (" (device)" if r["peak_kind"] == "device" else "")
        lines.append(f"| {r['model']} ({i['arch']}) | {LABELS[r['runtime']]} | {r['device']} | "
                     f"{i['params_m']['total']:.1f} | {i['file_mb'][r['runtime']]:.1f} | {r['image_b1_ms']:.1f} | "
                     f"{r['text_b1_ms']:.1f} | {r['images_per_s_b32']:.1f} | {r['texts_per_s_b32']:.1f} | {peak} |")
    return "\n".join(lines)


def ratios(info: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, float]]:
    """The comparisons the benchmark exists for, as lines of text and as numbers."""
    at = {(r["model"], r["runtime"], r["device"]): r for r in rows}
    lines, values = [], {}

    def add(name: str, num: float, den: float, note: str = "") -> None:
        values[name] = num / den
        lines.append(f"{name:58s} {num / den:6.3f}{note}")

    for runtime, device in runtimes():
        s, t = at[("student", runtime, device)], at[("teacher", runtime, device)]
        for tower in ("image", "text"):
            add(f"student/teacher {tower} b1 latency, {LABELS[runtime]} {device}", s[f"{tower}_b1_ms"],
                t[f"{tower}_b1_ms"])
    for key in ROLES:
        torch_row, onnx_row, int8_row = (at[(key, r, "cpu")] for r in CPU_RUNTIMES)
        for tower in ("image", "text"):
            add(f"ONNX/PyTorch {tower} b1 latency, {key} fp32 cpu", onnx_row[f"{tower}_b1_ms"],
                torch_row[f"{tower}_b1_ms"])
        for tower in ("image", "text"):
            add(f"INT8/fp32 {tower} b1 latency, {key} ORT cpu", int8_row[f"{tower}_b1_ms"], onnx_row[f"{tower}_b1_ms"])
        add(f"INT8/fp32 file size, {key}", info[key]["file_mb"]["ort-int8"], info[key]["file_mb"]["ort-fp32"])
    student_int8 = at[("student", "ort-int8", "cpu")]["image_b1_ms"]
    teacher_torch = at[("teacher", "pytorch-fp32", "cpu")]["image_b1_ms"]
    met = "met" if student_int8 / teacher_torch <= TARGET else "NOT met"
    add("target: student ORT INT8 / teacher PyTorch fp32, image b1 cpu", student_int8, teacher_torch,
        f"  (target <= {TARGET:.2f}: {met})")
    return lines, values


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        work, role, runtime, device = args.child
        print(json.dumps(run_child(Path(work), role, runtime, device, args)))
        return
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"deploy bench: {os.cpu_count()} CPUs, {args.threads} threads, load average "
          f"{'/'.join(f'{x:.1f}' for x in load) if load else 'n/a'}, {'quick' if args.quick else 'full'} run; "
          f"teacher {args.teacher}, student {args.student} at {args.image_size[0]}x{args.image_size[1]}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = prepare(work, args)
        rows = measure(work, args)
    lines, values = ratios(info, rows)
    print()
    print(table(info, rows))
    print()
    print("\n".join(lines))
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load average at the end "
          f"{'/'.join(f'{x:.1f}' for x in load_after) if load_after else 'n/a'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows, "ratios": values,
                                               "threads": args.threads, "quick": args.quick,
                                               "image_size": args.image_size,
                                               "load_before": load, "load_after": load_after}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

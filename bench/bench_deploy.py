"""What the student buys at deployment: teacher and student in PyTorch fp32, ONNX Runtime fp32 and
ONNX Runtime INT8, side by side, and the ratios between them.

    .venv/bin/python bench/bench_deploy.py [--quick] [--threads N] [--json out.json]
                                           [--teacher ARCH] [--student ARCH] [--image-size H W]
                                           [--only {teacher,student}]
                                           [--int8-schemes {dynamic,weight-only,calibrated} ...]

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

``--only teacher`` / ``--only student`` measures one model alone (the student/teacher ratios and the
target are then left out). ``--int8-schemes`` picks the INT8 schemes of
:mod:`kd_trainer.models.onnx.quantize` to measure, one ``ORT INT8 (<scheme>)`` row each per model; by
default only ``dynamic`` (what ``export-onnx --int8`` writes), whose row is then labelled ``ORT INT8`` as
before, so the default run's rows and cost do not change. The first scheme is exported with the fp32
graphs; each further one is a second ``export_onnx`` of the same model into its own folder. The time
spent in the quantiser (both towers) is printed per scheme and, with more than the default scheme, in a
second table beside its file size and its latency against ORT fp32.

``calibrated`` needs calibration images and captions: the script makes a seeded synthetic sample of
:data:`CALIBRATION_SAMPLES` random-noise images at the model's size and as many captions drawn from a small
fixed word list, and uses all of them as its sensitivity sample too. With random weights and noise images
the MatMuls it keeps in float32 and any ranking it preserves mean nothing: only its file size, its latency
(which depends on how many MatMuls it keeps in float32) and its export time are measured here.
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
from PIL import Image

from kd_trainer.data.tokenizer import tokenize
from kd_trainer.models.factory import create_model
from kd_trainer.models.onnx import OnnxDualEncoder, export_onnx
from kd_trainer.models.onnx.calibrated import calibrated_int8
from kd_trainer.models.onnx.quantize import DEFAULT_INT8_SCHEME, INT8_SCHEME_NAMES, INT8_SCHEMES

SIZE = (384, 128)
TEACHER, STUDENT = "clip-vit-b16", "tinyclip-xsmall"
ROLES = ("teacher", "student")
CAPTION = "A woman wearing a white shirt, dark blue jeans and black shoes, carrying a red handbag on her left arm."
LABELS = {"pytorch-fp32": "PyTorch fp32", "ort-fp32": "ORT fp32"}
TARGET = 0.10  # INT8 student image latency at batch 1 / PyTorch fp32 teacher's, on CPU
CALIBRATION_SAMPLES = 64  # synthetic images and captions for the calibrated scheme (also its sensitivity sample)
CALIBRATION_WORDS = ("a", "the", "man", "woman", "person", "wearing", "with", "and", "black", "white", "red", "blue",
                     "grey", "green", "shirt", "jacket", "coat", "jeans", "trousers", "shorts", "skirt", "shoes",
                     "sneakers", "bag", "backpack", "hair", "long", "short", "carrying", "walking")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke run; noisy ratios)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for PyTorch and ONNX Runtime alike (default: every CPU)")
    parser.add_argument("--json", help="also write every measurement here")
    parser.add_argument("--teacher", default=TEACHER, help=f"teacher architecture (default {TEACHER})")
    parser.add_argument("--student", default=STUDENT, help=f"student architecture (default {STUDENT})")
    parser.add_argument("--image-size", type=int, nargs=2, default=list(SIZE), metavar=("H", "W"))
    parser.add_argument("--only", choices=ROLES, help="measure only this model (default: both)")
    parser.add_argument("--int8-schemes", nargs="+", choices=INT8_SCHEME_NAMES, default=[DEFAULT_INT8_SCHEME],
                        metavar="SCHEME", help=f"INT8 schemes to measure, one row each: {', '.join(INT8_SCHEME_NAMES)} "
                                               f"(default: {DEFAULT_INT8_SCHEME} only)")
    parser.add_argument("--child", nargs=4, metavar=("WORK", "ROLE", "RUNTIME", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.int8_schemes = list(dict.fromkeys(args.int8_schemes))  # each once, in the order given
    return args


def roles(args: argparse.Namespace) -> tuple[str, ...]:
    return (args.only,) if args.only else ROLES


def int8_runtime(scheme: str) -> str:
    """The runtime key of a scheme's INT8 graphs: ``ort-int8`` for the default scheme (as before),
    ``ort-int8-<scheme>`` for the others."""
    return "ort-int8" if scheme == DEFAULT_INT8_SCHEME else f"ort-int8-{scheme}"


def runtime_scheme(runtime: str) -> str | None:
    """The INT8 scheme of a runtime key (None: not INT8)."""
    if runtime == "ort-int8":
        return DEFAULT_INT8_SCHEME
    return runtime[len("ort-int8-"):] if runtime.startswith("ort-int8-") else None


def int8_name(scheme: str, args: argparse.Namespace) -> str:
    """``INT8`` when only the default scheme is measured (the default run's labels), else ``INT8 (<scheme>)``."""
    return "INT8" if args.int8_schemes == [DEFAULT_INT8_SCHEME] else f"INT8 ({scheme})"


def label(runtime: str, args: argparse.Namespace) -> str:
    scheme = runtime_scheme(runtime)
    return LABELS[runtime] if scheme is None else f"ORT {int8_name(scheme, args)}"


def cpu_runtimes(args: argparse.Namespace) -> list[str]:
    return ["pytorch-fp32", "ort-fp32", *(int8_runtime(s) for s in args.int8_schemes)]


def model_folder(work: Path, role: str, runtime: str, args: argparse.Namespace) -> Path:
    """Where a (model, runtime)'s files are: the first scheme's INT8 graphs sit beside the fp32 ones and the
    PyTorch weights; each further scheme has its own export folder."""
    scheme = runtime_scheme(runtime)
    if scheme is None or scheme == args.int8_schemes[0]:
        return work / role
    return work / f"{role}-int8-{scheme}"


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
    folder = model_folder(work, role, runtime, args)
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


class TimedScheme:
    """An INT8 scheme that adds up the seconds spent in it (both towers; for ``calibrated`` its plan too).
    Its ``name`` is what preprocess.json records; other attributes (``describe``) are the scheme's."""

    def __init__(self, name: str, scheme: Callable[[Path, Path, str], None]):
        self.name, self.scheme, self.seconds = name, scheme, 0.0

    def __call__(self, fp32: Path, out: Path, tower: str) -> None:
        t0 = time.perf_counter()
        try:
            self.scheme(fp32, out, tower)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, attr: str) -> Any:  # only for what the instance itself lacks
        if "scheme" not in self.__dict__:
            raise AttributeError(attr)
        return getattr(self.__dict__["scheme"], attr)


def calibration_set(size: tuple[int, int], n: int = CALIBRATION_SAMPLES, seed: int = 0) -> tuple[list[Image.Image],
                                                                                               list[str]]:
    """``n`` uniform-noise RGB images of ``size`` (H, W) and ``n`` captions of 6 to 20 words of
    :data:`CALIBRATION_WORDS`, both seeded: enough for the calibrated scheme to run, meaningless as data."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8), "RGB") for _ in range(n)]
    captions = [" ".join(rng.choice(CALIBRATION_WORDS, size=int(rng.integers(6, 21)))) + "." for _ in range(n)]
    return images, captions


def make_scheme(scheme: str, args: argparse.Namespace) -> TimedScheme:
    if scheme == "calibrated":
        images, captions = calibration_set(tuple(args.image_size))
        return TimedScheme(scheme, calibrated_int8(images, captions, sensitivity_samples=len(images)))
    return TimedScheme(scheme, INT8_SCHEMES[scheme])


def _mb(paths: dict[str, Path]) -> float:
    return sum(p.stat().st_size for p in paths.values()) / 2**20


def prepare(work: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Build each model (seeded random weights), save its weights and export its ONNX graphs: the fp32 ones
    with the first INT8 scheme's, then one more export per further scheme."""
    info: dict[str, dict[str, Any]] = {}
    first, *others = args.int8_schemes
    for key in roles(args):
        arch = getattr(args, key)
        torch.manual_seed(0)
        model = create_model(arch, image_size=tuple(args.image_size)).eval()
        folder = work / key
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / "open_clip_model.safetensors"
        safetensors.torch.save_model(model.clip, str(weights))
        scheme = make_scheme(first, args)
        t0 = time.perf_counter()
        export = export_onnx(model, folder, int8=True, int8_scheme=scheme)
        visual = sum(p.numel() for p in model.clip.visual.parameters())
        total = sum(p.numel() for p in model.clip.parameters())
        info[key] = {
            "arch": arch, "export_s": time.perf_counter() - t0,
            "params_m": {"image": visual / 1e6, "text": (total - visual) / 1e6, "total": total / 1e6},
            "file_mb": {"pytorch-fp32": weights.stat().st_size / 2**20, "ort-fp32": _mb(export.files["fp32"]),
                        int8_runtime(first): _mb(export.files["int8"])},
            "int8_quantise_s": {first: scheme.seconds},
            "int8_plan": {first: export.spec.get("int8_plan")},
        }
        print(f"{key}: {arch}, {total / 1e6:.1f}M parameters, exported in {info[key]['export_s']:.0f} s", flush=True)
        for name in others:
            scheme = make_scheme(name, args)
            export = export_onnx(model, model_folder(work, key, int8_runtime(name), args), int8=True,
                                 int8_scheme=scheme)
            info[key]["file_mb"][int8_runtime(name)] = _mb(export.files["int8"])
            info[key]["int8_quantise_s"][name] = scheme.seconds
            info[key]["int8_plan"][name] = export.spec.get("int8_plan")
        if others:
            for name in args.int8_schemes:
                plan = info[key]["int8_plan"][name]
                kept = (f"; kept in float32: {sum(map(len, plan['kept_float32'].values()))} MatMuls, quantised "
                        f"{sum(plan['quantised_matmuls'].values())}" if plan else "")
                print(f"  {key} {name}: quantised (both towers) in {info[key]['int8_quantise_s'][name]:.1f} s, "
                      f"{info[key]['file_mb'][int8_runtime(name)]:.1f} MB{kept}", flush=True)
        del model
    return info


def runtimes(args: argparse.Namespace) -> list[tuple[str, str]]:
    out = [(r, "cpu") for r in cpu_runtimes(args)]
    if torch.cuda.is_available():
        out.append(("pytorch-fp32", "cuda"))
        import onnxruntime  # optional dependency, present whenever export_onnx ran

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            out.append(("ort-fp32", "cuda"))
    return out


def measure(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    width = max(13, *(len(label(r, args)) for r, _ in runtimes(args)))
    for key in roles(args):
        for runtime, device in runtimes(args):
            cmd = [sys.executable, __file__, "--child", str(work), key, runtime, device, "--threads", str(args.threads),
                   "--teacher", args.teacher, "--student", args.student, "--image-size", *map(str, args.image_size),
                   "--int8-schemes", *args.int8_schemes]
            if args.quick:
                cmd.append("--quick")
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{key} {runtime} on {device} failed:\n{done.stderr[-4000:]}")
            row = {"model": key, "runtime": runtime, "device": device, **json.loads(done.stdout.strip().splitlines()[-1])}
            print(f"  {key:8s} {label(runtime, args):{width}s} {device}: image b1 {row['image_b1_ms']:.1f} ms, "
                  f"text b1 {row['text_b1_ms']:.1f} ms", flush=True)
            rows.append(row)
    return rows


def table(info: dict[str, dict[str, Any]], rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["| model | runtime | device | params (M) | file (MB) | image b1 (ms) | text b1 (ms) | images/s b32 "
             "| texts/s b32 | peak memory (MB) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        i = info[r["model"]]
        peak = f"{r['peak_mb']:.0f}" + (" (device)" if r["peak_kind"] == "device" else "")
        lines.append(f"| {r['model']} ({i['arch']}) | {label(r['runtime'], args)} | {r['device']} | "
                     f"{i['params_m']['total']:.1f} | {i['file_mb'][r['runtime']]:.1f} | {r['image_b1_ms']:.1f} | "
                     f"{r['text_b1_ms']:.1f} | {r['images_per_s_b32']:.1f} | {r['texts_per_s_b32']:.1f} | {peak} |")
    return "\n".join(lines)


def scheme_table(info: dict[str, dict[str, Any]], rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Per model and INT8 scheme: the time spent quantising, the file size, and size and latency against
    the ORT fp32 graphs (cpu)."""
    at = {(r["model"], r["runtime"], r["device"]): r for r in rows}
    lines = ["| model | INT8 scheme | quantise (s) | file (MB) | file / ORT fp32 | image b1 / ORT fp32 "
             "| text b1 / ORT fp32 | MatMuls kept fp32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in roles(args):
        i, fp32 = info[key], at[(key, "ort-fp32", "cpu")]
        for scheme in args.int8_schemes:
            runtime = int8_runtime(scheme)
            r, plan = at[(key, runtime, "cpu")], i["int8_plan"][scheme]
            kept = f"{sum(map(len, plan['kept_float32'].values()))}" if plan else "0"
            lines.append(f"| {key} ({i['arch']}) | {scheme} | {i['int8_quantise_s'][scheme]:.1f} | "
                         f"{i['file_mb'][runtime]:.1f} | {i['file_mb'][runtime] / i['file_mb']['ort-fp32']:.3f} | "
                         f"{r['image_b1_ms'] / fp32['image_b1_ms']:.3f} | {r['text_b1_ms'] / fp32['text_b1_ms']:.3f} | "
                         f"{kept} |")
    return "\n".join(lines)


def ratios(info: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
           args: argparse.Namespace) -> tuple[list[str], dict[str, float]]:
    """The comparisons the benchmark exists for, as lines of text and as numbers (student/teacher and the
    target only when both models were measured)."""
    at = {(r["model"], r["runtime"], r["device"]): r for r in rows}
    lines, values = [], {}
    both = roles(args) == ROLES

    def add(name: str, num: float, den: float, note: str = "") -> None:
        values[name] = num / den
        lines.append(f"{name:58s} {num / den:6.3f}{note}")

    for runtime, device in runtimes(args) if both else ():
        s, t = at[("student", runtime, device)], at[("teacher", runtime, device)]
        for tower in ("image", "text"):
            add(f"student/teacher {tower} b1 latency, {label(runtime, args)} {device}", s[f"{tower}_b1_ms"],
                t[f"{tower}_b1_ms"])
    for key in roles(args):
        torch_row, onnx_row = at[(key, "pytorch-fp32", "cpu")], at[(key, "ort-fp32", "cpu")]
        for tower in ("image", "text"):
            add(f"ONNX/PyTorch {tower} b1 latency, {key} fp32 cpu", onnx_row[f"{tower}_b1_ms"],
                torch_row[f"{tower}_b1_ms"])
        for scheme in args.int8_schemes:
            int8_row, name = at[(key, int8_runtime(scheme), "cpu")], int8_name(scheme, args)
            for tower in ("image", "text"):
                add(f"{name}/fp32 {tower} b1 latency, {key} ORT cpu", int8_row[f"{tower}_b1_ms"],
                    onnx_row[f"{tower}_b1_ms"])
            add(f"{name}/fp32 file size, {key}", info[key]["file_mb"][int8_runtime(scheme)],
                info[key]["file_mb"]["ort-fp32"])
    for scheme in args.int8_schemes if both else ():
        student_int8 = at[("student", int8_runtime(scheme), "cpu")]["image_b1_ms"]
        teacher_torch = at[("teacher", "pytorch-fp32", "cpu")]["image_b1_ms"]
        met = "met" if student_int8 / teacher_torch <= TARGET else "NOT met"
        add(f"target: student ORT {int8_name(scheme, args)} / teacher PyTorch fp32, image b1 cpu", student_int8,
            teacher_torch, f"  (target <= {TARGET:.2f}: {met})")
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
          f"teacher {args.teacher}, student {args.student} at {args.image_size[0]}x{args.image_size[1]}"
          + (f"; only the {args.only}" if args.only else "")
          + (f"; INT8 schemes {', '.join(args.int8_schemes)}" if args.int8_schemes != [DEFAULT_INT8_SCHEME] else ""),
          flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = prepare(work, args)
        rows = measure(work, args)
    lines, values = ratios(info, rows, args)
    print()
    print(table(info, rows, args))
    if args.int8_schemes != [DEFAULT_INT8_SCHEME]:
        print()
        print(scheme_table(info, rows, args))
    print()
    print("\n".join(lines))
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n{time.perf_counter() - t0:.0f} s in all; load average at the end "
          f"{'/'.join(f'{x:.1f}' for x in load_after) if load_after else 'n/a'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows, "ratios": values,
                                               "threads": args.threads, "quick": args.quick,
                                               "only": args.only, "int8_schemes": args.int8_schemes,
                                               "image_size": args.image_size,
                                               "load_before": load, "load_after": load_after}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Time `kd-trainer index` and `kd-trainer search`: the demo's test gallery indexed once, 1,000 searches
of it, and one query against 100k (and more) stored embeddings.

    .venv/bin/python bench/bench_search.py [--model RUN_OR_EXPORT] [--root DIR] [--sizes 100000 300000]

1. Index: the SynthPEDES test gallery at the demo's settings (generated into a temporary folder unless
   ``--root`` holds it), embedded by ``--model`` (default: an untrained ``tiny-student`` at the demo's
   64x32 / 64 tokens, which costs what the demo's student costs; weights do not change the time).
2. 1,000 searches, one sentence each (the test captions in turn): text tower + ranking + top 10, what
   a `kd-trainer search` call does after loading.
3. Brute-force ranking alone over N random unit vectors (``--dim``, 512 as ViT-B/16 CLIP): the time per
   query of :class:`kd_trainer.evaluation.GalleryRanking`, one query at a time, median and 90th
   percentile over ``--queries`` queries.

Each figure is given twice: wall-clock time, and the CPU time this process used (``time.process_time``,
all its threads). On a shared machine the wall time says more about the other jobs than about search;
the CPU time does not (at 1 thread, ``--threads 1``, it is the wall time an idle core would take). The
machine, its load average and the thread count are printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from kd_trainer.data import load_pedes
from kd_trainer.evaluation import GalleryRanking
from kd_trainer.models.export import export_open_clip
from kd_trainer.models.factory import create_model
from kd_trainer.search import Searcher, build_index, load_encoder, load_index
from kd_trainer.synthetic.pedes import make_synth_pedes

DEMO_SYNTH = {"num_identities": 400, "images_per_identity": (3, 5), "image_size": (96, 48), "seed": 0}


class _Clock:
    """Wall and CPU time of a block: ``with _Clock() as c: ...; c.wall, c.cpu``."""

    def __enter__(self) -> "_Clock":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu

    def __str__(self) -> str:
        return f"{self.wall:.2f} s wall, {self.cpu:.2f} s CPU"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"load average {load[0]:.1f}" if load[0] != "?" else f"{cpu}, {torch.get_num_threads()} torch threads")


def _gallery(root: Path, work: Path) -> tuple[Path, list[str]]:
    """A folder of links to the test split's images, and the test captions."""
    raw = load_pedes("synth_pedes", root, splits=["test"])
    folder = work / "gallery"
    folder.mkdir()
    for path in raw["test_gallery"]["image_path"]:
        (folder / Path(path).name).symlink_to(path)
    return folder, list(raw["test_queries"]["caption"])


def bench_demo(model: str | None, root: str | None, searches: int, work: Path) -> None:
    data = Path(root) if root else work / "data"
    if not root:
        with _Clock() as made:
            make_synth_pedes(data / "SynthPEDES", **DEMO_SYNTH)
        print(f"generated SynthPEDES at the demo's settings: {made}")
    gallery, captions = _gallery(data, work)
    if model is None:
        torch.manual_seed(0)
        model = str(work / "tiny_student")
        export_open_clip(create_model("tiny-student", image_size=(64, 32), context_length=64).eval(), model)
        print("model: untrained tiny-student at 64x32, 64 tokens (the demo student's architecture)")
    else:
        print(f"model: {model}")

    with _Clock() as loading:
        encoder = load_encoder(model)
    with _Clock() as indexing:
        index = build_index(encoder, gallery, work / "demo.index")
    n = len(index.files)
    print(f"index: {n} images in {indexing} ({1000 * indexing.cpu / n:.1f} ms CPU per image); "
          f"loading the model: {loading}")

    with _Clock() as opening:
        index = load_index(work / "demo.index")
        index.check_gallery()
        searcher = Searcher(index, encoder)
    print(f"search start-up (read the index, check the gallery, fingerprint the model): {opening}")
    walls, cpus = [], []
    with _Clock() as all_searches:
        for i in range(searches):
            with _Clock() as one:
                searcher.search([captions[i % len(captions)]], top=10)
            walls.append(one.wall)
            cpus.append(one.cpu)
    print(f"{searches} searches of {n} images, top 10: {all_searches}; per query median "
          f"{1000 * statistics.median(walls):.2f} ms wall / {1000 * statistics.median(cpus):.2f} ms CPU, "
          f"p90 {1000 * _p90(walls):.2f} ms wall")


def _p90(times: list[float]) -> float:
    return sorted(times)[int(0.9 * (len(times) - 1))]


def bench_brute_force(sizes: list[int], dim: int, queries: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        ranking = GalleryRanking(torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1))
        qs = torch.nn.functional.normalize(torch.randn(queries, dim, generator=gen), dim=1)
        ranking.top_k(qs[:1], 10)  # warm-up: first touch of the pages
        walls, cpus = [], []
        for q in qs:
            with _Clock() as one:
                ranking.top_k(q[None], 10)
            walls.append(one.wall)
            cpus.append(one.cpu)
        mb = n * dim * 4 / 2**20
        print(f"{n:>9,} x {dim} stored ({mb:,.0f} MB float32), top 10, one query at a time: median "
              f"{1000 * statistics.median(walls):.1f} ms wall / {1000 * statistics.median(cpus):.1f} ms CPU, "
              f"p90 {1000 * _p90(walls):.1f} ms wall")
        del ranking


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run folder, open_clip export or ONNX export (default: untrained tiny-student)")
    parser.add_argument("--root", help="a data root holding SynthPEDES/ (default: generate one, demo settings)")
    parser.add_argument("--searches", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--skip-demo", action="store_true", help="only the brute-force part")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # numpy's BLAS too: the brute-force product runs there
    print(_machine(), flush=True)
    with tempfile.TemporaryDirectory() as work:
        if not args.skip_demo:
            bench_demo(args.model, args.root, args.searches, Path(work))
    bench_brute_force(args.sizes, args.dim, args.queries)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

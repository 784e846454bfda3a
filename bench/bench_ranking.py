"""Time ``rank_metrics`` on a random ICFG-PEDES-sized problem (20,000 captions x 20,000 images).

    .venv/bin/python bench/bench_ranking.py [--queries 20000] [--gallery 20000] [--dim 512] [--repeats 3]

Unit-norm random features; 1000 pids with 20 gallery images each (gallery / 1000 in general);
each query takes a random pid. Matches then sit anywhere in the ranking, which is the costly case
(real rankings put most matches near the top). Threads: torch's default.
"""

from __future__ import annotations

import argparse
import time

import torch

from kd_trainer.evaluation import rank_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--gallery", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--pids", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(args.gallery, args.dim, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=gen), dim=1)
    gallery_pids = torch.arange(args.gallery)[torch.randperm(args.gallery, generator=gen)] % args.pids
    query_pids = torch.randint(0, args.pids, (args.queries,), generator=gen)

    print(f"{args.queries} queries x {args.gallery} gallery, dim {args.dim}, "
          f"{torch.get_num_threads()} torch threads, chunk {args.chunk_size}")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics = rank_metrics(queries, gallery, query_pids, gallery_pids, chunk_size=args.chunk_size)
        times.append(time.perf_counter() - start)
        print(f"  {times[-1]:.2f} s")
    print(f"best {min(times):.2f} s   " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()

"""Is data loading ever the bottleneck? Loader throughput vs what training consumes.

For the transfer stage of the paper's recipe (4 groups, one photo and one cartoon each per step,
flip + resize + random crop with albumentations, toonfaces PNGs), prints batches/s of the
engine's loader (``StepData`` behind a ``DataLoader``) with 0 and ``--workers`` worker processes,
with and without the decoded-image cache, next to the training steps/s at the same size, and the
ratio (target >= 3).

    .venv/bin/python benchmarks/data_loading.py --sizes 64 128 256 --batches 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import build

from branchadapt.data import step_batches


def loader_rate(size: int, width: int, workers: int, cache: bool, batches: int) -> float:
    _, rt = build(size, width, 1, [f"data.cache_decoded={'true' if cache else 'false'}"])
    it = step_batches(rt.data, 0, batches + 10, workers)
    for _ in range(10):  # warm-up: worker start-up, first decodes
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def train_rate(size: int, width: int, steps: int = 2) -> float:
    trainer, rt = build(size, width, 1, [])
    trainer.train_step(rt, rt.data[0])
    start = time.perf_counter()
    for i in range(steps):
        trainer.train_step(rt, rt.data[i + 1])
    return steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} torch threads; loader: {args.batches} batches after 10 of warm-up\n")
    print("| size | train steps/s | loader, 0 workers, no cache | 0 workers, cached | "
          f"{args.workers} workers, cached | best / train |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        train = train_rate(size, args.width)
        plain = loader_rate(size, args.width, 0, False, args.batches)
        cached = loader_rate(size, args.width, 0, True, args.batches)
        workers = loader_rate(size, args.width, args.workers, True, args.batches)
        best = max(plain, cached, workers)
        print(
            f"| {size} | {train:.3f} | {plain:.1f} | {cached:.1f} | {workers:.1f} | {best / train:.0f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()

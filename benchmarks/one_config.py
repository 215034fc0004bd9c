"""The step time of one configuration, each run in a process of its own.

For stages too large to hold two trainers in one process (the transfer stage at 256 px needs about
19 GB, so ``optimisations.py --stage 2 --size 256`` does not fit 24 GiB): every ``--config`` (a
name and ``key=value`` overrides separated by ``;``) runs in a fresh Python process, one after the
other, ``--rounds`` times in alternating order. Each process reports the median of ``--steps``
after ``--warmup``, its peak RSS, and the median system CPU time and minor page faults of a step
(what the kernel spent serving the allocator); the table prints the median over rounds. The override
``<naive>`` runs selective BP the naive way (``step_time.py``'s deep copy of the shared stages), and ``<bf16 backward>``
runs its steps with bf16 backward convolutions (``bf16_backward.py``), and ``<channels_last weights>`` lays
the generators' convolution weights out channels_last (their activations' layout from 128 px), so that
oneDNN need not convert them on every call. ``<one arena>`` runs the process with ``MALLOC_ARENA_MAX=1``:
every thread allocates from glibc's main arena (the worker threads' own arenas serve blocks of 64 MiB
and more with fresh mappings, whatever ``train.retain_freed_memory`` sets), and ``<top pad>`` with
``MALLOC_TOP_PAD_`` at 256 MiB (glibc then keeps a worker arena's free 64 MiB heaps instead of deleting them).
``<huge pages>`` sets torch's ``THP_MEM_ALLOC_ENABLE=1``: its CPU allocator aligns blocks of 2 MiB and more
to 2 MiB and asks the kernel for transparent huge pages on them (``madvise``), so that a fresh mapping
faults once per 2 MiB instead of once per 4 KiB page. ``--flops`` counts each configuration's FLOPs
in one more process per configuration (``step_time.step_flops``: a serial step after one uncounted
step, with ``torch.utils.flop_counter``; markers left out, they do not change the maths) and prints a second
table: GFLOP per step, GFLOP/s and the fraction of the machine's measured peak (``step_time.py``'s).

    .venv/bin/python benchmarks/one_config.py --size 256 --stage 2 --steps 3 --threads 2 \\
        --config default= --config "default layout=model.channels_last=false"
    .venv/bin/python benchmarks/one_config.py --size 256 --stage 2 --steps 2 --threads 2 \\
        --config ours= --config "naive copy=<naive>"
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
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allocator import SETTING_ENV
from bf16_backward import MARKER as BWD16
from bf16_backward import patched
from interleave import rounds_order
from step_time import COPYING, NAIVE, build, naive_step, peak_gflops, step_flops

CL_WEIGHTS = "<channels_last weights>"
ONE_ARENA = "<one arena>"
TOP_PAD = "<top pad>"
HUGE_PAGES = "<huge pages>"
#: the child's extra environment per marker (glibc and torch read these when the process starts)
MARKER_ENV = {
    ONE_ARENA: SETTING_ENV["one arena"],
    TOP_PAD: {"MALLOC_TOP_PAD_": str(256 << 20)},
    HUGE_PAGES: {"THP_MEM_ALLOC_ENABLE": "1"},
}
MARKERS = (NAIVE, BWD16, CL_WEIGHTS, ONE_ARENA, TOP_PAD, HUGE_PAGES)


def child_env(overrides: str) -> dict[str, str]:
    """The environment of the process that runs ``overrides`` (a ``--config`` value): ours, plus
    what its markers set."""
    env = dict(os.environ)
    for marker in overrides.split(";"):
        env.update(MARKER_ENV.get(marker, {}))
    return env


def child(args: argparse.Namespace) -> None:
    """Run one configuration here and print its result as one JSON line."""
    torch.set_num_threads(args.threads)
    overrides = [o for o in args.child.split(";") if o]
    if args.count:  # a process of its own: a serial step's memory on top of a timed trainer's does not fit
        flops = step_flops(args.size, args.width, [o for o in overrides if o not in MARKERS], args.stage - 1)
        print(json.dumps({"flops": flops}))
        return
    trainer, rt = build(args.size, args.width, args.stage - 1, [o for o in overrides if o not in MARKERS])
    if CL_WEIGHTS in overrides:
        for name in ("gen_a2b", "gen_b2a"):
            for p in rt.modules[name].parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
    step = naive_step(trainer, rt) if NAIVE in overrides else partial(trainer.train_step, rt)
    if BWD16 in overrides:
        plain = step

        def step(batch: Any) -> Any:
            with patched():
                return plain(batch)

    times, copying, system, faults = [], [], [], []
    for i in range(args.warmup + args.steps):
        copied = COPYING["seconds"]
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        step(rt.data[i % len(rt.data)])
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        copying.append(COPYING["seconds"] - copied)
        system.append(after.ru_stime - before.ru_stime)  # the kernel's time: mostly page faults here
        faults.append(after.ru_minflt - before.ru_minflt)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    measured = slice(args.warmup, None)
    print(json.dumps({"step": statistics.median(times[measured]), "first": times[0], "rss_mb": rss_mb,
                      "copying": statistics.median(copying[measured]),
                      "system": statistics.median(system[measured]),
                      "faults": statistics.median(faults[measured])}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--stage", type=int, choices=[1, 2], default=2, help="1: basic, 2: transfer")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--config", action="append", metavar="NAME=OVERRIDES", help="repeatable; first is the base"
    )
    ap.add_argument(
        "--flops",
        action="store_true",
        help="also count each configuration's FLOPs per step (in one more process per configuration, serial "
        "steps) and print its GFLOP/s against the machine's measured peak",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args)
        return
    configs = dict(c.split("=", 1) for c in args.config or ["default="])
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    shared = [f"--{k}={getattr(args, k)}" for k in ("size", "width", "stage", "steps", "warmup", "threads")]

    def in_child(name: str, overrides: str, *extra: str) -> dict[str, Any]:
        """Run ``overrides`` in a fresh process of its own environment; its JSON result line."""
        cmd = [sys.executable, __file__, *shared, f"--child={overrides}", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(overrides))
        if done.returncode != 0:
            sys.exit(f"configuration {name!r} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    for name, overrides in rounds_order(list(configs.items()), args.rounds):
        results[name].append(in_child(name, overrides))
    flops = (
        {name: in_child(name, overrides, "--count")["flops"] for name, overrides in configs.items()}
        if args.flops
        else {}
    )
    print(f"stage {args.stage} at {args.size} px, width {args.width}, {args.threads} threads, median of "
          f"{args.steps} after {args.warmup} per process, {args.rounds} round(s), one process per run\n")  # fmt: skip
    print(
        "| configuration | s / step | vs first | of which copying (s) | first step (s) | peak RSS (MB) "
        "| system CPU (s / step) | page faults / step |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    base = statistics.median(r["step"] for r in next(iter(results.values())))
    for name, runs in results.items():
        step = statistics.median(r["step"] for r in runs)
        first = statistics.median(r["first"] for r in runs)
        rss = max(r["rss_mb"] for r in runs)
        copying = statistics.median(r["copying"] for r in runs)
        system = statistics.median(r["system"] for r in runs)
        faults = statistics.median(r["faults"] for r in runs)
        print(f"| {name} | {step:.3f} | {step / base:.2f} | {copying:.3f} | {first:.1f} | {rss:,.0f} "
              f"| {system:.2f} | {faults:,.0f} |")  # fmt: skip
    if args.flops:
        torch.set_num_threads(args.threads)
        peak, peak_name = peak_gflops()
        print(
            f"\nFLOPs (torch.utils.flop_counter) against the measured peak, {peak:.0f} GFLOP/s ({peak_name})\n"
        )
        print("| configuration | GFLOP per step | GFLOP/s | of peak |\n|---|---:|---:|---:|")
        for name, runs in results.items():
            gflop = flops[name] / 1e9
            rate = gflop / statistics.median(r["step"] for r in runs)
            print(f"| {name} | {gflop:.4g} | {rate:.0f} | {rate / peak:.2f} |")


if __name__ == "__main__":
    main()

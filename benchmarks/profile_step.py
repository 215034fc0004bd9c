"""Where the paper's step spends its time, and how fast it could be if every convolution ran at peak.

Stage 1 of the recipe (one photo + one cartoon, five losses, face-ID through a MobileFaceNet as in
the reference, width ``--width``) at each size: one
step under ``torch.profiler`` splits the self time into convolutions/matmuls and everything else
(normalisation, padding, element-wise ops, pooling, optimiser); the shares are applied to the
median unprofiled step time. The step profiled and timed is the serial one
(``task.concurrent = false``, both directions one after the other on all threads): the profiler
records the calling thread's ops only, and the ops are the same. The step's FLOPs (``torch.utils.flop_counter``, almost all in
convolutions) at the machine's measured peak give the time the convolutions would need at best;
adding the measured rest gives a **lower bound for this step without fusing the non-convolution
ops** (which only a compiler does), to compare with the reference iteration:

    .venv/bin/python benchmarks/profile_step.py --sizes 128 256 --steps 3 --threads 2 \
        [--reference-repo /path/to/photo2cartoon]

Without ``--reference-repo`` the reference column uses the figures measured by ``step_time.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import SAME_RECOGNIZER, build, peak_gflops, repeat_times, step_flops

from branchadapt.concurrency import WORKER_PREFIX

MATHS = {"aten::convolution_backward", "aten::mkldnn_convolution", "aten::_slow_conv2d_forward",
         "aten::_slow_conv2d_backward", "aten::addmm", "aten::mm", "aten::bmm", "aten::addmv_"}  # fmt: skip
MEASURED_REFERENCE = {128: 5.27, 256: 13.32}  # step_time.py --reference-repo (docs/performance.md)


def measure(size: int, width: int, steps: int, extra: list[str]) -> tuple[float, float, Counter[str]]:
    """Median step time (s) after a warm-up step, then one profiled step: the fraction of its self
    time in convolutions/matmuls, and the other ops' profiled times (s)."""
    # torch.profiler records the calling thread's ops only: the default step's concurrent
    # directions (worker threads) would be missing, so the serial step is profiled (same ops).
    trainer, rt = build(size, width, 0, [*SAME_RECOGNIZER, "task.concurrent=false", *extra])
    step = statistics.median(repeat_times(lambda: trainer.train_step(rt, rt.data[0]), steps))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(rt, rt.data[1])
    maths, rest = 0.0, Counter[str]()
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if event.key in MATHS:
            maths += seconds
        else:
            rest[event.key] += seconds
    if any(t.name.startswith(WORKER_PREFIX) for t in threading.enumerate()):
        raise RuntimeError("part of the step ran on worker threads, whose ops the profiler does not record")
    return step, maths / (maths + sum(rest.values())), rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reference-repo", type=Path, help="photo2cartoon checkout: time its iteration now")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="repeatable: a config override for our step, e.g. model.channels_last=false")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak, peak_name = peak_gflops()
    print(f"torch {torch.__version__}, {args.threads} threads, width {args.width}; measured peak {peak:.0f} "
          f"GFLOP/s ({peak_name}); overrides: {' '.join(args.set) or 'none'}\n")  # fmt: skip
    print("| size | step (s) | convs+matmuls (s) | their GFLOP/s | rest (s) | convs at peak + rest (s) "
          "| reference (s) | bound / reference | largest other ops (s) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
    for size in args.sizes:
        step, share, rest = measure(size, args.width, args.steps, args.set)
        flops = step_flops(size, args.width, SAME_RECOGNIZER)
        if args.reference_repo:
            from reference_step import ReferenceStep

            r = ReferenceStep(args.reference_repo, size, args.width)
            ref = statistics.median(repeat_times(lambda r=r: r(*r.batch()), args.steps))
        else:
            ref = MEASURED_REFERENCE.get(size, float("nan"))
        maths_s, rest_s = share * step, (1 - share) * step
        bound = flops / peak / 1e9 + rest_s
        scale = rest_s / sum(rest.values())  # profiled seconds -> unprofiled seconds
        top = ", ".join(f"{k.removeprefix('aten::')} {v * scale:.2f}" for k, v in rest.most_common(5))
        print(f"| {size} | {step:.2f} | {maths_s:.2f} | {flops / maths_s / 1e9:.0f} | {rest_s:.2f} | {bound:.2f} "
              f"| {ref:.2f} | {bound / ref:.2f} | {top} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

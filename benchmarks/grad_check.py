"""What the trainer's check for non-finite gradients costs (``branchadapt.divergence``).

Before each phase's optimiser step the trainer checks that every gradient is finite. For the
transfer stage of the paper's recipe, prints per phase the number of gradients and their
elements, the median time of the check as the trainer runs it (one fused pass per device and
dtype), the same with a max-abs ``torch._foreach_norm`` (the first implementation), and the step
time for scale.

    .venv/bin/python benchmarks/grad_check.py --size 128 --repeat 20 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import build, repeat_times

from branchadapt.divergence import finite_gradients


def foreach_norm_check(params: list[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    trainer, rt = build(args.size, args.width, 1, [])
    step = statistics.median(repeat_times(lambda: trainer.train_step(rt, rt.data[0]), 2))
    print(f"transfer stage at {args.size} px, width {args.width}, {args.threads} threads; "
          f"median of {args.repeat} checks; one step: {step:.3f} s\n")  # fmt: skip
    print("| phase | gradients | elements (M) | check (ms) | foreach max-abs norm (ms) | check / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for phase, optimizer in rt.optimizers.items():
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        assert finite_gradients(params) and foreach_norm_check(params)
        ours = statistics.median(repeat_times(partial(finite_gradients, params), args.repeat))
        norm = statistics.median(repeat_times(partial(foreach_norm_check, params), args.repeat))
        elements = sum(p.numel() for p in params) / 1e6
        print(f"| {phase} | {len(params)} | {elements:.1f} | {ours * 1e3:.1f} | {norm * 1e3:.1f} "
              f"| {ours / step:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()

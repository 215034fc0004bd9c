"""Step time of the paper's transfer stage: ours vs no branches, naive selective BP, reference order.

One step = 4 groups, one photo and one cartoon each, both directions, all six losses (face-ID with
the toonfaces encoder). Prints the median of ``--steps`` steps after ``--warmup`` for:

- ``ours``: branches (low = top = 2), selective BP, generators run once per step;
- ``no branches``: the same generator and losses, one shared model (branching overhead ratio);
- ``naive detach``: ours plus a deep copy of both generators per step (what selective BP costs
  when done by copying the shared stages instead of ``functional_call`` on detached views);
- ``reference order``: fakes recomputed for the generator update (``task.reuse_fakes = false``).

    python benchmarks/step_time.py --sizes 64 128 [--width 32] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

import branchadapt as ba
from branchadapt.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def overrides(size: int, width: int) -> list[str]:
    layers = max(3, min(7, (size // 3).bit_length() + 1))
    return [
        f"data.size={size}", f"data.load_size={size + size // 8}",
        f'data.augment=[{{name="HorizontalFlip",p=0.5}},{{name="Resize",height={size + size // 8},width={size + size // 8}}},{{name="RandomCrop",height={size},width={size}}}]',
        f"model.image_size={size}", f"model.width={width}", f"task.dis_width={width}",
        f"task.global_layers={min(7, layers)}", f"task.local_layers={max(3, min(5, layers - 2))}",
        "train.progress=none", "data.toonfaces.counts={women=[8,4],men=[4,4],kids=[4,4],elderly=[4,4]}",
        "data.toonfaces.test_per_group=1",
    ]  # fmt: skip


def measure(size: int, width: int, extra: list[str], steps: int, warmup: int, copy_gens: bool) -> float:
    exp = ba.load_experiment(ROOT / "examples" / "cartoon.toml", overrides(size, width) + extra)
    trainer = Trainer(exp, run_dir=Path("/tmp/branchadapt-step-time"), device="cpu")
    stage = exp.stages[1]
    untrained = dataclasses.replace(stage, spec=stage.spec.model_copy(update={"init_from": None}))
    rt = trainer.build_stage(1, untrained, trainer.build_source())
    times = []
    for i in range(warmup + steps):
        batch = rt.data[i]
        t0 = time.perf_counter()
        if copy_gens:
            for name in ("gen_a2b", "gen_b2a"):
                copy.deepcopy(rt.modules[name].backbone)
        trainer.train_step(rt, batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, width {args.width}, median of {args.steps} steps after {args.warmup}")
    print(
        "| size | ours (s) | no branches (s) | overhead | naive detach (s) | reference order (s) | ours / ref order |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        ours = measure(size, args.width, [], args.steps, args.warmup, False)
        plain = measure(
            size, args.width, ['stages.transfer.splitter={type="finetune"}'], args.steps, args.warmup, False
        )
        naive = measure(size, args.width, [], args.steps, args.warmup, True)
        ref = measure(size, args.width, ["task.reuse_fakes=false"], args.steps, args.warmup, False)
        print(f"| {size} | {ours:.3f} | {plain:.3f} | {ours / plain:.2f} | {naive:.3f} | {ref:.3f} | {ours / ref:.2f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Step time of the paper's recipe on this machine, against the issue-7 targets.

Two tables, median of ``--steps`` steps after ``--warmup`` (photo2cartoon generator at ``--width``,
global/local discriminators sized for the image, toonfaces data, fp32 unless stated):

1. **Transfer stage** (4 groups, one photo and one cartoon each, both directions, all six losses):
   ``ours`` (branches low = top = 2, selective BP, generators once per step); ``no branches`` (same
   maths, one shared model: the branching overhead ratio); ``naive`` (selective BP by deep-copying
   both generators' shared stages every step and running the few-shot groups through the copy);
   ``ref order`` (translations recomputed for the generator update, as the reference does).
2. **The reference's maths** (stage 1: one photo + one cartoon, no branches, five losses):
   ``ours`` and ``ref order`` next to the reference code's measured iteration (2.79 s at 128 px,
   6.32 s at 256 px on this machine, ``../shared/reference/photo2cartoon.md``), the step's FLOPs
   (``torch.utils.flop_counter``), achieved GFLOP/s and its fraction of the machine's measured peak
   (best of a large channels_last 3x3 convolution and a 2048^2 matmul).

    .venv/bin/python benchmarks/step_time.py --sizes 64 128 256 --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import branchadapt as ba
from branchadapt.branched import BranchedModel
from branchadapt.interfaces import Participation
from branchadapt.trainer import StageRuntime, Trainer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_SECONDS = {128: 2.79, 256: 6.32}  # the reference code's iteration, measured on this machine


def overrides(size: int, width: int) -> list[str]:
    """The recipe at ``size`` px: generator/discriminator width, discriminator depth, tiny data."""
    layers = max(3, min(7, (size // 3).bit_length() + 1))
    load = size + size // 8
    return [
        f"data.size={size}", f"data.load_size={load}",
        f'data.augment=[{{name="HorizontalFlip",p=0.5}},{{name="Resize",height={load},width={load}}},{{name="RandomCrop",height={size},width={size}}}]',
        f"model.image_size={size}", f"model.width={width}", f"task.dis_width={width}",
        f"task.global_layers={min(7, layers)}", f"task.local_layers={max(3, min(5, layers - 2))}",
        "train.progress=none", "data.toonfaces.counts={women=[8,4],men=[4,4],kids=[4,4],elderly=[4,4]}",
        "data.toonfaces.test_per_group=1",
    ]  # fmt: skip


def build(size: int, width: int, stage: int, extra: list[str]) -> tuple[Trainer, StageRuntime]:
    exp = ba.load_experiment(ROOT / "examples" / "cartoon.toml", overrides(size, width) + extra)
    trainer = Trainer(exp, run_dir=Path("/tmp/branchadapt-step-time"), device="cpu")
    spec = exp.stages[stage]
    untrained = dataclasses.replace(spec, spec=spec.spec.model_copy(update={"init_from": None}))
    return trainer, trainer.build_stage(stage, untrained, trainer.build_source())


def naive_step(trainer: Trainer, rt: StageRuntime) -> Callable[[ba.Batch], object]:
    """Selective BP without functional views: every forward of a detached group deep-copies the
    backbone, puts the real branch modules back into the copy, freezes the copy's shared
    parameters and runs the group through it (what a hand-written implementation would do)."""
    for name in ("gen_a2b", "gen_b2a"):
        model = rt.modules[name]
        assert isinstance(model, BranchedModel)
        live = model._run

        def run(policy, args, kwargs, model=model, live=live):  # type: ignore[no-untyped-def]
            if policy is Participation.LIVE:
                return live(policy, args, kwargs)
            clone = copy.deepcopy(model.backbone)
            for path in model.branch_paths:
                clone.set_submodule(path, model.backbone.get_submodule(path))
            shared = set(model._shared_names)
            for pname, param in clone.named_parameters():
                if pname in shared:
                    param.requires_grad_(False)
            return clone(*args, **kwargs)

        model._run = run  # type: ignore[method-assign]
    return lambda batch: trainer.train_step(rt, batch)


def timed(step: Callable[[ba.Batch], object], rt: StageRuntime, steps: int, warmup: int) -> float:
    times = []
    for i in range(warmup + steps):
        batch = rt.data[i]
        start = time.perf_counter()
        step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(size: int, width: int, stage: int, extra: list[str], args: argparse.Namespace, naive: bool = False) -> float:  # fmt: skip
    trainer, rt = build(size, width, stage, extra)
    step = naive_step(trainer, rt) if naive else (lambda b: trainer.train_step(rt, b))
    return timed(step, rt, args.steps, args.warmup)


def step_flops(size: int, width: int, extra: list[str]) -> int:
    trainer, rt = build(size, width, 0, extra)
    trainer.train_step(rt, rt.data[0])
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(rt, rt.data[1])
    return counter.get_total_flops()


def peak_gflops(repeat: int = 5) -> tuple[float, str]:
    """The machine's practical fp32 peak: best of a channels_last conv and a square matmul."""
    x = torch.randn(8, 128, 64, 64).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best: dict[str, float] = {}
    with torch.no_grad():
        for name, fn, flops in (
            ("conv3x3 c128 channels_last", lambda: conv(x), 2 * 8 * 128 * 128 * 9 * 64 * 64),
            ("matmul 2048^2", lambda: a @ b, 2 * 2048**3),
        ):
            fn()
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best[name] = flops / min(times) / 1e9
    name = max(best, key=lambda k: best[k])
    return best[name], name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-transfer", action="store_true", help="only the reference-maths table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak, peak_name = peak_gflops()
    print(f"torch {torch.__version__}, {args.threads} threads, width {args.width}, median of {args.steps} "
          f"steps after {args.warmup}; measured peak {peak:.0f} GFLOP/s ({peak_name})\n")  # fmt: skip
    if not args.skip_transfer:
        print("Transfer stage (4 groups x (1 photo + 1 cartoon), six losses), seconds per step")
        print("| size | ours | no branches | overhead | naive copy | ref order | ours bf16 |")
        print("|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        for size in args.sizes:
            ours = measure(size, args.width, 1, [], args)
            plain = measure(size, args.width, 1, ['stages.transfer.splitter={type="finetune"}'], args)
            naive = measure(size, args.width, 1, [], args, naive=True)
            ref = measure(size, args.width, 1, ["task.reuse_fakes=false"], args)
            bf16 = measure(size, args.width, 1, ['precision="bf16"'], args)
            print(f"| {size} | {ours:.3f} | {plain:.3f} | {ours / plain:.2f} | {naive:.3f} | {ref:.3f} | {bf16:.3f} |",
                  flush=True)  # fmt: skip
        print()
    print("Reference maths (stage 1: 1 photo + 1 cartoon, no branches, five losses), seconds per step")
    print(
        "| size | ours | ref order | reference code | ours / reference | GFLOP per step | GFLOP/s | of peak |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for size in args.sizes:
        ours = measure(size, args.width, 0, [], args)
        ref = measure(size, args.width, 0, ["task.reuse_fakes=false"], args)
        flops = step_flops(size, args.width, [])
        code = REFERENCE_SECONDS.get(size)
        code_s, ratio = (f"{code:.2f}", f"{ours / code:.2f}") if code else ("-", "-")
        rate = flops / ours / 1e9
        print(f"| {size} | {ours:.3f} | {ref:.3f} | {code_s} | {ratio} | {flops / 1e9:.1f} | {rate:.0f} | {rate / peak:.2f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

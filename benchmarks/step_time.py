"""Step time of the paper's recipe on this machine, against the issue-7 targets.

Two tables, median of ``--steps`` steps after ``--warmup`` (photo2cartoon generator at ``--width``,
global/local discriminators sized for the image, toonfaces data, fp32 unless stated):

1. **Transfer stage** (4 groups, one photo and one cartoon each, both directions, all six losses):
   ``ours`` (the defaults: branches low = top = 2, selective BP, generators once per step, live and
   detached rows as one call through the shared stages where a generator's batch is at most
   512 KiB, else two calls, the groups' branch copies as one call where a stage's batch is at
   most 8 MiB, else a loop); ``no branches`` (same maths, one shared model: the branching overhead
   ratio); ``loop`` / ``stacked`` (ours with ``train.stack_branches = false`` / ``true``: the
   branch copies always one group after the other / always as one call); ``fused`` /
   ``separate calls`` (ours with ``train.fuse_participation = true`` / ``false``: the anchor's and
   the few-shot groups' rows always as one call / always as two calls through the shared stages);
   ``vmap copies`` (ours with ``model.stacked_copies = "vmap"``: stacked branch copies through the
   engine's vmap instead of the generator's folded network); ``serial directions`` (ours with
   ``task.concurrent = false``) against ``no branches, serial`` (the same without branches): the
   overhead when the two directions do not run at once, i.e. without their threads waiting for
   each other's Python (the GIL);
   ``naive`` (selective BP by deep-copying
   both generators' shared stages every step and running the few-shot groups through the copy;
   ``of which copying``: the part of its step spent copying, the work ours does not do);
   ``ref order`` (translations recomputed for the generator update, as the reference does); and
   ours's FLOPs per step (counted on a trainer of its own, see below), GFLOP/s and fraction of peak.
2. **The reference's maths** (stage 1: one photo + one cartoon, no branches, five losses, the
   face-ID loss through a MobileFaceNet as in the reference, not the toonfaces recognizer):
   ``ours``, ``ref order``, ``ours`` with ``train.compile = "units"`` (its first, compiling,
   step is a warm-up step) and ``ours, all fp32`` (``model.bf16_decoder = false``: the decoder's
   residual blocks in fp32 too, where the default runs their convolutions in bf16) next to the reference code's iteration: measured in the same run when
   ``--reference-repo`` names a photo2cartoon checkout (``reference_step.py``; it runs in this
   process, after our trainer set ``train.retain_freed_memory``, so with freed memory retained
   too: ``allocator.py`` times each side with and without it), otherwise the
   figure quoted in ``../shared/reference/photo2cartoon.md`` (2.79 s at 128 px, 6.32 s at 256 px,
   taken on this kind of machine in another session), the step's FLOPs
   (``torch.utils.flop_counter``), achieved GFLOP/s and its fraction of the machine's measured peak
   (best of a large channels_last 3x3 convolution and a 2048^2 matmul).

    .venv/bin/python benchmarks/step_time.py --sizes 64 128 256 --steps 5 --warmup 2 \
        [--reference-repo /path/to/photo2cartoon]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import branchadapt as ba
from branchadapt.branched import BranchedModel
from branchadapt.interfaces import Participation
from branchadapt.trainer import StageRuntime, Trainer

ROOT = Path(__file__).resolve().parents[1]
NAIVE = "<naive>"  # marker: selective BP by copying the shared stages
COPYING = {"seconds": 0.0}  # time the naive steps spent copying, summed
REFERENCE_SECONDS = {128: 2.79, 256: 6.32}  # the reference code's iteration, measured on this machine
# the reference's face-ID network for the reference-maths table (random weights, as reference_step.py)
SAME_RECOGNIZER = ['losses.face_id.recognizer={type="mobilefacenet", allow_random=true}']


# the transfer table's variants besides ours and no branches (``--only`` picks some)
OPTIONAL_VARIANTS = {
    "loop": ["train.stack_branches=false"],
    "stacked": ["train.stack_branches=true"],
    "fused": ["train.fuse_participation=true"],
    "separate": ["train.fuse_participation=false"],
    "vmap": ['model.stacked_copies="vmap"'],
    "serial": ["task.concurrent=false"],  # with "no branches, serial" (SERIAL_PLAIN) as its yardstick
    "naive": [NAIVE],
    "ref": ["task.reuse_fakes=false"],
    "bf16": ['precision="bf16"'],
}


NO_BRANCHES = ['stages.transfer.splitter={type="finetune"}']
#: the ``serial`` variant's own yardstick: no branches, the two directions one after the other
SERIAL_PLAIN = [*NO_BRANCHES, "task.concurrent=false"]


def overrides(size: int, width: int) -> list[str]:
    """The recipe at ``size`` px: generator/discriminator width, discriminator depth, tiny data."""
    layers = max(3, min(7, (size // 3).bit_length() + 1))
    load = size + size // 8
    return [
        f"data.size={size}", f"data.load_size={load}",
        f'data.augment=[{{name="HorizontalFlip",p=0.5}},{{name="Resize",height={load},width={load}}},{{name="RandomCrop",height={size},width={size}}}]',
        f"model.image_size={size}", f"model.width={width}", f"task.dis_width={width}",
        f"task.global_layers={min(7, layers)}", f"task.local_layers={max(3, min(5, layers - 2))}",
        "train.progress=none", "train.compile=off", "data.toonfaces.counts={women=[8,4],men=[4,4],kids=[4,4],elderly=[4,4]}",
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
        model.fused = False  # the naive way runs the detached groups as their own call
        live = model._run

        def run(policy, args, kwargs, model=model, live=live):  # type: ignore[no-untyped-def]
            if policy is Participation.LIVE:
                return live(policy, args, kwargs)
            start = time.perf_counter()
            clone = copy.deepcopy(model.backbone)
            for path in model.branch_paths:
                clone.set_submodule(path, model.backbone.get_submodule(path))
            shared = set(model._shared_names)
            for pname, param in clone.named_parameters():
                if pname in shared:
                    param.requires_grad_(False)
            COPYING["seconds"] += time.perf_counter() - start
            return clone(*args, **kwargs)

        model._run = run  # type: ignore[method-assign]
    return lambda batch: trainer.train_step(rt, batch)


def interleaved(size: int, width: int, stage: int, configs: dict[str, list[str]], args: argparse.Namespace,
                extra_steps: dict[str, Callable[[int], object]] | None = None,
                rounds: dict[str, list[float]] | None = None) -> dict[str, float]:  # fmt: skip
    """Median step time of each configuration (and of each ``extra_steps`` function of the step
    index), their steps interleaved so that drift in the machine's speed hits all alike, in reversed
    order every other round (whichever runs first in a round measured up to ~10 % slower here).
    ``rounds``, when given, receives every configuration's times, one per measured round."""
    steps: dict[str, Callable[[int], object]] = dict(extra_steps or {})
    for name, extra in configs.items():
        trainer, rt = build(size, width, stage, [e for e in extra if e != NAIVE])
        step = naive_step(trainer, rt) if NAIVE in extra else partial(trainer.train_step, rt)
        steps[name] = lambda i, step=step, rt=rt: step(rt.data[i])
    times: dict[str, list[float]] = {name: [] for name in steps}
    copying: list[float] = []
    for i in range(args.warmup + args.steps):
        for name, step in list(steps.items())[:: -1 if i % 2 else 1]:
            copied = COPYING["seconds"]
            start = time.perf_counter()
            step(i)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                if NAIVE in configs.get(name, []):
                    copying.append(COPYING["seconds"] - copied)
    medians = {name: statistics.median(t) for name, t in times.items()}
    if rounds is not None:
        rounds.update(times)
    if copying:
        medians["copying"] = statistics.median(copying)
    return medians


def step_flops(size: int, width: int, extra: list[str], stage: int = 0) -> int:
    """FLOPs of one step of stage ``stage`` (0: basic), after one uncounted step, on a trainer of
    its own built with ``task.concurrent = false``: the counter is a dispatch mode of the calling
    thread and would miss the worker threads (the FLOPs are the same). Switching a trainer that
    ran concurrent steps to serial ones would not do: the serial step's memory comes on top of
    what the worker threads' allocator arenas keep (out of memory at 256 px)."""
    trainer, rt = build(size, width, stage, [*extra, "task.concurrent=false"])
    trainer.train_step(rt, rt.data[0])
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(rt, rt.data[1])
    return counter.get_total_flops()


def peak_gflops(repeat: int = 10) -> tuple[float, str]:
    """The machine's practical fp32 peak: best of large channels_last convolutions and a matmul."""
    best: dict[str, float] = {}
    with torch.no_grad():
        for c, k, hw in ((128, 3, 64), (128, 3, 128), (256, 1, 64)):
            x = torch.randn(4, c, hw, hw).contiguous(memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(c, c, k, padding=k // 2, bias=False).to(memory_format=torch.channels_last)
            flops = 2 * 4 * c * c * k * k * hw * hw
            seconds = min(repeat_times(partial(conv, x), repeat))
            best[f"conv{k}x{k} c{c} {hw}^2 channels_last"] = flops / seconds / 1e9
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        best["matmul 2048^2"] = 2 * 2048**3 / min(repeat_times(lambda: a @ b, repeat)) / 1e9
    name = max(best, key=lambda k: best[k])
    return best[name], name


def repeat_times(fn: Callable[[], object], repeat: int) -> list[float]:
    """Seconds of ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-transfer", action="store_true", help="only the reference-maths table")
    ap.add_argument("--skip-reference", action="store_true", help="only the transfer-stage table")
    ap.add_argument(
        "--no-bf16",
        action="store_true",
        help="leave out the bf16 column (very slow without native bf16 on the CPU)",
    )
    ap.add_argument(
        "--reference-repo", type=Path, help="photo2cartoon checkout: time its iteration in the same run"
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=list(OPTIONAL_VARIANTS),
        help="transfer table: time only these variants next to ours and no branches (the others print '-'); "
        "each variant holds a whole trainer, and seven of them at 256 px exceed 24 GiB",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak, peak_name = peak_gflops()
    print(f"torch {torch.__version__}, {args.threads} threads, width {args.width}, median of {args.steps} "
          f"steps after {args.warmup}; measured peak {peak:.0f} GFLOP/s ({peak_name}) at the start; "
          "each row's 'of peak' divides by the higher of it and the peak measured again right after "
          "the row's steps (its 'peak' column), so a slow moment at the start cannot inflate it\n")  # fmt: skip
    if not args.skip_transfer:
        print("Transfer stage (4 groups x (1 photo + 1 cartoon), six losses), seconds per step")
        print(
            "| size | ours | no branches | overhead | loop | overhead, loop | stacked | overhead, stacked "
            "| fused | overhead, fused | separate calls | overhead, separate | vmap copies | overhead, vmap "
            "| naive copy | of which copying | ref order | ours bf16 | overhead per round (min-max) "
            "| serial directions | no branches, serial | overhead, serial | GFLOP per step | GFLOP/s | of peak "
            "| peak |"
        )
        print("|---:" * 26 + "|", flush=True)
        wanted = set(args.only or OPTIONAL_VARIANTS) - ({"bf16"} if args.no_bf16 else set())
        configs = {"ours": [], "plain": NO_BRANCHES}
        configs |= {k: v for k, v in OPTIONAL_VARIANTS.items() if k in wanted}
        if "serial" in configs:
            configs["plain serial"] = SERIAL_PLAIN
        for size in args.sizes:
            per_round: dict[str, list[float]] = {}
            t = interleaved(size, args.width, 1, configs, args, rounds=per_round)

            def cell(name: str, ratio: bool = False, t: dict[str, float] = t) -> str:
                if name not in t:
                    return "-"
                return f"{t[name] / t['plain']:.2f}" if ratio else f"{t[name]:.3f}"

            # ours and no branches ran in the same round: their ratio is free of slower drift
            ratios = [o / p for o, p in zip(per_round["ours"], per_round["plain"], strict=True)]
            cells = [cell("ours"), cell("plain"), cell("ours", True), cell("loop"), cell("loop", True),
                     cell("stacked"), cell("stacked", True), cell("fused"), cell("fused", True),
                     cell("separate"), cell("separate", True), cell("vmap"), cell("vmap", True),
                     cell("naive"), cell("copying"), cell("ref"), cell("bf16"),
                     f"{min(ratios):.2f}-{max(ratios):.2f}", cell("serial"), cell("plain serial"),
                     f"{t['serial'] / t['plain serial']:.2f}" if "serial" in t else "-"]  # fmt: skip
            flops = step_flops(size, args.width, [], stage=1)  # ours, counted on a trainer of its own
            rate = flops / t["ours"] / 1e9
            row_peak = max(peak, peak_gflops()[0])
            cells += [f"{flops / 1e9:.4g}", f"{rate:.0f}", f"{rate / row_peak:.2f}", f"{row_peak:.0f}"]
            print(f"| {size} | " + " | ".join(cells) + " |", flush=True)
        print()
    if args.skip_reference:
        return
    print("Reference maths (stage 1: 1 photo + 1 cartoon, no branches, five losses), seconds per step")
    print(
        "| size | ours | ref order | reference code | ours / reference | GFLOP per step | GFLOP/s | of peak "
        "| reference GFLOP | ours, compiled units | compiled / reference | ours, all fp32 | all fp32 / reference "
        "| peak |"
    )
    print("|---:" * 14 + "|", flush=True)
    for size in args.sizes:
        extra: dict[str, Callable[[int], object]] = {}
        if args.reference_repo:
            from reference_step import ReferenceStep

            reference = ReferenceStep(args.reference_repo, size, args.width)
            extra["code"] = lambda i, r=reference: r(*r.batch())
        same = SAME_RECOGNIZER
        configs = {
            "ours": same,
            "ref": [*same, "task.reuse_fakes=false"],
            "compiled": [*same, 'train.compile="units"'],
            "fp32": [*same, "model.bf16_decoder=false"],
        }
        t = interleaved(size, args.width, 0, configs, args, extra)
        ours, ref = t["ours"], t["ref"]
        flops = step_flops(size, args.width, same)
        code = t.get("code", REFERENCE_SECONDS.get(size))
        measured = "measured now" if "code" in t else "quoted"
        code_s, ratio = (f"{code:.2f} ({measured})", f"{ours / code:.2f}") if code else ("-", "-")
        compiled_ratio = f"{t['compiled'] / code:.2f}" if code else "-"
        fp32_ratio = f"{t['fp32'] / code:.2f}" if code else "-"
        rate = flops / ours / 1e9
        row_peak = max(peak, peak_gflops()[0])
        ref_flops = "-"
        if args.reference_repo:
            with FlopCounterMode(display=False) as counter:
                reference(*reference.batch())
            ref_flops = f"{counter.get_total_flops() / 1e9:.1f}"
        print(f"| {size} | {ours:.3f} | {ref:.3f} | {code_s} | {ratio} | {flops / 1e9:.1f} | {rate:.0f} "
              f"| {rate / row_peak:.2f} | {ref_flops} | {t['compiled']:.3f} | {compiled_ratio} | {t['fp32']:.3f} "
              f"| {fp32_ratio} | {row_peak:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

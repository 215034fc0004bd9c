"""Which single-process optimisations win for the paper's step on this machine?

Stage 1 of the recipe (``--stage 1``, the default: one photo + one cartoon, five losses; ``--stage 2``:
the transfer stage, four groups with branches and selective BP; numbered as in ``one_config.py``) at ``--size`` px, each variant
against the default configuration, steps interleaved, median of ``--steps`` after ``--warmup``:

- ``channels_last``: every module and input in channels_last memory format;
- ``channels_last + IN``: the same with ``nn.InstanceNorm2d`` replaced by a layout-agnostic
  instance norm (``var_mean`` over H, W), so no layout conversion happens around the norms;
- ``channels_last generators`` / ``default-layout generators``: ``model.channels_last = true`` /
  ``false``, the generators' training activations in channels_last at every size / at none (the
  default ``auto`` uses it for inputs of 128 px and more on a CPU; the discriminators and the
  generators' outputs stay in the default layout);
- ``bf16 autocast``: ``precision = "bf16"`` (convolutions and matmuls in bfloat16); in one process
  with the others it slows the fp32 steps after it (docs/performance.md): take its figure from
  ``one_config.py``;
- ``fp32 decoder blocks``: ``model.bf16_decoder = false``, the generator's decoder residual blocks
  in fp32 (the default ``auto`` runs their convolutions in bf16 from 128 px on a CPU with AMX);
- ``for-loop Adam``: torch's own default Adam kernels on CPU (a loop over the parameters; foreach
  on CUDA) instead of the fused ones ``train.fused_optimizers`` selects;
- ``ref order``: the translations recomputed for the generator update (what reusing them saves);
- ``serial directions``: ``task.concurrent = false``, the two directions' generators and
  discriminators one after the other on all threads instead of at once on one thread each
  (what running them at once saves; ``1 thread`` is serial too);
- ``1 thread``: the default with one intra-op thread instead of ``--threads``;
- ``two-pass LIN``: the layer-instance norms (AdaLIN, LIN) computed as the reference writes them
  (separate instance and layer statistics, then the mix) instead of one reduction and one fused
  multiply-add: what the fused form saves;
- ``torch instance norm``: ``nn.InstanceNorm2d`` itself instead of the generator's
  ``InstanceNorm``, whose output is not an autograd view (no gradient copy behind the in-place
  ReLUs): what the latter saves;
- ``unfused units``: the generator's low-memory units (``branchadapt_cartoon.lowmem``) switched
  off, so autograd keeps the ReLU outputs and padded maps: what keeping less costs or saves in time;
- ``all units low-memory``: ``model.low_memory_min_mb = 0``, every unit on its low-memory path
  however small its input (by default only inputs of 8 MiB and more): what the threshold saves;
- ``torch pad backward``: torch's own CPU kernel for every reflection pad's gradient instead of
  ``branchadapt_cartoon.padding``'s strided fold of large maps: what the fold saves;
- ``torch IN forward``: torch's batch-norm kernel for the instance norms' training forward instead
  of ``branchadapt_cartoon.instnorm``'s four vectorised ops: what the latter saves;
- ``torch IN backward``: torch's channels_last batch-norm backward kernel for the instance norms
  of maps with at most 8 channels too, instead of ``branchadapt_cartoon.instnorm``'s plain ops:
  what the latter save;
- ``torch var_mean``: ``torch.var_mean`` for the layer-instance norms' statistics instead of
  ``branchadapt_cartoon.instnorm.var_mean_hw``: what the latter saves;
- ``classic spectral norm``: the discriminators under ``torch.nn.utils.spectral_norm`` (divides
  every weight by sigma) instead of dividing a large weight's output: what the latter saves;
- ``torch.compile`` (only with ``--compile``): ``train.compile = "units"``, regional compilation
  of the generator's repeated units (hourglass ConvBlock, encoder ResnetBlock, decoder
  SoftAdaLINBlock), forward and backward;
  the first (compiling) step is reported separately;
- ``torch.compile, directions at once`` (with ``--compile``): the same with ``task.concurrent =
  true`` (``auto`` runs compiled steps serially; the worker threads compile their own graphs);
- ``torch.compile, whole generators`` (with ``--compile``): each generator compiled whole with
  ``nn.Module.compile`` instead of by units, the directions one after the other as ``auto`` runs
  compiled modules (the first step compiles: minutes on a small CPU).

    .venv/bin/python benchmarks/optimisations.py --size 128 --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import build

import branchadapt as ba
from branchadapt.interfaces import Backbone


def _channels_last(batch: ba.Batch) -> ba.Batch:
    return {
        stream: {
            k: v.contiguous(memory_format=torch.channels_last) if k == "image" else v for k, v in f.items()
        }
        for stream, f in batch.items()
    }


class LayoutFreeInstanceNorm(torch.nn.Module):
    """Instance norm without affine parameters that keeps its input's memory format."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + self.eps)


@contextlib.contextmanager
def _classic_spectral_norm() -> Iterator[None]:
    import branchadapt_cartoon.critics as critics

    ours = critics.spectral_norm
    critics.spectral_norm = torch.nn.utils.spectral_norm  # type: ignore[assignment]
    try:
        yield
    finally:
        critics.spectral_norm = ours


def _swap_instance_norms(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.InstanceNorm2d) and not child.affine:
            setattr(module, name, LayoutFreeInstanceNorm(child.eps))
        else:
            _swap_instance_norms(child)


def _two_pass_lin(module: torch.nn.Module, x: torch.Tensor, *style: torch.Tensor) -> torch.Tensor:
    """``AdaLIN`` / ``LIN`` the reference's way: IN and LN statistics separately, then the mix."""
    in_var, in_mean = torch.var_mean(x, dim=(2, 3), keepdim=True)
    ln_var, ln_mean = torch.var_mean(x, dim=(1, 2, 3), keepdim=True)
    rho = module.rho
    out = rho * (x - in_mean) * torch.rsqrt(in_var + module.eps) + (1 - rho) * (x - ln_mean) * torch.rsqrt(
        ln_var + module.eps
    )
    if style:  # AdaLIN: gamma, beta per sample
        gamma, beta = style
        return out * gamma[:, :, None, None] + beta[:, :, None, None]
    return out * module.gamma + module.beta


def _use_two_pass_lin(module: torch.nn.Module) -> None:
    from branchadapt_cartoon.networks import LIN, AdaLIN

    for m in module.modules():
        if isinstance(m, AdaLIN | LIN):
            m.forward = types.MethodType(_two_pass_lin, m)  # type: ignore[method-assign]


def _use_torch_instance_norm(module: torch.nn.Module) -> None:
    from branchadapt_cartoon.networks import InstanceNorm

    for m in module.modules():
        if isinstance(m, InstanceNorm):
            m.forward = types.MethodType(torch.nn.InstanceNorm2d.forward, m)  # type: ignore[method-assign]


def _unfuse(module: torch.nn.Module) -> None:
    from branchadapt_cartoon.lowmem import NormReluConv, ReflectConv2d

    for m in module.modules():
        if isinstance(m, NormReluConv | ReflectConv2d):
            m.fused = False  # this instance only: the other variants in the process keep theirs


#: variants that turn off module-level switches (of the core or the cartoon plugins) for their own steps
SWITCHES = {
    "torch pad backward": [("branchadapt_cartoon.padding", "fold_enabled")],
    "torch IN forward": [("branchadapt_cartoon.instnorm", "fast_forward")],
    "torch IN backward": [("branchadapt_cartoon.instnorm", "plain_backward")],
    "torch var_mean": [("branchadapt_cartoon.instnorm", "fast_var_mean")],
    # the transfer stage (--stage 2) on small maps: what the branch copies cost
    "live-row mode in branch copies": [("branchadapt.rowgrad", "pause_in_branches")],
    "autograd functions under vmap": [
        ("branchadapt_cartoon.instnorm", "vmap_kernels"),
        ("branchadapt_cartoon.padding", "vmap_kernels"),
    ],
    # torch's apply for the plugin's setup_context-style functions: inspect.signature on every call
    "signature-bound autograd functions": [("branchadapt_cartoon.fastapply", "enabled")],
}


def variant(
    name: str, size: int, width: int, stage: int = 0, base: Sequence[str] = ()
) -> tuple[Callable[[int], object], int | None]:
    """A step function ``f(i)`` for the variant on the configuration ``base`` (overrides), and its
    thread count (None: the default)."""
    extra = [
        *base,
        *{
            "bf16 autocast": ['precision="bf16"'],
            "fp32 decoder blocks": ["model.bf16_decoder=false"],
            "ref order": ["task.reuse_fakes=false"],
            "serial directions": ["task.concurrent=false"],
            "channels_last generators": ["model.channels_last=true"],
            "default-layout generators": ["model.channels_last=false"],
            "torch.compile": ['train.compile="units"'],
            "torch.compile, directions at once": ['train.compile="units"', "task.concurrent=true"],
            "torch.compile, whole generators": ["task.concurrent=false"],  # as auto runs compiled modules
            "all units low-memory": ["model.low_memory_min_mb=0"],
            "branch copies under vmap": ['model.stacked_copies="vmap"'],
        }.get(name, []),
    ]
    if name == "classic spectral norm":
        with _classic_spectral_norm():
            trainer, rt = build(size, width, stage, extra)
    else:
        trainer, rt = build(size, width, stage, extra)
    if name == "two-pass LIN":
        for m in rt.modules.values():
            _use_two_pass_lin(m)
    if name == "torch instance norm":
        for m in rt.modules.values():
            _use_torch_instance_norm(m)
    if name == "unfused units":
        for m in rt.modules.values():
            _unfuse(m)
    if name == "torch.compile, whole generators":  # one graph per backbone, compiled in place
        for m in rt.modules.values():
            for sub in m.modules():
                if isinstance(sub, Backbone):
                    sub.compile()
    threads = 1 if name == "1 thread" else None
    convert: Callable[[ba.Batch], ba.Batch] = lambda b: b  # noqa: E731
    if name in ("channels_last", "channels_last + IN"):
        for m in rt.modules.values():
            if name.endswith("+ IN"):
                _swap_instance_norms(m)
            m.to(memory_format=torch.channels_last)
        convert = _channels_last
    if name == "for-loop Adam":  # switched in place, so the stage's LR schedulers stay bound to them
        for opt in rt.optimizers.values():
            for group in opt.param_groups:
                group.update(foreach=None, fused=None)
    if name in SWITCHES:  # module-level switches: off around this variant's steps only
        switches = [(importlib.import_module(m), attr) for m, attr in SWITCHES[name]]

        def step(i: int) -> object:
            for module, attr in switches:
                setattr(module, attr, False)
            try:
                return trainer.train_step(rt, rt.data[i])
            finally:
                for module, attr in switches:
                    setattr(module, attr, True)

        return step, threads
    return (lambda i: trainer.train_step(rt, convert(rt.data[i]))), threads


def optimiser_steps(params: list[torch.Tensor], repeats: int = 5) -> dict[str, float]:
    """Median time of one Adam step over tensors shaped like ``params``, per implementation."""
    kinds = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(2):  # two rounds, each a fresh optimiser per implementation
        for kind, flags in kinds.items():
            copies = [torch.nn.Parameter(torch.randn_like(p)) for p in params]
            for c in copies:
                c.grad = torch.randn_like(c)
            opt = torch.optim.Adam(copies, lr=1e-4, betas=(0.5, 0.999), weight_decay=1e-4, **flags)
            opt.step()  # state allocated
            for _ in range(repeats):
                start = time.perf_counter()
                opt.step()
                times[kind].append(time.perf_counter() - start)
    return {k: statistics.median(t) for k, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--stage", type=int, choices=[1, 2], default=1, help="1: basic; 2: transfer (branches)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile here)")
    ap.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (and the default)")
    ap.add_argument("--skip", nargs="+", default=[], metavar="VARIANT", help="leave these variants out")
    ap.add_argument(
        "--set",
        dest="base",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="repeatable: a config override for every variant, the default included "
        "(e.g. task.concurrent=false: the variants on the serial step); a variant's own "
        "overrides (serial directions: task.concurrent=false, ...) come after these and win",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [
        "default",
        "channels_last",
        "channels_last + IN",
        "channels_last generators",
        "default-layout generators",
        "bf16 autocast",
        "fp32 decoder blocks",
        "for-loop Adam",
        "ref order",
        "serial directions",
        "1 thread",
        "two-pass LIN",
        "torch instance norm",
        "unfused units",
        "all units low-memory",
        "classic spectral norm",
        "torch pad backward",
        "torch IN forward",
        "torch IN backward",
        "torch var_mean",
        "live-row mode in branch copies",
        "autograd functions under vmap",
        "branch copies under vmap",
        "signature-bound autograd functions",
    ]
    names += (
        ["torch.compile", "torch.compile, directions at once", "torch.compile, whole generators"]
        if args.compile
        else []
    )
    for flag, chosen in (("--only", args.only or []), ("--skip", args.skip)):
        unknown = set(chosen) - set(names)
        if unknown:
            ap.error(f"{flag}: unknown variant(s) {sorted(unknown)}; expected some of {names}")
    if args.only:
        names = [n for n in names if n == "default" or n in args.only]
    if "default" in args.skip:
        ap.error("--skip: the default is every variant's yardstick")
    names = [n for n in names if n not in args.skip]
    stage = args.stage - 1  # the experiment's stage index
    steps = {n: variant(n, args.size, args.width, stage, args.base) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    system: dict[str, list[float]] = {n: [] for n in names}  # the kernel's time: mostly page faults here
    first: dict[str, float] = {}
    for i in range(args.warmup + args.steps):
        # reversed every other round: whichever variant runs first in a round measured slower
        for name, (step, threads) in list(steps.items())[:: -1 if i % 2 else 1]:
            torch.set_num_threads(threads or args.threads)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
            start = time.perf_counter()
            step(i)
            seconds = time.perf_counter() - start
            first.setdefault(name, seconds)
            if i >= args.warmup:
                times[name].append(seconds)
                system[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - before)
    torch.set_num_threads(args.threads)
    base = statistics.median(times["default"])
    print(f"stage {args.stage} step at {args.size} px, width {args.width}, {args.threads} threads, median of {args.steps} "
          f"after {args.warmup} (interleaved){'; overrides: ' + ' '.join(args.base) if args.base else ''}\n")  # fmt: skip
    print("| variant | s / step | vs default | first step (s) | system CPU (s / step) |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        t = statistics.median(times[name])
        print(
            f"| {name} | {t:.3f} | {t / base:.2f} | {first[name]:.1f} | {statistics.median(system[name]):.2f} |"
        )
    _, rt = build(args.size, args.width, stage, [])
    params = [p.detach() for opt in rt.optimizers.values() for g in opt.param_groups for p in g["params"]]
    print(
        f"\nthe optimiser steps alone: Adam over the stage's {sum(p.numel() for p in params):,} parameters\n"
    )
    print("| Adam kernels | s / step |\n|---|---:|")
    for kind, t in optimiser_steps(params).items():
        print(f"| {kind} | {t:.3f} |")


if __name__ == "__main__":
    main()

"""Would batching the groups' branch copies into one call remove the small-image branching overhead?

The branched model runs every branch stage once per group (``GroupBranches``: a loop over the
groups' copies). At 64 px that costs more than the convolutions it saves (``step_time.py``:
overhead 1.27-1.35). The alternative is one call over all groups: the copies' weights stacked and
the stage mapped over them with ``torch.func.vmap``, which turns every convolution into one
grouped convolution. This script measures that idea on the paper's branch stages before anyone
builds it into the engine: the generator's low branch (ConvBlock1 + HourGlass1, the input side)
and top branch (HourGlass4 + ConvBlock2), ``--groups`` groups of ``--per-group`` images each,
forward and backward (gradients for the input and every weight), median of ``--repeat`` after
one warm-up, variants interleaved in reversed order every other round:

- ``one copy``: a single copy on the whole batch (no branches: the floor);
- ``loop``: one copy per group on its rows, as ``GroupBranches`` runs them (low-memory units);
- ``loop, unfused units``: the same with the generator's low-memory units switched off;
- ``vmap``: the stacked copies under ``torch.func.vmap(functional_call)``; the low-memory units
  run through their vmap rules (``branchadapt_cartoon.lowmem_stacked``) wherever they would
  recompute in the loop. Its gradients are checked against the loop's.

    .venv/bin/python benchmarks/branch_batching.py --sizes 64 128 --repeat 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

import branchadapt as ba
from branchadapt_cartoon.lowmem import unfused

STAGES = {"low (ConvBlock1 + HourGlass1)": ("ConvBlock1", "HourGlass1"),
          "top (HourGlass4 + ConvBlock2)": ("HourGlass4", "ConvBlock2")}  # fmt: skip


def stage_copies(size: int, width: int, names: tuple[str, ...], groups: int) -> list[nn.Module]:
    gen = ba.build_backbone("ugatit", image_size=size, width=width)
    stage = nn.Sequential(*(getattr(gen, n) for n in names))
    return [copy.deepcopy(stage) for _ in range(groups)]


def variants(copies: list[nn.Module], x: Tensor) -> dict[str, Callable[[], list[Tensor]]]:
    """Each variant runs forward + backward and returns the gradients (input first, then weights
    of the first group's copy), for the exactness check."""
    groups = len(copies)
    rows = x.shape[0] // groups
    params, buffers = stack_module_state(copies)  # type: ignore[arg-type]
    template = copy.deepcopy(copies[0]).to("meta")

    def grads(first: dict[str, Tensor]) -> list[Tensor]:
        assert x.grad is not None
        return [x.grad] + [g for g in first.values() if g is not None]

    def reset() -> None:
        x.grad = None
        for c in copies:
            c.zero_grad(set_to_none=True)
        for p in params.values():
            p.grad = None

    def one() -> list[Tensor]:
        reset()
        copies[0](x).square().mean().backward()
        return grads({n: p.grad for n, p in copies[0].named_parameters()})

    def loop() -> list[Tensor]:
        reset()
        out = torch.cat([c(part) for c, part in zip(copies, x.split(rows), strict=True)])
        out.square().mean().backward()
        return grads({n: p.grad for n, p in copies[0].named_parameters()})

    def loop_unfused() -> list[Tensor]:
        with unfused():
            return loop()

    def batched(p: dict[str, Tensor], b: dict[str, Tensor], part: Tensor) -> Tensor:
        return functional_call(template, (p, b), (part,))

    def mapped() -> list[Tensor]:
        reset()
        out = vmap(batched)(params, buffers, x.view(groups, rows, *x.shape[1:]))
        out.square().mean().backward()
        return grads({n: p.grad[0] if p.grad is not None else None for n, p in params.items()})

    return {"one copy": one, "loop": loop, "loop, unfused units": loop_unfused, "vmap": mapped}


def measure(fns: dict[str, Callable[[], list[Tensor]]], repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeat + 1):
        for name, fn in list(fns.items())[:: -1 if i % 2 else 1]:
            start = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def relative_difference(a: list[Tensor], b: list[Tensor]) -> float:
    """``|a - b| / |b|`` over all gradients as one vector (L2 norms); ~1e-6 is float32 rounding."""
    assert len(a) == len(b)
    flat_a, flat_b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument(
        "--per-group", type=int, default=2, help="images per group (translate: 1 photo + 1 cartoon)"
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, width {args.width}, {args.groups} groups x "
          f"{args.per_group} images, forward + backward, median of {args.repeat} after 1; seconds\n")  # fmt: skip
    print("| size | stage | one copy | loop | loop, unfused units | vmap | loop / one copy | vmap / loop "
          "| vmap vs loop gradients (rel. diff.) |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for size in args.sizes:
        for label, names in STAGES.items():
            copies = stage_copies(size, args.width, names, args.groups)
            channels = 3 if names[0] == "ConvBlock1" else args.width
            x = torch.randn(args.groups * args.per_group, channels, size, size, requires_grad=True)
            fns = variants(copies, x)
            diff = relative_difference(fns["vmap"](), fns["loop"]())
            t = measure(fns, args.repeat)
            print(f"| {size} | {label} | {t['one copy']:.4f} | {t['loop']:.4f} | {t['loop, unfused units']:.4f} | "
                  f"{t['vmap']:.4f} | {t['loop'] / t['one copy']:.2f} | {t['vmap'] / t['loop']:.2f} | {diff:.1e} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

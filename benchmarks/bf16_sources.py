"""Where does the generator's bf16 gradient error come from? Simulated roundings, one place at a time.

``bf16_check.py`` finds the generators' gradients 24-44 % off under bf16 autocast. This script
takes stage 1's photo-to-cartoon generator at ``--size`` px after ``--train`` fp32 steps, in fp32
with its fused low-memory units split into plain modules, and rounds one thing to bf16 at a time:

- ``autocast``: the real thing, for comparison;
- ``forward: conv/linear inputs and weights``: every convolution's and linear layer's input and
  weight rounded to bf16 before an fp32 computation (what autocast does to their operands,
  without its bf16 outputs), everywhere or only within one of the backbone's stages;
- ``backward: gradients at conv/linear inputs``: the gradient each of them sends back rounded to
  bf16 (autocast's bf16 ``grad_input``), forward pass in fp32;
- ``autocast`` within parts of the decoder only (their outputs back in fp32);
- ``backward convolutions' operands``: the forward pass in fp32, every convolution's input and
  weight gradients computed from bf16 operands (``bf16_backward.py``).

A second table times the generator's forward and backward pass (its default, fused modules) with
autocast nowhere, everywhere and in those parts of the decoder, and with bf16 backward
convolutions: what bf16 where it is safe would save.

Each row compares the generator's weight gradient for the loss ``sum(output * R)`` (R fixed
Gaussian noise) with float64's on the same weights and photo: cosine similarity and relative
error ``|g - g_64| / |g_64|``.

    .venv/bin/python benchmarks/bf16_sources.py --size 128 --train 3 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bf16_backward import patched
from optimisations import _unfuse
from step_time import build

BWD = "backward convolutions in bf16"  # the timing table's row for bf16_backward.patched()


def _bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


class _RoundGradient(torch.autograd.Function):
    """Identity forward (a copy, so in-place ops after it are allowed); gradient rounded to bf16."""

    @staticmethod
    def forward(t: Tensor) -> Tensor:
        return t.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _bf16(grad)


def _round_operands(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    module._fp32_weights = {n: p.data for n, p in module.named_parameters(recurse=False)}  # type: ignore[assignment]
    for p in module.parameters(recurse=False):
        p.data = _bf16(p.data)
    return tuple(_bf16(t) if torch.is_tensor(t) else t for t in inputs)


def _restore_weights(module: nn.Module, inputs: Any, output: Any) -> None:
    for n, p in module.named_parameters(recurse=False):
        p.data = module._fp32_weights[n]  # type: ignore[index]


def _round_input_gradients(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_RoundGradient.apply(t) if torch.is_tensor(t) and t.requires_grad else t for t in inputs)


def _autocast_within(generator: nn.Module, stages: list[str]) -> list[Any]:
    """Hooks that run each of the backbone's ``stages`` under bf16 autocast, its output back in fp32."""

    def enter(module: nn.Module, inputs: Any) -> None:
        module._autocast = torch.autocast("cpu", dtype=torch.bfloat16)  # type: ignore[assignment]
        module._autocast.__enter__()  # type: ignore[operator]

    def leave(module: nn.Module, inputs: Any, output: Any) -> Any:
        module._autocast.__exit__(None, None, None)  # type: ignore[operator]
        return output.float() if torch.is_tensor(output) else output

    hooks = []
    for stage in stages:
        m = generator.get_submodule(f"backbone.{stage}")
        hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    return hooks


def weight_gradient(
    generator: nn.Module, x: Tensor, noise: Tensor, rounding: str = "", within: str = "", autocast: bool = False,
    autocast_stages: list[str] | None = None,
) -> Tensor:  # fmt: skip
    """The generator's flattened weight gradient (float64) for ``sum(output * noise)``, with
    ``rounding`` ("forward" or "backward") applied to the convolutions and linears under ``within``,
    and the backbone's ``autocast_stages`` under bf16 autocast."""
    hooks = _autocast_within(generator, autocast_stages or [])
    for name, m in generator.named_modules():
        if not isinstance(m, nn.Conv2d | nn.Linear) or not name.startswith(within):
            continue
        if rounding == "forward":
            hooks += [m.register_forward_pre_hook(_round_operands), m.register_forward_hook(_restore_weights)]
        elif rounding == "backward":
            hooks.append(m.register_forward_pre_hook(_round_input_gradients))
    generator.zero_grad(set_to_none=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = generator(x)[0]
        (out.to(noise.dtype) * noise).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([p.grad.double().flatten() for p in generator.parameters() if p.grad is not None])


def autocast_placements(stages: list[str]) -> dict[str, list[str]]:
    """The parts of the generator put under autocast for the timing table (empty: none)."""
    decoder = [s for s in stages if s.startswith("DecodeBlock")]
    side = [*decoder, "FC", "HourGlass3", "HourGlass4", "ConvBlock2"]
    return {
        "the decoder's residual blocks": decoder,
        "+ FC, HourGlass3-4, ConvBlock2": side if decoder and set(side) <= set(stages) else [],
    }


def timings(
    generator: nn.Module, x: Tensor, placements: dict[str, list[str] | None], repeats: int
) -> dict[str, float]:
    """Median seconds of one forward and backward pass per placement (None: autocast everywhere;
    the row named ``BWD``: fp32 with bf16 backward convolutions), interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in placements}

    def once(stages: list[str] | None) -> None:
        hooks = _autocast_within(generator, stages or [])
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=stages is None):
                out = generator(x)[0]
            out.float().sum().backward()
        finally:
            for h in hooks:
                h.remove()

    for i in range(repeats + 1):
        for name, stages in placements.items():
            start = time.perf_counter()
            if name == BWD:
                with patched():
                    once(stages)
            else:
                once(stages)
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--train", type=int, default=3, help="fp32 steps before the comparison")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5, help="timed forward and backward passes per placement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    trainer, rt = build(args.size, args.width, 0, ["model.bf16_decoder=false"])  # fp32, hooks add bf16
    for i in range(args.train):
        trainer.train_step(rt, rt.data[i])
    generator = rt.modules["gen_a2b"]
    timed = copy.deepcopy(generator)  # the default (fused) modules, for the timing table
    _unfuse(generator)  # plain modules, so that hooks see every convolution
    x = rt.data[args.train]["photo"]["image"].float()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = weight_gradient(copy.deepcopy(generator).double(), x.double(), noise)
    backbone = generator.get_submodule("backbone")
    stages = backbone.stage_names() if hasattr(backbone, "stage_names") else []
    rows: list[tuple[str, str, Callable[[], Tensor]]] = [
        ("none (fp32)", "-", lambda: weight_gradient(generator, x, noise)),
        ("autocast", "everywhere", lambda: weight_gradient(generator, x, noise, autocast=True)),
        ("backward: gradients at conv/linear inputs", "everywhere",
         lambda: weight_gradient(generator, x, noise, "backward")),
        ("forward: conv/linear inputs and weights", "everywhere",
         lambda: weight_gradient(generator, x, noise, "forward")),
    ]  # fmt: skip

    def bwd_gradient() -> Tensor:
        with patched():
            return weight_gradient(generator, x, noise)

    rows.append(("backward convolutions' operands", "everywhere, fp32 forward", bwd_gradient))
    placements = autocast_placements(stages)
    for name, group in placements.items():
        if group:
            rows.append(
                ("autocast", name, lambda g=group: weight_gradient(generator, x, noise, autocast_stages=g))
            )
    for stage in stages:
        rows.append(
            ("forward: conv/linear inputs and weights", stage,
             lambda s=stage: weight_gradient(generator, x, noise, "forward", f"backbone.{s}.")),
        )  # fmt: skip
    print(f"gen_a2b at {args.size} px, width {args.width}, after {args.train} fp32 steps: weight gradient of "
          "sum(output * noise) against float64\n")  # fmt: skip
    print("| rounded to bf16 | where | cosine | rel. error |")
    print("|---|---|---:|---:|")
    for what, where, run in rows:
        g = run()
        cosine = float(torch.nn.functional.cosine_similarity(g, reference, dim=0))
        print(f"| {what} | {where} | {cosine:.4f} | {float((g - reference).norm() / reference.norm()):.2e} |")
    timed_placements: dict[str, list[str] | None] = {"none (fp32)": [], "everywhere": None}
    timed_placements.update({name: group for name, group in placements.items() if group})
    timed_placements[BWD] = []
    seconds = timings(timed, x, timed_placements, args.repeats)
    print(f"\nthe same generator's forward and backward pass (default modules, {x.shape[0]} image), "
          f"median of {args.repeats} after 1, {args.threads} threads\n")  # fmt: skip
    print("| autocast | s | vs fp32 |")
    print("|---|---:|---:|")
    for name, t in seconds.items():
        print(f"| {name} | {t:.3f} | {t / seconds['none (fp32)']:.2f} |")


if __name__ == "__main__":
    main()

"""Is bf16 autocast numerically safe for the paper's step? Gradients of fp32 and bf16 compared.

Stage 1 of the recipe at ``--size`` px: after ``--train`` ordinary fp32 steps (so that the check
is not only made at initialisation), the same weights and batch are run in float64 (the
reference), in fp32 and under ``precision = "bf16"``, with the optimiser steps disabled so that
every run sees identical weights in both phases. Per phase and module the table prints, for fp32
and for bf16, the cosine similarity of the gradient with the float64 one and its relative error
(``|g - g_64| / |g_64|``, worst over ``--batches`` batches); per loss term the relative
difference of the values. fp32's column is the yardstick of what the step's conditioning allows.

``--decoder-only`` checks ``model.bf16_decoder`` instead: fp32 with the generators' decoder
residual blocks under autocast.

    .venv/bin/python benchmarks/bf16_check.py --size 128 --train 5 --batches 3 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import build

from branchadapt.trainer import StageRuntime, Trainer


def gradients(
    trainer: Trainer, rt: StageRuntime, batch: object
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Each phase's gradient per module (flattened) and the loss values, without updating weights."""
    grads: dict[str, Tensor] = {}
    for phase, optimizer in rt.optimizers.items():
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}

        def capture(*_: object, phase: str = phase, owned: set[int] = owned, **__: object) -> None:
            for name, module in rt.modules.items():
                g = [p.grad.flatten() for p in module.parameters() if id(p) in owned and p.grad is not None]
                if g:
                    grads[f"{phase}: {name}"] = torch.cat(g).double()

        optimizer.step = capture  # type: ignore[method-assign]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        logged = trainer.train_step(rt, batch)
    losses = {k.removeprefix("loss/"): float(v) for k, v in logged.items() if k.startswith("loss/")}
    return grads, losses


def as_double(rt: StageRuntime, batch: Any) -> tuple[StageRuntime, Any]:
    """A float64 copy of the runtime (modules and loss terms) and of the batch: the reference."""
    rt = copy.deepcopy(rt)
    for module in rt.modules.values():
        module.double()
    for terms in rt.losses.values():
        for term in terms:
            term.double()
    convert = lambda v: v.double() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    return rt, {stream: {k: convert(v) for k, v in fields.items()} for stream, fields in batch.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--train", type=int, default=5, help="fp32 steps before the comparison")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--decoder-only",
        action="store_true",
        help="the bf16 columns with model.bf16_decoder = true (the generators' decoder residual blocks "
        'under autocast) instead of precision = "bf16"; the fp32 columns have it off',
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    trainer, rt = build(args.size, args.width, 0, ["model.bf16_decoder=false"])  # fp32 throughout
    for i in range(args.train):
        trainer.train_step(rt, rt.data[i])
    candidate = None
    if args.decoder_only:  # the same weights in generators built with the option
        _, candidate = build(args.size, args.width, 0, ["model.bf16_decoder=true"])
        for name, module in candidate.modules.items():
            module.load_state_dict(rt.modules[name].state_dict())
    cosines: dict[tuple[str, str], list[float]] = defaultdict(list)
    errors: dict[tuple[str, str], list[float]] = defaultdict(list)
    loss_diff: dict[tuple[str, str], list[float]] = defaultdict(list)
    for b in range(args.batches):
        batch = rt.data[args.train + b]
        runs = {}
        runs["fp32"] = gradients(trainer, copy.deepcopy(rt), batch)
        if candidate is not None:
            runs["bf16"] = gradients(trainer, copy.deepcopy(candidate), batch)
        else:
            trainer.spec = trainer.spec.model_copy(update={"precision": "bf16"})
            runs["bf16"] = gradients(trainer, copy.deepcopy(rt), batch)
            trainer.spec = trainer.spec.model_copy(update={"precision": "fp32"})
        runs["fp64"] = gradients(trainer, *as_double(rt, batch))
        g64, l64 = runs["fp64"]
        for precision in ("fp32", "bf16"):
            grads, losses = runs[precision]
            for key, ref in g64.items():
                cosines[precision, key].append(
                    float(torch.nn.functional.cosine_similarity(grads[key], ref, dim=0))
                )
                errors[precision, key].append(float((grads[key] - ref).norm() / ref.norm()))
            for key, ref in l64.items():
                loss_diff[precision, key].append(abs(losses[key] - ref) / max(abs(ref), 1e-12))
    print(f"stage 1 at {args.size} px, width {args.width}, after {args.train} fp32 steps, "
          f"{args.batches} batches (min cosine / max relative error over batches)\n")  # fmt: skip
    bf16 = "bf16 decoder" if candidate is not None else "bf16"
    print(f"| phase: module | fp32 cosine | fp32 rel. error | {bf16} cosine | {bf16} rel. error |")
    print("|---|---:|---:|---:|---:|")
    for key in sorted({k for _, k in cosines}, key=list(g64).index):
        row = [f"{min(cosines[p, key]):.4f} | {max(errors[p, key]):.2e}" for p in ("fp32", "bf16")]
        print(f"| {key} | {' | '.join(row)} |")
    print(f"\n| loss term | fp32 rel. difference | {bf16} rel. difference |")
    print("|---|---:|---:|")
    for key in l64:
        print(f"| {key} | {max(loss_diff['fp32', key]):.2e} | {max(loss_diff['bf16', key]):.2e} |")


if __name__ == "__main__":
    main()

"""Optimisers and learning-rate schedules from an experiment's ``optim`` tables."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .config import OptimSpec

FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused Adam/AdamW kernels exist for every float dtype


def build_optimizer(
    spec: OptimSpec, params: Iterable[nn.Parameter], fused: bool = True
) -> torch.optim.Optimizer:
    """Adam or AdamW from an :class:`OptimSpec`.

    ``fused`` takes torch's fused kernels (one pass over each parameter and its state) when every
    parameter is a floating-point tensor on a device that has them, otherwise torch's default
    kernels (a per-parameter loop on CPU, foreach on CUDA); the maths is the same up to rounding."""
    params = list(params)
    cls = torch.optim.AdamW if spec.type == "adamw" else torch.optim.Adam
    fused = fused and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return cls(
        params,
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.eps,
        weight_decay=spec.weight_decay,
        **({"fused": True} if fused else {}),
    )


def build_scheduler(
    spec: OptimSpec, optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up, then constant, linear decay to 0 or cosine decay starting at ``start`` of the stage."""
    sched = spec.schedule
    begin = int(sched.start * steps)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / sched.warmup) if sched.warmup else 1.0
        if sched.type == "constant" or step < begin:
            return warm
        frac = (step - begin) / max(1, steps - begin)
        decay = 1.0 - frac if sched.type == "linear_decay" else 0.5 * (1 + math.cos(math.pi * frac))
        return warm * max(0.0, decay)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def unique_params(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """``params`` without repeats (a module shared by two phases' modules), in order."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out

"""Catching a step whose loss or gradients are not finite, before it reaches the weights.

A non-finite gradient applied by the optimiser turns every weight it touches into NaN, and the
checkpoint after it holds them: the run could not be resumed from there. So the trainer checks each
phase's gradients before its optimiser step (one fused pass over them) and stops with a message
naming the phase, the parameters and the step's data items; the weights and the latest checkpoint
stay as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import TrainingDiverged


def finite_gradients(params: Iterable[nn.Parameter]) -> bool:
    """Whether every gradient among ``params`` is finite (parameters without one are skipped).

    One fused pass per device and dtype with the kernel ``torch.amp.GradScaler`` uses to find
    infs (unscaling by 1, which leaves the gradients as they are), many times faster on a CPU than
    a max-abs ``torch._foreach_norm`` (``benchmarks/grad_check.py``)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for (device, _), grads in groups.items():
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=device))
        if float(found) != 0.0:
            return False
    return True


def nonfinite_names(modules: Mapping[str, nn.Module]) -> list[str]:
    """``module.parameter`` names of the gradients that are not finite (the slow path, on failure)."""
    return [
        f"{name}.{pname}"
        for name, module in modules.items()
        for pname, p in module.named_parameters()
        if p.grad is not None and not bool(torch.isfinite(p.grad).all())
    ]


def diverged(
    stage: str, step: int, what: str, items: Sequence[str], names: Sequence[str] = ()
) -> TrainingDiverged:
    """The error for step ``step`` (1-based; -1: not known) whose ``what`` is not finite."""
    shown = ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
    params = f" ({len(names)} parameter{'s' if len(names) > 1 else ''}, first {names[0]})" if names else ""
    return TrainingDiverged(
        f"stage {stage}{f', step {step}' if step > 0 else ''}: {what} not finite{params}; that update "
        "was not applied, the run stops, and its latest checkpoint is intact (a re-run resumes there). "
        f"The step's data: {shown or '(none)'}. A learning rate too high, or an item without any "
        "variation (normalisation layers then amplify its gradients without bound), can cause this."
    )

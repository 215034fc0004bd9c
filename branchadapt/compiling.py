"""Regional compilation: ``torch.compile`` on a backbone's repeated units, not on whole models.

Compiling a whole translator or classifier for training can take longer than the run it would
speed up (tens of minutes on a small CPU); compiling its repeated blocks compiles one small graph
per block type and feature-map shape, shared by every instance, including the per-group branch
copies. A backbone opts in by listing its block classes in ``Backbone.compile_unit_types``; the
trainer compiles them when ``train.compile = "units"`` (or ``"auto"`` on a CUDA device: there
inductor fuses the memory-bound work around the convolutions into GPU kernels, while on a CPU the
gain measured in docs/performance.md ranged from 20 % faster to 15 % slower across machines).

Units are compiled in place with ``nn.Module.compile``, so parameter names, state dicts and
checkpoints are unchanged, and selective back-propagation still works: the parameters (or the
detached views a few-shot group runs with) are inputs of the compiled graphs, not constants.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .interfaces import Backbone

#: one graph per (unit type, feature-map size, batch size): a U-Net-like backbone has many
RECOMPILE_LIMIT = 64
ACCUMULATED_RECOMPILE_LIMIT = 1024


def compiles_units(mode: str, device: torch.device) -> bool:
    """Whether ``train.compile = mode`` compiles the units on ``device`` ("auto": on CUDA only)."""
    return mode == "units" or (mode == "auto" and device.type == "cuda")


def unit_types(modules: Iterable[nn.Module]) -> tuple[type[nn.Module], ...]:
    """The unit classes declared by every backbone found inside ``modules``."""
    found: list[type[nn.Module]] = []
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, Backbone):
                found += [t for t in sub.compile_unit_types if t not in found]
    return tuple(found)


def compile_units(modules: Iterable[nn.Module], **compile_kwargs: object) -> int:
    """Compile in place every instance of a declared unit class; returns how many were compiled.

    Nested units are compiled at the outermost level only. ``compile_kwargs`` go to
    ``torch.compile`` (e.g. ``mode="max-autotune"``).
    """
    modules = list(modules)
    types = unit_types(modules)
    if not types:
        return 0
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, ACCUMULATED_RECOMPILE_LIMIT
    )
    count = 0
    seen: set[int] = set()
    for module in modules:
        count += _compile_outermost(module, types, seen, compile_kwargs)
    return count


def _compile_outermost(
    module: nn.Module, types: tuple[type[nn.Module], ...], seen: set[int], kwargs: dict[str, object]
) -> int:
    if id(module) in seen:
        return 0
    seen.add(id(module))
    if isinstance(module, types):
        module.compile(**kwargs)
        return 1
    return sum(_compile_outermost(child, types, seen, kwargs) for child in module.children())


def has_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules was compiled in place (``nn.Module.compile``)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


__all__ = ["compile_units", "compiles_units", "has_compiled", "unit_types"]

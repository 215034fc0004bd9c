"""Calling this plugin's autograd functions without torch's per-call signature binding.

The plugin's autograd functions are written in the ``setup_context`` style, which ``torch.func``
needs (their ``vmap`` rules serve stacked branch copies). For that style ``Function.apply`` binds
the arguments to ``forward``'s signature with ``inspect.signature`` on every call, to fill in
defaults: tens of microseconds of Python per call, with the GIL held. At about 2,000 such calls a
training step that was a tenth of a second of a 128 px step here, serialised between the two
directions that run at once (a GIL profile, docs/performance.md). :func:`fast_apply` returns an
``apply`` that runs a classic-style twin of the function (``forward(ctx, ...)``, which torch does
not bind) unless a ``torch.func`` transform is active, where the original runs. Callers pass
every argument positionally; the values and gradients are the original's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

enabled = True  # False: every call through the original's apply (A/B runs)


def classic_twin(fn: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """``fn`` (forward without ``ctx``, plus ``setup_context``) as a classic-style function."""
    forward, setup, backward = fn.forward, fn.setup_context, fn.backward

    def classic_forward(ctx: Any, *args: Any) -> Any:
        out = forward(*args)
        setup(ctx, args, out)
        return out

    attrs = {"forward": staticmethod(classic_forward), "backward": staticmethod(backward)}
    return type(fn.__name__, (torch.autograd.Function,), attrs)  # same name: same grad_fn names


def fast_apply(fn: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``fn.apply`` for positional arguments, skipping the signature binding (module docstring)."""
    if fn.setup_context is torch.autograd.Function.setup_context:
        raise TypeError(f"{fn.__name__} has no setup_context: its apply binds nothing")
    twin = classic_twin(fn)
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args: Any) -> Any:
        return twin.apply(*args) if enabled and not transforms_active() else fn.apply(*args)

    return apply


__all__ = ["classic_twin", "fast_apply"]

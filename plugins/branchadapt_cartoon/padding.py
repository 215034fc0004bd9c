"""Reflection padding with a faster gradient on the CPU: same values, same gradients.

The gradient of a reflection pad adds each border pixel of the padded map's gradient onto the
pixel it mirrors. torch's CPU kernel (``reflection_pad2d_backward``) zero-fills the result and
then visits every element with index arithmetic; on the photo2cartoon maps of 0.5-16 MiB that
took 1.6-2.5x as long as copying the gradient's interior once and adding the ``pad`` mirrored
rows, columns and corners as strided slices (:func:`reflect_pad_backward`; ``benchmarks/kernels.py``).
On small maps a handful of slice operations cost more than torch's one call, so maps under
:data:`FOLD_MIN_NUMEL` elements, every device other than the CPU, and maps under ``vmap`` (stacked
branch copies, where a Python autograd function costs more than the fold saves) keep torch's kernel.
A channels_last gradient (``model.channels_last``) is folded in that layout.

:func:`reflect_pad` is ``F.pad(x, (pad,) * 4, mode="reflect")`` whose backward is that fold;
:class:`ReflectionPad2d` is ``nn.ReflectionPad2d`` with the same behaviour (no parameters, so
state dicts are unchanged). Sums are taken in a different order than torch's kernel, so the
gradients agree to rounding (tested against it in ``tests/cartoon/test_padding.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchadapt.batching import is_vmapped

from .fastapply import fast_apply
from .layout import is_channels_last

FOLD_MIN_NUMEL = 1 << 16  # smaller padded gradients go through torch's kernel (module docstring)

fold_enabled = True  # False: torch's kernel everywhere (A/B runs in benchmarks/optimisations.py)
vmap_kernels = True  # False: under vmap too, the folded gradient where its size calls for it (A/B runs)


def _foldable(padded: tuple[int, ...], device: torch.device, pad: int) -> bool:
    """Whether the gradient of a map padded to shape ``padded`` on ``device`` is folded here."""
    if not fold_enabled or device.type != "cpu" or len(padded) != 4:
        return False
    b, c, h, w = padded
    # the corner slices below need two distinct mirrored rows and columns per pad step
    return b * c * h * w >= FOLD_MIN_NUMEL and min(h, w) - 2 * pad >= 2 * pad + 2


def reflect_pad_backward(grad: Tensor, pad: int) -> Tensor:
    """The gradient at ``x`` from ``grad``, the gradient at ``F.pad(x, (pad,) * 4, mode="reflect")``."""
    if not pad:
        return grad
    h, w = grad.shape[-2] - 2 * pad, grad.shape[-1] - 2 * pad
    if not _foldable(tuple(grad.shape), grad.device, pad):
        like = grad.new_empty((*grad.shape[:-2], h, w))  # torch's kernel reads only the shape
        return torch.ops.aten.reflection_pad2d_backward(grad, like, [pad] * 4)
    rows, cols = slice(pad, pad + h), slice(pad, pad + w)
    layout = torch.channels_last if is_channels_last(grad) else torch.contiguous_format
    out = grad[..., rows, cols].clone(memory_format=layout)
    for k in range(1, pad + 1):
        # padded row pad - k mirrors row k, padded row pad + h - 1 + k mirrors row h - 1 - k: both
        # pairs as one strided slice each (few Python-level operations: each holds the GIL)
        out[..., k : h - k : h - 1 - 2 * k, :] += grad[..., pad - k : pad + h + k : h - 1 + 2 * k, cols]
        out[..., :, k : w - k : w - 1 - 2 * k] += grad[..., rows, pad - k : pad + w + k : w - 1 + 2 * k]
    for i in range(1, pad + 1):  # corners: mirrored in both directions, four at a time
        for j in range(1, pad + 1):
            out[..., i : h - i : h - 1 - 2 * i, j : w - j : w - 1 - 2 * j] += grad[
                ..., pad - i : pad + h + i : h - 1 + 2 * i, pad - j : pad + w + j : w - 1 + 2 * j
            ]
    return out


class _ReflectPad(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, pad: int) -> Tensor:
        return F.pad(x, (pad,) * 4, mode="reflect")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.pad = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return reflect_pad_backward(grad, ctx.pad), None


_reflect_pad_apply = fast_apply(_ReflectPad)


def reflect_pad(x: Tensor, pad: int) -> Tensor:
    """``F.pad(x, (pad,) * 4, mode="reflect")``, differentiated by :func:`reflect_pad_backward`."""
    if not pad:
        return x
    # under vmap (stacked branch copies) a Python autograd function costs more than its fold saves
    if x.dim() != 4 or not torch.is_grad_enabled() or (vmap_kernels and is_vmapped(x)):
        return F.pad(x, (pad,) * 4, mode="reflect")
    b, c, h, w = x.shape
    # where backward would take torch's kernel anyway, torch's pad: no Python function to pay
    if not _foldable((b, c, h + 2 * pad, w + 2 * pad), x.device, pad):
        return F.pad(x, (pad,) * 4, mode="reflect")
    return _reflect_pad_apply(x, pad)


class ReflectionPad2d(nn.ReflectionPad2d):
    """``nn.ReflectionPad2d`` with equal padding on every side, differentiated by :func:`reflect_pad`."""

    def __init__(self, pad: int) -> None:
        super().__init__(pad)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return reflect_pad(x, self.pad)


__all__ = ["FOLD_MIN_NUMEL", "ReflectionPad2d", "reflect_pad", "reflect_pad_backward"]

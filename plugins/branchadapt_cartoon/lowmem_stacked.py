"""The low-memory units under ``vmap``: several groups' branch copies at once, still keeping only the input.

With ``train.stack_branches`` the engine runs the groups' copies of a branch stage as one
``torch.func.vmap`` call over their stacked weights (:mod:`branchadapt.batching`). Left to vmap, a
unit of :mod:`.lowmem` would take its plain path there (vmap's tensors do not report
``requires_grad``), so autograd would keep every rectified and padded map again, and each
convolution would become one grouped convolution. The units' ``vmap`` rules come here instead and
run, on the stacked tensors (copies first: ``(copies, rows, C, H, W)``):

- the instance norm, ReLU and reflection padding once over every copy's rows (they act per row and
  channel, so the copies are simply more rows), keeping only the norm's input and its statistics,
  as a single copy does;
- the convolutions either as one grouped convolution or as one dense convolution per copy, whichever
  is faster: oneDNN's grouped kernels lose to dense ones on this kind of CPU once a copy's
  convolution is large (``GROUPED_MAX_MACS``; measured in docs/performance.md), while on CUDA one
  launch for every copy is the point of stacking.

The values and gradients are those of the loop over the copies up to floating-point rounding (the
convolutions run as the same kernels, the norms on more rows at once).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .lowmem import (
    _cast,
    _norm_relu,
    _norm_relu_backward,
    _NormReluPadConv,
    _pad,
    _ReflectPadConv,
    aten,
)
from .padding import reflect_pad_backward

#: on CPU, a copy's convolution with at least this many multiply-adds runs dense, one per copy
GROUPED_MAX_MACS = 20_000_000


def _front(t: Tensor | None, dim: int | None, copies: int) -> Tensor | None:
    """``t`` with its vmapped dimension first (expanded along a new one if it has none)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(copies, *t.shape)


def _grouped(x: Tensor, weight: Tensor, stride: int) -> bool:
    """One grouped convolution for every copy (True) or a dense one per copy."""
    if x.device.type != "cpu":
        return True
    rows, channels, height, width = x.shape[1:]
    out_channels, _, kh, kw = weight.shape[1:]
    macs = rows * out_channels * channels * kh * kw * (height // stride) * (width // stride)
    return macs < GROUPED_MAX_MACS


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, grouped: bool) -> Tensor:
    """Copy ``i``'s ``conv2d(x[i], weight[i], bias[i])`` for every copy: ``(copies, rows, O, H', W')``."""
    copies = x.shape[0]
    if not grouped:
        return torch.stack(
            [F.conv2d(x[i], weight[i], None if bias is None else bias[i], stride) for i in range(copies)]
        )
    out = F.conv2d(
        x.transpose(0, 1).flatten(1, 2),
        weight.flatten(0, 1),
        None if bias is None else bias.flatten(),
        stride,
        groups=copies,
    )
    return out.unflatten(1, (copies, -1)).transpose(0, 1)


def _conv_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    has_bias: bool,
    stride: int,
    needs: tuple[bool, ...],
    grouped: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`_conv` (``x`` already padded) for the inputs flagged in ``needs``."""
    copies, out_channels = weight.shape[:2]
    mask = [needs[0], needs[1], needs[2] and has_bias]
    grad = grad.to(x.dtype)

    def run(g: Tensor, inp: Tensor, w: Tensor, groups: int) -> tuple[Tensor | None, ...]:
        bias_sizes = [w.shape[0]] if has_bias else None
        geometry = ([stride] * 2, [0, 0], [1, 1], False, [0, 0], groups)
        return tuple(aten.convolution_backward(g, inp, w, bias_sizes, *geometry, mask))

    if grouped:
        g_x, g_w, g_b = run(
            grad.transpose(0, 1).flatten(1, 2), x.transpose(0, 1).flatten(1, 2), weight.flatten(0, 1), copies
        )
        return (
            None if g_x is None else g_x.unflatten(1, (copies, -1)).transpose(0, 1),
            None if g_w is None else g_w.unflatten(0, (copies, out_channels)),
            None if g_b is None else g_b.unflatten(0, (copies, out_channels)),
        )
    parts = [run(grad[i], x[i], weight[i], 1) for i in range(copies)]
    g_x, g_w, g_b = (torch.stack([p[j] for p in parts]) if mask[j] else None for j in range(3))  # type: ignore[misc]
    return g_x, g_w, g_b


class _StackedReflectPadConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, pad: int, stride: int, dtype: Any
    ) -> Tensor:
        copies, rows = x.shape[:2]
        xc = _cast(dtype, x)
        padded = _pad(xc.flatten(0, 1), pad).unflatten(0, (copies, rows))
        ctx.grouped = _grouped(padded, weight, stride)
        ctx.pad, ctx.stride, ctx.dtype, ctx.has_bias = pad, stride, dtype, bias is not None
        ctx.save_for_backward(x, weight)
        return _conv(padded, _cast(dtype, weight), _cast(dtype, bias), stride, ctx.grouped)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        copies, rows = x.shape[:2]
        flat = _cast(ctx.dtype, x).flatten(0, 1)
        padded = _pad(flat, ctx.pad).unflatten(0, (copies, rows))
        g_pad, g_w, g_b = _conv_backward(
            grad,
            padded,
            _cast(ctx.dtype, weight),
            ctx.has_bias,
            ctx.stride,
            ctx.needs_input_grad[:3],
            ctx.grouped,
        )
        g_x = None
        if g_pad is not None:
            g_flat = g_pad.flatten(0, 1)
            g_x = reflect_pad_backward(g_flat, ctx.pad).to(x.dtype).unflatten(0, (copies, rows))
        return g_x, _cast(weight.dtype, g_w), _cast(weight.dtype, g_b), None, None, None


class _StackedNormReluPadConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        eps: float,
        pad: int,
        stride: int,
        dtype: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        copies, rows = x.shape[:2]
        y, mean, invstd = _norm_relu(x.flatten(0, 1), eps)
        padded = _pad(_cast(dtype, y), pad).unflatten(0, (copies, rows))
        ctx.grouped = _grouped(padded, weight, stride)
        ctx.eps, ctx.pad, ctx.stride, ctx.dtype, ctx.has_bias = eps, pad, stride, dtype, bias is not None
        ctx.save_for_backward(x, weight, mean, invstd)
        out = _conv(padded, _cast(dtype, weight), _cast(dtype, bias), stride, ctx.grouped)
        mean, invstd = mean.unflatten(0, (copies, -1)), invstd.unflatten(0, (copies, -1))
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_statistics: Any) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        copies, rows = x.shape[:2]
        flat = x.flatten(0, 1)
        y, _, _ = _norm_relu(flat, ctx.eps)  # the forward's kernels on the forward's rows: bit for bit
        yc = _cast(ctx.dtype, y)
        padded = _pad(yc, ctx.pad).unflatten(0, (copies, rows))
        g_pad, g_w, g_b = _conv_backward(
            grad,
            padded,
            _cast(ctx.dtype, weight),
            ctx.has_bias,
            ctx.stride,
            ctx.needs_input_grad[:3],
            ctx.grouped,
        )
        g_x = None
        if g_pad is not None:
            g_x = _norm_relu_backward(g_pad.flatten(0, 1), flat, y, yc, mean, invstd, ctx.eps, ctx.pad)
            g_x = g_x.unflatten(0, (copies, rows))
        return g_x, _cast(weight.dtype, g_w), _cast(weight.dtype, g_b), None, None, None, None


def reflect_conv_rule(
    copies: int, in_dims: tuple[int | None, ...], x: Tensor, weight: Tensor, bias: Tensor | None, *rest: Any
) -> tuple[Tensor, int]:
    """vmap rule of the padded convolution unit: ``(output, its vmapped dimension)``."""
    xd, wd, bd = in_dims[:3]
    xs = _front(x, xd, copies)
    assert xs is not None
    if wd is None and bd is None:  # one weight for every copy: the copies are more rows
        out = _ReflectPadConv.apply(xs.flatten(0, 1), weight, bias, *rest)
        return out.unflatten(0, (copies, -1)), 0
    ws = _front(weight, wd, copies)
    return _StackedReflectPadConv.apply(xs, ws, _front(bias, bd, copies), *rest), 0


def norm_relu_conv_rule(
    copies: int, in_dims: tuple[int | None, ...], x: Tensor, weight: Tensor, bias: Tensor | None, *rest: Any
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int, int]]:
    """vmap rule of the norm-ReLU-pad-convolution unit: ``(outputs, their vmapped dimensions)``."""
    xd, wd, bd = in_dims[:3]
    xs = _front(x, xd, copies)
    assert xs is not None
    if wd is None and bd is None:
        out, mean, invstd = _NormReluPadConv.apply(xs.flatten(0, 1), weight, bias, *rest)
        per_copy = (
            out.unflatten(0, (copies, -1)),
            mean.unflatten(0, (copies, -1)),
            invstd.unflatten(0, (copies, -1)),
        )
        return per_copy, (0, 0, 0)
    ws = _front(weight, wd, copies)
    return _StackedNormReluPadConv.apply(xs, ws, _front(bias, bd, copies), *rest), (0, 0, 0)


__all__ = ["GROUPED_MAX_MACS", "norm_relu_conv_rule", "reflect_conv_rule"]

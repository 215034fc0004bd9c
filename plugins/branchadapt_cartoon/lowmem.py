"""Convolution units that keep less for backward: same values and gradients, a fraction of the memory.

Autograd keeps every intermediate an operation needs for its gradient. For the photo2cartoon
generator's ``InstanceNorm -> ReLU -> ReflectionPad2d -> Conv2d`` units that is three full maps per
unit: the norm's input, the ReLU's output and the padded map (the convolution's input); the
generator's activations are most of a training step's memory (4 groups at 256 px do not fit 24 GiB).

- :class:`ReflectConv2d` (a reflection pad followed by a convolution) keeps the *unpadded* input and
  pads it again in backward: one copy of a map, cheap next to the convolution.
- :class:`NormReluConv` (the hourglass unit) keeps only the norm's input and its statistics, and
  recomputes the normalised, rectified, padded map in backward with the same kernels as the
  forward pass, so the recomputed map, and therefore every gradient, is bit-identical to
  autograd's through the unfused modules.

Both fall back to the plain modules when no gradient is recorded (inference, export, sampling), so
they cost nothing there. Under ``vmap`` (stacked branch copies, ``train.stack_branches``) their
``vmap`` rules in :mod:`.lowmem_stacked` run every copy at once and still keep only the input.

Recomputing costs time (an extra norm and padding pass in backward, and a Python autograd function
per unit), and on small maps the memory it saves is small too: a unit takes its low-memory path
only when its input is at least ``min_bytes`` (8 MiB by default; the generator's option
``low_memory_min_mb``). Measured on the CPU of docs/performance.md, the plain path made the whole
step 18 % faster at 64 px and about 10 % at 128 px, and the same at 256 px, where the units are
what lets the transfer stage fit in memory. Under autocast the convolution runs in the autocast dtype, as it would
unfused. The class attribute ``fused = False`` on either class restores the plain path (A/B runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchadapt import rowgrad
from branchadapt.batching import is_vmapped
from branchadapt.device import autocast_dtype

from .fastapply import fast_apply
from .instnorm import norm_backward, norm_stats
from .padding import reflect_pad, reflect_pad_backward

aten = torch.ops.aten


MIN_BYTES = 8 << 20  # default smallest input the units recompute rather than keep (module docstring)


def _small(x: Tensor, min_bytes: int) -> bool:
    return x.numel() * x.element_size() < min_bytes


def _records_grad(*tensors: Tensor | None) -> bool:
    """Whether the low-memory function should run: gradients are being recorded, or the call is
    inside ``vmap`` (stacked branch copies), whose wrapped tensors report ``requires_grad=False``."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and (t.requires_grad or is_vmapped(t)) for t in tensors)


def _live_rows(*params: Tensor | None) -> int | None:
    """Rows whose gradients reach ``params`` (:func:`branchadapt.rowgrad.cooperating`)."""
    with rowgrad.cooperating(*params) as live:
        return live


def _cast(dtype: torch.dtype | None, t: Tensor | None) -> Any:
    return t if dtype is None or t is None else t.to(dtype)


def _groups(x: Tensor, weight: Tensor) -> int:
    """The convolution's group count, from its input's and weight's channels (a generator stage
    folded per copy runs its convolutions grouped, :mod:`.folding`)."""
    return x.shape[1] // weight.shape[1]


def _pad(x: Tensor, pad: int) -> Tensor:
    """Torch's reflection pad: inside the units' autograd functions nothing records its gradient
    (which those functions fold themselves), so no second autograd function is nested there."""
    return F.pad(x, (pad,) * 4, mode="reflect") if pad else x


def _conv_backward(
    grad: Tensor,
    padded: Tensor,
    weight: Tensor,
    has_bias: bool,
    stride: int,
    needs: tuple[bool, ...],
    live: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``conv2d(padded, weight, bias, stride)`` for the inputs flagged in ``needs``;
    the weight and bias gradients from the first ``live`` rows only when ``live`` is given
    (:func:`branchadapt.rowgrad.cooperating`)."""
    bias_sizes = [weight.shape[0]] if has_bias else None
    mask = [needs[0], needs[1], needs[2] and has_bias]
    grad = grad.to(padded.dtype)
    groups = _groups(padded, weight)

    def run(g: Tensor, x: Tensor, which: list[bool]) -> tuple[Tensor | None, ...]:
        return tuple(
            aten.convolution_backward(
                g, x, weight, bias_sizes, [stride] * 2, [0, 0], [1, 1], False, [0, 0], groups, which
            )
        )

    if live is None or live >= grad.shape[0]:
        g_in, g_w, g_b = run(grad, padded, mask)
        return g_in, g_w, g_b
    g_in = run(grad, padded, [mask[0], False, False])[0] if mask[0] else None
    g_w = g_b = None
    if mask[1] or mask[2]:
        _, g_w, g_b = run(grad[:live], padded[:live], [False, mask[1], mask[2]])
    return g_in, g_w, g_b


class _ReflectPadConv(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, pad: int, stride: int, dtype: Any) -> Tensor:
        with rowgrad.cooperating(weight, bias):
            padded = _pad(_cast(dtype, x), pad)
            return F.conv2d(
                padded, _cast(dtype, weight), _cast(dtype, bias), stride, groups=_groups(x, weight)
            )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, bias, pad, stride, dtype = inputs
        ctx.pad, ctx.stride, ctx.dtype, ctx.has_bias = pad, stride, dtype, bias is not None
        ctx.save_for_backward(x, weight)
        ctx.live = _live_rows(weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        xc, wc = _cast(ctx.dtype, x), _cast(ctx.dtype, weight)
        g_pad, g_w, g_b = _conv_backward(
            grad, _pad(xc, ctx.pad), wc, ctx.has_bias, ctx.stride, ctx.needs_input_grad[:3], ctx.live
        )
        g_x = None
        if g_pad is not None:
            g_x = reflect_pad_backward(g_pad, ctx.pad).to(x.dtype)
        return g_x, _cast(weight.dtype, g_w), _cast(weight.dtype, g_b), None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Tensor, int]:
        from .lowmem_stacked import reflect_conv_rule

        return reflect_conv_rule(info.batch_size, in_dims, *args)


_reflect_pad_conv_apply = fast_apply(_ReflectPadConv)


def reflect_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, pad: int, stride: int = 1) -> Tensor:
    """``conv2d(reflection_pad(x, pad), weight, bias, stride)``, saving ``x`` rather than the padded map."""
    if not _records_grad(x, weight, bias):
        return F.conv2d(_pad(x, pad), weight, bias, stride, groups=_groups(x, weight))
    dtype = autocast_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _reflect_pad_conv_apply(x, weight, bias, pad, stride, dtype)


class ReflectConv2d(nn.Conv2d):
    """``nn.Conv2d`` on a reflection-padded input (``reflect`` pixels per side); same parameters and
    state-dict keys as the plain convolution, so it replaces a ``ReflectionPad2d`` + ``Conv2d`` pair."""

    fused = True
    min_bytes = MIN_BYTES  # inputs smaller than this take the plain path (module docstring)

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, *, reflect: int, bias: bool = True
    ) -> None:
        super().__init__(c_in, c_out, kernel_size, stride, bias=bias)
        self.reflect = reflect

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused or _small(x, self.min_bytes):
            return self._conv_forward(reflect_pad(x, self.reflect), self.weight, self.bias)
        return reflect_conv2d(x, self.weight, self.bias, self.reflect, self.stride[0])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reflect={self.reflect}"


def _norm_relu(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Instance norm (no affine, :func:`.instnorm.norm_stats`), then ReLU: (output, mean, inverse std)."""
    out, mean, invstd = norm_stats(x, eps)
    return out.relu_(), mean, invstd


class _NormReluPadConv(torch.autograd.Function):
    @staticmethod
    def forward(
        x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, pad: int, stride: int, dtype: Any
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, invstd = _norm_relu(x, eps)
        with rowgrad.cooperating(weight, bias):
            padded = _pad(_cast(dtype, y), pad)
            out = F.conv2d(
                padded, _cast(dtype, weight), _cast(dtype, bias), stride, groups=_groups(x, weight)
            )
        return out, mean, invstd  # the statistics are outputs so that backward may keep them

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, weight, bias, eps, pad, stride, dtype = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.eps, ctx.pad, ctx.stride, ctx.dtype, ctx.has_bias = eps, pad, stride, dtype, bias is not None
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.live = _live_rows(weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_statistics: Any) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        y, _, _ = _norm_relu(x, ctx.eps)  # the same kernels as forward: the same map, bit for bit
        yc, wc = _cast(ctx.dtype, y), _cast(ctx.dtype, weight)
        needs = ctx.needs_input_grad
        g_pad, g_w, g_b = _conv_backward(
            grad, _pad(yc, ctx.pad), wc, ctx.has_bias, ctx.stride, needs[:3], ctx.live
        )
        g_x = None if g_pad is None else _norm_relu_backward(g_pad, x, y, yc, mean, invstd, ctx.eps, ctx.pad)
        return g_x, _cast(weight.dtype, g_w), _cast(weight.dtype, g_b), None, None, None, None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, ...], *args: Any
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        from .lowmem_stacked import norm_relu_conv_rule

        return norm_relu_conv_rule(info.batch_size, in_dims, *args)


_norm_relu_pad_conv_apply = fast_apply(_NormReluPadConv)


def _norm_relu_backward(
    g_pad: Tensor, x: Tensor, y: Tensor, yc: Tensor, mean: Tensor, invstd: Tensor, eps: float, pad: int
) -> Tensor:
    """The gradient at the norm's input ``x`` from the gradient at the padded map (``y``: the
    rectified map, ``yc``: it in the convolution's dtype)."""
    g_y = reflect_pad_backward(g_pad, pad)
    g_y = aten.threshold_backward(g_y.to(x.dtype), y, 0)
    return norm_backward(g_y, x, mean, invstd, eps)


class NormReluConv(nn.Sequential):
    """``InstanceNorm2d -> ReLU -> (pad) -> conv`` (the children, and so the state-dict keys, of that
    ``nn.Sequential``), run as one autograd operation that keeps only the norm's input.

    Children: an ``nn.InstanceNorm2d`` without affine parameters or running statistics, a ReLU, a
    placeholder where the reference pads, and a :class:`ReflectConv2d` (or a plain ``nn.Conv2d``).
    """

    fused = True
    min_bytes = MIN_BYTES  # inputs smaller than this take the plain path (module docstring)

    def __init__(self, norm: nn.InstanceNorm2d, placeholder: nn.Module, conv: nn.Conv2d) -> None:
        if norm.affine or norm.track_running_stats:
            raise ValueError("NormReluConv fuses an instance norm without affine parameters or running stats")
        if (
            conv.padding != (0, 0)
            or conv.dilation != (1, 1)
            or conv.groups != 1
            or conv.stride[0] != conv.stride[1]
        ):
            raise ValueError(
                "NormReluConv fuses an unpadded, undilated, ungrouped convolution (or a ReflectConv2d)"
            )
        super().__init__(norm, nn.ReLU(True), placeholder, conv)

    def forward(self, x: Tensor) -> Tensor:
        norm, conv = cast(nn.InstanceNorm2d, self[0]), cast(nn.Conv2d, self[3])
        reflect = isinstance(conv, ReflectConv2d)
        fused = self.fused and (not reflect or conv.fused)
        if (
            not fused
            or x.dim() != 4
            or _small(x, self.min_bytes)
            or not _records_grad(x, conv.weight, conv.bias)
        ):
            return super().forward(x)
        pad = conv.reflect if isinstance(conv, ReflectConv2d) else 0
        dtype = autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            out, _, _ = _norm_relu_pad_conv_apply(
                x, conv.weight, conv.bias, norm.eps, pad, conv.stride[0], dtype
            )
            return out


@contextmanager
def unfused() -> Iterator[None]:
    """Both unit classes on their plain path inside the block (autograd saves the ReLU output and
    the padded map): A/B runs and tests. Restores the fused path afterwards."""
    NormReluConv.fused = ReflectConv2d.fused = False
    try:
        yield
    finally:
        NormReluConv.fused = ReflectConv2d.fused = True


__all__ = ["NormReluConv", "ReflectConv2d", "reflect_conv2d", "unfused"]

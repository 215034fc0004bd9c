"""Instance norm (no affine parameters) for training: torch's maths, a faster forward on the CPU.

torch computes an instance norm as a batch norm of the input reshaped to ``(1, B*C, H, W)``. On
this project's CPU that kernel's training forward took 1.2-1.9x as long (inputs of 0.5-16 MiB,
``benchmarks/kernels.py``) as a mean, a subtraction, a vector norm of the deviations and a
scaling, the same two-pass maths as four vectorised torch ops; its backward kernel stayed the fastest,
so the gradient is still torch's ``native_batch_norm_backward`` from the same saved input, mean
and inverse standard deviation.

:func:`norm_stats` is the forward (output, per-row mean, per-row inverse std, shaped like
``native_batch_norm``'s); :func:`instance_norm` is it under autograd. Both fall back to torch's
kernel off the CPU (measured only here), for inputs under :data:`FAST_MIN_NUMEL` elements and
when :data:`fast_forward` is False (A/B runs).

A channels_last input (``model.channels_last``) runs each sample as a channels_last batch norm,
forward and backward: torch's kernels, the layout kept, no copies. The backward of maps of at most
:data:`PLAIN_BACKWARD_MAX_CHANNELS` channels on the CPU with two or more threads is the exception:
there torch's kernel took 3.7-7.6x as long as four vectorised torch ops of the same maths, which
:func:`norm_backward` runs instead (``benchmarks/kernels.py``; on one thread torch's kernel is the
faster, so the default step, whose two directions run on one thread each, keeps it). The serial
128 px step took 1.06x as long without them (``optimisations.py --set task.concurrent=false``,
variant ``torch IN backward``).

Under ``vmap`` (stacked branch copies) the norm is torch's batch norm whatever the size: a Python
autograd function there goes through functorch's Python dispatch, which cost more than the fast
forward saves (about 0.4 ms a call, ad-hoc microbenchmarks; the 64 px generator 6 % faster without
it).

The output is an ordinary tensor, not an autograd view as torch's instance norm returns: the
in-place ReLU after nearly every instance norm here would otherwise make autograd copy the whole
gradient in backward (``CopySlices``).

:func:`var_mean_hw` is ``torch.var_mean`` over the spatial dimensions (the layer-instance norms'
statistics) as a mean, a sum of squared deviations and, in backward, one fused multiply-add: torch's
CPU kernels took 3.7-5.9x as long forward and backward, in either layout, on one thread or two.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from branchadapt.batching import is_vmapped

from .fastapply import fast_apply
from .layout import is_channels_last

aten = torch.ops.aten

fast_forward = True  # False: torch's batch-norm kernel for the forward too (A/B runs)
vmap_kernels = True  # False: under vmap too, the autograd function where its size calls for it (A/B runs)
#: smaller inputs take torch's kernel: its speed there is the same, and a Python autograd
#: function's own cost (tens of microseconds a call) would be a loss
FAST_MIN_NUMEL = 1 << 16
#: channels_last maps with at most this many channels take the plain-ops backward (at 16 channels
#: torch's kernel is the faster again)
PLAIN_BACKWARD_MAX_CHANNELS = 8
plain_backward = True  # False: torch's kernel for every channels_last backward (A/B runs)
fast_var_mean = True  # False: torch.var_mean (A/B runs)


def _fast(x: Tensor) -> bool:
    return fast_forward and x.device.type == "cpu" and x.numel() >= FAST_MIN_NUMEL


def norm_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Instance-normalised ``x`` (B, C, H, W), and each (sample, channel) row's mean and inverse
    standard deviation (biased variance), both of shape ``(B * C,)``."""
    b, c, h, w = x.shape
    if is_channels_last(x):  # each sample as a channels_last batch norm: no layout copies
        out = torch.empty_like(x)
        mean, invstd = x.new_empty(b * c), x.new_empty(b * c)
        for i in range(b):
            aten.native_batch_norm.out(
                x[i : i + 1], None, None, None, None, True, 0.0, eps,
                out=out[i : i + 1], save_mean=mean[i * c : (i + 1) * c], save_invstd=invstd[i * c : (i + 1) * c],
            )  # fmt: skip
        return out, mean, invstd
    if not _fast(x):
        out, mean, invstd = aten.native_batch_norm(
            x.reshape(1, b * c, h, w), None, None, None, None, True, 0.0, eps
        )
        return aten._unsafe_view(out, x.shape), mean, invstd
    mean = x.mean(dim=(2, 3), keepdim=True)
    out = x - mean
    norm = torch.linalg.vector_norm(out, dim=(2, 3), keepdim=True)  # one pass, vectorised
    invstd = torch.rsqrt(norm * norm / (h * w) + eps)  # (tiny tensors: out of place, vmap has rules)
    return out.mul_(invstd), mean.view(b * c), invstd.view(b * c)


def _plain_backward(x: Tensor) -> bool:
    """Whether :func:`norm_backward` runs plain ops: a channels_last map of few channels on the CPU,
    with two or more threads (on one, torch's kernel is the faster)."""
    return (
        plain_backward
        and x.shape[1] <= PLAIN_BACKWARD_MAX_CHANNELS
        and x.device.type == "cpu"
        and torch.get_num_threads() >= 2
        and is_channels_last(x)
    )


def plain_norm_backward(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """:func:`norm_backward` in four vectorised torch ops, in ``x``'s layout."""
    b, c = x.shape[:2]
    # gx = s * (g - mean(g) - y * mean(g * y)) with y = (x - m) * s, written per row as
    # g * s + x * k + j so that x is read instead of a recomputed y
    s, m = invstd.view(b, c, 1, 1), mean.view(b, c, 1, 1)
    mg = grad.mean(dim=(2, 3), keepdim=True)
    mgy = s * ((grad * x).mean(dim=(2, 3), keepdim=True) - m * mg)
    k = -s * s * mgy
    return torch.addcmul(-s * mg - k * m, x, k).addcmul_(grad, s)


def norm_backward(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, eps: float) -> Tensor:
    """The gradient at ``x`` from the gradient at :func:`norm_stats`'s output (torch's kernel)."""
    b, c, h, w = x.shape
    if _plain_backward(x):
        return plain_norm_backward(grad, x, mean, invstd)
    if is_channels_last(x):  # per sample (the out= form of this op rejects the unused outputs)
        parts = [
            aten.native_batch_norm_backward(
                grad[i : i + 1], x[i : i + 1], None, None, None, mean[i * c : (i + 1) * c],
                invstd[i * c : (i + 1) * c], True, eps, [True, False, False],
            )[0]
            for i in range(b)
        ]  # fmt: skip
        return parts[0] if b == 1 else torch.cat(parts)
    return aten.native_batch_norm_backward(
        grad.reshape(1, b * c, h, w), x.reshape(1, b * c, h, w), None, None, None,
        mean, invstd, True, eps, [True, False, False],
    )[0].view(b, c, h, w)  # fmt: skip


class _InstanceNorm(torch.autograd.Function):
    generate_vmap_rule = True  # stacked branch copies run it under torch.func.vmap

    @staticmethod
    def forward(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return norm_stats(x, eps)  # the statistics are outputs so that backward may keep them

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, eps = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        ctx.save_for_backward(x, mean, invstd)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, *_statistics: Any) -> tuple[Tensor | None, None]:
        if grad is None:
            return None, None
        x, mean, invstd = ctx.saved_tensors
        return norm_backward(grad, x, mean, invstd, ctx.eps), None


_instance_norm_apply = fast_apply(_InstanceNorm)


class _VarMean(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[2] * x.shape[3]
        mean = x.mean(dim=(2, 3), keepdim=True)
        dev = x - mean
        var = dev.mul_(dev).sum(dim=(2, 3), keepdim=True).div_(n - 1)  # (vmap has no rule for square_)
        return var, mean

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx: Any, grad_var: Tensor, grad_mean: Tensor) -> Tensor:
        x, mean = ctx.saved_tensors
        n = x.shape[2] * x.shape[3]
        # d var / dx = 2 (x - mean) / (n - 1) and d mean / dx = 1 / n: one multiply-add over x
        scale = grad_var * (2.0 / (n - 1))
        return torch.addcmul(grad_mean / n - mean * scale, x, scale)


_var_mean_apply = fast_apply(_VarMean)


def var_mean_hw(x: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.var_mean(x, dim=(2, 3), keepdim=True)`` (unbiased) for a 4-D ``x``, faster on the CPU."""
    small = x.shape[2] * x.shape[3] < 2  # one element: torch's NaN variance, not a division by zero
    if not fast_var_mean or small or x.device.type != "cpu" or (vmap_kernels and is_vmapped(x)):
        return torch.var_mean(x, dim=(2, 3), keepdim=True)
    return _var_mean_apply(x)


def instance_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``F.instance_norm(x, eps=eps)`` for a 4-D ``x``, differentiable, not an autograd view."""
    # under vmap (stacked branch copies) a Python autograd function costs more than its kernels save
    if not (vmap_kernels and is_vmapped(x)) and (_fast(x) or is_channels_last(x)):
        return _instance_norm_apply(x, eps)[0]
    # torch's batch norm, shaped back with _unsafe_view: not a view to autograd, which is safe
    # because nothing else holds the batch norm's output (its backward keeps the input and statistics)
    b, c, h, w = x.shape
    out = F.batch_norm(x.reshape(1, b * c, h, w), None, None, training=True, eps=eps)
    return aten._unsafe_view(out, x.shape)


__all__ = [
    "FAST_MIN_NUMEL",
    "PLAIN_BACKWARD_MAX_CHANNELS",
    "instance_norm",
    "norm_backward",
    "norm_stats",
    "var_mean_hw",
]

"""Convolutions with an fp32 forward and a bf16 backward: a candidate measured, not shipped.

``bf16_sources.py`` finds that bf16's error in this generator comes from rounding the forward
operands (20-24 %), while rounding the gradients costs about 1 %. So the backward convolutions
(input and weight gradients: two thirds of a convolution's arithmetic) could run in bf16 with the
forward pass in fp32. This CPU's AMX runs them 1.5-3.5x faster, casts included, for the
generator's 3x3 and 7x7 convolutions (1x1 ones are slower: see ``MIN_KERNEL``).

:func:`patched` swaps ``torch.nn.functional.conv2d`` (which ``nn.Conv2d`` and the cartoon plugin's
units call) for :class:`BwdBf16Conv2d` within the block, for convolutions that record a gradient,
run in fp32, have a kernel larger than 1x1 and at least a quarter as many input elements as
weights (the discriminators' last, weight-bound layers would spend more on casting their weights
than they save). The cartoon units' own low-memory backward (inputs of 8 MiB and more) is not changed.

Used by ``bf16_sources.py`` (numerics and the generator's pass) and ``one_config.py``
(``--config "name=<bf16 backward>"``: whole steps).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

aten = torch.ops.aten
MARKER = "<bf16 backward>"  # one_config.py override that runs the steps inside patched()
MIN_KERNEL = 2  # kernel side below which the convolution keeps its fp32 backward
_PLAIN = F.conv2d


def _pair(v: Any) -> list[int]:
    return [int(i) for i in v] if isinstance(v, list | tuple) else [int(v)] * 2


class BwdBf16Conv2d(torch.autograd.Function):
    """``conv2d`` in fp32; its input, weight and bias gradients from bf16 operands, returned in fp32."""

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any, groups: int
    ) -> Tensor:
        return _PLAIN(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry = (_pair(stride), _pair(padding), _pair(dilation), groups)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        needs = ctx.needs_input_grad
        half = torch.bfloat16
        g_x, g_w, g_b = aten.convolution_backward(
            grad.to(half), x.to(half), weight.to(half), [weight.shape[0]] if ctx.has_bias else None,
            stride, padding, dilation, False, [0, 0], groups, [needs[0], needs[1], ctx.has_bias and needs[2]],
        )  # fmt: skip
        up = [None if g is None else g.float() for g in (g_x, g_w, g_b)]
        return up[0], up[1], up[2], None, None, None, None


def conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
    dilation: Any = 1, groups: int = 1,
) -> Tensor:  # fmt: skip
    """``F.conv2d``, through :class:`BwdBf16Conv2d` where it applies (module docstring)."""
    if (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and x.dtype == weight.dtype == torch.float32
        and not isinstance(padding, str)
        and min(weight.shape[-2:]) >= MIN_KERNEL
        and 4 * x.numel() >= weight.numel()
    ):
        return BwdBf16Conv2d.apply(x, weight, bias, stride, padding, dilation, groups)
    return _PLAIN(x, weight, bias, stride, padding, dilation, groups)


@contextmanager
def patched() -> Iterator[None]:
    """``F.conv2d`` is :func:`conv2d` within the block."""
    F.conv2d = conv2d
    try:
        yield
    finally:
        F.conv2d = _PLAIN

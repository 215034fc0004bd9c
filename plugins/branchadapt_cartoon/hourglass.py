"""The photo2cartoon generator's hourglass modules: the instance norm, the unit, the block, the stage.

Split out of :mod:`.networks` (which uses them for ``HourGlass1``-``HourGlass4``) so that
:mod:`.folding`, which runs several groups' copies of them at once, can build on them too.
Parameter names follow the reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .instnorm import instance_norm
from .layout import is_channels_last
from .lowmem import NormReluConv, ReflectConv2d


class InstanceNorm(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` whose training forward is :func:`.instnorm.instance_norm`: torch's
    values and gradients, a faster forward on the CPU, and an ordinary tensor rather than an
    autograd view as output (no gradient copy behind the in-place ReLU that follows). Inference,
    affine and running-statistics uses take torch's path unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.affine or self.track_running_stats or x.dim() != 4 or not torch.is_grad_enabled():
            return super().forward(x)
        return instance_norm(x, self.eps)


def _conv_unit(c_in: int, c_out: int) -> nn.Sequential:
    """IN -> ReLU -> reflection pad -> 3x3 conv, one fused operation (:class:`NormReluConv`); the
    reference's ReflectionPad2d slot holds an Identity, so the keys keep their indices."""
    return NormReluConv(
        InstanceNorm(c_in), nn.Identity(), ReflectConv2d(c_in, c_out, 3, reflect=1, bias=False)
    )


class ConvBlock(nn.Module):
    """Hourglass unit: three chained 3x3 convs (out/2, out/4, out/4) concatenated, plus a residual."""

    #: copies folded into the channels (:mod:`.folding`): the three maps are concatenated per copy
    copies = 1

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.c_out = c_out
        self.ConvBlock1 = _conv_unit(c_in, c_out // 2)
        self.ConvBlock2 = _conv_unit(c_out // 2, c_out // 4)
        self.ConvBlock3 = _conv_unit(c_out // 4, c_out // 4)
        # present (and counted) even when unused, as in the reference, so its checkpoints load
        self.ConvBlock4 = nn.Sequential(
            InstanceNorm(c_in), nn.ReLU(True), nn.Conv2d(c_in, c_out, 1, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.ConvBlock1(x)
        x2 = self.ConvBlock2(x1)
        x3 = self.ConvBlock3(x2)
        residual = x if x.shape[1] == self.c_out else self.ConvBlock4(x)
        if self.copies == 1:
            return residual + torch.cat((x1, x2, x3), 1)
        if is_channels_last(x1):  # channels innermost: one cat over (rows, H, W, copies, C) keeps the layout
            per_copy = [t.permute(0, 2, 3, 1).unflatten(3, (self.copies, -1)) for t in (x1, x2, x3)]
            return residual + torch.cat(per_copy, 4).flatten(3, 4).permute(0, 3, 1, 2)
        per_copy = [t.unflatten(1, (self.copies, -1)) for t in (x1, x2, x3)]
        return residual + torch.cat(per_copy, 2).flatten(1, 2)


class HourGlassBlock(nn.Module):
    """Four average-pool levels down, four nearest up-samplings back, skips at every level."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        for level in range(1, 5):
            setattr(self, f"ConvBlock{level}_1", ConvBlock(c_in if level == 1 else c_out, c_out))
            setattr(self, f"ConvBlock{level}_2", ConvBlock(c_in if level == 1 else c_out, c_out))
        for k in range(5, 10):
            setattr(self, f"ConvBlock{k}", ConvBlock(c_out, c_out))

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for level in range(1, 5):
            skips.append(getattr(self, f"ConvBlock{level}_1")(x))
            x = getattr(self, f"ConvBlock{level}_2")(F.avg_pool2d(x, 2))
        x = self.ConvBlock5(x)
        for k, skip in zip(range(6, 10), reversed(skips), strict=True):
            x = F.interpolate(getattr(self, f"ConvBlock{k}")(x), scale_factor=2.0, mode="nearest") + skip
        return x


class HourGlass(nn.Module):
    """Hourglass block + unit + 1x1 conv, with a 3-channel side output fed back (if residual)."""

    def __init__(self, c_in: int, c_out: int, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.HG = nn.Sequential(
            HourGlassBlock(c_in, c_out),
            ConvBlock(c_out, c_out),
            nn.Conv2d(c_out, c_out, 1, bias=False),
            InstanceNorm(c_out),
            nn.ReLU(True),
        )
        self.Conv1 = nn.Conv2d(c_out, 3, 1)
        if residual:
            self.Conv2 = nn.Conv2d(c_out, c_out, 1)
            self.Conv3 = nn.Conv2d(3, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        ll = self.HG(x)
        side = self.Conv1(ll)
        if not self.residual:
            return side
        return x + self.Conv2(ll) + self.Conv3(side)


__all__ = ["ConvBlock", "HourGlass", "HourGlassBlock", "InstanceNorm"]

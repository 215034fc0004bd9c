"""photo2cartoon's discriminators (global: 7 layers, local: 5) with CAM and a group head.

Spectral norm, on every conv/linear but the CAM 1x1 conv, has the maths and the keys of
``torch.nn.utils.spectral_norm`` (``weight_orig``/``_u``/``_v``, as the reference checkpoints);
:mod:`.spectral` divides a layer's output rather than a large weight. The group head (the
paper's auxiliary classifier) reads the pooled features the CAM also reads: a linear layer on
[GAP, GMP] giving one logit per group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from branchadapt import UserError

from .networks import init_normal
from .padding import ReflectionPad2d
from .spectral import spectral_norm


class DOut(NamedTuple):
    """Patch logits (B, 1, h, w), CAM logits (B, 2), heatmap (B, 1, h', w'), group logits or None."""

    patch: Tensor
    cam_logit: Tensor
    heatmap: Tensor
    group_logits: Tensor | None

    def split(self, n: int) -> tuple[DOut, DOut]:
        """The first ``n`` samples and the rest (real and fake scored in one pass)."""
        first = DOut(*(t[:n] if t is not None else None for t in self))
        rest = DOut(*(t[n:] if t is not None else None for t in self))
        return first, rest


def min_size(n_layers: int) -> int:
    """Smallest input side a discriminator of ``n_layers`` accepts (patch map at least 1x1)."""
    return 3 * 2 ** (n_layers - 2)


class Discriminator(nn.Module):
    """PatchGAN with CAM attention; ``n_groups > 0`` adds the group-classification head."""

    def __init__(self, width: int = 32, n_layers: int = 7, n_groups: int = 0) -> None:
        super().__init__()
        if n_layers < 3:
            raise ValueError(f"a discriminator needs at least 3 layers, got {n_layers}")
        self.n_layers = n_layers
        convs: list[nn.Module] = []
        c_in, c_out = 3, width
        for _ in range(n_layers - 2):  # stride-2 convs
            convs += [ReflectionPad2d(1), nn.Conv2d(c_in, c_out, 4, 2), nn.LeakyReLU(0.2, True)]
            c_in, c_out = c_out, c_out * 2
        convs += [ReflectionPad2d(1), nn.Conv2d(c_in, c_out, 4, 1), nn.LeakyReLU(0.2, True)]
        channels = c_out
        self.model = nn.Sequential(*convs)
        self.gap_fc = nn.Linear(channels, 1, bias=False)
        self.gmp_fc = nn.Linear(channels, 1, bias=False)
        self.conv1x1 = nn.Conv2d(2 * channels, channels, 1)
        self.leaky_relu = nn.LeakyReLU(0.2, True)
        self.pad = ReflectionPad2d(1)
        self.conv = nn.Conv2d(channels, 1, 4, 1, bias=False)
        self.group_head = nn.Linear(2 * channels, n_groups) if n_groups > 0 else None
        init_normal(self)
        for m in [*self.model, self.gap_fc, self.gmp_fc, self.conv]:
            if isinstance(m, nn.Conv2d | nn.Linear):
                spectral_norm(m)

    def forward(self, x: Tensor) -> DOut:
        side = min_size(self.n_layers)
        if min(x.shape[-2:]) < side:
            raise UserError(
                f"a {self.n_layers}-layer discriminator needs images of at least {side} px, got "
                f"{tuple(x.shape[-2:])}; lower task.global_layers / task.local_layers"
            )
        x = self.model(x)
        gap, gmp = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
        cam_logit = torch.cat((self.gap_fc(gap), self.gmp_fc(gmp)), 1)
        # the reference re-weights with the un-normalised weight (its first parameter)
        w_gap, w_gmp = self.gap_fc.weight_orig, self.gmp_fc.weight_orig
        x = torch.cat((x * w_gap[:, :, None, None], x * w_gmp[:, :, None, None]), 1)
        x = self.leaky_relu(self.conv1x1(x))
        heatmap = x.sum(dim=1, keepdim=True)
        groups = self.group_head(torch.cat((gap, gmp), 1)) if self.group_head is not None else None
        return DOut(self.conv(self.pad(x)), cam_logit, heatmap, groups)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["DOut", "Discriminator", "count", "min_size"]

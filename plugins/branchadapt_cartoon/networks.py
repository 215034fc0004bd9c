"""The photo2cartoon generator (U-GAT-IT "light" with hourglass blocks and soft-AdaLIN).

Parameter names follow the reference implementation, so its checkpoints map one to one, except
that the three CAM pieces (``gap_fc``, ``gmp_fc``, ``conv1x1``) live in one ``cam`` module: every
stage must be a module called through its attribute, so the branched model can route it per group.
Stages, input side first: ConvBlock1, HourGlass1-2, DownBlock1-2, EncodeBlock1-n, cam, FC,
DecodeBlock1-n, UpBlock1-2, HourGlass3-4, ConvBlock2.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from branchadapt import Backbone, PluginOptions, UserError
from branchadapt.batching import StackedRule
from branchadapt.device import autocast

from .folding import folded_rule
from .hourglass import ConvBlock, HourGlass, InstanceNorm
from .instnorm import var_mean_hw
from .lowmem import NormReluConv, ReflectConv2d
from .precision import BF16_DECODER_MIN_SIDE, bf16_decoder_applies


def _lin_affine(x: Tensor, rho: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) ``scale, shift`` with ``x * scale + shift`` equal to
    ``rho * IN(x) + (1 - rho) * LN(x)`` (unbiased variances, as the reference).

    One reduction over ``x`` gives the instance statistics; the layer statistics follow from them
    (law of total variance, no cancellation), so the full-size work is one ``var_mean`` and one
    fused multiply-add instead of two reductions and about ten element-wise passes.
    """
    n = x.shape[2] * x.shape[3]
    total = n * x.shape[1]
    in_var, in_mean = var_mean_hw(x)
    ln_mean = in_mean.mean(dim=1, keepdim=True)
    spread = (in_var * ((n - 1) / n) + (in_mean - ln_mean).square()).mean(dim=1, keepdim=True)
    ln_var = spread * (total / (total - 1))
    in_scale = rho * torch.rsqrt(in_var + eps)
    ln_scale = (1 - rho) * torch.rsqrt(ln_var + eps)
    return in_scale + ln_scale, -(in_scale * in_mean + ln_scale * ln_mean)


class AdaLIN(nn.Module):
    """Adaptive layer-instance norm: ``rho`` mixes IN and LN; gamma/beta come from outside."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.full((1, channels, 1, 1), 0.9))

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        scale, shift = _lin_affine(x, self.rho, self.eps)
        gamma, beta = gamma[:, :, None, None], beta[:, :, None, None]
        return torch.addcmul(shift * gamma + beta, x, scale * gamma)


class LIN(nn.Module):
    """Layer-instance norm with learnt mixing, scale and shift (decoder up-sampling blocks)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = _lin_affine(x, self.rho, self.eps)
        return torch.addcmul(shift * self.gamma + self.beta, x, scale * self.gamma)


class SoftAdaLIN(nn.Module):
    """AdaLIN whose gamma/beta blend style (from FC) and content (encoder features) by ``w``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = AdaLIN(channels)
        self.w_gamma = nn.Parameter(torch.zeros(1, channels))
        self.w_beta = nn.Parameter(torch.zeros(1, channels))
        self.c_gamma = nn.Sequential(
            nn.Linear(channels, channels), nn.ReLU(True), nn.Linear(channels, channels)
        )
        self.c_beta = nn.Sequential(
            nn.Linear(channels, channels), nn.ReLU(True), nn.Linear(channels, channels)
        )
        self.s_gamma = nn.Linear(channels, channels)
        self.s_beta = nn.Linear(channels, channels)

    def forward(self, x: Tensor, content: Tensor, style: Tensor) -> Tensor:
        gamma = (1 - self.w_gamma) * self.s_gamma(style) + self.w_gamma * self.c_gamma(content)
        beta = (1 - self.w_beta) * self.s_beta(style) + self.w_beta * self.c_beta(content)
        return self.norm(x, gamma, beta)


class ResnetBlock(nn.Module):
    """Encoder residual block: two reflect-padded 3x3 convs with instance norm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Identity(),
            ReflectConv2d(channels, channels, 3, reflect=1, bias=False),
            InstanceNorm(channels),
            nn.ReLU(True),
            nn.Identity(),
            ReflectConv2d(channels, channels, 3, reflect=1, bias=False),
            InstanceNorm(channels),
        )  # fmt: skip  (Identity: where the reference pads; the convolutions pad themselves)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x + self.conv_block(x)
        return x, x.mean(dim=(2, 3))  # features and their global average: the "content features"


class SoftAdaLINBlock(nn.Module):
    """Decoder residual block normalised by soft-AdaLIN (content + style)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ReflectConv2d(channels, channels, 3, reflect=1, bias=False)
        self.norm1 = SoftAdaLIN(channels)
        self.relu1 = nn.ReLU(True)
        self.conv2 = ReflectConv2d(channels, channels, 3, reflect=1, bias=False)
        self.norm2 = SoftAdaLIN(channels)

    def forward(self, x: Tensor, content: Tensor, style: Tensor) -> Tensor:
        out = self.relu1(self.norm1(self.conv1(x), content, style))
        return x + self.norm2(self.conv2(out), content, style)


class CAM(nn.Module):
    """Class activation map: GAP/GMP logits, features re-weighted by each classifier, 1x1 fusion."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gap_fc = nn.Linear(channels, 1)
        self.gmp_fc = nn.Linear(channels, 1)
        self.conv1x1 = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gap_logit = self.gap_fc(x.mean(dim=(2, 3)))
        gmp_logit = self.gmp_fc(x.amax(dim=(2, 3)))
        gap = x * self.gap_fc.weight[:, :, None, None]
        gmp = x * self.gmp_fc.weight[:, :, None, None]
        x = F.relu(self.conv1x1(torch.cat((gap, gmp), 1)))
        return x, torch.cat((gap_logit, gmp_logit), 1), x.sum(dim=1, keepdim=True)


#: ``channels_last = "auto"`` uses channels_last for training inputs of at least this many pixels a side
CHANNELS_LAST_MIN_SIDE = 128


class UGATITOptions(PluginOptions):
    width: int = Field(32, ge=4, description="base channel width (photo2cartoon: 32)")
    image_size: int = Field(
        256,
        ge=32,
        description="input size in pixels; a multiple of 16, at least 32 (2 px at the deepest level)",
    )
    n_blocks: int = Field(4, ge=1, description="encoder and decoder residual blocks")
    light: bool = Field(True, description="light FC (pooled features), as photo2cartoon")
    low_memory_min_mb: float = Field(
        8.0,
        ge=0,
        description="convolution units whose input has at least this many MiB keep only that input for "
        "backward and recompute the rest (less memory, some time); smaller ones keep their maps. 0: every "
        "unit saves memory",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="train with the activations in channels_last memory format (outputs stay in the default "
        f"layout); auto: on a CPU for inputs of at least {CHANNELS_LAST_MIN_SIDE} px (0.92x of the one-group "
        "step at 256 px, 0.94-0.96x at 128 px, a tie for the 64 px transfer stage; docs/performance.md)",
    )
    bf16_decoder: bool | Literal["auto"] = Field(
        "auto",
        description="train the decoder's residual blocks' convolutions under bf16 autocast, the part of the "
        "generator where bf16 is numerically safe (benchmarks/bf16_sources.py); auto: for inputs of at least "
        f"{BF16_DECODER_MIN_SIDE} px on a CPU with AMX or a CUDA GPU with bf16 (0.92x of the one-group step at "
        "256 px, 0.97x at 128 px, a tie in the transfer stage; docs/performance.md)",
    )

    stacked_copies: Literal["folded", "vmap"] = Field(
        "folded",
        description="how the groups' branch copies run when the engine stacks them (train.stack_branches): "
        "folded, one network whose grouped convolutions hold every copy (stages of hourglass units, "
        "convolutions and instance norms; others use vmap); vmap, the engine's generic way "
        "(branchadapt_cartoon/folding.py, docs/performance.md)",
    )

    @model_validator(mode="after")
    def _check(self) -> UGATITOptions:
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (hourglass levels), got {self.image_size}")
        if self.width % 4:
            raise ValueError(
                f"width must be a multiple of 4 (hourglass units split it in 2 and 4), got {self.width}"
            )
        return self


class UGATITGenerator(Backbone):
    """photo2cartoon's generator; forward returns (image, CAM logits (B, 2), heatmap (B, 1, h, w))."""

    Options = UGATITOptions
    options: UGATITOptions
    #: compiled one by one under ``train.compile = "units"`` (72 hourglass units, 8 residual blocks)
    compile_unit_types = (ConvBlock, ResnetBlock, SoftAdaLINBlock)
    #: instance and layer-instance norms only: rows never mix (live and detached groups share one call)
    rows_independent = True
    #: the exported graph's names (``branchadapt export``)
    input_names = ("image",)
    output_names = ("translated", "cam_logits", "heatmap")

    def __init__(self, options: UGATITOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        c, n = o.width, o.n_blocks
        self.n_blocks = n
        self.ConvBlock1 = nn.Sequential(
            nn.Identity(), ReflectConv2d(3, c, 7, reflect=3, bias=False), InstanceNorm(c), nn.ReLU(True)
        )
        self.HourGlass1 = HourGlass(c, c)
        self.HourGlass2 = HourGlass(c, c)
        self.DownBlock1 = _down(c, 2 * c)
        self.DownBlock2 = _down(2 * c, 4 * c)
        for i in range(1, n + 1):
            setattr(self, f"EncodeBlock{i}", ResnetBlock(4 * c))
        self.cam = CAM(4 * c)
        fc_in = 4 * c if o.light else (o.image_size // 4) ** 2 * 4 * c
        self.FC = nn.Sequential(
            nn.Linear(fc_in, 4 * c), nn.ReLU(True), nn.Linear(4 * c, 4 * c), nn.ReLU(True)
        )
        for i in range(1, n + 1):
            setattr(self, f"DecodeBlock{i}", SoftAdaLINBlock(4 * c))
        self.UpBlock1 = _up(4 * c, 2 * c)
        self.UpBlock2 = _up(2 * c, c)
        self.HourGlass3 = HourGlass(c, c)
        self.HourGlass4 = HourGlass(c, c, residual=False)
        self.ConvBlock2 = nn.Sequential(
            nn.Identity(), ReflectConv2d(3, 3, 7, reflect=3, bias=False), nn.Tanh()
        )
        init_normal(self)
        for m in self.modules():
            if isinstance(m, NormReluConv | ReflectConv2d):
                m.min_bytes = int(o.low_memory_min_mb * 2**20)

    def example_inputs(self, batch_size: int = 1) -> tuple[Tensor, ...]:
        size = self.options.image_size
        return (torch.zeros(batch_size, 3, size, size),)

    def stage_names(self) -> list[str]:
        enc = [f"EncodeBlock{i}" for i in range(1, self.n_blocks + 1)]
        dec = [f"DecodeBlock{i}" for i in range(1, self.n_blocks + 1)]
        return ["ConvBlock1", "HourGlass1", "HourGlass2", "DownBlock1", "DownBlock2", *enc, "cam", "FC",
                *dec, "UpBlock1", "UpBlock2", "HourGlass3", "HourGlass4", "ConvBlock2"]  # fmt: skip

    def stacked_rule(self, path: str, module: nn.Module) -> StackedRule | None:
        """Stacked branch copies folded into the channels (:mod:`.folding`), where the stage allows."""
        return None if self.options.stacked_copies == "vmap" else folded_rule(module)

    def _channels_last(self, x: Tensor) -> bool:
        """Whether this training forward runs its activations in channels_last (option above)."""
        if not torch.is_grad_enabled() or torch.onnx.is_in_onnx_export():
            return False  # inference, sampling and export keep the default layout
        setting = self.options.channels_last
        if setting == "auto":
            return x.device.type == "cpu" and min(x.shape[-2:]) >= CHANNELS_LAST_MIN_SIDE
        return bool(setting)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.shape[-1] % 16 or x.shape[-2] % 16 or min(x.shape[-2:]) < 32:
            raise ValueError(
                "image sides must be multiples of 16 and at least 32 (the hourglass halves them 4 times "
                f"and reflection-pads the 2 px result), got {tuple(x.shape[-2:])}"
            )
        side = self.options.image_size
        if tuple(x.shape[-2:]) != (side, side) and (torch.is_grad_enabled() or not self.options.light):
            # the full FC's size depends on it; a light model trained at another size would export
            # (example_inputs) and be documented at the wrong one
            raise UserError(
                f"model.image_size is {side} but the images are {x.shape[-2]}x{x.shape[-1]} px; set "
                f"model.image_size to the data's size"
            )
        layout = self._channels_last(x)
        bf16 = bf16_decoder_applies(self.options.bf16_decoder, x)  # decided on the input image's size
        if layout:  # convolutions keep it; the norms and pads have channels_last paths
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.HourGlass2(self.HourGlass1(self.ConvBlock1(x)))
        x = self.DownBlock2(self.DownBlock1(x))
        content = []
        for i in range(1, self.n_blocks + 1):
            x, feat = getattr(self, f"EncodeBlock{i}")(x)
            content.append(feat)
        x, cam_logit, heatmap = self.cam(x)
        style = self.FC(x.mean(dim=(2, 3)) if self.options.light else x.flatten(1))
        with autocast(x.device, "bf16" if bf16 else "fp32"):
            for i in range(1, self.n_blocks + 1):
                x = getattr(self, f"DecodeBlock{i}")(x, content[-i], style)
        if bf16:
            x = x.float()
        x = self.HourGlass4(self.HourGlass3(self.UpBlock2(self.UpBlock1(x))))
        if layout:
            return self.ConvBlock2(x).contiguous(), cam_logit, heatmap.contiguous()
        return self.ConvBlock2(x), cam_logit, heatmap


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Identity(),
        ReflectConv2d(c_in, c_out, 3, 2, reflect=1, bias=False),
        InstanceNorm(c_out),
        nn.ReLU(True),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Identity(),
        ReflectConv2d(c_in, c_out, 3, reflect=1, bias=False),
        LIN(c_out),
        nn.ReLU(True),
    )


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """The paper's initialisation: conv and linear weights ~ N(0, std), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

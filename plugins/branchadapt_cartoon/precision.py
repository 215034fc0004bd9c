"""Where the generator trains in bf16 (``model.bf16_decoder``): its decoder's residual blocks.

Under bf16 autocast as a whole the generator's weight gradients are 20-40 % off float64's, and
rounding the forward operands of any one encoder stage alone costs 7-22 %; with the decoder's
residual blocks under autocast they are 1.3-2.0 % off, against 0.3-0.6 % for fp32 itself at
128-256 px (``benchmarks/bf16_sources.py``, docs/performance.md). Those blocks hold the 128-channel
convolutions that AMX and tensor cores speed up, so the generator may run them under autocast
while the rest stays fp32. Training only: inference, sampling and ONNX export stay fp32. Inside
``vmap`` (stacked branch copies) torch's CPU autocast does not reach the convolutions, so such
copies run in fp32.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

#: ``bf16_decoder = "auto"`` is on for training inputs of at least this many pixels a side (a tie at 64 px)
BF16_DECODER_MIN_SIDE = 128


@functools.cache
def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 matrix units: AMX tiles on a CPU, bf16 support on a CUDA GPU
    (probed once per device: the generator asks on every training forward)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x
        return bool(probe()) if probe is not None else False
    return False


def bf16_decoder_applies(setting: bool | Literal["auto"], x: Tensor) -> bool:
    """Whether a training forward on ``x`` runs the decoder's residual blocks under bf16 autocast:
    ``True``/``False`` as set, ``"auto"`` for inputs of :data:`BF16_DECODER_MIN_SIDE` px and more on
    a device with :func:`fast_bf16`; never without gradients (inference), in an ONNX export or
    when autocast is already on (``precision = "bf16"``)."""
    if not setting or not torch.is_grad_enabled() or torch.onnx.is_in_onnx_export():
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if setting == "auto":
        return min(x.shape[-2:]) >= BF16_DECODER_MIN_SIDE and fast_bf16(x.device)
    return True


__all__ = ["BF16_DECODER_MIN_SIDE", "bf16_decoder_applies", "fast_bf16"]

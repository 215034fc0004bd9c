"""Device selection and mixed precision, the only place that knows about cuda/mps/cpu."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from . import hostmem
from .errors import UserError


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is a user error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(
            f"device: {spec!r} is not a device; expected auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f'device: {spec!r} requested but CUDA is not available here; use device = "auto" or "cpu"'
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            f'device: {spec!r} requested but MPS is not available here; use device = "auto" or "cpu"'
        )
    return device


def configure_backend(device: torch.device, retain_memory: bool = True) -> None:
    """Backend defaults for the fastest correct training on ``device``.

    On CUDA: ``cudnn.benchmark`` (every stage trains at one fixed input size, so cuDNN's autotuner
    picks each convolution's fastest algorithm once and reuses it) and TF32 for fp32 matmuls
    (``"high"``, the precision cuDNN already uses for fp32 convolutions by default). On CPU, with
    ``retain_memory``: the C allocator keeps freed blocks for reuse
    (:func:`branchadapt.hostmem.retain_freed_memory`; CUDA's caching allocator already does that
    for device memory). Torch's own CPU defaults were measured fastest (``docs/performance.md``).
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    elif device.type == "cpu" and retain_memory:
        hostmem.retain_freed_memory()


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a convolution or matmul on ``t``'s device in, or None when it is off
    there (for custom autograd functions that must cast their operands as autocast would)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for ``precision="bf16"``, a no-op context for ``"fp32"`` (the experiment's
    ``precision`` key); another value is a ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(map(repr, PRECISIONS))}")
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

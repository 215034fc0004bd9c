"""Memory layout of feature maps: which ops may keep channels_last (``model.channels_last``)."""

from __future__ import annotations

import torch
from torch import Tensor


def is_channels_last(t: Tensor) -> bool:
    """Whether ``t`` is a 4-D map laid out channels_last (and not also plain contiguous)."""
    if t.dim() != 4 or t.is_contiguous():
        return False
    try:
        return t.is_contiguous(memory_format=torch.channels_last)
    except RuntimeError:  # inside vmap (stacked branch copies) only the default layout can be queried
        return False


__all__ = ["is_channels_last"]

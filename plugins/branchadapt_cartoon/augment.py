"""The paper's default augmentation (the generic machinery is :mod:`branchadapt.augment`)."""

from __future__ import annotations

from typing import Any


def paper_augment(size: int, load_size: int) -> list[dict[str, Any]]:
    """The paper's augmentation: flip, resize to ``load_size`` (286), random crop ``size`` (256)."""
    return [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "Resize", "height": load_size, "width": load_size},
        {"name": "RandomCrop", "height": size, "width": size},
    ]

"""Preview grid: rows = groups, columns = (photo, cartoon) pairs of test identities."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .dataset import generate_image
from .identity import GROUPS


def make_preview(
    seed: int = 0, size: int = 128, per_group: int = 4, groups: Sequence[str] = GROUPS, gap: int = 4
) -> np.ndarray:
    """uint8 RGB grid of paired test photos/cartoons with a group label column."""
    label_w = max(64, size // 2)
    tile = size + gap
    h = len(groups) * tile + gap
    w = label_w + per_group * (2 * size + gap) + gap
    grid = np.full((h, w, 3), 255, np.uint8)
    for r, group in enumerate(groups):
        y = gap + r * tile
        cv2.putText(grid, group, (4, y + size // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for c in range(per_group):
            x = label_w + c * (2 * size + gap)
            grid[y : y + size, x : x + size] = generate_image(seed, "test", group, "photo", c, size)
            grid[y : y + size, x + size : x + 2 * size] = generate_image(
                seed, "test", group, "cartoon", c, size
            )
    return grid


def save_preview(path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(make_preview(**kwargs), cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path

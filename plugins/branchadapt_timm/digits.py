"""Embedded few-shot data for classification: procedurally rendered digit glyphs in visual domains.

Every image is a digit 0-9 drawn with an OpenCV Hershey font (random font, scale, thickness,
position, small rotation), deterministic from (seed, split, group, index). Groups are domains:

- ``clean``: dark glyph on a light background (the anchor: many samples per class);
- ``rotated_noisy``: rotated up to +-60 degrees, strong Gaussian noise;
- ``inverted``: light glyph on a dark, colour-tinted background;
- ``blurred``: heavy blur at low contrast.

Train counts are per class and group (default anchor 100, others 5); the test split (default 30
per class) uses other seeds, never seen in training. Albumentations from ``augment`` apply to the
train split only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pydantic import Field, field_validator

from branchadapt import DataSource, PluginOptions, UserError

DOMAINS = ("clean", "rotated_noisy", "inverted", "blurred")
FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
         cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)  # fmt: skip


def render_glyph(digit: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A dark digit on white, float32 (size, size) in [0, 1], with font/scale/pose jitter."""
    canvas = np.full((size * 2, size * 2), 255, np.uint8)
    font = FONTS[int(rng.integers(len(FONTS)))]
    scale = float(rng.uniform(1.6, 2.2)) * size / 32 * (2.0 if font == cv2.FONT_HERSHEY_PLAIN else 1.0)
    thick = int(rng.integers(2, 5))
    (w, h), _ = cv2.getTextSize(str(digit), font, scale, thick)
    x = size - w // 2 + int(rng.integers(-3, 4))
    y = size + h // 2 + int(rng.integers(-3, 4))
    cv2.putText(canvas, str(digit), (x, y), font, scale, 0, thick, cv2.LINE_AA)
    angle = float(rng.uniform(-10, 10))
    m = cv2.getRotationMatrix2D((size, size), angle, 1.0)
    canvas = cv2.warpAffine(canvas, m, (size * 2, size * 2), borderValue=255)
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def apply_domain(glyph: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Turn a clean glyph into an RGB float32 image of ``domain``, values in [0, 1]."""
    size = glyph.shape[0]
    if domain == "clean":
        g = glyph
        rgb = np.stack([g, g, g], -1)
    elif domain == "rotated_noisy":
        m = cv2.getRotationMatrix2D((size / 2, size / 2), float(rng.uniform(-60, 60)), 1.0)
        g = cv2.warpAffine(glyph, m, (size, size), borderValue=1.0)
        g = g + rng.normal(0, 0.35, g.shape).astype(np.float32)
        rgb = np.stack([g, g, g], -1)
    elif domain == "inverted":
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
        rgb = (1.0 - glyph)[..., None] * tint[None, None, :] + 0.05
    elif domain == "blurred":
        g = cv2.GaussianBlur(glyph, (0, 0), float(rng.uniform(1.5, 2.2)))
        rgb = np.stack([0.5 + (g - 0.5) * 0.25] * 3, -1)
    else:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


class DigitsOptions(PluginOptions):
    size: int = Field(32, ge=16, le=128, description="image side in pixels")
    seed: int = Field(0, ge=0, description="seed of the generated data")
    per_class: dict[str, int] = Field(
        default_factory=lambda: {"clean": 100, "rotated_noisy": 5, "inverted": 5, "blurred": 5},
        description="training images per class for each group",
    )
    test_per_class: int = Field(30, ge=1)
    augment: list[dict[str, Any]] = Field(
        default_factory=list, description="albumentations transforms [{name=..., args...}] for training"
    )

    @field_validator("augment")
    @classmethod
    def _augment(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from branchadapt_cartoon.augment import check_augment

        return check_augment(value)


class Digits(DataSource):
    """Ten-class digit glyphs, one stream ``train`` per group with fields ``x`` (image) and ``y``."""

    Options = DigitsOptions
    options: DigitsOptions

    def __init__(
        self, options: DigitsOptions | None, groups: Sequence[str], base_dir: Path, split: str = "train"
    ) -> None:
        super().__init__(options, groups, base_dir, split)
        unknown = [g for g in self.groups if g not in DOMAINS]
        if unknown:
            raise UserError(f"groups {unknown} are not digits domains; expected some of {list(DOMAINS)}")
        missing = [g for g in self.groups if g not in self.options.per_class]
        if missing and split == "train":
            raise UserError(f"data.per_class has no count for groups {missing}")
        self._cache: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
        self.augment = None
        if self.options.augment and split == "train":
            from branchadapt_cartoon.augment import Augmenter

            self.augment = Augmenter(self.options.augment, self.options.size)

    def count(self, group: str) -> int:
        per = self.options.test_per_class if self.split == "test" else self.options.per_class.get(group, 0)
        return 10 * per

    def sizes(self) -> dict[str, dict[str, int]]:
        return {g: {"train": self.count(g)} for g in self.groups}

    def image(self, group: str, index: int) -> tuple[np.ndarray, int]:
        """Item ``index`` of a group: (RGB float image in [0, 1], label); classes interleave."""
        key = (group, index)
        if key not in self._cache:
            digit = index % 10
            entropy = (self.options.seed, zlib.crc32(self.split.encode()), zlib.crc32(group.encode()), index)
            rng = np.random.default_rng(entropy)
            self._cache[key] = (apply_domain(render_glyph(digit, self.options.size, rng), group, rng), digit)
        return self._cache[key]

    def get(self, group: str, stream: str, index: int, rng: np.random.Generator | None) -> dict[str, Any]:
        img, label = self.image(group, index)
        if self.augment is not None:
            img = self.augment((img * 255).astype(np.uint8), rng).astype(np.float32) / 255.0
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1) * 2 - 1
        return {"x": x, "y": label}

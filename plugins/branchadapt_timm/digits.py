"""Embedded few-shot data for classification: rendered digit glyphs in four visual domains.

Nothing is downloaded: every image is a digit 0-9 drawn with an OpenCV Hershey font (random font,
scale, thickness, position and a small tilt), deterministic from (seed, split, group, index), then
turned into its group's domain:

- ``clean``: dark glyph on a light background (the anchor: many samples per class);
- ``rotated_noisy``: rotated up to +-60 degrees under strong Gaussian noise;
- ``inverted``: light, colour-tinted glyph on a dark background;
- ``blurred``: heavy blur at a quarter of the contrast.

A model trained on ``clean`` alone is near chance on the other three, so they need adapting.
The ``test`` split draws other glyphs (other seeds) and is never used for training.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pydantic import Field, field_validator

from branchadapt import DataSource, PluginOptions, UserError
from branchadapt.augment import Augmenter, check_augment

FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
         cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)  # fmt: skip


def render_glyph(digit: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A dark digit on white, float32 (size, size) in [0, 1], with font/scale/pose jitter."""
    big = size * 2  # draw at twice the size, then downsample: anti-aliased strokes
    canvas = np.full((big, big), 255, np.uint8)
    font = FONTS[int(rng.integers(len(FONTS)))]
    scale = float(rng.uniform(1.6, 2.2)) * size / 32 * (2.0 if font == cv2.FONT_HERSHEY_PLAIN else 1.0)
    thick = int(rng.integers(2, 5)) * max(1, size // 32)
    (w, h), _ = cv2.getTextSize(str(digit), font, scale, thick)
    jitter = max(1, big // 20)
    x = size - w // 2 + int(rng.integers(-jitter, jitter + 1))
    y = size + h // 2 + int(rng.integers(-jitter, jitter + 1))
    cv2.putText(canvas, str(digit), (x, y), font, scale, 0, thick, cv2.LINE_AA)
    tilt = cv2.getRotationMatrix2D((size, size), float(rng.uniform(-10, 10)), 1.0)
    tilted = cv2.warpAffine(canvas, tilt, (big, big), borderValue=255)
    return cv2.resize(tilted, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _grey(g: np.ndarray) -> np.ndarray:
    return np.stack([g, g, g], -1)


def _clean(glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _grey(glyph)


def _rotated_noisy(glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = glyph.shape[0]
    turn = cv2.getRotationMatrix2D((size / 2, size / 2), float(rng.uniform(-60, 60)), 1.0)
    g = cv2.warpAffine(glyph, turn, (size, size), borderValue=1.0)
    return _grey(g + np.asarray(rng.normal(0, 0.35, g.shape), np.float32))


def _inverted(glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
    return (1.0 - glyph)[..., None] * tint[None, None, :] + 0.05


def _blurred(glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = float(rng.uniform(1.5, 2.2)) * glyph.shape[0] / 32
    g = cv2.GaussianBlur(glyph, (0, 0), sigma)
    return _grey(0.5 + (g - 0.5) * 0.25)


#: domain name -> (clean glyph, rng) -> RGB float image (values clipped to [0, 1] afterwards)
DOMAINS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "clean": _clean,
    "rotated_noisy": _rotated_noisy,
    "inverted": _inverted,
    "blurred": _blurred,
}


def render(digit: int, domain: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB float32 image (size, size, 3) in [0, 1] of ``digit`` in ``domain``."""
    return np.clip(DOMAINS[domain](render_glyph(digit, size, rng), rng), 0.0, 1.0).astype(np.float32)


class DigitsOptions(PluginOptions):
    size: int = Field(32, ge=16, le=128, description="image side in pixels")
    seed: int = Field(0, ge=0, description="seed of the rendered data (independent of the run's seed)")
    per_class: dict[str, int] = Field(
        default_factory=lambda: {"clean": 100, "rotated_noisy": 5, "inverted": 5, "blurred": 5},
        description="training images per class for each group",
    )
    test_per_class: int = Field(50, ge=1, description="held-out test images per class and group")
    domains: dict[str, str] = Field(
        default_factory=dict, description="group -> domain for groups not named after a domain"
    )
    augment: list[dict[str, Any]] = Field(
        default_factory=list,
        description="albumentations transforms for the train split: [{name = ..., **arguments}]",
    )

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, value: dict[str, str]) -> dict[str, str]:
        bad = {g: d for g, d in value.items() if d not in DOMAINS}
        if bad:
            raise ValueError(f"unknown domains {bad}; expected some of {list(DOMAINS)}")
        return value

    @field_validator("per_class")
    @classmethod
    def _counts(cls, value: dict[str, int]) -> dict[str, int]:
        if any(n < 0 for n in value.values()):
            raise ValueError(f"counts must be >= 0, got {value}")
        return value

    @field_validator("augment")
    @classmethod
    def _buildable(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return check_augment(value)


class Digits(DataSource):
    """Ten-class digit glyphs; one stream ``train`` per group with fields ``image`` and ``label``.

    Images are ``(3, size, size)`` float tensors in [-1, 1]; classes interleave (item i is digit
    ``i % 10``) so any prefix of a group is class-balanced. Rendered on first use, then cached.
    """

    Options = DigitsOptions
    options: DigitsOptions

    def __init__(
        self, options: DigitsOptions | None, groups: Sequence[str], base_dir: Path, split: str = "train"
    ) -> None:
        super().__init__(options, groups, base_dir, split)
        o = self.options
        self.domain = {g: o.domains.get(g, g) for g in self.groups}
        unknown = [g for g, d in self.domain.items() if d not in DOMAINS]
        if unknown:
            raise UserError(
                f"data: groups {unknown} are not digits domains ({list(DOMAINS)}); "
                "name groups after domains or map them with data.domains = {group = domain}"
            )
        if split == "train":
            missing = [g for g in self.groups if g not in o.per_class]
            if missing:
                raise UserError(f"data.per_class has no count for groups {missing}")
        self._cache: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
        self.augment = Augmenter(o.augment, o.size) if o.augment and split == "train" else None

    def count(self, group: str) -> int:
        """Items of ``group`` in this split."""
        per = self.options.test_per_class if self.split != "train" else self.options.per_class[group]
        return 10 * per

    def sizes(self) -> dict[str, dict[str, int]]:
        return {g: {"train": self.count(g)} for g in self.groups}

    def image(self, group: str, index: int) -> tuple[np.ndarray, int]:
        """Item ``index`` of ``group``: (RGB float32 image in [0, 1], label), before augmentation."""
        key = (group, index)
        if key not in self._cache:
            if not 0 <= index < self.count(group):
                raise IndexError(f"{group} has {self.count(group)} {self.split} items, asked for {index}")
            seeds = (self.options.seed, zlib.crc32(self.split.encode()), zlib.crc32(group.encode()), index)
            digit = index % 10
            self._cache[key] = (
                render(digit, self.domain[group], self.options.size, np.random.default_rng(seeds)),
                digit,
            )
        return self._cache[key]

    def get(self, group: str, stream: str, index: int, rng: np.random.Generator | None) -> dict[str, Any]:
        img, label = self.image(group, index)
        if self.augment is not None and self.training:
            where = self.describe(group, stream, index)
            img = self.augment((img * 255).round().astype(np.uint8), rng, where).astype(np.float32) / 255.0
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1) * 2 - 1
        return {"image": image, "label": label}

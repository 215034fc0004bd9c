"""Augmentations declared in the experiment file and built with albumentations.

``augment = [{name = "HorizontalFlip", p = 0.5}, {name = "Resize", height = 286, width = 286}, ...]``:
each table names an albumentations transform and gives its arguments. Names and arguments are
checked when the experiment is validated, so a typo fails before any training starts.
"""

from __future__ import annotations

import difflib
from typing import Any

import albumentations as A
import numpy as np


def _transform_names() -> list[str]:
    return sorted(
        n for n in dir(A) if not n.startswith("_") and isinstance(getattr(A, n), type) and n[0].isupper()
    )


def build_transform(name: str, params: dict[str, Any]) -> A.BasicTransform:
    """One albumentations transform by class name; clear ``ValueError`` on a bad name or argument."""
    cls = getattr(A, name, None)
    if not isinstance(cls, type) or not issubclass(cls, A.BasicTransform | A.BaseCompose):
        close = difflib.get_close_matches(name, _transform_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{name!r} is not an albumentations transform{hint}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())}): {exc}") from exc


def check_augment(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate ``[{name=..., **params}]`` by building every transform once."""
    for i, spec in enumerate(specs):
        if "name" not in spec:
            raise ValueError(
                f"augment[{i}] needs a 'name' (an albumentations transform, e.g. 'HorizontalFlip')"
            )
        params = {k: v for k, v in spec.items() if k != "name"}
        try:
            build_transform(str(spec["name"]), params)
        except ValueError as exc:
            raise ValueError(f"augment[{i}]: {exc}") from exc
    return specs


def paper_augment(size: int, load_size: int) -> list[dict[str, Any]]:
    """The paper's augmentation: flip, resize to ``load_size`` (286), random crop ``size`` (256)."""
    return [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "Resize", "height": load_size, "width": load_size},
        {"name": "RandomCrop", "height": size, "width": size},
    ]


class Augmenter:
    """A seeded albumentations pipeline: the caller's RNG fixes every random choice."""

    def __init__(self, specs: list[dict[str, Any]], size: int) -> None:
        transforms = [build_transform(s["name"], {k: v for k, v in s.items() if k != "name"}) for s in specs]
        # whatever the pipeline does, the output has the configured size
        transforms.append(A.Resize(size, size))
        self.pipeline = A.Compose(transforms, seed=0)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        if rng is not None:
            self.pipeline.set_random_seed(int(rng.integers(0, 2**31 - 1)))
        return self.pipeline(image=image)["image"]

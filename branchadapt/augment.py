"""Augmentations declared in the experiment file and built with albumentations.

``augment = [{name = "HorizontalFlip", p = 0.5}, {name = "Affine", translate_px = [-2, 2]}]``: each
table names an albumentations transform and gives its constructor arguments. Data sources validate
the list with :func:`check_augment` (every transform is built once, so a typo fails before any
training starts) and apply it with :class:`Augmenter`, whose randomness comes from the caller's RNG.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

import albumentations as A
import numpy as np
from pydantic import ValidationError

from .errors import UserError, not_options

__all__ = ["Augmenter", "build_transform", "check_augment"]


def _transform_names() -> list[str]:
    return sorted(
        n for n in dir(A) if not n.startswith("_") and isinstance(getattr(A, n), type) and n[0].isupper()
    )


def build_transform(name: str, params: dict[str, Any]) -> A.BasicTransform:
    """One albumentations transform by class name; a clear ``ValueError`` on a bad name or argument."""
    cls = getattr(A, name, None)
    if not isinstance(cls, type) or not issubclass(cls, A.BasicTransform | A.BaseCompose):
        close = difflib.get_close_matches(name, _transform_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{name!r} is not an albumentations transform{hint}")
    call = f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transform = cls(**params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{call}: {_one_line(exc)}") from exc
    for warning in caught:  # albumentations only warns about an argument it does not know
        if "not valid for transform" in str(warning.message):
            raise ValueError(f"{call}: {warning.message}")
    return transform


def _one_line(exc: BaseException) -> str:
    """An albumentations argument error in one line: its pydantic errors as ``arg: problem``
    (albumentations re-raises them as a plain ValueError, the ValidationError as its cause)."""
    cause = exc if isinstance(exc, ValidationError) else exc.__cause__
    if isinstance(cause, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in cause.errors())
    return str(exc)


def _split(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return str(spec["name"]), {k: v for k, v in spec.items() if k != "name"}


def check_augment(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate ``[{name=..., **params}]`` by building every transform once; returns ``specs``."""
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(
                f"augment[{i}] needs a 'name' (an albumentations transform, e.g. 'HorizontalFlip')"
            )
        try:
            build_transform(*_split(spec))
        except ValueError as exc:
            raise ValueError(f"augment[{i}]: {exc}") from exc
    return specs


class Augmenter:
    """A seeded albumentations pipeline that always returns ``size`` x ``size`` images.

    ``augmenter(image, rng)`` draws the pipeline's seed from ``rng``, so the same item RNG gives
    the same augmentation (reproducible batches and bit-identical resume).
    """

    def __init__(self, specs: list[dict[str, Any]], size: int, key: str = "data.augment") -> None:
        self.key = key
        transforms = [build_transform(*_split(s)) for s in specs]
        transforms.append(A.Resize(size, size))  # whatever the pipeline does, the output has this size
        self.pipeline = A.Compose(transforms, seed=0)

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator | None, item: str = "an item"
    ) -> np.ndarray:
        """Augment a uint8 H x W x C image; a transform that cannot take it (a crop larger than
        the image, say) is a :class:`UserError` naming ``item`` (its file, where it has one)."""
        if rng is not None:
            self.pipeline.set_random_seed(int(rng.integers(0, 2**31 - 1)))
        try:
            return self.pipeline(image=image)["image"]
        except Exception as exc:
            if not_options(exc):  # out of memory: not the transforms' fault
                raise
            shape = "x".join(str(n) for n in image.shape[:2])
            said = " ".join(_one_line(exc).split())  # OpenCV's messages span lines
            raise UserError(
                f"{item}: {self.key} cannot augment this {shape} image: {type(exc).__name__}: "
                f"{said}; the transforms must fit every training image (resize before a crop)"
            ) from exc

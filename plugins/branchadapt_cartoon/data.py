"""Photo and cartoon images per group: a user's folders, or the embedded toonfaces set.

Folder layout (``root``), one sub-folder per group::

    ROOT/train/photo/<group>/*.png|jpg     ROOT/train/cartoon/<group>/*.png|jpg
    ROOT/test/photo/<group>/               ROOT/test/cartoon/<group>/   (optional, paired by order)

photo2cartoon's layout is accepted too: ``ROOT/trainA/<group>/`` (photos), ``trainB`` (cartoons),
``testA``/``testB``. Faces are expected aligned and background-removed (white background), as
photo2cartoon's own pre-processing leaves them; RGBA images are composited on white. An alignment
step can be plugged in with ``preprocess = ["my_module:align"]`` (a function RGB uint8 -> RGB uint8
applied to every decoded photo; one that raises, or returns anything but an H x W x 3 uint8 array, is
a user error naming it and the photo). With no ``root``, the embedded toonfaces data set is
generated (deterministically, once) into the cache folder and used. Which files are images, and
decoding them: ``images``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from branchadapt import DataSource, PluginOptions, UserError
from branchadapt.augment import Augmenter, check_augment
from branchadapt.plugins import import_beside, raised_at

from .augment import paper_augment
from .images import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from .images import check_headers, list_images, read_rgb

STREAMS = ("photo", "cartoon")
FOLDERS = {
    "streams": {("train", "photo"): "train/photo", ("train", "cartoon"): "train/cartoon",
                ("test", "photo"): "test/photo", ("test", "cartoon"): "test/cartoon"},
    "trainAB": {("train", "photo"): "trainA", ("train", "cartoon"): "trainB",
                ("test", "photo"): "testA", ("test", "cartoon"): "testB"},
}  # fmt: skip


class ToonfacesOptions(PluginOptions):
    seed: int = Field(0, ge=0, description="seed of the generated data set")
    counts: dict[str, tuple[int, int]] | None = Field(
        None,
        description="train (photos, cartoons) per group; default: the paper's 1000/200, 75/15, 50/10, 50/10",
    )
    test_per_group: int = Field(100, ge=1, description="paired test photos/cartoons per group")
    cache: Path | None = Field(
        None, description="cache folder (default $BRANCHADAPT_CACHE or ~/.cache/branchadapt)"
    )


class FaceImagesOptions(PluginOptions):
    root: Path | None = Field(None, description="data folder (see layout); none: the embedded toonfaces set")
    layout: Literal["auto", "streams", "trainAB"] = Field("auto", description="folder layout of root")
    size: int = Field(256, ge=16, description="image size the networks see")
    load_size: int | None = Field(
        None, description="resize before the random crop; default size + size*30/256"
    )
    augment: list[dict[str, Any]] | None = Field(
        None, description="albumentations transforms [{name=..., args...}]; default: flip, resize, crop"
    )
    preprocess: list[str] = Field(
        default_factory=list, description="'module:function' photo hooks (alignment)"
    )
    cache_decoded: bool = Field(True, description="keep decoded images in memory")
    toonfaces: ToonfacesOptions = Field(default_factory=ToonfacesOptions)

    @field_validator("augment")
    @classmethod
    def _augment(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        return None if value is None else check_augment(value)

    @field_validator("preprocess")
    @classmethod
    def _hooks(cls, value: list[str]) -> list[str]:
        for item in value:
            if ":" not in item:
                raise ValueError(f"{item!r}: expected 'module:function'")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> FaceImagesOptions:
        if self.load_size is not None and self.load_size < self.size:
            raise ValueError(f"load_size ({self.load_size}) must be >= size ({self.size})")
        return self

    def effective_load_size(self) -> int:
        return self.load_size or self.size + round(self.size * 30 / 256)


def cache_dir(explicit: Path | None = None) -> Path:
    """Where generated data is kept: the option, $BRANCHADAPT_CACHE, or ~/.cache/branchadapt."""
    if explicit is not None:
        return explicit
    env = os.environ.get("BRANCHADAPT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "branchadapt"


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [-1, 1] (the networks' range)."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """float CHW in [-1, 1] -> uint8 HWC RGB."""
    return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def detect_layout(root: Path) -> str:
    if (root / "trainA").is_dir() or (root / "testA").is_dir():
        return "trainAB"
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "streams"
    raise UserError(
        f"{root}: no data folders found; expected ROOT/train/photo/<group>/ and ROOT/train/cartoon/<group>/ "
        "(or photo2cartoon's ROOT/trainA/<group>/ and ROOT/trainB/<group>/)"
    )


def load_hook(spec: str, base_dir: Path | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The function ``spec`` ("module:function") names, its module imported from ``base_dir`` (the
    experiment file's folder) or ``sys.path``, as local plugin modules are."""
    module_name, _, attr = spec.partition(":")
    module = import_beside(module_name, base_dir, "data.preprocess")
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(
            f"data.preprocess: {spec!r}: module {module_name!r} ({module.__file__}) has no {attr!r}"
        )
    if not callable(fn):
        raise UserError(f"data.preprocess: {spec!r} is not callable")
    return fn


def load_hooks(specs: Sequence[str], base_dir: Path | None) -> list[PreprocessHook]:
    """The ``data.preprocess`` hooks, each checked as it runs."""
    return [PreprocessHook(spec, load_hook(spec, base_dir)) for spec in specs]


class PreprocessHook:
    """A photo hook called as ``hook(rgb, path)``: one that raises, or returns anything but an
    H x W x 3 uint8 array, is a user error naming the hook and the photo. A float array is refused
    too, not converted: the augmentations and ``to_tensor`` take 0-255 values, and a float image
    may as well hold 0-1 ones (an all but black photo, trained on without a word). A class, not a
    closure, so that a source with hooks still pickles (data workers under ``spawn``)."""

    def __init__(self, spec: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.spec, self.fn = spec, fn

    def __call__(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        try:
            out = self.fn(rgb)
        except Exception as exc:
            raise UserError(
                f"data.preprocess {self.spec!r} failed on {path}: {type(exc).__name__}: {exc} "
                f"(at {raised_at(exc)})"
            ) from exc
        if isinstance(out, np.ndarray):
            if out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.size:
                return out
            got = f"a {out.shape} {out.dtype} array"
        else:
            kind = type(out)
            got = "None" if out is None else f"a {kind.__qualname__}"
            got += "" if out is None or kind.__module__ == "builtins" else f" ({kind.__module__})"
        raise UserError(
            f"data.preprocess {self.spec!r} returned {got} for {path}; expected an H x W x 3 uint8 "
            "array (RGB, values 0-255)"
        )


class FaceImages(DataSource):
    """Unpaired photos and cartoons per group for training; paired ones for testing."""

    Options = FaceImagesOptions
    options: FaceImagesOptions

    def __init__(
        self, options: FaceImagesOptions | None, groups: Sequence[str], base_dir: Path, split: str = "train"
    ) -> None:
        super().__init__(options, groups, base_dir, split)
        opts = self.options
        self.root = self._root()
        layout = detect_layout(self.root) if opts.layout == "auto" else opts.layout
        self.files: dict[str, dict[str, list[Path]]] = {}
        for group in self.groups:
            self.files[group] = {}
            for stream in STREAMS:
                folder = self.root / FOLDERS[layout][(split, stream)] / group
                if folder.is_dir():
                    self.files[group][stream] = check_headers(list_images(folder))
                elif split == "train":
                    raise UserError(
                        f"data: no folder {folder} for group {group!r}; expected one sub-folder per group "
                        f"under {folder.parent} (groups in the experiment: {list(self.groups)})"
                    )
                else:
                    self.files[group][stream] = []
        self.hooks = load_hooks(opts.preprocess, self.base_dir)
        self.augment = Augmenter(
            opts.augment or paper_augment(opts.size, opts.effective_load_size()), opts.size
        )
        self._decoded: dict[Path, np.ndarray] = {}

    def _root(self) -> Path:
        opts = self.options
        if opts.root is not None:
            root = opts.root if opts.root.is_absolute() else self.base_dir / opts.root
            if not root.is_dir():
                raise UserError(
                    f"data.root: {root} is not a folder; expected a data folder (see the docs' layout)"
                )
            return root
        from branchadapt_toonfaces import DEFAULT_TRAIN_COUNTS, GROUPS, ToonFaces

        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown:
            raise UserError(
                f"groups {unknown} are not toonfaces groups {list(GROUPS)}; set data.root to use your own data"
            )
        t = opts.toonfaces
        counts = t.counts or DEFAULT_TRAIN_COUNTS
        counts = {g: counts[g] for g in self.groups if g in counts}
        data = ToonFaces(cache_dir(t.cache) / "toonfaces", opts.size, t.seed, counts, t.test_per_group)
        return data.ensure()

    def sizes(self) -> dict[str, dict[str, int]]:
        return {g: {s: len(files) for s, files in streams.items()} for g, streams in self.files.items()}

    def describe(self, group: str, stream: str, index: int) -> str:
        return str(self.files[group][stream][index])

    def image(self, group: str, stream: str, index: int) -> np.ndarray:
        """The decoded (and pre-processed) RGB image, before augmentation."""
        path = self.files[group][stream][index]
        cached = self._decoded.get(path)
        if cached is not None:
            return cached
        rgb = read_rgb(path)
        if int(rgb.min()) == int(rgb.max()):  # instance norms would amplify its gradients to inf
            raise UserError(
                f"{path}: the image is one flat colour ({int(rgb.min())} everywhere), nothing to learn "
                "from, and it makes training diverge; remove it"
            )
        if stream == "photo":
            for hook in self.hooks:
                rgb = hook(rgb, path)
        if self.options.cache_decoded:
            self._decoded[path] = rgb
        return rgb

    def get(self, group: str, stream: str, index: int, rng: np.random.Generator | None) -> dict[str, Any]:
        rgb = self.image(group, stream, index)
        if self.split == "train" and self.training:
            rgb = self.augment(rgb, rng, item=self.describe(group, stream, index))
        elif rgb.shape[:2] != (self.options.size, self.options.size):
            rgb = cv2.resize(rgb, (self.options.size, self.options.size), interpolation=cv2.INTER_AREA)
        return {"image": to_tensor(rgb), "index": index}

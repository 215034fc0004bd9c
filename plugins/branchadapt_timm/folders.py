"""``image_folders``: your own labelled images, one folder per split, group and class.

``root/<split>/<group>/<class>/<image>`` (``split`` is ``train`` or ``test``)::

    root/train/clean/cat/0001.png      root/test/clean/cat/0100.png
    root/train/clean/dog/0002.jpg      ...
    root/train/night/cat/0001.png      (5 images per class: a few-shot group)

Every group shares one list of classes (``classes``, default: every class folder name found under
the train split, sorted); the label of an image is its class's position in that list, so the
model's ``num_classes`` must be its length. A few-shot group may lack some classes. One stream
``train`` per group with fields ``image`` (``(3, size, size)`` float in [-1, 1]) and ``label``, as
the ``classify`` task reads them. Images are resized to ``size`` x ``size``; the train split is
augmented with ``augment`` (albumentations), the test split never.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from pydantic import Field, field_validator

from branchadapt import DataSource, PluginOptions, UserError
from branchadapt.augment import Augmenter, check_augment

#: file names read as images (case-insensitive); anything else in a class folder is an error
SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


class ImageFoldersOptions(PluginOptions):
    root: Path = Field(description="folder holding train/<group>/<class>/ and test/<group>/<class>/")
    size: int = Field(64, ge=8, le=1024, description="image side in pixels the networks see")
    classes: list[str] | None = Field(
        None,
        min_length=1,
        description="class names in label order; default: the train split's class folders, sorted",
    )
    augment: list[dict[str, Any]] = Field(
        default_factory=list,
        description="albumentations transforms for the train split: [{name = ..., **arguments}]",
    )
    cache_decoded: bool = Field(True, description="keep decoded, resized images in memory")

    @field_validator("augment")
    @classmethod
    def _buildable(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return check_augment(value)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        twice = sorted({c for c in value or [] if (value or []).count(c) > 1})
        if twice:
            raise ValueError(f"class names must be distinct (each is one label); repeated: {twice}")
        return value


def _folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolders(DataSource):
    """Labelled images from ``root/<split>/<group>/<class>/``; one stream ``train`` per group with
    fields ``image`` and ``label``."""

    Options = ImageFoldersOptions
    options: ImageFoldersOptions

    def __init__(
        self, options: ImageFoldersOptions | None, groups: Sequence[str], base_dir: Path, split: str = "train"
    ) -> None:
        super().__init__(options, groups, base_dir, split)
        o = self.options
        self.classes = list(o.classes) if o.classes is not None else self._found_classes()
        self.items = {g: self._list(g) for g in self.groups}
        if split == "train" and (o.root / "test").exists():  # its mistakes now, not after the training
            type(self)(o, groups, base_dir, "test")
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        self.augment = Augmenter(o.augment, o.size) if o.augment and split == "train" else None

    def _folder(self, split: str, group: str | None = None) -> Path:
        path = self.options.root / split if group is None else self.options.root / split / group
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise UserError(
                f"data.root: {path} {what}; expected {self.options.root}/<split>/<group>/<class>/<image> "
                f"with splits train and test and groups {list(self.groups)}"
            )
        return path

    def _found_classes(self) -> list[str]:
        names = sorted({c.name for g in self.groups for c in _folders(self._folder("train", g))})
        if not names:
            raise UserError(f"data.root: no class folders under {self._folder('train')}/<group>/")
        return names

    def _list(self, group: str) -> list[tuple[Path, int]]:
        folder = self._folder(self.split, group)
        loose = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if loose:
            raise UserError(
                f"{folder / loose[0]}: a file directly in the group's folder; expected it in a class "
                f"folder, {folder}/<class>/{loose[0]}"
            )
        items: list[tuple[Path, int]] = []
        for class_dir in _folders(folder):
            if class_dir.name not in self.classes:
                raise UserError(
                    f"{class_dir}: class {class_dir.name!r} is not one of data.classes {self.classes}; "
                    "add it there (the model's num_classes with it) or remove the folder"
                )
            files = sorted(p for p in class_dir.iterdir() if not p.name.startswith("."))
            for path in files:
                if path.is_dir():
                    raise UserError(
                        f"{path}: a folder inside a class folder; expected the class's images only"
                    )
                if path.suffix.lower() not in SUFFIXES:
                    raise UserError(f"{path}: not an image file; expected one of {', '.join(SUFFIXES)}")
                items.append((path, self.classes.index(class_dir.name)))
        if not items:
            raise UserError(f"{folder}: no images in its class folders (<class>/<image>)")
        return items

    def sizes(self) -> dict[str, dict[str, int]]:
        return {g: {"train": len(self.items[g])} for g in self.groups}

    def describe(self, group: str, stream: str, index: int) -> str:
        return str(self.items[group][index][0])

    def image(self, group: str, index: int) -> np.ndarray:
        """Item ``index`` of ``group``: RGB uint8 (size, size, 3), before augmentation."""
        key = (group, index)
        if key in self._cache:
            return self._cache[key]
        path = self.items[group][index][0]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # grey, alpha and 16-bit images as 8-bit BGR
        if bgr is None:
            what = (
                "it does not exist any more" if not path.exists() else "corrupt, or not an image OpenCV reads"
            )
            raise UserError(f"{path}: cannot read the image ({what})")
        size = self.options.size
        rgb = cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        if self.options.cache_decoded:
            self._cache[key] = rgb
        return rgb

    def get(self, group: str, stream: str, index: int, rng: np.random.Generator | None) -> dict[str, Any]:
        rgb = self.image(group, index)
        if self.augment is not None and self.training:
            rgb = self.augment(rgb, rng, self.describe(group, stream, index))
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1
        return {"image": image, "label": self.items[group][index][1]}

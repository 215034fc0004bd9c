"""Photo and cartoon images per group: a user's folders, or the embedded toonfaces set.

Folder layout (``root``), one sub-folder per group::

    ROOT/train/photo/<group>/*.png|jpg     ROOT/train/cartoon/<group>/*.png|jpg
    ROOT/test/photo/<group>/               ROOT/test/cartoon/<group>/   (optional, paired by order)

photo2cartoon's layout is accepted too: ``ROOT/trainA/<group>/`` (photos), ``trainB`` (cartoons),
``testA``/``testB``. Faces are expected aligned and background-removed (white background), as
photo2cartoon's own pre-processing leaves them; RGBA images are composited on white. An alignment
step can be plugged in with ``preprocess = ["my_module:align"]`` (a function RGB uint8 -> RGB uint8
applied to every decoded photo). With no ``root``, the embedded toonfaces data set is generated
(deterministically, once) into the cache folder and used.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator, model_validator

from branchadapt import DataSource, PluginOptions, UserError
from branchadapt.augment import Augmenter, check_augment
from branchadapt.plugins import import_beside

from .augment import paper_augment

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
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


# EXIF orientation (tag 0x0112) -> the array operation that shows the stored pixels upright
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


#: where Pillow finds an orientation: EXIF (PNG ``eXIf``, WebP ``EXIF``, the ``Exif`` header), a
#: PNG text chunk of raw EXIF, XMP (PNG ``XML:com.adobe.xmp``, WebP ``XMP ``)
_ORIENTATION_MARKERS = (b"eXIf", b"EXIF", b"Exif", b"Raw profile type exif", b"XML:com.adobe.xmp", b"XMP ")


def exif_orientation(data: np.ndarray) -> int:
    """The EXIF orientation of an encoded image (1, upright, when it has none or Pillow cannot
    read its header). Pillow reads a PNG's EXIF by decoding the whole image, so a file without a
    marker of any place Pillow takes the orientation from is not opened at all."""
    raw = data.tobytes()
    if not any(marker in raw for marker in _ORIENTATION_MARKERS):
        return 1
    try:
        with Image.open(io.BytesIO(raw)) as im:
            value = im.getexif().get(0x0112, 1)
    except Exception:  # OpenCV decodes formats Pillow may not know: no tag then
        return 1
    return value if isinstance(value, int) else 1


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image as RGB uint8; RGBA is composited on white, and an image with an EXIF
    orientation (phone photos; JPEG, PNG, WebP, TIFF) turned upright as viewers show it; a clear
    error if unreadable."""
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise UserError(f"{path}: image file not found")
    # OpenCV turns a JPEG (read without alpha, 8 bits) and a TIFF upright itself; other formats are
    # decoded with IMREAD_UNCHANGED, which keeps alpha and 16-bit depth but ignores the orientation
    jpeg = data[:2].tobytes() == b"\xff\xd8"
    oriented = jpeg or data[:4].tobytes() in (b"II*\x00", b"MM\x00*")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR if jpeg else cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise UserError(
            f"{path}: cannot decode the image (corrupt or not an image); expected "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    upright = None if oriented else _UPRIGHT.get(exif_orientation(data))
    if upright is not None:
        img = np.ascontiguousarray(upright(img))
    if img.dtype != np.uint8:
        img = (img / (256 if img.dtype == np.uint16 else 1)).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        rgb = img[:, :, 2::-1].astype(np.float32)
        return np.clip(rgb * alpha + 255.0 * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img[:, :, ::-1])


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [-1, 1] (the networks' range)."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """float CHW in [-1, 1] -> uint8 HWC RGB."""
    return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def list_images(folder: Path) -> list[Path]:
    """The images directly in ``folder``, by name; hidden files (``.name``, such as macOS's
    ``._photo.jpg`` metadata) are not images of the data."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


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
    return fn  # type: ignore[no-any-return]


def check_headers(files: list[Path]) -> list[Path]:
    """``files``, once OpenCV recognises each one's header (a few bytes each, so every image of a
    large group too): a corrupt or mislabelled file stops the run before its first step, not when
    a step first samples it; a file that is damaged further in fails when decoded (``branchadapt
    validate --data`` decodes them all)."""
    bad = [p for p in files if not cv2.haveImageReader(str(p))]
    if bad:
        more = f" (and {len(bad) - 1} more in {bad[0].parent})" if len(bad) > 1 else ""
        raise UserError(
            f"{bad[0]}: not an image OpenCV can read (corrupt or another format){more}; expected one of "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    return files


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
        self.hooks = [load_hook(s, self.base_dir) for s in opts.preprocess]
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
                rgb = hook(rgb)
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

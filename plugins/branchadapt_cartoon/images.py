"""Reading the images of a data folder: which files are images, their headers, decoding them.

Every message about a file names it, what is wrong and what is expected; the accepted formats are
named alike everywhere, from one list (``IMAGE_FORMATS``). A missing image (a symbolic link whose
target is gone) is an error, not left out; samples other than 8- or 16-bit unsigned integers (a
float TIFF) are refused by their format rather than turned into a wrong image.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from branchadapt import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
#: the accepted image files as every message names them: one list, from ``IMAGE_SUFFIXES``
IMAGE_FORMATS = ", ".join(sorted(IMAGE_SUFFIXES))
EXPECTED_IMAGE = f"expected an image file, one of {IMAGE_FORMATS}"


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
    if not path.is_file():
        raise UserError(missing_image(path))
    data = np.fromfile(str(path), dtype=np.uint8)
    if not data.size:
        raise UserError(f"{path}: empty file (0 bytes); {EXPECTED_IMAGE}")
    # OpenCV turns a JPEG (read without alpha, 8 bits) and a TIFF upright itself; other formats are
    # decoded with IMREAD_UNCHANGED, which keeps alpha and 16-bit depth but ignores the orientation
    jpeg = data[:2].tobytes() == b"\xff\xd8"
    oriented = jpeg or data[:4].tobytes() in (b"II*\x00", b"MM\x00*")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR if jpeg else cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"{path}: cannot decode the image (corrupt or not an image); {EXPECTED_IMAGE}")
    check_sample_format(path, img.dtype)
    upright = None if oriented else _UPRIGHT.get(exif_orientation(data))
    if upright is not None:
        img = np.ascontiguousarray(upright(img))
    if img.dtype == np.uint16:
        img = (img / 256).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        rgb = img[:, :, 2::-1].astype(np.float32)
        return np.clip(rgb * alpha + 255.0 * (1 - alpha) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img[:, :, ::-1])


def check_sample_format(path: Path, dtype: np.dtype) -> None:
    """Refuse samples other than 8- or 16-bit unsigned integers (a float TIFF, say): their range is
    not 0-255 or 0-65535 (floats are mostly 0-1), so a conversion would guess, and truncating them
    made a float image look like one flat colour."""
    if dtype in (np.uint8, np.uint16):
        return
    kind = {"f": "floating-point", "i": "signed integer", "u": "unsigned integer"}.get(dtype.kind, dtype.kind)
    raise UserError(
        f"{path}: the image has a {dtype.itemsize * 8}-bit {kind} sample format ({dtype}), which is not "
        "supported; expected an image with 8- or 16-bit unsigned integer samples (save it as 8-bit)"
    )


def list_images(folder: Path) -> list[Path]:
    """The images directly in ``folder``, by name; hidden files (``.name``, such as macOS's
    ``._photo.jpg`` metadata) are not images of the data. A symbolic link whose target is missing
    is a missing image, an error: left out, it would shift the pairing of the test split (by
    sorted order) and shrink a group without a word."""
    images, dangling = [], []
    for p in folder.iterdir():
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        if p.is_file():
            images.append(p)
        elif p.is_symlink() and not p.exists():  # a link to a folder is no image, as a folder is not
            dangling.append(p)
    if dangling:
        dangling.sort()
        raise UserError(
            f"{missing_image(dangling[0])}{and_more(dangling)}; restore its target or remove the link"
        )
    return sorted(images)


def missing_image(path: Path) -> str:
    """The message for an image that is not there; a symbolic link names where it points."""
    if not path.is_symlink():
        return f"{path}: image not found"
    target = os.readlink(path)
    where = target if os.path.isabs(target) else f"{target} ({os.path.normpath(path.parent / target)})"
    return f"{path}: image not found: a symbolic link to {where}, which does not exist"


def and_more(paths: list[Path]) -> str:
    """`` (and N more in FOLDER)`` when a message names the first of several ``paths``."""
    return f" (and {len(paths) - 1} more in {paths[0].parent})" if len(paths) > 1 else ""


def check_headers(files: list[Path]) -> list[Path]:
    """``files``, once OpenCV recognises each one's header (a few bytes each, so every image of a
    large group too): a corrupt or mislabelled file stops the run before its first step, not when
    a step first samples it; a file that is damaged further in fails when decoded (``branchadapt
    validate --data`` decodes them all)."""
    bad = [p for p in files if not cv2.haveImageReader(str(p))]
    if bad:
        first = bad[0]
        if not first.is_file():
            problem = missing_image(first).removeprefix(f"{first}: ")
        elif first.stat().st_size == 0:
            problem = "empty file (0 bytes)"
        else:
            problem = "not an image OpenCV can read (corrupt or another format)"
        raise UserError(f"{first}: {problem}{and_more(bad)}; {EXPECTED_IMAGE}")
    return files

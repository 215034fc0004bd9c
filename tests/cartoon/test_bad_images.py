"""Bad images and bad photo hooks: one clear user error naming the file, never a traceback."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import branchadapt as ba
from branchadapt_cartoon.data import IMAGE_SUFFIXES, FaceImages, FaceImagesOptions, list_images, read_rgb

GROUPS = ("a", "b")
FORMATS = ", ".join(sorted(IMAGE_SUFFIXES))  # how every message names the accepted formats
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cartoon_cpu.toml"

HOOKS = """\
import numpy as np

def bad_shape(rgb):
    return rgb[:, :, 0]

def as_float(rgb):
    return rgb.astype(np.float32) / 255

def nothing(rgb):
    pass

def four_channels(rgb):
    return np.concatenate([rgb, rgb[:, :, :1]], axis=2)

def boom(rgb):
    raise ValueError("no face found")

def good(rgb):
    return rgb[:, ::-1]

def as_list(rgb):
    return rgb.tolist()
"""


def make_folder(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for g in GROUPS:
        for d in ("train/photo", "train/cartoon", "test/photo", "test/cartoon"):
            (root / d / g).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(root / d / g / f"{i}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return root


def source(tmp_path: Path, split: str = "train", **options) -> FaceImages:
    return FaceImages(FaceImagesOptions(root=tmp_path / "data", size=32, **options), GROUPS, tmp_path, split)


def experiment(tmp_path: Path, extra: str = "") -> Path:
    """A cartoon experiment on the data folder ``tmp_path/data`` (groups a and b)."""
    exp = tmp_path / "x.toml"
    exp.write_text(
        f'extends = "{EXAMPLE.as_posix()}"\ngroups = ["a", "b"]\nanchor = "a"\n[data]\nroot = "data"\n'
        f'{extra}[stages.basic]\ngroups = ["a"]\n'
    )
    return exp


# --- 1. data.preprocess hooks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook", "returned"),
    [
        ("bad_shape", "a (40, 40) uint8 array"),
        ("four_channels", "a (40, 40, 4) uint8 array"),
        # refused, not taken silently: 0..1 floats would become an all but black image
        ("as_float", "a (40, 40, 3) float32 array"),
        ("nothing", "None"),
        ("as_list", "a list"),
    ],
)
def test_a_hook_returning_the_wrong_thing_is_named_with_what_it_returned(tmp_path, hook, returned):
    make_folder(tmp_path / "data")
    (tmp_path / "hooks_wrong.py").write_text(HOOKS)
    src = source(tmp_path, preprocess=[f"hooks_wrong:{hook}"])
    photo = tmp_path / "data" / "train" / "photo" / "a" / "0.png"
    with pytest.raises(ba.UserError) as info:
        src.get("a", "photo", 0, np.random.default_rng(0))
    assert str(info.value).startswith(
        f"data.preprocess 'hooks_wrong:{hook}' returned {returned} for {photo}; "
        "expected an H x W x 3 uint8 array"
    ), str(info.value)


def test_a_hook_that_raises_is_named_with_the_photo_and_its_error(tmp_path):
    make_folder(tmp_path / "data")
    (tmp_path / "hooks_raise.py").write_text(HOOKS)
    src = source(tmp_path, preprocess=["hooks_raise:good", "hooks_raise:boom"])
    photo = tmp_path / "data" / "train" / "photo" / "b" / "2.png"
    with pytest.raises(ba.UserError) as info:
        src.get("b", "photo", 2, np.random.default_rng(0))
    assert str(info.value).startswith(
        f"data.preprocess 'hooks_raise:boom' failed on {photo}: ValueError: no face found"
    ), str(info.value)
    assert "hooks_raise.py:16" in str(info.value)  # where the hook raised


def test_a_good_hook_still_runs_on_photos_only(tmp_path):
    make_folder(tmp_path / "data")
    (tmp_path / "hooks_good.py").write_text(HOOKS)
    src = source(tmp_path, preprocess=["hooks_good:good"])
    photo = read_rgb(tmp_path / "data" / "train" / "photo" / "a" / "1.png")
    cartoon = read_rgb(tmp_path / "data" / "train" / "cartoon" / "a" / "1.png")
    assert np.array_equal(src.image("a", "photo", 1), photo[:, ::-1])
    assert np.array_equal(src.image("a", "cartoon", 1), cartoon)
    copy = pickle.loads(pickle.dumps(src))  # as data workers started with "spawn" receive it
    assert np.array_equal(copy.image("a", "photo", 1), photo[:, ::-1])


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        ("bad_shape", "'hooks_cli:bad_shape' returned a (40, 40) uint8 array for "),
        ("boom", "'hooks_cli:boom' failed on "),
    ],
)
def test_a_bad_hook_is_a_clean_cli_error(tmp_path, run_cli, hook, expected):
    make_folder(tmp_path / "data")
    (tmp_path / "hooks_cli.py").write_text(HOOKS)
    exp = experiment(tmp_path, f'preprocess = ["hooks_cli:{hook}"]\n')
    out = run_cli("validate", str(exp), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: data.preprocess {expected}"), out.stderr
    assert "Traceback" not in out.stderr, out.stderr


# --- 2. dangling symbolic links ------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_dangling_symlink_is_a_missing_image_not_left_out(tmp_path, split):
    root = make_folder(tmp_path / "data")
    link = root / split / "photo" / "a" / "1b.png"  # sorts between 1.png and 2.png: pairs would shift
    target = tmp_path / "elsewhere" / "moved.png"
    link.symlink_to(target)
    with pytest.raises(ba.UserError) as info:
        source(tmp_path, split)
    message = str(info.value)
    assert message.startswith(f"{link}: image not found: a symbolic link to {target}, which does not exist")
    with pytest.raises(ba.UserError, match=r"1b\.png: image not found"):
        list_images(link.parent)
    link.unlink()
    assert source(tmp_path, split).sizes()["a"]["photo"] == 3


def test_a_relative_dangling_symlink_names_where_it_points(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), np.zeros((4, 4, 3), np.uint8))
    (folder / "1.png").symlink_to("../gone/1.png")
    (folder / "2.jpg").symlink_to("2.jpg")  # a link to itself: a loop, no image either
    with pytest.raises(ba.UserError) as info:
        list_images(folder)
    assert str(info.value).startswith(
        f"{folder / '1.png'}: image not found: a symbolic link to ../gone/1.png "
        f"({tmp_path / 'gone' / '1.png'}), which does not exist (and 1 more in {folder})"
    ), str(info.value)


def test_a_symlink_to_an_image_is_read_and_a_link_to_a_folder_is_no_image(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(tmp_path / "real.png"), np.zeros((4, 4, 3), np.uint8))
    (folder / "0.png").symlink_to(tmp_path / "real.png")
    (tmp_path / "dir.png").mkdir()
    (folder / "1.png").symlink_to(tmp_path / "dir.png")
    (folder / "2.png").mkdir()
    assert list_images(folder) == [folder / "0.png"]
    assert read_rgb(folder / "0.png").shape == (4, 4, 3)


def test_read_rgb_names_a_link_whose_target_went_missing(tmp_path):
    link = tmp_path / "x.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(ba.UserError, match=r"x\.png: image not found: a symbolic link to .*gone\.png"):
        read_rgb(link)
    with pytest.raises(ba.UserError, match=r"y\.png: image not found$"):
        read_rgb(tmp_path / "y.png")


def test_a_dangling_symlink_is_a_clean_cli_error(tmp_path, run_cli):
    root = make_folder(tmp_path / "data")
    link = root / "test" / "cartoon" / "b" / "0.png"
    link.unlink()
    link.symlink_to(tmp_path / "gone.png")
    out = run_cli("validate", str(experiment(tmp_path)), "--data", "test", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert f"{link}: image not found: a symbolic link to {tmp_path / 'gone.png'}" in out.stderr
    assert "Traceback" not in out.stderr


# --- 3. empty and non-image files: the accepted formats, named alike ------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty file (0 bytes)"),
        (b"hello, not an image", "not an image OpenCV can read (corrupt or another format)"),
    ],
)
def test_empty_and_non_image_files_name_the_accepted_formats(tmp_path, content, problem):
    root = make_folder(tmp_path / "data")
    bad = root / "train" / "cartoon" / "b" / "1.jpg"
    bad.write_bytes(content)
    with pytest.raises(ba.UserError) as info:
        source(tmp_path)
    assert str(info.value) == f"{bad}: {problem}; expected an image file, one of {FORMATS}"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty file (0 bytes)"),
        (b"\x89PNG\r\n\x1a\n", "cannot decode the image (corrupt or not an image)"),
    ],
)
def test_decoding_an_empty_or_damaged_file_names_the_accepted_formats(tmp_path, content, problem):
    bad = tmp_path / "x.png"
    bad.write_bytes(content)
    with pytest.raises(ba.UserError) as info:
        read_rgb(bad)
    assert str(info.value) == f"{bad}: {problem}; expected an image file, one of {FORMATS}"


# --- 4. sample formats ---------------------------------------------------------------------------


def write_float_tiff_pil(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).random((40, 40), dtype=np.float32)).save(path)


def write_float_tiff_cv2(path: Path) -> None:
    cv2.imwrite(str(path), np.random.default_rng(0).random((40, 40, 3), dtype=np.float32))


def write_int32_tiff(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 2**20, (40, 40), dtype=np.int32)).save(path)


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (write_float_tiff_pil, "a 32-bit floating-point sample format (float32)"),
        (write_float_tiff_cv2, "a 32-bit floating-point sample format (float32)"),
        (write_int32_tiff, "a 32-bit signed integer sample format (int32)"),
    ],
)
def test_an_unsupported_sample_format_is_named_not_taken_for_a_flat_image(tmp_path, write, expected):
    root = make_folder(tmp_path / "data")
    tif = root / "train" / "photo" / "a" / "1.tif"
    write(tif)
    with pytest.raises(ba.UserError) as info:
        read_rgb(tif)
    assert str(info.value) == (
        f"{tif}: the image has {expected}, which is not supported; expected an image with 8- or "
        "16-bit unsigned integer samples (save it as 8-bit)"
    )
    src = source(tmp_path)
    index = src.files["a"]["photo"].index(tif)
    with pytest.raises(ba.UserError, match=r"floating-point|signed integer") as info:
        src.get("a", "photo", index, np.random.default_rng(0))
    assert "flat colour" not in str(info.value)


def test_16_bit_images_are_still_read(tmp_path):
    pixels = (np.arange(48, dtype=np.uint16).reshape(4, 4, 3) * 1000).astype(np.uint16)
    for name in ("x.png", "x.tif"):
        cv2.imwrite(str(tmp_path / name), pixels)
        rgb = read_rgb(tmp_path / name)
        assert rgb.dtype == np.uint8 and np.array_equal(rgb, (pixels[:, :, ::-1] // 256).astype(np.uint8))

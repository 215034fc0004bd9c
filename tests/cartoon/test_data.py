"""User data folders: both layouts, RGBA, determinism, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

import branchadapt as ba
from branchadapt_cartoon.data import FaceImages, FaceImagesOptions, read_rgb

GROUPS = ("a", "b")


def make_folder(root, layout="streams", n=3):
    dirs = {
        "streams": {
            "photo": "train/photo",
            "cartoon": "train/cartoon",
            "tp": "test/photo",
            "tc": "test/cartoon",
        },
        "trainAB": {"photo": "trainA", "cartoon": "trainB", "tp": "testA", "tc": "testB"},
    }[layout]
    rng = np.random.default_rng(0)
    for g in GROUPS:
        for d in dirs.values():
            (root / d / g).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(root / d / g / f"{i}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return root


@pytest.mark.parametrize("layout", ["streams", "trainAB"])
def test_layouts_are_detected_and_items_are_deterministic(tmp_path, layout):
    root = make_folder(tmp_path / "data", layout)
    src = FaceImages(FaceImagesOptions(root=root, size=32), GROUPS, tmp_path, "train")
    assert src.sizes() == {"a": {"photo": 3, "cartoon": 3}, "b": {"photo": 3, "cartoon": 3}}
    x = src.get("b", "photo", 1, np.random.default_rng(7))["image"]
    y = src.get("b", "photo", 1, np.random.default_rng(7))["image"]
    z = src.get("b", "photo", 1, np.random.default_rng(8))["image"]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(x, y) and not np.array_equal(x, z)  # the RNG drives augmentation
    src.eval()  # evaluation mode: the train split's images as they are, resized
    e1, e2 = (src.get("b", "photo", 1, np.random.default_rng(s))["image"] for s in (7, 8))
    assert np.array_equal(e1, e2) and not np.array_equal(e1, x)
    test = FaceImages(FaceImagesOptions(root=root, size=32), GROUPS, tmp_path, "test")
    t1 = test.get("a", "cartoon", 0, None)["image"]
    assert np.array_equal(
        t1, test.get("a", "cartoon", 0, np.random.default_rng(3))["image"]
    )  # no augmentation


def test_rgba_is_composited_on_white(tmp_path):
    img = np.zeros((8, 8, 4), np.uint8)
    img[:4, :, :3] = (0, 0, 255)  # BGR red
    img[:4, :, 3] = 255  # opaque top half, transparent bottom
    cv2.imwrite(str(tmp_path / "x.png"), img)
    rgb = read_rgb(tmp_path / "x.png")
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[7, 7]) == (255, 255, 255)


def test_corrupt_and_missing_inputs_name_the_file(tmp_path):
    root = make_folder(tmp_path / "data")
    bad = root / "train" / "photo" / "a" / "1.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")  # caught when the source is built, before any step
    with pytest.raises(ba.UserError, match=r"1\.png: not an image OpenCV can read"):
        FaceImages(FaceImagesOptions(root=root, size=32), GROUPS, tmp_path, "train")
    bad.write_bytes(good[:40])  # a PNG header with its data cut off: caught when decoded
    src = FaceImages(FaceImagesOptions(root=root, size=32), GROUPS, tmp_path, "train")
    with pytest.raises(ba.UserError, match=r"1\.png: cannot decode"):
        src.get("a", "photo", 1, np.random.default_rng(0))
    with pytest.raises(ba.UserError, match="group 'c'"):
        FaceImages(FaceImagesOptions(root=root, size=32), ("a", "c"), tmp_path, "train")
    with pytest.raises(ba.UserError, match="not a folder"):
        FaceImages(FaceImagesOptions(root=tmp_path / "nope"), GROUPS, tmp_path, "train")


def test_augmentations_are_validated_with_their_index():
    with pytest.raises(ValueError, match=r"augment\[1\].*did you mean HorizontalFlip"):
        FaceImagesOptions(augment=[{"name": "Resize", "height": 8, "width": 8}, {"name": "HorizontalFlipp"}])
    with pytest.raises(ValueError, match=r"augment\[0\]: Resize"):
        FaceImagesOptions(augment=[{"name": "Resize", "heigth": 8}])


def test_preprocess_hook_runs_on_photos(tmp_path):
    root = make_folder(tmp_path / "data")
    # beside the experiment file (base_dir), as a local plugin module may be: not on sys.path
    (tmp_path / "myalign_beside.py").write_text("def black(rgb):\n    return rgb * 0\n")
    opts = FaceImagesOptions(root=root, size=32, preprocess=["myalign_beside:black"])
    src = FaceImages(opts, GROUPS, tmp_path, "test")
    assert float(src.get("a", "photo", 0, None)["image"].max()) == -1.0
    assert float(src.get("a", "cartoon", 0, None)["image"].max()) > -1.0  # cartoons untouched


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nosuch_align_mod:f", r"data\.preprocess: plugin module 'nosuch_align_mod' not found"),
        (
            "align_typo:algn",
            r"data\.preprocess: 'align_typo:algn': module 'align_typo' \(.*align_typo\.py\) has no 'algn'",
        ),
        ("align_typo:VALUE", r"data\.preprocess: 'align_typo:VALUE' is not callable"),
    ],
)
def test_a_preprocess_hook_that_cannot_be_loaded_says_why(tmp_path, spec, expected):
    root = make_folder(tmp_path / "data")
    (tmp_path / "align_typo.py").write_text("VALUE = 3\ndef align(rgb):\n    return rgb\n")
    with pytest.raises(ba.UserError, match=expected):
        FaceImages(FaceImagesOptions(root=root, size=32, preprocess=[spec]), GROUPS, tmp_path, "test")


def test_unknown_augment_in_experiment_is_a_clean_cli_error(tmp_path):
    from pathlib import Path

    base = Path(__file__).resolve().parents[2] / "examples" / "cartoon_cpu.toml"
    exp = tmp_path / "x.toml"
    exp.write_text(f'extends = "{base.as_posix()}"\n[data]\naugment = [{{ name = "Flipp" }}]\n')
    out = subprocess.run(
        [sys.executable, "-m", "branchadapt", "validate", str(exp)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "data.augment" in out.stderr and "Flipp" in out.stderr


def test_validate_data_lists_images_damaged_past_their_header(tmp_path):
    from pathlib import Path

    root = make_folder(tmp_path / "data")
    base = Path(__file__).resolve().parents[2] / "examples" / "cartoon_cpu.toml"
    exp = tmp_path / "x.toml"
    exp.write_text(
        f'extends = "{base.as_posix()}"\ngroups = ["a", "b"]\nanchor = "a"\n[data]\nroot = "data"\n'
        '[stages.basic]\ngroups = ["a"]\n'
    )
    damaged = root / "train" / "cartoon" / "b" / "2.png"
    damaged.write_bytes(damaged.read_bytes()[:60])  # the header is fine: building the source passes

    def validate(*args):
        return subprocess.run(
            [sys.executable, "-m", "branchadapt", "validate", str(exp), *args], capture_output=True, text=True
        )

    out = validate("--data", "test,train")
    assert out.returncode == 2, out.stderr
    assert "data (test): 12 items read (a 6, b 6), all usable" in out.stdout
    assert (
        f"data (train): 12 items read (a 6, b 6), 1 cannot be used:\n    {damaged}: cannot decode"
        in out.stdout
    )
    assert "error: 1 data item cannot be used" in out.stderr
    damaged.unlink()
    out = validate("--data")
    assert out.returncode == 0 and "11 items read (a 6, b 5), all usable" in out.stdout


def test_an_image_too_small_for_the_augmentation_is_named_and_listed_by_validate_data(tmp_path):
    from pathlib import Path

    root = make_folder(tmp_path / "data")  # 40 x 40 images
    base = Path(__file__).resolve().parents[2] / "examples" / "cartoon_cpu.toml"
    exp = tmp_path / "x.toml"
    exp.write_text(
        f'extends = "{base.as_posix()}"\ngroups = ["a", "b"]\nanchor = "a"\n'
        '[data]\nroot = "data"\nsize = 32\naugment = [{ name = "RandomCrop", height = 36, width = 36 }]\n'
        "[model]\nimage_size = 32\n[task]\nglobal_layers = 4\nlocal_layers = 3\n"
        '[stages.basic]\ngroups = ["a"]\n'
    )
    small = root / "train" / "photo" / "a" / "0.png"  # the first photo: the check before a run reads it
    cv2.imwrite(str(small), np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8))

    def validate(*args):
        return subprocess.run(
            [sys.executable, "-m", "branchadapt", "validate", str(exp), *args], capture_output=True, text=True
        )

    expected = f"{small}: data.augment cannot augment this 20x24 image: CropSizeError:"
    out = validate()
    assert out.returncode == 2 and out.stderr.startswith(f"error: {expected}"), out.stderr
    out = validate("--data")  # every such item listed, not only the first one the build reads
    assert out.returncode == 2, out.stderr
    assert f"data (train): 12 items read (a 6, b 6), 1 cannot be used:\n    {expected}" in out.stdout
    cv2.imwrite(str(small), np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    out = validate("--data")
    assert out.returncode == 0 and "all usable" in out.stdout and ": OK" in out.stdout, out.stderr


def test_a_jpeg_is_turned_upright_by_its_exif_orientation(tmp_path):
    from PIL import Image, ImageOps

    pixels = np.zeros((40, 60, 3), np.uint8)  # 60 wide, 40 high, red band along the top
    pixels[:5] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg")).convert("RGB"))
    rgb = read_rgb(tmp_path / "phone.jpg")
    assert rgb.shape == shown.shape == (60, 40, 3)  # as a viewer shows it: tall
    assert rgb[:, -5:, 0].mean() > 200 and rgb[:, :5, 0].mean() < 60  # the band now on the right
    assert np.abs(rgb.astype(int) - shown.astype(int)).mean() < 3  # the same image, up to decoding


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_other_formats_are_turned_upright_by_their_exif_orientation(tmp_path, suffix, orientation):
    from PIL import Image, ImageOps

    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # no symmetry to hide a wrong turn
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone{suffix}"
    Image.fromarray(pixels).save(path, exif=exif, **({"lossless": True} if suffix == ".webp" else {}))
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    rgb = read_rgb(path)
    assert rgb.shape == shown.shape
    assert np.array_equal(rgb, shown)  # lossless formats: exactly what a viewer shows


def test_an_image_with_alpha_is_turned_upright_after_compositing(tmp_path):
    from PIL import Image

    pixels = np.zeros((4, 8, 4), np.uint8)  # 8 wide, transparent but for an opaque red top row
    pixels[0] = (255, 0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to display"
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png", exif=exif)
    rgb = read_rgb(tmp_path / "a.png")
    assert rgb.shape == (8, 4, 3)
    assert (rgb[:, 0] == (255, 0, 0)).all() and (rgb[:, 1:] == 255).all()  # the red row now on the left


def test_messages_name_an_item_by_its_file(tmp_path):
    root = make_folder(tmp_path / "data")
    src = FaceImages(FaceImagesOptions(root=root, size=32), GROUPS, tmp_path, "train")
    assert src.describe("b", "cartoon", 2) == str(root / "train" / "cartoon" / "b" / "2.png")


def test_a_flat_colour_image_is_refused_by_name(tmp_path):
    root = make_folder(tmp_path / "data")
    flat = root / "train" / "photo" / "a" / "1.png"
    cv2.imwrite(str(flat), np.full((40, 40, 3), 255, np.uint8))
    src = FaceImages(FaceImagesOptions(root=root, size=32), GROUPS, tmp_path, "train")
    with pytest.raises(ba.UserError, match=r"1\.png: the image is one flat colour \(255 everywhere\)"):
        src.get("a", "photo", 1, np.random.default_rng(0))
    assert src.get("a", "photo", 0, np.random.default_rng(0))["image"].shape == (3, 32, 32)


def test_an_image_without_exif_is_not_opened_twice(tmp_path, monkeypatch):
    import branchadapt_cartoon.images as images

    cv2.imwrite(str(tmp_path / "plain.png"), np.full((8, 8, 3), 7, np.uint8))
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: pytest.fail("Pillow decoded it a second time"))
    assert read_rgb(tmp_path / "plain.png").shape == (8, 8, 3)


def test_an_orientation_in_a_png_text_chunk_or_xmp_is_still_found(tmp_path):
    from PIL import Image, PngImagePlugin

    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = b"Exif\x00\x00" + exif.tobytes()
    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", f"\nexif\n{len(raw)}\n{raw.hex()}\n", zip=True)
    xmp = PngImagePlugin.PngInfo()
    xmp.add_itxt(
        "XML:com.adobe.xmp",
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>',
        zip=True,
    )
    for name, info in (("text.png", text), ("xmp.png", xmp)):
        Image.fromarray(pixels).save(tmp_path / name, pnginfo=info)
        assert Image.open(tmp_path / name).getexif().get(0x0112) == 6, name  # Pillow sees it
        assert read_rgb(tmp_path / name).shape == (4, 2, 3), name

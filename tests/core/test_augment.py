"""branchadapt.augment: config lists become seeded albumentations pipelines; typos fail early."""

import numpy as np
import pytest

import branchadapt as ba
from branchadapt.augment import Augmenter, check_augment


def test_typos_and_bad_arguments_name_the_entry():
    with pytest.raises(
        ValueError, match=r"augment\[1\]: 'HorizontalFlp' is not .*did you mean HorizontalFlip"
    ):
        check_augment([{"name": "Blur"}, {"name": "HorizontalFlp"}])
    with pytest.raises(ValueError, match=r"augment\[0\] needs a 'name'"):
        check_augment([{"p": 0.5}])
    with pytest.raises(ValueError, match=r"augment\[0\]: Resize\(height=-3\)"):
        check_augment([{"name": "Resize", "height": -3}])
    # one line per problem, naming the argument (not pydantic's multi-line block and its URL)
    with pytest.raises(
        ValueError, match=r"^augment\[0\]: HorizontalFlip\(p=2\): p: Input should be less"
    ) as info:
        check_augment([{"name": "HorizontalFlip", "p": 2}])
    assert "\n" not in str(info.value) and "pydantic.dev" not in str(info.value)
    # an argument the transform does not take: albumentations only warns, here it is an error
    with pytest.raises(
        ValueError, match=r"augment\[0\]: HorizontalFlip\(q=2\): Argument\(s\) 'q' are not valid"
    ):
        check_augment([{"name": "HorizontalFlip", "q": 2}])


def test_the_callers_rng_fixes_the_augmentation_and_the_size_is_kept():
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    aug = Augmenter([{"name": "RandomCrop", "height": 20, "width": 20}], size=32)
    a, b, c = (aug(image, np.random.default_rng(s)) for s in (1, 1, 2))
    assert a.shape == (32, 32, 3)
    assert (a == b).all() and not (a == c).all()


def test_a_transform_that_cannot_take_an_image_is_a_user_error_naming_the_item():
    aug = Augmenter([{"name": "RandomCrop", "height": 64, "width": 64}], size=32)
    image = np.zeros((40, 48, 3), dtype=np.uint8)
    with pytest.raises(
        ba.UserError,
        match=r"^photos/a\.png: data\.augment cannot augment this 40x48 image: "
        r"CropSizeError: .*\(64, 64\) vs \(40, 48\); the transforms must fit every training",
    ):
        aug(image, np.random.default_rng(0), "photos/a.png")


def test_an_augmentation_error_is_one_line_and_running_out_of_memory_is_not_one(monkeypatch):
    aug = Augmenter([{"name": "HorizontalFlip", "p": 1.0}], size=8)
    image = np.zeros((8, 8, 3), dtype=np.uint8)

    def fails(**kwargs):  # type: ignore[no-untyped-def]
        raise ValueError("OpenCV(4.10) error:\n  (-215:Assertion failed) in function 'resize'\n")

    monkeypatch.setattr(aug, "pipeline", fails)
    with pytest.raises(ba.UserError) as caught:
        aug(image, None, "x.png")
    assert "\n" not in str(caught.value) and "error: (-215:Assertion failed) in function 'resize';" in str(
        caught.value
    )

    def full(**kwargs):  # type: ignore[no-untyped-def]
        raise MemoryError

    monkeypatch.setattr(aug, "pipeline", full)
    with pytest.raises(MemoryError):
        aug(image, None, "x.png")

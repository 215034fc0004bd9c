"""The embedded digits data: deterministic, domains that differ, a disjoint test split, augmentations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import branchadapt as ba
from branchadapt_timm.digits import DOMAINS, Digits, DigitsOptions

GROUPS = tuple(DOMAINS)
COUNTS = {"clean": 20, "rotated_noisy": 5, "inverted": 5, "blurred": 5}


def source(split: str = "train", groups=GROUPS, **options) -> Digits:
    return Digits(DigitsOptions(**{"per_class": COUNTS, **options}), groups, Path("."), split)


def test_sizes_and_labels():
    train, test = source(), source("test", test_per_class=7)
    assert train.sizes() == {"clean": {"train": 200}, "rotated_noisy": {"train": 50},
                             "inverted": {"train": 50}, "blurred": {"train": 50}}  # fmt: skip
    assert test.sizes()["inverted"] == {"train": 70}
    item = train.get("clean", "train", 13, None)
    assert item["label"] == 3 and item["image"].shape == (3, 32, 32)
    assert float(item["image"].min()) >= -1 and float(item["image"].max()) <= 1
    with pytest.raises(IndexError):
        train.image("blurred", 50)


def test_deterministic_from_the_seed_and_test_split_is_other_images():
    a, b, other_seed, test = source(), source(), source(seed=1), source("test")
    for g in GROUPS:
        assert np.array_equal(a.image(g, 4)[0], b.image(g, 4)[0])
        assert not np.array_equal(a.image(g, 4)[0], other_seed.image(g, 4)[0])
        assert not np.array_equal(a.image(g, 4)[0], test.image(g, 4)[0])
    # no test image is a training image
    train_set = {a.image("blurred", i)[0].tobytes() for i in range(50)}
    assert not any(test.image("blurred", i)[0].tobytes() in train_set for i in range(100))


def test_domains_look_as_documented():
    d = source()
    stats = {g: np.stack([d.image(g, i)[0] for i in range(40)]) for g in GROUPS}
    assert stats["clean"].mean() > 0.7 and stats["inverted"].mean() < 0.3  # dark on light vs light on dark
    contrast = {g: float((s.max((1, 2, 3)) - s.min((1, 2, 3))).mean()) for g, s in stats.items()}
    assert contrast["blurred"] < 0.3 < 0.9 < contrast["clean"]
    colour = stats["inverted"].std(-1).mean()  # tinted: channels differ; the others are grey
    assert colour > 0.02 and stats["clean"].std(-1).max() < 1e-6
    # rotated_noisy: noisy background, where clean is flat white
    assert stats["rotated_noisy"][:, :3, :3].std() > 0.2 and stats["clean"][:, :2, :2].std() < 0.05


def test_augment_is_seeded_and_only_on_train():
    spec = [{"name": "Affine", "translate_px": [-4, 4], "p": 1.0}]
    d, test = source(augment=spec), source("test", augment=spec)
    rng = lambda s: np.random.default_rng(s)  # noqa: E731
    one, same, other = (d.get("clean", "train", 0, rng(s))["image"] for s in (1, 1, 2))
    assert (one == same).all() and not (one == other).all()
    assert (
        test.get("clean", "train", 0, rng(1))["image"] == test.get("clean", "train", 0, rng(2))["image"]
    ).all()
    # in evaluation mode the train split gives its images as rendered (evaluate --split train)
    assert d.eval() is d and not d.training
    plain = d.get("clean", "train", 0, rng(1))["image"]
    assert not (plain == one).all()
    assert (plain == source().get("clean", "train", 0, rng(5))["image"]).all()  # as without augment
    assert (d.train().get("clean", "train", 0, rng(1))["image"] == one).all()


def test_bad_options_are_reported():
    with pytest.raises(
        ValidationError,
        match=r"augment\[0\]: 'Afine' is not an albumentations transform; did you mean Affine",
    ):
        DigitsOptions(augment=[{"name": "Afine"}])
    with pytest.raises(ValidationError, match="unknown domains"):
        DigitsOptions(domains={"g": "sepia"})
    with pytest.raises(ba.UserError, match=r"groups \['g1'\] are not digits domains"):
        source(groups=("clean", "g1"))
    with pytest.raises(ba.UserError, match=r"per_class has no count for groups \['g1'\]"):
        source(groups=("clean", "g1"), domains={"g1": "inverted"})
    mapped = source(groups=("clean", "g1"), domains={"g1": "inverted"}, per_class={"clean": 1, "g1": 1})
    assert mapped.image("g1", 0)[0].mean() < 0.3

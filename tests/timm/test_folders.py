"""``image_folders``: labelled images from root/<split>/<group>/<class>/, through the CLI with the
classify task and a timm backbone, and every mistake in the folders named with its path."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import branchadapt as ba
from branchadapt.plugins import default_plugins

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "folders.toml"
COLOURS = {"red": (0, 0, 255), "blue": (255, 0, 0)}  # BGR


def make_root(root: Path, counts: dict[str, int], test: int = 4) -> Path:
    """Colour squares on noise: class red or blue, the few-shot group's darker and grey-ish."""
    rng = np.random.default_rng(0)
    for split, per in (("train", counts), ("test", dict.fromkeys(counts, test))):
        for group, n in per.items():
            for name, bgr in COLOURS.items():
                folder = root / split / group / name
                folder.mkdir(parents=True)
                for i in range(n):
                    img = rng.integers(0, 60, (20, 24, 3), dtype=np.uint8)
                    scale = 1.0 if group == "anchor" else 0.5
                    img[4:16, 4:18] = [int(c * scale) for c in bgr]
                    cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    return root


TINY = [
    "data.size=16",
    "stages.basic.steps=12",
    "stages.transfer.steps=6",
    "stages.basic.sampler.per_group=8",
    "stages.transfer.sampler.per_group=2",
    "model.kwargs={channels=[8, 16, 32, 64], stem_width=8}",
    "train.progress='plain'",
]


def test_the_example_trains_on_folders_and_scores_each_group(tmp_path, run_cli):
    root = make_root(tmp_path / "images", {"anchor": 12, "fewshot": 2})
    sets = [a for s in [*TINY, f'data.root="{root.as_posix()}"'] for a in ("--set", s)]
    done = run_cli("run", str(EXAMPLE), "--run-dir", str(tmp_path / "run"), *sets)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "eval" / "transfer-test" / "metrics.json").read_text())
    assert set(metrics["groups"]) == {"anchor", "fewshot"}
    assert metrics["groups"]["anchor"]["accuracy"] == 1.0  # red against blue: separable


def _source(root: Path, split: str = "train", **options) -> ba.DataSource:
    cls = default_plugins().registry.get("data", "image_folders")
    return cls(cls.Options(root=root, size=8, **options), ["anchor", "fewshot"], root, split)


def test_items_carry_their_class_s_label_in_one_list_for_every_group(tmp_path):
    root = make_root(tmp_path / "images", {"anchor": 3, "fewshot": 1})
    (root / "train" / "fewshot" / "blue").rename(
        root / "train" / "fewshot" / ".hidden"
    )  # few-shot lacks blue
    source = _source(root)
    assert source.classes == ["blue", "red"] and source.sizes() == {
        "anchor": {"train": 6},
        "fewshot": {"train": 1},
    }
    item = source.get("fewshot", "train", 0, np.random.default_rng(0))
    assert item["label"] == 1 and item["image"].shape == (3, 8, 8)
    assert float(item["image"].min()) >= -1 and float(item["image"].max()) <= 1
    assert source.describe("fewshot", "train", 0).endswith("train/fewshot/red/000.png")
    assert _source(root, classes=["red", "blue", "green"]).get("anchor", "train", 0, None)["label"] == 1


def test_folder_mistakes_name_the_path(tmp_path):
    root = make_root(tmp_path / "images", {"anchor": 2, "fewshot": 1})
    with pytest.raises(ba.UserError, match=r"data\.root: .*images/train/other does not exist; expected"):
        ba.registry().get("data", "image_folders")(_source(root).options, ["anchor", "other"], root, "train")
    (root / "test" / "fewshot" / "green").mkdir()
    with pytest.raises(ba.UserError, match=r"test/fewshot/green: class 'green' is not one of data\.classes"):
        _source(root, "test")
    (root / "test" / "fewshot" / "green").rmdir()
    (root / "train" / "anchor" / "red" / "notes.txt").write_text("x")
    with pytest.raises(ba.UserError, match=r"red/notes\.txt: not an image file; expected one of"):
        _source(root)
    (root / "train" / "anchor" / "red" / "notes.txt").unlink()
    (root / "train" / "anchor" / "red" / "000.png").write_bytes(b"not a png")
    with pytest.raises(ba.UserError, match=r"red/000\.png: cannot read the image \(corrupt"):
        _source(root).get("anchor", "train", 2, None)


def test_more_folder_mistakes_are_found_before_training(tmp_path):
    root = make_root(tmp_path / "images", {"anchor": 2, "fewshot": 1})
    (root / "train" / "anchor" / "loose.png").write_bytes(b"")
    with pytest.raises(ba.UserError, match=r"anchor/loose\.png: a file directly in the group's folder"):
        _source(root)
    (root / "train" / "anchor" / "loose.png").unlink()
    (root / "train" / "anchor" / "red" / "more").mkdir()
    with pytest.raises(ba.UserError, match=r"red/more: a folder inside a class folder"):
        _source(root)
    (root / "train" / "anchor" / "red" / "more").rmdir()
    with pytest.raises(ValueError, match=r"class names must be distinct .*\['red'\]"):
        _source(root, classes=["red", "red", "blue"])
    # the test split's mistakes are found with the train split (not after the training)
    (root / "test" / "fewshot").rename(root / "test" / "few")
    with pytest.raises(ba.UserError, match=r"images/test/fewshot does not exist"):
        _source(root)

"""Deterministic toonfaces data set: seeds, in-memory generation and a PNG cache.

Train split: UNPAIRED -- photos and cartoons of a group come from different
identities (the image kind is part of the identity seed).
Test split: PAIRED -- index ``i`` has a photo and its ground-truth cartoon of the
same identity (the kind is left out of the identity seed).
Train and test identities are disjoint by construction (the split is part of
every seed).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from .identity import GROUPS, Identity, sample_identity
from .render import render_cartoon, render_photo

DEFAULT_TRAIN_COUNTS: dict[str, tuple[int, int]] = {
    "women": (1000, 200),
    "men": (75, 15),
    "kids": (50, 10),
    "elderly": (50, 10),
}
TEST_PER_GROUP = 100
SPLITS: tuple[str, ...] = ("train", "test")
KINDS: tuple[str, ...] = ("photo", "cartoon")
GENERATOR_VERSION = 1  # bump when the renderers change: it is part of the cache folder hash
DONE_MARKER = "DONE"


def _h(text: str) -> int:
    """Stable 32-bit hash of a string (never Python's salted ``hash()``)."""
    return zlib.crc32(text.encode("utf-8"))


def _check(split: str, group: str, kind: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; valid groups: {', '.join(GROUPS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def identity_seed(seed: int, split: str, group: str, kind: str, index: int) -> int:
    """64-bit seed of the identity shown in image (seed, split, group, kind, index).

    In the test split the kind is ignored, so photo ``i`` and cartoon ``i`` share
    their identity (paired).  In the train split it is part of the entropy, so
    the photos and cartoons of a group are different people (unpaired).
    """
    _check(split, group, kind)
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    kind_key = kind if split == "train" else "pair"
    entropy = (int(seed), _h("toonfaces"), _h(split), _h(group), _h(kind_key), int(index))
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def identity_for(seed: int, split: str, group: str, kind: str, index: int) -> Identity:
    """The identity parameters behind one image (ground truth for tests/analysis)."""
    rng = np.random.default_rng(identity_seed(seed, split, group, kind, index))
    return sample_identity(group, rng)


def generate_image(seed: int, split: str, group: str, kind: str, index: int, size: int) -> np.ndarray:
    """Render one image in memory: uint8 (size, size, 3) RGB, byte-identical for equal arguments."""
    return render_seeded(identity_seed(seed, split, group, kind, index), group, kind, size)


def render_seeded(seed: int, group: str, kind: str, size: int) -> np.ndarray:
    """Render the image of one identity seed; other seed streams (e.g. the judges') reuse it."""
    ident = sample_identity(group, np.random.default_rng(seed))
    if kind == "cartoon":
        return render_cartoon(ident, size)
    noise = np.random.default_rng(np.random.SeedSequence((seed, _h("photo-noise"))))
    return render_photo(ident, size, noise)


def write_png_atomic(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


def _job(args: tuple) -> None:
    seed, split, group, kind, index, size, path = args
    write_png_atomic(Path(path), generate_image(seed, split, group, kind, index, size))


class ToonFaces:
    """PNG cache of the toonfaces data set under ``root/toonfaces-s{size}-seed{seed}-{hash}/``.

    Layout: ``{train,test}/{photo,cartoon}/<group>/00000.png``.  Groups are the
    keys of ``train_counts`` (values are ``(photos, cartoons)`` per group); the
    test split has ``test_per_group`` photo/cartoon pairs for each of them.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 128,
        seed: int = 0,
        train_counts: Mapping[str, tuple[int, int]] = DEFAULT_TRAIN_COUNTS,
        test_per_group: int = TEST_PER_GROUP,
        workers: int = 1,
    ):
        if not 16 <= int(size) <= 2048:
            raise ValueError("size must be within 16..2048")
        if int(seed) < 0 or int(test_per_group) < 0:
            raise ValueError("seed and test_per_group must be non-negative")
        for g, counts in train_counts.items():
            if g not in GROUPS:
                raise ValueError(f"unknown group {g!r}; valid groups: {', '.join(GROUPS)}")
            if len(counts) != 2 or min(int(c) for c in counts) < 0:
                raise ValueError(f"train_counts[{g!r}] must be (photos, cartoons) >= 0")
        self.root = Path(root)
        self.size = int(size)
        self.seed = int(seed)
        self.train_counts = {
            g: (int(train_counts[g][0]), int(train_counts[g][1])) for g in GROUPS if g in train_counts
        }
        self.test_per_group = int(test_per_group)
        self.workers = max(1, int(workers))
        self.groups: tuple[str, ...] = tuple(self.train_counts)
        self.path = self.root / f"toonfaces-s{self.size}-seed{self.seed}-{self.config_hash()}"

    def config_hash(self) -> str:
        cfg = {"train": self.train_counts, "test": self.test_per_group, "version": GENERATOR_VERSION}
        return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]

    def count(self, split: str, kind: str, group: str) -> int:
        _check(split, group, kind)
        if group not in self.train_counts:
            return 0
        if split == "test":
            return self.test_per_group
        return self.train_counts[group][KINDS.index(kind)]

    def _expected(self, split: str, kind: str, group: str) -> list[Path]:
        folder = self.path / split / kind / group
        return [folder / f"{i:05d}.png" for i in range(self.count(split, kind, group))]

    def is_complete(self) -> bool:
        return (self.path / DONE_MARKER).is_file()

    def ensure(self) -> Path:
        """Generate every missing image (atomically), then write the ``DONE`` marker last."""
        if self.is_complete():
            return self.path
        jobs = []
        for split in SPLITS:
            for kind in KINDS:
                for group in self.groups:
                    folder = self.path / split / kind / group
                    folder.mkdir(parents=True, exist_ok=True)
                    for stale in folder.glob(".*.tmp"):  # leftovers of an interrupted run
                        stale.unlink(missing_ok=True)
                    for i, p in enumerate(self._expected(split, kind, group)):
                        if not p.is_file():
                            jobs.append((self.seed, split, group, kind, i, self.size, str(p)))
        t0 = time.perf_counter()
        if self.workers > 1 and len(jobs) > 16:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(self.workers) as pool:
                for _ in pool.imap_unordered(_job, jobs, chunksize=16):
                    pass
        else:
            for job in jobs:
                _job(job)
        meta = {
            "size": self.size,
            "seed": self.seed,
            "train_counts": self.train_counts,
            "test_per_group": self.test_per_group,
            "version": GENERATOR_VERSION,
            "generated_now": len(jobs),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        tmp = self.path / f".{DONE_MARKER}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, self.path / DONE_MARKER)
        return self.path

    def files(self, split: str, kind: str, group: str) -> list[Path]:
        """Sorted image paths of one (split, kind, group); requires :meth:`ensure` first."""
        _check(split, group, kind)
        if not self.is_complete():
            raise FileNotFoundError(f"{self.path} is not generated yet; call ensure() first")
        return self._expected(split, kind, group)

    def identity(self, split: str, kind: str, group: str, index: int) -> Identity:
        """Ground-truth identity parameters of one cached image."""
        if not 0 <= index < self.count(split, kind, group):
            raise IndexError(f"index {index} out of range for {split}/{kind}/{group}")
        return identity_for(self.seed, split, group, kind, index)

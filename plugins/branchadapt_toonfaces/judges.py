"""Judges for the toonfaces data: an identity encoder and a group-trait classifier.

Both are small CNNs trained by the project on toonfaces identities of their own seed stream
(``judge_identity_seed``), disjoint from the data set's train and test splits, and shipped in
``weights/`` (safetensors + a JSON sidecar with the held-out metrics):

- :class:`IdentityEncoder` maps a photo and the cartoon of the same person close together; it is
  the face-ID recognizer for the embedded data (registered as backbone ``toonfaces_id``) and
  scores identity preservation of translations;
- :class:`TraitClassifier` predicts the group traits (:data:`TRAITS`) of a cartoon, to judge
  whether a generated cartoon shows the traits of its person's group.

Reproduce the shipped weights (deterministic on CPU, one thread, a few minutes)::

    python -m branchadapt_toonfaces.judges train [--out DIR] [--seed 0]
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from branchadapt.checkpoint import state_differences
from branchadapt.errors import CheckpointError, UserError
from branchadapt.interfaces import Backbone, PluginOptions

from .identity import GROUPS, Identity

__all__ = [
    "INPUT_SIZE",
    "TRAITS",
    "WEIGHTS_DIR",
    "IdentityEncoder",
    "TraitClassifier",
    "judge_identity_seed",
    "load_identity_encoder",
    "load_trait_classifier",
    "predict_traits",
    "read_sidecar",
    "to_judge_input",
    "trait_accuracy",
    "trait_labels",
    "trait_match",
]

#: side of the square the judges see; larger or smaller inputs are resized to it
INPUT_SIZE = 64
#: group traits, in the order of the classifier's outputs and of :func:`trait_labels`
TRAITS: tuple[str, ...] = ("eyelashes", "beard", "blush", "wrinkles", "grey_hair")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TRAIN_COMMAND = "python -m branchadapt_toonfaces.judges train"
JUDGE_STREAMS: tuple[str, ...] = ("fit", "val")


def judge_identity_seed(seed: int, stream: str, group: str, index: int) -> int:
    """Identity seed of the judges' own paired streams (``fit`` trains, ``val`` measures).

    Built like the data set's seeds but with ``judge:<stream>`` in place of the split, so judge
    identities are disjoint from every train/test identity of the data set.
    """
    if stream not in JUDGE_STREAMS:
        raise ValueError(f"unknown judge stream {stream!r}; valid: {', '.join(JUDGE_STREAMS)}")
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; valid groups: {', '.join(GROUPS)}")
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")

    def h(text: str) -> int:
        return zlib.crc32(text.encode("utf-8"))

    entropy = (int(seed), h("toonfaces"), h(f"judge:{stream}"), h(group), h("pair"), int(index))
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def trait_labels(identity: Identity) -> Tensor:
    """Ground-truth traits of an identity as a float 0/1 vector in :data:`TRAITS` order.

    Thresholds sit in the gaps of the group ranges of ``identity.py``: a trace of blush on some
    women's cheeks is not "blush"; any stubble or beard counts as "beard".
    """
    return torch.tensor(
        [
            float(identity.eyelashes),
            float(identity.beard_level > 0.0),
            float(identity.blush_level >= 0.5),
            float(identity.wrinkle_level >= 0.3),
            float(identity.grey_amount >= 0.3),
        ]
    )


def to_judge_input(x: Tensor) -> Tensor:
    """Images in [-1, 1] of any size -> (B, 3, 64, 64), area-like resize (antialiased)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return x
    # the antialiased kernel has no bf16 implementation on CPU: resize half types in fp32
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    return F.interpolate(
        x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False
    )


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class JudgeOptions(PluginOptions):
    weights: Path | None = Field(
        None, description="safetensors file; None: the weights shipped in the package"
    )
    random_init: bool = Field(False, description="skip loading (the training command starts from random)")


class _Judge(Backbone):
    """Shared loading logic: shipped or user safetensors weights, strictly matched."""

    options: JudgeOptions
    file_name = ""

    def _load(self) -> None:
        if self.options.random_init:
            return
        path = self.options.weights or WEIGHTS_DIR / self.file_name
        load_judge_weights(self, path)


class IdentityEncoder(_Judge):
    """Photo/cartoon identity embedding (L2-normalised, 128-d) of toonfaces faces."""

    Options = JudgeOptions
    file_name = "identity_encoder.safetensors"
    embedding_dim = 128

    def __init__(self, options: JudgeOptions | None = None) -> None:
        super().__init__(options)
        self.stem = _conv(3, 24, 2)  # 32 px
        self.block1 = nn.Sequential(_conv(24, 48, 2), _conv(48, 48))  # 16 px
        self.block2 = nn.Sequential(_conv(48, 96, 2), _conv(96, 96))  # 8 px
        self.block3 = _conv(96, 128, 2)  # 4 px
        # a depthwise 4x4 conv keeps *where* things are (pose, hair line), unlike average pooling
        self.head = nn.Sequential(
            nn.Conv2d(128, 128, 4, groups=128, bias=False),
            nn.BatchNorm2d(128),
            nn.Flatten(),
            nn.Linear(128, self.embedding_dim),
        )
        self._load()

    def stage_names(self) -> list[str]:
        return ["stem", "block1", "block2", "block3", "head"]

    def forward(self, x: Tensor) -> Tensor:
        x = to_judge_input(x)
        for name in self.stage_names():
            x = getattr(self, name)(x)
        return F.normalize(x, dim=1)


class TraitClassifier(_Judge):
    """Multi-label logits (B, len(TRAITS)) of the group traits shown by a cartoon."""

    Options = JudgeOptions
    file_name = "trait_classifier.safetensors"

    def __init__(self, options: JudgeOptions | None = None) -> None:
        super().__init__(options)
        self.stem = _conv(3, 16, 2)  # 32 px
        self.block1 = nn.Sequential(_conv(16, 32, 2), _conv(32, 32))  # 16 px
        self.block2 = nn.Sequential(_conv(32, 64, 2), _conv(64, 64))  # 8 px
        self.head = nn.Linear(128, len(TRAITS))  # from average and max pooling: "is it anywhere"
        self._load()

    def stage_names(self) -> list[str]:
        return ["stem", "block1", "block2", "head"]

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(to_judge_input(x))))
        return self.head(torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1))


def load_judge_weights(module: nn.Module, path: Path) -> None:
    """Load a safetensors file into ``module``; any key or shape difference is an error."""
    path = Path(path).expanduser()
    if not path.is_file():
        shipped = path.parent == WEIGHTS_DIR
        raise UserError(
            f"judge weights {path} not found"
            + (f" (the package ships them; re-create them with `{TRAIN_COMMAND}`)" if shipped else "")
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    problems = state_differences(module.state_dict(), state)
    if problems:
        raise CheckpointError(f"{path} does not match {type(module).__name__}:\n  " + "\n  ".join(problems))
    module.load_state_dict(state)


_J = TypeVar("_J", bound=nn.Module)


def _frozen(module: _J, device: torch.device | str | None) -> _J:
    module.requires_grad_(False).eval()
    return module.to(device) if device is not None else module


def load_identity_encoder(
    weights: Path | None = None, device: torch.device | str | None = None
) -> IdentityEncoder:
    """The identity encoder with shipped (or given) weights, frozen and in eval mode."""
    return _frozen(IdentityEncoder(JudgeOptions(weights=weights)), device)


def load_trait_classifier(
    weights: Path | None = None, device: torch.device | str | None = None
) -> TraitClassifier:
    """The trait classifier with shipped (or given) weights, frozen and in eval mode."""
    return _frozen(TraitClassifier(JudgeOptions(weights=weights)), device)


def read_sidecar(name: str) -> dict[str, Any]:
    """The JSON sidecar of a shipped judge (``identity_encoder`` or ``trait_classifier``)."""
    return json.loads((WEIGHTS_DIR / f"{name}.json").read_text())


@torch.no_grad()
def predict_traits(classifier: TraitClassifier, images: Tensor, batch_size: int = 256) -> Tensor:
    """Boolean (B, len(TRAITS)) predictions for images in [-1, 1]."""
    out = [classifier(images[i : i + batch_size]) > 0 for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, len(TRAITS), dtype=torch.bool)


def trait_match(classifier: TraitClassifier, images: Tensor, identities: Sequence[Identity]) -> Tensor:
    """Per image: True when EVERY predicted trait equals the traits of its ground-truth identity.

    The per-image score is the strict one (all five right): a cartoon of an elderly man that
    shows the grey hair but not the wrinkles does not show its group.
    """
    if len(images) != len(identities):
        raise ValueError(f"{len(images)} images but {len(identities)} identities")
    pred = predict_traits(classifier, images)
    if not identities:
        return torch.zeros(0, dtype=torch.bool, device=pred.device)
    target = torch.stack([trait_labels(i) for i in identities]).bool().to(pred.device)
    return (pred == target).all(1)


def trait_accuracy(pred: Tensor, target: Tensor) -> dict[str, float]:
    """``exact`` (share of images with all traits right) and the accuracy of each trait."""
    pred, target = pred.bool(), target.bool().to(pred.device)
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != len(TRAITS):
        raise ValueError(
            f"expected two (N, {len(TRAITS)}) tensors, got {tuple(pred.shape)}, {tuple(target.shape)}"
        )
    hit = (pred == target).float()
    out = {"exact": float(hit.all(1).float().mean()) if len(hit) else float("nan")}
    out.update({t: float(hit[:, k].mean()) for k, t in enumerate(TRAITS)})
    return out


if __name__ == "__main__":
    from .judge_training import main

    raise SystemExit(main())

"""A small, domain-free supervised example: MLP backbone, grouped Gaussian clusters, cross-entropy.

Each group sees the same classes through its own random affine distortion of the input, so a
per-group *input* branch is exactly what a few-shot group needs; it keeps the engine's tests and
the quick-start honest without any domain plugin installed.
"""

from __future__ import annotations

import itertools
import typing
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data import first_input, group_batches
from ..errors import UserError
from ..interfaces import Backbone, Batch, DataSource, LossOptions, LossTerm, Phase, PluginOptions, Task


class MLPOptions(PluginOptions):
    in_features: int = Field(8, ge=1)
    hidden: list[typing.Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [32, 32],
        min_length=1,
        description="width of each hidden stage (at least one)",
    )
    out_features: int = Field(4, ge=1)


class MLPBackbone(Backbone):
    """Multi-layer perceptron; stages: input, hidden layers, head."""

    Options = MLPOptions
    options: MLPOptions
    rows_independent = True  # linear layers and ReLUs: each row's output depends on that row alone

    def __init__(self, options: MLPOptions | None = None) -> None:
        super().__init__(options)
        widths = [self.options.in_features, *self.options.hidden]
        self._names = ["input"] + [f"hidden{i}" for i in range(1, len(widths) - 1)] + ["head"]
        for name, (a, b) in zip(self._names[:-1], itertools.pairwise(widths), strict=True):
            setattr(self, name, nn.Sequential(nn.Linear(a, b), nn.ReLU()))
        self.head = nn.Linear(widths[-1], self.options.out_features)

    def stage_names(self) -> list[str]:
        return list(self._names)

    def example_inputs(self, batch_size: int = 1) -> tuple[Tensor, ...]:
        return (torch.zeros(batch_size, self.options.in_features),)

    def forward(self, x: Tensor) -> Tensor:
        for name in self._names:
            x = getattr(self, name)(x)
        return x


class ClusterOptions(PluginOptions):
    features: int = Field(8, ge=2)
    classes: int = Field(4, ge=2)
    counts: dict[str, int] = Field(default_factory=dict, description="training items per group")
    default_count: int = Field(64, ge=1, description="training items of groups not in counts")
    test_count: int = Field(200, ge=1, description="items per group in the test split")
    distortion: float = Field(1.0, ge=0, description="strength of each non-first group's input distortion")
    noise: float = Field(0.6, gt=0)
    seed: int = 0


class ClusterData(DataSource):
    """Gaussian class clusters; every group but the first sees them through its own affine map."""

    Options = ClusterOptions
    options: ClusterOptions

    def __init__(
        self, options: ClusterOptions | None, groups: Sequence[str], base_dir: Path, split: str = "train"
    ):
        super().__init__(options, groups, base_dir, split)
        o = self.options
        unknown = sorted(set(o.counts) - set(self.groups))
        if unknown:
            raise UserError(
                f"data.counts: {unknown} are not groups of the experiment; groups: {list(self.groups)}"
            )
        rng = np.random.default_rng([o.seed, 7])
        centres = rng.normal(0, 2.0, (o.classes, o.features))
        self._x: dict[str, np.ndarray] = {}
        self._y: dict[str, np.ndarray] = {}
        for gi, group in enumerate(self.groups):
            g_rng = np.random.default_rng([o.seed, zlib.crc32(group.encode())])
            mix = np.eye(o.features) + (o.distortion * g_rng.normal(0, 0.6, (o.features,) * 2) if gi else 0)
            shift = o.distortion * g_rng.normal(0, 1.5, o.features) if gi else np.zeros(o.features)
            n = o.test_count if split == "test" else o.counts.get(group, o.default_count)
            s_rng = np.random.default_rng([o.seed, zlib.crc32(group.encode()), zlib.crc32(split.encode())])
            y = s_rng.integers(0, o.classes, n)
            x = centres[y] + s_rng.normal(0, o.noise, (n, o.features))
            self._x[group] = (x @ mix.T + shift).astype(np.float32)
            self._y[group] = y.astype(np.int64)

    def sizes(self) -> dict[str, dict[str, int]]:
        return {g: {"train": len(self._y[g])} for g in self.groups}

    def get(self, group: str, stream: str, index: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"x": torch.from_numpy(self._x[group][index]), "y": int(self._y[group][index])}


class SupervisedOptions(PluginOptions):
    stream: str = "train"
    input_key: str = "x"
    target_key: str = "y"


class SupervisedTask(Task):
    """One model, one phase: predictions for a stream's inputs, scored against its targets."""

    Options = SupervisedOptions
    options: SupervisedOptions

    def build(self) -> dict[str, nn.Module]:
        return {"model": self.context.build_backbone()}

    def phases(self) -> list[Phase]:
        return [Phase("main", ("model",))]

    def forward(
        self, phase: str, modules: Mapping[str, nn.Module], batch: Batch, scratch: dict[str, Any]
    ) -> dict[str, Any]:
        data = batch[self.options.stream]
        logits = modules["model"](data[self.options.input_key], groups=data["group"])
        return {"logits": logits, "target": data[self.options.target_key], "group": data["group"]}

    def outputs(self, phase: str) -> frozenset[str] | None:
        return frozenset({"logits", "target", "group"})

    def example_inputs(
        self, module: str, source: DataSource, batch_size: int = 2
    ) -> tuple[Tensor, ...] | None:
        """The first training input, repeated ``batch_size`` times (the data's size, not a default),
        for ``model``, the module :meth:`forward` gives it to (a subclass's other modules: None)."""
        if module != "model":
            return None
        x = first_input(
            source, self.context.groups, [self.options.stream], self.options.input_key, batch_size
        )
        return None if x is None else (x,)

    def evaluate(
        self,
        modules: Mapping[str, nn.Module],
        source: DataSource,
        device: torch.device,
        out_dir: Path | None = None,
    ) -> dict[str, dict[str, float]]:
        """Accuracy and mean cross-entropy per group."""
        model = modules["model"]
        out = {}
        with torch.no_grad():
            for gi, group in enumerate(self.context.groups):
                correct, loss, n = 0.0, 0.0, 0
                for b in group_batches(source, group, self.options.stream, gi, batch_size=256):
                    x, y = b[self.options.input_key].to(device), b[self.options.target_key].to(device)
                    logits = model(x, groups=b["group"])
                    correct += float((logits.argmax(1) == y).sum())
                    loss += float(F.cross_entropy(logits, y, reduction="sum"))
                    n += len(y)
                if n:
                    out[group] = {"accuracy": correct / n, "cross_entropy": loss / n}
        return out


class CrossEntropyOptions(LossOptions):
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class CrossEntropy(LossTerm):
    """Cross-entropy of ``outputs['logits']`` against ``outputs['target']``."""

    Options = CrossEntropyOptions
    options: CrossEntropyOptions
    reads = ("logits", "target")
    _checked = False  # the targets' range against the logits, on the first call only (no sync after)

    def forward(self, outputs: Mapping[str, Any], batch: Batch) -> Tensor:
        logits, target = outputs["logits"], outputs["target"]
        classes = logits.shape[1 if logits.ndim > 1 else 0]  # (C), (N, C) or (N, C, d1, ...)
        if not self._checked:  # the first batch's targets, also where a bad one is no catchable error
            self._checked = True
            self._check(int(target.max()) if target.numel() else -1, classes)
        try:
            return F.cross_entropy(logits, target, label_smoothing=self.options.label_smoothing)
        except IndexError:  # a later batch's class beyond the logits (torch: "Target 7 is out of bounds")
            self._check(int(target.max()), classes)
            raise

    def _check(self, top: int, classes: int) -> None:
        """A user error when a class index ``top`` has no logit among ``classes``."""
        if top >= classes:
            raise UserError(
                f"loss {self.name!r}: the data has class index {top}, but the model gives {classes} "
                f"logits per sample; its output size (model.num_classes or model.out_features, say) "
                f"must be at least {top + 1}"
            )

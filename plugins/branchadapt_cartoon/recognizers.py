"""Face recognizers for the face-ID loss: images in [-1, 1] -> identity embeddings.

The paper's face-ID loss is ``1 - cosine(F(photo), F(cartoon))`` for a frozen recognizer ``F``.
``F`` is a plugin point and its weights are data the user names (nothing is downloaded):

- :class:`MobileFaceNet`: the recognizer photo2cartoon uses; its parameter names match that
  project's ``model_mobilefacenet.pth`` so the user's file loads strictly;
- :class:`TimmRecognizer`: any timm architecture, pooled features as the embedding.

Each recognizer does its own crop and resize, so callers pass whole images of any size.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from pickle import UnpicklingError  # only to report refused files; nothing is unpickled here
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from safetensors import SafetensorError
from torch import Tensor, nn

import branchadapt as ba
from branchadapt.checkpoint import read_state, state_differences
from branchadapt.errors import CheckpointError, UserError
from branchadapt.interfaces import Backbone, PluginOptions
from branchadapt.loading import describe
from branchadapt.paths import anchor, files_required

__all__ = [
    "WEIGHTS_OPTION",
    "MobileFaceNet",
    "TimmRecognizer",
    "load_state_file",
    "photo2cartoon_crop",
]

#: where a recognizer's weights are usually set in an experiment file (used in error messages)
WEIGHTS_OPTION = "losses.face_id.recognizer.weights"

Crop = Literal["photo2cartoon", "none"]


# ---------------------------------------------------------------------------- shared helpers
def photo2cartoon_crop(x: Tensor) -> Tensor:
    """The face crop photo2cartoon applies before its recognizer (aligned 2.1x face boxes).

    Rows from ``h/2.1*0.47`` to ``h - h/2.1*0.3`` and a centred square of that height: it keeps
    the face and drops most hair and background of photo2cartoon's aligned portraits.
    """
    h, w = x.shape[-2:]
    top = int(h / 2.1 * (0.8 - 0.33))
    bottom = int(h - h / 2.1 * 0.3)
    side = bottom - top
    left = int(w / 2 - side / 2)
    return x[..., top:bottom, left : left + side]


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


def load_state_file(path: Path, what: str, option: str = WEIGHTS_OPTION) -> dict[str, Tensor]:
    """Read a state dict from safetensors or a torch file (``weights_only``, never full pickle).

    Accepts a bare state dict, one wrapped as ``{"state_dict": ...}``, and ``module.``-prefixed
    keys (DataParallel). Any problem is a :class:`UserError` naming the file and the option.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: weights file {path} does not exist (set {option} to an existing file)")
    try:
        state = read_state(path)  # by the content, whatever the name
    except (SafetensorError, UnpicklingError, OSError, RuntimeError, ValueError, EOFError) as exc:
        if isinstance(exc, UnpicklingError):  # torch's own text suggests weights_only=False: not here
            reason = "it holds Python objects besides tensors, or is not a torch file"
        else:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"{what}: {path} is not a readable safetensors file or plain torch state dict "
            f"(torch files are read with weights_only=True): {reason}"
        ) from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{what}: {path} does not hold a state dict of tensors")
    out = {str(k): v for k, v in state.items()}
    if out and all(k.startswith("module.") for k in out):
        out = {k.removeprefix("module."): v for k, v in out.items()}
    return out


def load_strict(module: nn.Module, state: Mapping[str, Tensor], what: str, path: Path) -> None:
    """Load ``state`` into ``module``; any missing, unexpected or mis-shaped key is an error."""
    state = dict(state)
    for key, value in module.state_dict().items():  # files from before torch 0.4.1 lack this buffer
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    problems = state_differences(module.state_dict(), state)
    if problems:
        raise CheckpointError(f"{what}: {path} does not match the model:\n  " + "\n  ".join(problems))
    module.load_state_dict(state, strict=True)


def _require_weights(weights: Path | None, allow_random: bool, what: str, hint: str) -> Path | None:
    if weights is None and not allow_random:
        raise UserError(
            f"{what} needs a weights file ({hint}) and none is set: set {WEIGHTS_OPTION} "
            "(the recognizer's `weights` option) to its path; nothing is downloaded"
        )
    return weights


def anchor_weights(table: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recognizer table (``{type = ..., weights = ...}``, built when it is used) with a relative
    ``weights`` taken beside the experiment file as it loads (:mod:`branchadapt.paths`)."""
    if not table or table.get("weights") is None:
        return table
    return {**table, "weights": str(anchor(str(table["weights"])))}


def check_recognizer(table: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recognizer table checked as the experiment loads, not when a stage or the evaluation
    first builds it: a registered backbone ``type``, options valid for it and a weights file that
    exists (a relative one taken beside the experiment file) and loads into it. Problems are a
    ``ValueError`` that the experiment's validation reports under the table's key."""
    table = anchor_weights(table)
    if table is None:
        return None
    options = dict(table)
    kind = options.pop("type", None)
    if not kind or not isinstance(kind, str):
        raise ValueError(
            "needs a 'type': a registered recognizer backbone (toonfaces_id, mobilefacenet, ...)"
        )
    try:
        cls: Any = ba.registry().get("backbone", kind)
    except ba.RegistryError as exc:
        raise ValueError(f"type: {exc}") from None
    try:
        opts = cls.Options.model_validate(options)
    except ValidationError as exc:
        raise ValueError("; ".join(describe(e, cls.Options) for e in exc.errors())) from None
    weights = getattr(opts, "weights", None)
    if weights is None and getattr(cls, "needs_weights", False) and not getattr(opts, "allow_random", False):
        raise ValueError(
            f'weights: {cls.__name__} needs a weights file and none is set; set weights = "PATH" '
            "(nothing is downloaded)"
        )
    if weights is not None and files_required():
        if not Path(str(weights)).is_file():
            raise ValueError(f"weights: file {weights} does not exist")
        stat = Path(str(weights)).stat()
        try:  # the file the user named is read now, not after a stage's training (the shipped ones are trusted)
            _loads(cls, opts.model_dump_json(), stat.st_mtime_ns, stat.st_size)
        except UserError as exc:
            raise ValueError(f"weights: {exc}") from None
    return table


@functools.lru_cache(maxsize=16)
def _loads(cls: type[Backbone], options_json: str, mtime_ns: int, size: int) -> bool:
    """Build ``cls`` from its options once per file version: an experiment names a recognizer's
    table in several places (a loss inherited by every stage) and is validated in two passes."""
    cls(cls.Options.model_validate_json(options_json))
    return True


class RecognizerOptions(PluginOptions):
    weights: Path | None = Field(
        None, description="state-dict file (.safetensors, or a torch file read with weights_only)"
    )
    allow_random: bool = Field(False, description="run with random weights when none are set (tests only)")


# ---------------------------------------------------------------------------- MobileFaceNet
class _ConvUnit(nn.Module):
    """Convolution (no bias) + batch norm, optionally + PReLU; the attribute names are the file's."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
    ):
        super().__init__()
        padding = 1 if kernel == 3 else 0  # the 7x7 depthwise reduces 7x7 maps to 1x1
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout) if act else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return self.prelu(x) if self.prelu is not None else x


class _Bottleneck(nn.Module):
    """Expand (1x1), depthwise 3x3, linear projection (1x1); a skip when shapes allow it."""

    def __init__(self, cin: int, cout: int, hidden: int, stride: int, residual: bool):
        super().__init__()
        self.conv = _ConvUnit(cin, hidden)
        self.conv_dw = _ConvUnit(hidden, hidden, 3, stride, groups=hidden)
        self.project = _ConvUnit(hidden, cout, act=False)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class _Repeat(nn.Module):
    """``n`` residual bottlenecks at constant width (kept under ``.model`` like the original)."""

    def __init__(self, channels: int, n: int, hidden: int):
        super().__init__()
        self.model = nn.Sequential(*(_Bottleneck(channels, channels, hidden, 1, True) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class MobileFaceNetOptions(RecognizerOptions):
    crop: Crop = Field("photo2cartoon", description="face crop before the 112 px resize")


class MobileFaceNet(Backbone):
    """photo2cartoon's face recognizer: 112 px face crop -> L2-normalised 512-d embedding.

    Needs photo2cartoon's ``model_mobilefacenet.pth`` (or a safetensors copy) in ``weights``.
    """

    needs_weights = True  # checked when the experiment loads (check_recognizer)

    Options = MobileFaceNetOptions
    options: MobileFaceNetOptions
    input_size = 112
    embedding_size = 512

    def __init__(self, options: MobileFaceNetOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        hint = "photo2cartoon's model_mobilefacenet.pth"
        weights = _require_weights(o.weights, o.allow_random, "MobileFaceNet", hint)
        self.conv1 = _ConvUnit(3, 64, 3, 2)
        self.conv2_dw = _ConvUnit(64, 64, 3, 1, groups=64)
        self.conv_23 = _Bottleneck(64, 64, 128, 2, False)
        self.conv_3 = _Repeat(64, 4, 128)
        self.conv_34 = _Bottleneck(64, 128, 256, 2, False)
        self.conv_4 = _Repeat(128, 6, 256)
        self.conv_45 = _Bottleneck(128, 128, 512, 2, False)
        self.conv_5 = _Repeat(128, 2, 256)
        self.conv_6_sep = _ConvUnit(128, 512)
        self.conv_6_dw = _ConvUnit(512, 512, 7, groups=512, act=False)  # 7x7 -> 1x1 global depthwise
        self.linear = nn.Linear(512, self.embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(self.embedding_size)
        if weights is not None:
            load_strict(self, load_state_file(weights, "MobileFaceNet"), "MobileFaceNet", weights)

    def stage_names(self) -> list[str]:
        return [
            "conv1",
            "conv2_dw",
            "conv_23",
            "conv_3",
            "conv_34",
            "conv_4",
            "conv_45",
            "conv_5",
            "conv_6_sep",
            "conv_6_dw",
            "linear",
            "bn",
        ]

    def forward(self, x: Tensor) -> Tensor:
        if self.options.crop == "photo2cartoon":
            x = photo2cartoon_crop(x)
        x = _resize(x, self.input_size)
        for name in self.stage_names()[:-2]:
            x = getattr(self, name)(x)
        x = self.bn(self.linear(x.flatten(1)))
        return F.normalize(x, dim=1)


# ---------------------------------------------------------------------------- timm
class TimmRecognizerOptions(RecognizerOptions):
    model: str = Field("resnet18", description="timm model name (created with pretrained=False)")
    input_size: int = Field(112, ge=16, description="side of the square input after crop and resize")
    crop: Crop = Field("none", description="face crop before the resize")


class TimmRecognizer(Backbone):
    """Any timm architecture as a recognizer; the embedding is its pooled features.

    The input is mapped from [-1, 1] to the model's own mean/std (``pretrained_cfg``). A
    classifier head in the weights file is ignored: the model is built with ``num_classes=0``.
    """

    needs_weights = True  # checked when the experiment loads (check_recognizer)

    Options = TimmRecognizerOptions
    options: TimmRecognizerOptions
    mean: Tensor
    std: Tensor

    def __init__(self, options: TimmRecognizerOptions | None = None) -> None:
        super().__init__(options)
        import timm  # local: only this recognizer needs it

        o = self.options
        if not timm.is_model(o.model):
            near = timm.list_models(f"*{o.model.split('.')[0][:6]}*")[:8]
            raise UserError(
                f"unknown timm model {o.model!r} (recognizer option `model`)"
                + (f"; similar names: {', '.join(near)}" if near else "")
            )
        what = f"TimmRecognizer({o.model})"
        weights = _require_weights(o.weights, o.allow_random, what, f"a state dict of timm's {o.model}")
        self.model = timm.create_model(o.model, pretrained=False, num_classes=0)
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)
        if weights is not None:
            state = load_state_file(weights, what)
            head = cfg.get("classifier")
            heads = [head] if isinstance(head, str) else list(head or [])
            state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
            load_strict(self.model, state, what, weights)

    def stage_names(self) -> list[str]:
        return ["model"]

    def forward(self, x: Tensor) -> Tensor:
        if self.options.crop == "photo2cartoon":
            x = photo2cartoon_crop(x)
        x = _resize(x, self.options.input_size)
        x = ((x + 1) * 0.5 - self.mean) / self.std
        return self.model(x)

"""Any timm model as a branchadapt ``Backbone``, its stages found from timm's own feature metadata.

timm describes where each feature level ends (``model.feature_info``: module paths such as
``layer1``, ``stages.0`` or ``blocks.3``). The model's top-level children are listed in order,
containers holding a feature level are opened up, and the list is cut after every feature
module: the first piece is the ``stem`` (when the first feature is a nested stage it gets its own
stage after the stem), each following piece is named by its feature module, and what is left
after the last feature is the ``head``. A stage may span several sibling modules (``stage_paths``).
Parameters held directly by the model (e.g. a ViT's ``pos_embed`` and ``cls_token``) are not in
any stage, so they stay shared.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from pydantic import Field
from torch import Tensor, nn

from branchadapt import Backbone, CheckpointError, PluginOptions, UserError


class TimmOptions(PluginOptions):
    model: str = Field(description="timm model name, e.g. resnet18, mobilenetv3_small_050, convnext_atto")
    num_classes: int = Field(10, ge=1)
    in_chans: int = Field(3, ge=1)
    weights: Path | None = Field(None, description="local weights: .safetensors or a torch state dict")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")


def discover_stages(model: nn.Module) -> dict[str, list[str]]:
    """Ordered stage name -> sub-module paths, from ``model.feature_info``."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise UserError(f"{type(model).__name__} reports no feature_info; cannot cut it into stages")
    features = [f["module"] for f in info]
    containers = {f.split(".")[0] for f in features if "." in f}
    units: list[str] = []
    for name, child in model.named_children():
        if name in containers:
            units += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            units.append(name)
    feature_set = set(features)
    pieces: list[list[str]] = []
    current: list[str] = []
    for unit in units:
        current.append(unit)
        if unit in feature_set:
            pieces.append(current)
            current = []
    stages: dict[str, list[str]] = {}
    first = pieces[0]
    if len(first) > 1 and "." in first[-1]:
        stages["stem"] = first[:-1]
        stages[first[-1]] = [first[-1]]
    else:
        stages["stem"] = first
    for piece in pieces[1:]:
        stages[piece[-1]] = piece
    if current:
        stages["head"] = current
    return stages


def load_state(path: Path) -> dict[str, Tensor]:
    """A state dict from safetensors or a torch file (``weights_only=True``: no pickle code runs)."""
    if not path.is_file():
        raise UserError(
            f"model.weights: {path} does not exist; expected a .safetensors or torch state-dict file"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"model.weights: cannot read {path} ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"model.weights: {path} holds a {type(state).__name__}, expected a state dict")
    return state


class TimmBackbone(Backbone):
    """``timm.create_model(model, pretrained=False, ...)`` cut into stem / feature stages / head."""

    Options = TimmOptions
    options: TimmOptions

    def __init__(self, options: TimmOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        if o.model not in timm.list_models():
            close = difflib.get_close_matches(o.model, timm.list_models(), n=5)
            raise UserError(
                f"model.model: {o.model!r} is not a timm model; closest: {', '.join(close) or 'none'}"
            )
        self.model = timm.create_model(
            o.model, pretrained=False, num_classes=o.num_classes, in_chans=o.in_chans, **o.kwargs
        )
        if o.weights is not None:
            state = load_state(o.weights)
            own = self.model.state_dict()
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            bad = [k for k in own if k in state and state[k].shape != own[k].shape]
            if missing or unexpected or bad:
                raise CheckpointError(
                    f"{o.weights} does not match timm model {o.model!r}: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}, shape mismatch {bad[:5]}"
                )
            self.model.load_state_dict(state)
        self._stages = discover_stages(self.model)

    def stage_names(self) -> list[str]:
        return list(self._stages)

    def stage_paths(self, stage: str) -> list[str]:
        return [f"model.{p}" for p in self._stages[stage]]

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # type: ignore[no-any-return]

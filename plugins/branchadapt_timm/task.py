"""``classify``: the core's supervised step plus what domain-adaptation losses need.

It is the core ``supervised`` task (same evaluation: per-group accuracy and cross-entropy on the
held-out split) with two more outputs: ``features``, the pooled pre-logit features of a backbone
that can return them (``TimmBackbone``), and ``anchor``, a mask of the samples of the anchor
group, so losses such as ``entropy`` or ``feature_alignment`` can treat the few-shot groups apart
without knowing group indices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field
from torch import nn

from branchadapt import Batch, UserError
from branchadapt.builtin.example import SupervisedOptions, SupervisedTask

from .backbone import TimmBackbone


class ClassifyOptions(SupervisedOptions):
    input_key: str = "image"
    target_key: str = "label"
    features: bool = Field(True, description="also output pooled features (needed by feature_alignment)")


class ClassifyTask(SupervisedTask):
    """Logits (and pooled features) of the ``train`` stream, with an anchor-group mask."""

    Options = ClassifyOptions
    options: ClassifyOptions

    def build(self) -> dict[str, nn.Module]:
        model = self.context.build_backbone()
        if self.options.features and not isinstance(model, TimmBackbone):
            raise UserError(
                f"task.features = true needs a backbone that returns pooled features (timm), "
                f"not {type(model).__name__}; set task.features = false"
            )
        return {"model": model}

    def outputs(self, phase: str) -> frozenset[str] | None:
        extra = {"anchor", "features"} if self.options.features else {"anchor"}
        return frozenset({"logits", "target", "group", *extra})

    def forward(
        self, phase: str, modules: Mapping[str, nn.Module], batch: Batch, scratch: dict[str, Any]
    ) -> dict[str, Any]:
        data = batch[self.options.stream]
        groups = data["group"]
        if self.options.features:
            out = modules["model"](data[self.options.input_key], groups=groups, features=True)
        else:
            out = {"logits": modules["model"](data[self.options.input_key], groups=groups)}
        anchor = self.context.groups.index(self.context.anchor)
        return {**out, "target": data[self.options.target_key], "group": groups, "anchor": groups == anchor}

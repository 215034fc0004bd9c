"""Classification losses beyond cross-entropy (the core's ``cross_entropy`` has label smoothing)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

import branchadapt as ba
from branchadapt import LossOptions, LossTerm


class EntropyOptions(LossOptions):
    skip_group: int | None = Field(0, description="group index left out (the anchor: it has labels enough)")


class Entropy(LossTerm):
    """Entropy minimisation: confident predictions on the few-shot domains (a classic DA regulariser)."""

    Options = EntropyOptions
    options: EntropyOptions

    def forward(self, outputs: Mapping[str, Any], batch: ba.Batch) -> Tensor:
        logits = outputs["logits"].float()
        if self.options.skip_group is not None:
            logits = logits[outputs["group"] != self.options.skip_group]
        if logits.shape[0] == 0:
            return outputs["logits"].sum() * 0.0
        p = F.softmax(logits, dim=1)
        return -(p * F.log_softmax(logits, dim=1)).sum(1).mean()

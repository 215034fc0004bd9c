"""Domain-adaptation regularisers for classification (cross-entropy itself is the core's
``cross_entropy``, with ``label_smoothing``).

Both read the ``anchor`` mask of the ``classify`` task's outputs, so they act on the few-shot
groups only and never need group indices.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from branchadapt import Batch, LossOptions, LossTerm, UserError


def _needs(outputs: Mapping[str, Any], keys: tuple[str, ...], loss: str) -> None:
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise UserError(
            f"loss {loss!r} needs task outputs {missing}; use task.type = 'classify' (with features = true)"
        )


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of the softmax predictions."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1).mean()


class EntropyOptions(LossOptions):
    on: Literal["few_shot", "all"] = Field("few_shot", description="samples whose predictions are sharpened")


class Entropy(LossTerm):
    """Entropy minimisation: confident predictions on the few-shot groups (a classic DA regulariser).

    With few labels per class, low-entropy predictions push decision boundaries away from the
    few-shot samples; the anchor group has labels enough and is left out by default.
    """

    Options = EntropyOptions
    options: EntropyOptions
    reads = ("logits", "anchor")

    def forward(self, outputs: Mapping[str, Any], batch: Batch) -> Tensor:
        _needs(outputs, self.reads, self.name)
        logits = outputs["logits"]
        if self.options.on == "few_shot":
            logits = logits[~outputs["anchor"]]
        if logits.shape[0] == 0:
            return outputs["logits"].sum() * 0.0
        return entropy(logits)


def coral(source: Tensor, target: Tensor) -> Tensor:
    """CORAL (Sun & Saenko 2016): squared Frobenius distance of covariances over ``4 d^2``."""
    d = source.shape[1]
    return (_covariance(source) - _covariance(target)).pow(2).sum() / (4 * d * d)


def _covariance(x: Tensor) -> Tensor:
    centred = x - x.mean(0, keepdim=True)
    return centred.T @ centred / max(1, x.shape[0] - 1)


def moments(source: Tensor, target: Tensor) -> Tensor:
    """Per-feature squared difference of means plus of standard deviations, averaged."""
    mean = (source.mean(0) - target.mean(0)).pow(2).mean()
    std = (source.std(0, unbiased=False) - target.std(0, unbiased=False)).pow(2).mean()
    return mean + std


class AlignmentOptions(LossOptions):
    method: Literal["coral", "moments"] = Field("coral", description="statistic matched to the anchor's")


class FeatureAlignment(LossTerm):
    """Align each few-shot group's pooled features with the anchor group's in the same batch.

    The anchor side is detached: the few-shot group's branch moves towards the anchor's feature
    distribution (the one the shared head was trained on), never the reverse. Groups with fewer
    than two samples, or batches without anchor samples, contribute nothing.
    """

    Options = AlignmentOptions
    options: AlignmentOptions
    reads = ("features", "anchor", "group")
    _said_no_anchor = False

    def forward(self, outputs: Mapping[str, Any], batch: Batch) -> Tensor:
        _needs(outputs, self.reads, self.name)
        features: Tensor = outputs["features"].float()
        anchor_mask: Tensor = outputs["anchor"]
        zero = features.sum() * 0.0
        if int(anchor_mask.sum()) < 2:
            if not self._said_no_anchor:  # it would train nothing, silently
                self._said_no_anchor = True
                warnings.warn(
                    f"loss {self.name!r}: a batch with fewer than 2 anchor samples, so the term adds "
                    "nothing for it; a stage using it needs the anchor group among its groups and a "
                    "sampler giving it at least 2 samples per batch",
                    stacklevel=2,
                )
            return zero
        target = features[anchor_mask].detach()
        distance = coral if self.options.method == "coral" else moments
        terms = []
        groups = outputs["group"][~anchor_mask]
        few = features[~anchor_mask]
        for g in torch.unique(groups).tolist():
            source = few[groups == g]
            if source.shape[0] >= 2:
                terms.append(distance(source, target))
        return torch.stack(terms).mean() if terms else zero

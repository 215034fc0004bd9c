"""The paper's six loss terms, each usable in the discriminator or the generator phase.

A term reads the task's outputs (see :mod:`branchadapt_cartoon.task` for the keys). Terms whose
maths differs between phases (adversarial, CAM, group classification) are listed twice in the
recipe, once per phase: ``[losses.adv_d] type = "adversarial", phase = "discriminator"``.
Discriminator names: ``GA``/``LA`` (global/local, photo domain A), ``GB``/``LB`` (cartoon domain B).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

import branchadapt as ba
from branchadapt import LossOptions, LossTerm

from .recognizers import check_recognizer

D_PHASE = "discriminator"
G_PHASE = "generator"


def _mse_to(x: Tensor, value: float) -> Tensor:
    return F.mse_loss(x, torch.full_like(x, value))


def _bce_to(x: Tensor, value: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(x, torch.full_like(x, value))


class _PhaseTerm(LossTerm):
    """A term with one formula per phase; unknown phases fail at build time, not mid-run."""

    default_phase = G_PHASE

    def __init__(self, options: LossOptions | None = None, name: str | None = None) -> None:
        super().__init__(options, name)
        if self.phase not in (D_PHASE, G_PHASE):
            raise ba.ConfigError(
                f"losses.{self.name}.phase: {self.phase!r}; expected {D_PHASE!r} or {G_PHASE!r}"
            )


class AdversarialOptions(LossOptions):
    cam_logits: bool = Field(
        True, description="also train the discriminators' CAM logits adversarially (U-GAT-IT)"
    )


class Adversarial(_PhaseTerm):
    """LSGAN: D pushes real patches to 1 and fakes to 0; G pushes D's view of its fakes to 1."""

    Options = AdversarialOptions
    options: AdversarialOptions

    def forward(self, outputs: Mapping[str, Any], batch: ba.Batch) -> Tensor:
        fake = outputs["d_fake"]
        if self.phase == D_PHASE:
            real = outputs["d_real"]
            terms = [_mse_to(real[k].patch, 1.0) + _mse_to(fake[k].patch, 0.0) for k in fake]
        else:
            terms = [_mse_to(fake[k].patch, 1.0) for k in fake]
            if self.options.cam_logits:
                terms += [_mse_to(fake[k].cam_logit, 1.0) for k in fake]
        return torch.stack(terms).sum()


class Cam(_PhaseTerm):
    """CAM. Generator: BCE on its own CAM logits (translation -> 1, identity mapping -> 0).
    Discriminator: least squares on its CAM logits (real -> 1, fake -> 0)."""

    def forward(self, outputs: Mapping[str, Any], batch: ba.Batch) -> Tensor:
        if self.phase == D_PHASE:
            real, fake = outputs["d_real"], outputs["d_fake"]
            return torch.stack(
                [_mse_to(real[k].cam_logit, 1.0) + _mse_to(fake[k].cam_logit, 0.0) for k in fake]
            ).sum()
        cam = outputs["cam"]
        return (
            _bce_to(cam["a2b"], 1.0)
            + _bce_to(cam["b2b"], 0.0)
            + _bce_to(cam["b2a"], 1.0)
            + _bce_to(cam["a2a"], 0.0)
        )


class Cycle(LossTerm):
    """L1 between an image and its round trip (photo -> cartoon -> photo, and back)."""

    default_phase = G_PHASE

    def forward(self, outputs: Mapping[str, Any], batch: ba.Batch) -> Tensor:
        return F.l1_loss(outputs["rec_a"], outputs["real_a"]) + F.l1_loss(outputs["rec_b"], outputs["real_b"])


class Identity(LossTerm):
    """L1 between an image and the generator into its own domain applied to it."""

    default_phase = G_PHASE

    def forward(self, outputs: Mapping[str, Any], batch: ba.Batch) -> Tensor:
        return F.l1_loss(outputs["id_a"], outputs["real_a"]) + F.l1_loss(outputs["id_b"], outputs["real_b"])


class FaceIdOptions(LossOptions):
    recognizer: dict[str, Any] = Field(
        default_factory=lambda: {"type": "toonfaces_id"},
        description="a registered recognizer backbone {type = name, ...options}: toonfaces_id, mobilefacenet, timm_recognizer",
    )

    @field_validator("recognizer")
    @classmethod
    def _recognizer(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Checked as the experiment loads (:func:`.recognizers.check_recognizer`)."""
        return check_recognizer(value) or value


class FaceId(LossTerm):
    """1 - cosine of recognizer embeddings of input and translation, both directions."""

    Options = FaceIdOptions
    options: FaceIdOptions
    default_phase = G_PHASE

    def __init__(self, options: FaceIdOptions | None = None, name: str | None = None) -> None:
        super().__init__(options, name)
        spec = dict(self.options.recognizer)
        kind = spec.pop("type", None)
        if not kind:
            raise ba.ConfigError(f"losses.{self.name}.recognizer: needs a 'type' (a registered recognizer)")
        self.recognizer = ba.build_backbone(str(kind), **spec).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FaceId:
        super().train(mode)
        self.recognizer.eval()  # a fixed judge: never update its statistics
        return self

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        fx, fy = self.recognizer(x), self.recognizer(y)
        return (1.0 - F.cosine_similarity(fx.float(), fy.float(), dim=1)).mean()

    def forward(self, outputs: Mapping[str, Any], batch: ba.Batch) -> Tensor:
        return self._distance(outputs["real_a"], outputs["fake_b"]) + self._distance(
            outputs["real_b"], outputs["fake_a"]
        )


class GroupCls(_PhaseTerm):
    """Group classification by the global discriminators' head: real images train D, fakes train G."""

    def forward(self, outputs: Mapping[str, Any], batch: ba.Batch) -> Tensor:
        if self.phase == D_PHASE:
            d, ids = outputs["d_real"], outputs["groups"]
        else:
            d, ids = outputs["d_fake"], outputs["fake_groups"]
        terms = []
        for key, domain in (("GA", "A"), ("GB", "B")):
            logits = d[key].group_logits
            if logits is None:
                raise ba.ConfigError(
                    f"losses.{self.name}: the discriminators have no group head; set task.group_head = true"
                )
            terms.append(F.cross_entropy(logits.float(), ids[domain]))
        return torch.stack(terms).sum()

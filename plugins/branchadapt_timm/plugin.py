"""Entry point of the timm plugin set (group ``branchadapt``): registers its implementations."""

from __future__ import annotations

from branchadapt.hookspecs import Register, hookimpl


@hookimpl
def register_backbones(register: Register) -> None:
    from .backbone import TimmBackbone

    register(TimmBackbone, name="timm")


@hookimpl
def register_tasks(register: Register) -> None:
    from .task import ClassifyTask

    register(ClassifyTask, name="classify")


@hookimpl
def register_losses(register: Register) -> None:
    from .losses import Entropy, FeatureAlignment

    register(Entropy, name="entropy")
    register(FeatureAlignment, name="feature_alignment")


@hookimpl
def register_data(register: Register) -> None:
    from .digits import Digits
    from .folders import ImageFolders

    register(Digits, name="digits")
    register(ImageFolders, name="image_folders")

"""Entry point of the cartoon plugin set (group ``branchadapt``): registers its implementations."""

from __future__ import annotations

import argparse
from typing import Any

from branchadapt.hookspecs import Register, hookimpl

from . import losses, splitters
from .data import FaceImages


@hookimpl
def register_backbones(register: Register) -> None:
    from .networks import UGATITGenerator
    from .recognizers import MobileFaceNet, TimmRecognizer

    register(UGATITGenerator, name="ugatit")
    register(MobileFaceNet, name="mobilefacenet")
    register(TimmRecognizer, name="timm_recognizer")


@hookimpl
def register_tasks(register: Register) -> None:
    from .task import Translate

    register(Translate, name="translate")


@hookimpl
def register_losses(register: Register) -> None:
    register(losses.Adversarial, name="adversarial")
    register(losses.Cam, name="cam")
    register(losses.Cycle, name="cycle")
    register(losses.Identity, name="identity")
    register(losses.FaceId, name="face_id")
    register(losses.GroupCls, name="group_cls")


@hookimpl
def register_splitters(register: Register) -> None:
    register(splitters.SelectiveDetach, name="selective_detach")
    register(splitters.Finetune, name="finetune")
    register(splitters.PerGroupFinetune, name="per_group_finetune")


@hookimpl
def register_data(register: Register) -> None:
    register(FaceImages, name="faces")


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction, context: Any) -> None:
    from .translate import add_command

    add_command(subparsers)

"""What a stage runs with (:class:`StageRuntime`), what a run reports (:class:`RunResult`), how
a task's backbones are built and branched for a stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .data import StepData
from .interfaces import Backbone, LossTerm, Phase, Task
from .loading import Component, ResolvedStage
from .splitting import split


def backbone_factory(model: Component, initial_weights: bool = True) -> Callable[[], Backbone]:
    """What ``TaskContext.build_backbone`` calls; without ``initial_weights`` the backbone's
    :attr:`~Backbone.initial_weights_options` are at their defaults (no file read: trained weights
    follow)."""
    options = model.options
    if not initial_weights:
        fields = type(options).model_fields
        skip = model.cls.initial_weights_options
        unusable = [f for f in skip if f not in fields or fields[f].is_required()]
        if unusable:
            raise TypeError(
                f"{model.cls.__name__}.initial_weights_options names {unusable}: not options with a default"
            )
        options = options.model_copy(
            update={f: fields[f].get_default(call_default_factory=True) for f in skip}
        )
    return lambda: model.cls(options)


def wrap_backbones(
    modules: dict[str, nn.Module], stage: ResolvedStage, groups: tuple[str, ...], anchor: str
) -> dict[str, nn.Module]:
    """Branch every :class:`Backbone` among ``modules`` as the stage's splitter says."""
    splitter = stage.splitter.cls(stage.splitter.options)
    out: dict[str, nn.Module] = {}
    for name, module in modules.items():
        if isinstance(module, Backbone):
            module = split(
                splitter, f"{stage.splitter.where} (splitter {stage.splitter.type!r})", module, groups, anchor
            )
        out[name] = module
    return out


@dataclass
class StageRuntime:
    """Everything a stage's loop needs, built from the resolved experiment."""

    stage: ResolvedStage
    index: int
    task: Task
    modules: dict[str, nn.Module]
    phases: list[Phase]
    losses: dict[str, list[LossTerm]]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    data: StepData
    forward_modules: dict[str, nn.Module]  # what Task.forward calls: DDP-wrapped under torchrun

    @property
    def steps(self) -> int:
        return self.stage.spec.steps


@dataclass
class RunResult:
    run_dir: Path
    completed: list[str] = field(default_factory=list)
    paused_at: tuple[str, int] | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)

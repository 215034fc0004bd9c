"""branchadapt: few-shot domain adaptation by group branches.

The pieces a custom training loop needs are importable from here: the interfaces, the registry
and plugin set, :func:`build` for any registered implementation, :class:`BranchedModel`, the
trainer's optimiser helpers, and checkpoint save/load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from . import splitting
from .branched import BranchedModel, GroupBranches, check_group_names
from .checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from .config import Experiment
from .data import StepData, step_batches, to_device
from .device import autocast, select_device
from .errors import (
    CheckpointError,
    CheckpointMismatch,
    ConfigError,
    RegistryError,
    TrainingDiverged,
    UserError,
)
from .hookspecs import hookimpl
from .interfaces import (
    Backbone,
    Batch,
    BranchSplitter,
    DataSource,
    GroupSampler,
    LossOptions,
    LossTerm,
    Participation,
    Phase,
    PluginOptions,
    Task,
    TaskContext,
)
from .loading import describe, load_experiment
from .plugins import PluginSet, default_plugins
from .registry import Registry

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "Batch",
    "BranchSplitter",
    "BranchedModel",
    "CheckpointError",
    "CheckpointMismatch",
    "ConfigError",
    "DataSource",
    "Experiment",
    "GroupBranches",
    "GroupSampler",
    "LossOptions",
    "LossTerm",
    "Participation",
    "Phase",
    "PluginOptions",
    "PluginSet",
    "Registry",
    "RegistryError",
    "StepData",
    "Task",
    "TaskContext",
    "TrainingDiverged",
    "UserError",
    "autocast",
    "branch",
    "build",
    "build_backbone",
    "default_plugins",
    "hookimpl",
    "load_checkpoint",
    "load_experiment",
    "load_weights",
    "registry",
    "save_checkpoint",
    "save_weights",
    "select_device",
    "step_batches",
    "to_device",
]


def registry() -> Registry:
    """The process-wide registry (builtins + installed plugins)."""
    return default_plugins().registry


def build(kind: str, name: str, *args: Any, **options: Any) -> Any:
    """Instantiate a registered implementation with validated options.

    ``build("loss", "cross_entropy", weight=2.0)``; positional ``args`` follow the options (e.g.
    the sizes and seed of a sampler, the groups of a data source).
    """
    cls: Any = registry().get(kind, name)
    try:
        opts = cls.Options.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(describe(e, cls.Options) for e in exc.errors())
        raise ConfigError(f"{kind} {name!r}: {problems}") from None
    if kind == "loss":
        return cls(opts, name=name)
    return cls(opts, *args)


def build_backbone(name: str, **options: Any) -> Backbone:
    """A registered backbone by name: ``build_backbone("mlp", hidden=[64])``."""
    backbone: Backbone = build("backbone", name, **options)
    return backbone


def branch(
    backbone: Backbone,
    groups: Sequence[str],
    splitter: str = "branches",
    anchor: str | None = None,
    **options: Any,
) -> BranchedModel:
    """Branch ``backbone`` for ``groups`` with a registered splitter: ``branch(net, g, low=2, top=1)``.

    ``anchor`` (default: the first group) is the group with many samples. The backbone is branched
    in place: use the returned model (or its ``extract(group)``) from then on."""
    if not isinstance(backbone, Backbone):
        raise TypeError(
            f"ba.branch() takes a branchadapt.Backbone (a module that names its stages), got "
            f"{type(backbone).__name__}; subclass ba.Backbone and list the stages in stage_names()"
        )
    check_group_names(groups)
    split: BranchSplitter = build("splitter", splitter, **options)
    anchor = groups[0] if anchor is None else anchor
    if anchor not in groups:
        raise UserError(f"anchor {anchor!r} is not one of the groups {list(groups)}")
    problems = split.check_groups(groups)
    if problems:
        raise UserError(f"splitter {splitter!r}: " + "; ".join(problems))
    return splitting.split(split, f"splitter {splitter!r}", backbone, groups, anchor)

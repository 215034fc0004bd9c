"""The abstract pieces a plugin implements.

Four concepts carry the method (``Backbone``, ``BranchSplitter``, ``LossTerm``, ``GroupSampler``);
two more keep the engine domain-free: a ``DataSource`` says where group-keyed samples come from
and a ``Task`` says what one training step computes. Every implementation declares its options as
a pydantic model (``Options``) so experiment files are validated down to plugin options.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch
from pydantic import ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.utils.data import default_collate

from .batching import StackedRule
from .errors import UserError
from .paths import anchor_values
from .scalars import TomlTyped

#: A step's input: for every stream (e.g. "source", "target", "train") a dict of batched tensors,
#: always including ``"group"``, the index of each sample's group in the experiment's group list.
Batch = dict[str, dict[str, Tensor]]


class PluginOptions(TomlTyped):
    """Base of every plugin's options; unknown keys are errors, so typos never pass silently, and
    scalars must have their field's TOML type (:mod:`branchadapt.scalars`: ``"yes"`` is no boolean).

    ``Path`` fields that are relative are taken beside the experiment file when the core
    validates the options (:mod:`branchadapt.paths`). Defaults are validated too: a plugin whose
    default breaks its own field's constraint is refused, not run with it."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="after")
    def _anchor_paths(self) -> Self:
        for name in type(self).model_fields:
            value = getattr(self, name)
            anchored = anchor_values(value)
            if anchored is not value:  # frozen: set in place, as validation does
                object.__setattr__(self, name, anchored)
        return self


class Participation(StrEnum):
    """How a group's samples take part in the shared stages of a branched model."""

    LIVE = "live"  #: the group's losses update the shared parameters
    DETACHED = "detached"  #: selective back-propagation: gradients pass through, shared params get none
    FROZEN = "frozen"  #: like detached, and the shared stages run in eval mode (buffers untouched)


class Backbone(nn.Module, ABC):
    """A network that can be cut by depth: an ordered list of named stages.

    ``stage_names()`` lists attribute paths of sub-modules, lowest (input side) first. The forward
    must call each stage through its attribute (``self.enc1(x)``) with tensors whose dim 0 is the
    batch, so the branched model can swap a stage for a per-group router.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: block classes compiled one by one under ``train.compile = "units"`` (regional compilation;
    #: see :mod:`branchadapt.compiling`); empty: the backbone is never compiled
    compile_unit_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: the forward treats batch rows independently (no batch statistics, no mixing across rows), so
    #: live and detached groups can share one call through the shared stages (``train.fuse_participation``,
    #: :mod:`branchadapt.rowgrad`); False: they run as separate calls
    rows_independent: ClassVar[bool] = False
    #: options naming files that only initialise the weights (e.g. ``("weights",)``): when trained
    #: weights replace them (a stage starting from an earlier one, a resume, a finished run loaded
    #: for evaluation or export; :attr:`TaskContext.initial_weights`), the engine builds the
    #: backbone with these options at their defaults, so the files need not exist any more
    initial_weights_options: ClassVar[tuple[str, ...]] = ()
    #: names of the forward's positional inputs and of its flattened outputs in an exported graph
    #: (``branchadapt export``); empty: ``input0``, ``input1``, ... and ``output0``, ``output1``, ...
    input_names: ClassVar[tuple[str, ...]] = ()
    output_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: PluginOptions | None = None) -> None:
        super().__init__()
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def stage_names(self) -> list[str]:
        """Ordered stage names, input side first (by default each is a ``get_submodule`` path)."""

    def stage_paths(self, stage: str) -> list[str]:
        """The sub-module paths making up ``stage`` (default: the stage name itself).

        Override when one logical stage is several sibling modules (e.g. a CNN stem made of a
        conv, a norm and a pool) so split depth counts logical stages, not modules.
        """
        return [stage]

    def stacked_rule(self, path: str, module: nn.Module) -> StackedRule | None:
        """How to run several groups' copies of the branch sub-module ``module`` (at ``path``) as one
        call, when the branched model stacks them (``train.stack_branches``). None, the default:
        ``torch.func.vmap`` over the copies' stacked parameters, which works for any module with
        vmap rules. A backbone that knows a cheaper way for some of its modules returns a
        :class:`branchadapt.batching.StackedRule` (see its contract); asked once per path, at split
        time, with the module before it is copied per group.
        """
        return None

    def example_inputs(self, batch_size: int = 1) -> tuple[Tensor, ...]:
        """Positional inputs of one forward (for export and tracing); dim 0 is the batch.

        Backbones that can be exported (``branchadapt export``) override this.
        """
        raise NotImplementedError(f"{type(self).__name__} does not declare example_inputs()")


class BranchSplitter(ABC):
    """Decides which stages become per-group branches and how each group uses the shared rest."""

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def branch_stages(self, stage_names: Sequence[str]) -> list[str]:
        """The stages that get one copy per group, a subset of ``stage_names``."""

    @abstractmethod
    def participation(self, group: str, anchor: str) -> Participation:
        """How ``group`` takes part in the shared stages (the anchor is the many-sample group)."""

    def check_groups(self, groups: Sequence[str]) -> list[str]:
        """Problems with the options given the experiment's ``groups`` (an option naming a group
        that does not exist, say), one message each; checked when an experiment is loaded."""
        return []


class LossOptions(PluginOptions):
    """Options every loss term has; a loss plugin extends this model with its own fields."""

    weight: float = Field(1.0, ge=0, description="multiplier of the term in its phase's total")
    phase: str | None = Field(None, description="optimiser phase fed; default: the term's own")
    enabled: bool = Field(True, description="false removes the term from the stage")


class LossTerm(nn.Module, ABC):
    """A named, weighted loss feeding one optimiser phase.

    It is an ``nn.Module`` so helper networks it owns (e.g. a frozen feature extractor) follow the
    device; its state is not trained and not checkpointed.
    """

    Options: ClassVar[type[PluginOptions]] = LossOptions
    #: the optimiser phase this term feeds unless the config says otherwise
    default_phase: ClassVar[str] = "main"
    #: the task outputs it reads; a run checks them against :meth:`Task.outputs` before it writes
    #: anything, so a stage whose task lacks one is refused at once, not when that stage begins
    reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: PluginOptions | None = None, name: str | None = None) -> None:
        super().__init__()
        self.options = options if options is not None else self.Options()
        self.name = name or type(self).__name__
        phase = getattr(self.options, "phase", None)
        self.weight = float(getattr(self.options, "weight", 1.0))
        self.phase = phase or self.default_phase

    @abstractmethod
    def forward(self, outputs: Mapping[str, Any], batch: Batch) -> Tensor:
        """The unweighted scalar loss from the task's outputs and the batch."""


def loss_value(term: LossTerm, value: Any) -> Tensor:
    """``value``, what ``term`` returned, as a 0-dim float tensor; anything but a one-value tensor
    (a float, a tuple, a per-sample vector) is a user error naming the term."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise UserError(
            f"loss {term.name!r} ({type(term).__module__}.{type(term).__qualname__}) returned {got}; expected "
            "a scalar tensor (reduce a per-sample loss with .mean(), say)"
        )
    return value.reshape(()).float()


class GroupSampler(ABC):
    """Plans which samples of which groups form each step's batch.

    Plans are a pure function of (seed, step), so resuming at step k replays exactly what an
    uninterrupted run would have seen, and ranks can shard a plan without talking to each other.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(
        self,
        options: PluginOptions | None,
        sizes: Mapping[str, Mapping[str, int]],
        seed: int,
    ) -> None:
        self.options = options if options is not None else self.Options()
        self.sizes = {g: dict(s) for g, s in sizes.items()}
        self.seed = seed

    @abstractmethod
    def plan(self, step: int) -> dict[str, list[tuple[str, int]]]:
        """For ``step``: stream name -> list of (group, index into that group's stream)."""


class DataSource(ABC):
    """Group-keyed samples: for each group, one or more named streams of items.

    A translation task has two unpaired streams per group (source and target domain), a
    classifier one. ``get`` receives the RNG to use for augmentation so data is reproducible.
    Like a module, a source is in training mode (:attr:`training`) unless :meth:`eval` was called:
    evaluation reads the items as they are, without training-time augmentation, whatever the split.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: the splits it can load; another one is a user error naming these
    splits: ClassVar[tuple[str, ...]] = ("train", "test")

    def __init__(
        self,
        options: PluginOptions | None,
        groups: Sequence[str],
        base_dir: Path,
        split: str = "train",
    ) -> None:
        if split not in self.splits:
            raise UserError(
                f"data split {split!r} does not exist; {type(self).__name__} has {', '.join(map(repr, self.splits))}"
            )
        self.options = options if options is not None else self.Options()
        self.groups = tuple(groups)
        self.base_dir = base_dir
        self.split = split
        #: False after :meth:`eval`: ``get`` should not augment
        self.training = True

    def train(self, mode: bool = True) -> Self:
        """Training mode (``get`` may augment) or, with ``mode=False``, evaluation mode."""
        self.training = mode
        return self

    def eval(self) -> Self:
        """Evaluation mode: ``get`` gives items without training-time augmentation."""
        return self.train(False)

    @abstractmethod
    def sizes(self) -> dict[str, dict[str, int]]:
        """group -> stream -> number of items."""

    @abstractmethod
    def get(self, group: str, stream: str, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """One item as a dict of tensors/numbers; ``rng`` drives any randomness (augmentation)."""

    def collate(self, stream: str, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Stack items of one stream into a batch (override for ragged data)."""
        return default_collate(items)

    def describe(self, group: str, stream: str, index: int) -> str:
        """How messages name one item (a file's path, say; default ``group/stream[index]``)."""
        return f"{group}/{stream}[{index}]"


@dataclass(frozen=True)
class Phase:
    """One optimiser phase of a step: its name and the modules whose parameters it updates."""

    name: str
    modules: tuple[str, ...]


@dataclass
class TaskContext:
    """What a task needs from the experiment to build its modules."""

    groups: tuple[str, ...]
    anchor: str
    build_backbone: Callable[[], Backbone]
    extras: dict[str, Any] = field(default_factory=dict)
    #: False when trained weights are loaded into the built modules straight after (a stage that
    #: starts from an earlier one or resumes, or a finished run loaded for inference): ``Task.build``
    #: can then skip its own initial weights (files it would read only to be overwritten);
    #: ``build_backbone`` already leaves out the backbone's :attr:`Backbone.initial_weights_options`
    initial_weights: bool = True


class Task(ABC):
    """What one training step computes for a domain (the only place that knows the domain).

    The engine owns the loop, optimisers, checkpoints and devices; the task builds the named
    modules (every ``Backbone`` among them is branched by the engine), lists the optimiser phases
    and computes, per phase, the outputs the loss terms read.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions | None, context: TaskContext) -> None:
        self.options = options if options is not None else self.Options()
        self.context = context

    @abstractmethod
    def build(self) -> dict[str, nn.Module]:
        """Fresh, untrained modules by name."""

    @abstractmethod
    def phases(self) -> list[Phase]:
        """Optimiser phases in the order they run within a step."""

    @abstractmethod
    def forward(
        self,
        phase: str,
        modules: Mapping[str, nn.Module],
        batch: Batch,
        scratch: dict[str, Any],
    ) -> dict[str, Any]:
        """Outputs for ``phase``; ``scratch`` persists across the phases of one step."""

    def backward(self, phase: str, loss: Tensor, scratch: dict[str, Any]) -> None:
        """Back-propagate ``phase``'s weighted total ``loss``; default ``loss.backward()``.

        A task may split the backward pass at tensors it kept in ``scratch`` (e.g. to run
        independent parts at once, :mod:`branchadapt.concurrency`); the parameters' gradients
        must end up as ``loss.backward()`` would leave them.
        """
        loss.backward()

    def after_step(self, phase: str, modules: Mapping[str, nn.Module]) -> None:
        """Hook after a phase's optimiser step (e.g. clamping parameters); default: nothing."""

    def evaluate(
        self,
        modules: Mapping[str, nn.Module],
        source: DataSource,
        device: torch.device,
        out_dir: Path | None = None,
    ) -> dict[str, dict[str, float]] | None:
        """Per-group metrics on ``source`` (a held-out split); None: the task has no evaluation.

        A task may also write figures (PNG) into ``out_dir``; the report embeds them.
        """
        return None

    def outputs(self, phase: str) -> frozenset[str] | None:
        """The keys :meth:`forward` returns for ``phase`` with these options (checked against the
        losses' :attr:`LossTerm.reads`); None: not declared, nothing checked."""
        return None

    def example_inputs(
        self, module: str, source: DataSource, batch_size: int = 2
    ) -> tuple[Tensor, ...] | None:
        """Inputs for ``module`` shaped as the training data makes them (``source``: the train
        split). A run tries every stage's modules on them before it trains (a branched backbone
        with ``groups``, another module with these inputs alone) and ``export`` traces a
        backbone with them. None: not tried, and ``export`` uses the backbone's own
        :meth:`Backbone.example_inputs`."""
        return None

    def samples(
        self,
        modules: Mapping[str, nn.Module],
        source: DataSource,
        device: torch.device,
        out_dir: Path,
        step: int,
    ) -> list[Path]:
        """Write periodic training samples (e.g. image grids) into ``out_dir``; default: none."""
        return []

"""What a run checks before it writes anything, and what ``branchadapt validate`` builds.

:func:`check_stages` is the run's own first step: every stage's losses against what the task
gives them, the training data of every stage and each stage's first global batch (under
``torchrun``, that it splits evenly over the processes), so that a mistake in a later stage is
refused before the run directory is touched, not hours in.
:func:`build_stages` goes further for ``validate``: it builds every stage as its start would
(models, branches, weight files the experiment names, losses, optimisers, sampler), without
the earlier stages' trained weights, which only a run produces, and runs its models on inputs
shaped as the data's where the task can make them (:func:`try_inputs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import distributed
from .branched import BranchedModel
from .data import check_plan
from .errors import ConfigError, UserError, not_options
from .interfaces import DataSource, Task
from .rundir import final_weights

if TYPE_CHECKING:
    from .loading import ResolvedStage
    from .trainer import Trainer


def check_stages(trainer: Trainer, world: int | None = None) -> DataSource:
    """Every stage's losses against the task's outputs, training data and first global batch
    (split over ``world`` processes, by default the trainer's); returns the train split's source."""
    check_reads(trainer)
    source = trainer.build_source("train")
    world = trainer.dist.world if world is None else world
    for index, stage in enumerate(trainer.exp.stages):
        sizes = stage_sizes(trainer, stage, source)
        sampler = trainer.sampler(index, stage, sizes)
        plan = sampler.plan(0)
        check_plan(plan, sizes, 0, sampler_label(trainer, stage))  # each step's is checked as it is read
        uneven = distributed.uneven_stream(plan, world)
        if uneven is not None:
            raise ConfigError(
                f"{sampler_label(trainer, stage)}: the global "
                f"batch of stream {uneven[0]!r} has {uneven[1]} items, not a multiple of the {world} "
                f"processes; set its batch (per_group, batch_size) to a multiple of {world}"
            )
    return source


def sampler_label(trainer: Trainer, stage: ResolvedStage) -> str:
    """How messages name a stage's sampler: the experiment file, its key and the sampler's type."""
    return f"{trainer.exp.source}: stages.{stage.name}.sampler ({stage.sampler.type})"


def stage_sizes(
    trainer: Trainer, stage: ResolvedStage, source: DataSource, notes: bool = True
) -> dict[str, dict[str, int]]:
    """The stage's groups' stream sizes; a group without training data is a user error, and
    (with ``notes``, once per run) a group lacking a stream the others have is pointed out."""
    all_sizes = source.sizes()
    sizes = {g: all_sizes.get(g, {}) for g in stage.groups}
    empty = [g for g, s in sizes.items() if not any(s.values())]
    if empty:
        raise UserError(
            f"{trainer.exp.source}: stages.{stage.name}: groups {empty} have no training data in "
            f"{trainer.exp.data.type!r}"
        )
    streams = {st for s in sizes.values() for st, n in s.items() if n} if notes else set()
    for group, own in sizes.items():
        lacking = sorted(st for st in streams if not own.get(st))
        if lacking:
            trainer.progress.message(
                f"note: stages.{stage.name}: group {group} has no items in stream(s) {lacking} that "
                "other groups have; it trains on its other streams only"
            )
    return sizes


def check_reads(trainer: Trainer) -> None:
    """The experiment against its task, without building a module: every ``optim`` table names one
    of the task's phases (or ``default``), and each loss's
    :attr:`~branchadapt.interfaces.LossTerm.reads` are outputs the task declares for its phase
    (:meth:`~branchadapt.interfaces.Task.outputs`; undeclared: unchecked)."""
    exp = trainer.exp
    task = trainer.build_task(initial_weights=False)  # constructed only: no module is built
    phases = [p.name for p in task.phases()]
    tables = [("optim", exp.spec.optim)] + [(f"stages.{s.name}.optim", s.spec.optim) for s in exp.stages]
    for key, table in tables:  # an optimiser for a phase the task lacks would be silently unused
        strangers = [name for name in table if name != "default" and name not in phases]
        if strangers:
            raise ConfigError(
                f"{exp.source}: {key}.{strangers[0]}: {strangers[0]!r} is not a phase of task "
                f"{exp.task.type!r}; expected one of {phases} or 'default'"
            )
    for stage in exp.stages:
        for comp in stage.losses.values():
            phase = getattr(comp.options, "phase", None) or comp.cls.default_phase
            given = task.outputs(phase)
            missing = [k for k in comp.cls.reads if given is not None and k not in given]
            if missing:
                raise ConfigError(
                    f"{exp.source}: {comp.where}: loss {comp.type!r} reads task outputs {missing}, which "
                    f"task {exp.task.type!r} does not give in phase {phase!r} with these options (it "
                    f"gives {sorted(given or ())})"
                )


def build_stages(trainer: Trainer, source: DataSource) -> list[str]:
    """Build every stage (no earlier stage's weights: they do not exist before a run); one line
    per stage: its modules' trainable parameters, branches included."""
    lines = []
    for index, stage in enumerate(trainer.exp.stages):
        runtime = trainer.build_stage(index, stage, source, check_only=True)
        sizes = ", ".join(
            f"{name} {_count(sum(p.numel() for p in module.parameters() if p.requires_grad))}"
            for name, module in runtime.modules.items()
        )
        try_inputs(trainer, runtime.task, runtime.modules, stage, source)
        lines.append(f"trainable parameters {sizes}")
        del runtime
    return lines


#: module name -> each of its inputs as ``[dtype, shape without the batch dimension]``
InputShapes = dict[str, list[list[Any]]]


def check_inputs(trainer: Trainer, source: DataSource) -> dict[str, InputShapes]:
    """What a run checks of :func:`try_inputs` before it writes anything: every stage's models,
    built without weights, on inputs shaped as the data's, for tasks that can make them
    (others build nothing here), finished stages left out. A branching that breaks a model's
    forward in a later stage is then refused before the earlier stages train, not after.
    Returns the inputs tried, by stage (a run records them with each stage's final weights)."""
    task = trainer.build_task(initial_weights=False)
    tried: dict[str, InputShapes] = {}
    if type(task).example_inputs is Task.example_inputs:
        return tried
    for stage in trainer.exp.stages:
        if final_weights(trainer.run_dir, stage.name).exists():
            continue  # finished already (a resumed run)
        tried[stage.name] = try_inputs(trainer, task, trainer.build_modules(task, stage), stage, source)
    return tried


def try_inputs(
    trainer: Trainer, task: Task, modules: Mapping[str, nn.Module], stage: ResolvedStage, source: DataSource
) -> InputShapes:
    """Each module of the stage the task gives inputs for
    (:meth:`~branchadapt.interfaces.Task.example_inputs`), on the experiment's device: a branched
    backbone with one row per group of the stage, another module with its inputs alone. A model
    built for other inputs (image size, channels, features) is found here rather than in the
    stage's first step. The forward runs as training runs it, gradients on (a model may check
    its inputs only then), with the modules in eval mode (batch statistics of so few rows could
    fail where the real batch does not); the graph is dropped at once. Returns the inputs tried,
    by module."""
    ids = torch.tensor([trainer.groups.index(g) for g in stage.groups])
    tried: InputShapes = {}
    for name, module in modules.items():
        try:
            inputs = task.example_inputs(name, source, len(ids))
        except (KeyError, IndexError) as exc:  # the task's options name what the data lacks
            raise UserError(
                f"{trainer.exp.source}: stages.{stage.name}: task {trainer.exp.task.type!r} cannot make "
                f"inputs for module {name!r} from the data: {type(exc).__name__}: {exc}"
            ) from exc
        if inputs is None:
            continue
        tried[name] = [[str(x.dtype).removeprefix("torch."), list(x.shape[1:])] for x in inputs]
        module.to(trainer.device).eval()
        moved = tuple(x.to(trainer.device) for x in inputs)
        extra = {"groups": ids.to(trainer.device)} if isinstance(module, BranchedModel) else {}
        try:
            with torch.enable_grad():
                module(*moved, **extra)
        except Exception as exc:
            if not_options(exc):  # out of memory: the machine's limit, not the options'
                raise
            shape = ", ".join(str(tuple(x.shape)) for x in inputs)
            raise UserError(
                f"{trainer.exp.source}: stages.{stage.name}: module {name!r} cannot take inputs shaped as "
                f"the data's ({shape}): {type(exc).__name__}: {exc}"
            ) from exc
    return tried


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


__all__ = [
    "InputShapes",
    "build_stages",
    "check_inputs",
    "check_reads",
    "check_stages",
    "stage_sizes",
    "try_inputs",
]

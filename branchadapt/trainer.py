"""The training loop: stages, optimiser phases, checkpoints, resume, metrics.

A run directory holds ``config.toml``/``config.json`` (the resolved experiment), ``metrics.jsonl``,
``checkpoints/<stage>-<step>/`` and ``stages/<stage>/final.safetensors``. Re-running the same
experiment skips finished stages and resumes the current one from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .branched import BranchedModel
from .checkpoint import (
    latest_checkpoint,
    prune_checkpoints,
    read_tensors,
    resume_latest,
    save_checkpoint,
    save_weights,
    split_state,
    state_differences,
)
from .compiling import compile_units, compiles_units
from .data import StepData, step_batches, to_device
from .device import autocast, configure_backend, select_device
from .divergence import diverged, finite_gradients, nonfinite_names
from .errors import CheckpointError, ConfigError, UserError, first_step, naming
from .interfaces import Batch, DataSource, GroupSampler, LossTerm, Phase, Task, TaskContext, loss_value
from .interrupt import StopRequest
from .loading import ResolvedExperiment, ResolvedStage
from .optim import build_optimizer, build_scheduler, unique_params
from .preflight import InputShapes, check_inputs, check_stages, sampler_label, stage_sizes
from .progress import ProgressReporter
from .rng import seed_rngs
from .rundir import check_final_weights, final_weights, forget_logged_steps, hold, prepare_run_dir
from .runtime import RunResult, StageRuntime, backbone_factory, wrap_backbones


class Trainer:
    """Runs a resolved experiment's stages in a run directory."""

    def __init__(
        self,
        experiment: ResolvedExperiment,
        run_dir: Path | None = None,
        device: str | None = None,
        progress: ProgressReporter | None = None,
        join_process_group: bool = True,
    ) -> None:
        """``join_process_group = False``: one process even under ``torchrun`` (rank 0's evaluation
        after training, when the other ranks have left the group)."""
        self.exp = experiment
        self.spec = experiment.spec
        self.run_dir = Path(run_dir) if run_dir is not None else experiment.run_dir
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(
                f"run directory {self.run_dir} is a file; expected a folder (new, or holding this run)"
            )
        device_ = select_device(device or self.spec.device)
        # torchrun: join the process group, else one process
        self.dist = distributed.setup(device_) if join_process_group else distributed.DistInfo()
        # under torchrun this rank's own GPU, whether or not it joins the group
        self.device = distributed.local_device(device_, distributed.from_env())
        configure_backend(self.device, self.spec.train.retain_freed_memory)
        mode = self.spec.train.progress if self.dist.is_main else "none"
        self.progress = progress or ProgressReporter(mode)
        self._interrupt = StopRequest(enabled=not self.dist.enabled)
        #: whether a stage's steps have begun (errors before are the same on every rank)
        self.started = False
        self.groups = tuple(self.spec.groups)
        self.anchor = self.spec.anchor_group

    # ------------------------------------------------------------------ building
    def build_source(self, split: str = "train") -> DataSource:
        data = self.exp.data
        with naming(self.exp.source):  # a plugin refusing its options names the key only
            return data.cls(data.options, self.groups, self.exp.base_dir, split)

    def build_task(self, initial_weights: bool = True) -> Task:
        """The experiment's task; ``initial_weights=False`` when trained weights replace what it
        builds (:attr:`TaskContext.initial_weights`)."""
        build = backbone_factory(self.exp.model, initial_weights)
        context = TaskContext(self.groups, self.anchor, build, initial_weights=initial_weights)
        with naming(self.exp.source):
            return self.exp.task.cls(self.exp.task.options, context)

    def build_modules(self, task: Task, stage: ResolvedStage) -> dict[str, nn.Module]:
        """The task's modules, every backbone branched as ``stage`` says."""
        with naming(self.exp.source):
            return wrap_backbones(task.build(), stage, self.groups, self.anchor)

    def build_stage(
        self, index: int, stage: ResolvedStage, source: DataSource, check_only: bool = False
    ) -> StageRuntime:
        """The stage ready to train; ``check_only`` (``validate``): without its ``init_from``
        weights, a checkpoint's or compiling."""
        seed_rngs(self.spec.seed + 1000 * index)
        # an earlier stage's weights or a checkpoint replace the initial ones
        resumes = not check_only and latest_checkpoint(self.run_dir, stage.name) is not None
        task = self.build_task(initial_weights=not (stage.spec.init_from or resumes))
        modules = self.build_modules(task, stage)
        if stage.spec.init_from and not check_only:
            self.load_stage_weights(stage.spec.init_from, modules)
        compiling = not check_only and compiles_units(self.spec.train.compile, self.device)
        for module in modules.values():
            module.to(self.device).train()
            if isinstance(module, BranchedModel):
                module.stacked = self.spec.train.stack_branches
                # compiled units would trace the row-restricting mode: keep the separate calls there
                module.fused = False if compiling else self.spec.train.fuse_participation
        if compiling:
            n = compile_units(modules.values())
            self.progress.message(
                f"stage {stage.name}: {n} backbone units compiled (the first steps are slow while they compile)"
                if n
                else f"stage {stage.name}: train.compile = 'units' but no backbone declares compile_unit_types"
            )
        phases = task.phases()
        losses = self._losses(stage, phases, task)
        optimizers, schedulers = {}, {}
        for phase in phases:
            if not losses.get(phase.name):
                continue
            params = unique_params(
                p for m in phase.modules for p in modules[m].parameters() if p.requires_grad
            )
            spec = self.exp.optim_for(stage, phase.name)
            optimizers[phase.name] = build_optimizer(spec, params, self.spec.train.fused_optimizers)
            schedulers[phase.name] = build_scheduler(spec, optimizers[phase.name], stage.spec.steps)
        sampler = self.sampler(index, stage, stage_sizes(self, stage, source, notes=False))
        data = StepData(
            source,
            sampler,
            self.groups,
            self.spec.seed,
            index,
            self.dist.rank,
            self.dist.world,
            sampler_label(self, stage),
        )
        ddp = distributed.wrap_ddp(modules, self.device)  # also gives every rank rank 0's weights
        return StageRuntime(stage, index, task, modules, phases, losses, optimizers, schedulers, data, ddp)

    def _losses(self, stage: ResolvedStage, phases: list[Phase], task: Task) -> dict[str, list[LossTerm]]:
        names = [p.name for p in phases]
        out: dict[str, list[LossTerm]] = {}
        for loss_name, comp in stage.losses.items():
            term: LossTerm = comp.cls(comp.options, name=loss_name)
            if term.phase not in names:
                raise ConfigError(
                    f"{self.exp.source}: {comp.where}.phase: {term.phase!r} is not a phase of task "
                    f"{self.exp.task.type!r}; expected one of {names}"
                )
            out.setdefault(term.phase, []).append(term.to(self.device))
        return out  # not empty: loading refuses a stage without an enabled loss

    def sampler(self, index: int, stage: ResolvedStage, sizes: dict[str, dict[str, int]]) -> GroupSampler:
        """Stage ``index``'s sampler over ``sizes`` (:func:`~.preflight.stage_sizes`), seeded for the stage."""
        return stage.sampler.cls(stage.sampler.options, sizes, self.spec.seed + index)

    def load_stage_weights(self, stage_name: str, modules: Mapping[str, nn.Module]) -> None:
        """Initialise ``modules`` from an earlier stage's final weights (branching as needed)."""
        path = final_weights(self.run_dir, stage_name)
        state = split_state(read_tensors(path), list(modules))
        for name, module in modules.items():
            own = state.get(name)
            if own is None:
                raise CheckpointError(f"{path} has no weights for module {name!r}")
            if isinstance(module, BranchedModel):
                module.load_flexible(own, self.anchor, source=f"{path} [{name}]")
            else:
                problems = state_differences(module.state_dict(), own, f"{name}.")
                if problems:
                    raise CheckpointError(f"{path} does not match the model:\n  " + "\n  ".join(problems))
                module.load_state_dict(own)

    # ------------------------------------------------------------------ running
    def run(self, max_steps: int | None = None) -> RunResult:
        """Run (or resume) every stage; ``max_steps`` pauses after that many steps in this call.

        In a single process, a Ctrl-C stops the run after the step in progress, checkpointed
        (:mod:`branchadapt.interrupt`); a second one at once."""
        with self._interrupt:
            return self._run(max_steps)

    def _run(self, max_steps: int | None) -> RunResult:
        names = [stage.name for stage in self.exp.stages]
        if all(final_weights(self.run_dir, name).exists() for name in names):  # nothing to train:
            prepare_run_dir(self.run_dir, self.exp, write=False)  # if the run is this experiment's
            for name in names:  # and its weights can be read (evaluation, export, a later stage)
                check_final_weights(self.run_dir, name)
            self.progress.message(f"every stage has finished in {self.run_dir}: nothing to train")
            return RunResult(self.run_dir, completed=names)
        source = check_stages(self)  # every stage's data and batches before anything is written
        # and its models on inputs shaped as the data's, where the task can make them (recorded below)
        inputs = check_inputs(self, source)
        with hold(self.run_dir) if self.dist.is_main else contextlib.nullcontext():  # one process trains it
            # every rank checks, rank 0 writes
            prepare_run_dir(self.run_dir, self.exp, write=self.dist.is_main)
            distributed.barrier(self.dist)
            return self._stages(source, inputs, max_steps)

    def _stages(self, source: DataSource, inputs: dict[str, InputShapes], max_steps: int | None) -> RunResult:
        result = RunResult(self.run_dir)
        budget = max_steps
        for index, stage in enumerate(self.exp.stages):
            final = final_weights(self.run_dir, stage.name)
            if final.exists():
                result.completed.append(stage.name)
                continue
            runtime = self.build_stage(index, stage, source)
            start = self._resume(runtime)
            stop = stage.spec.steps if budget is None else min(stage.spec.steps, start + budget)
            result.last_metrics = self._loop(runtime, start, stop)
            if stop < stage.spec.steps:
                result.paused_at = (stage.name, stop)
                return result
            if budget is not None:
                budget -= stop - start
            if self.dist.is_main:
                meta = {"stage": stage.name, "config_hash": self.exp.config_hash}
                if inputs.get(stage.name):  # the inputs tried: export traces with them, without the data
                    meta["inputs"] = json.dumps(inputs[stage.name])
                save_weights(final, runtime.modules, meta)
            distributed.barrier(self.dist)  # the next stage (and every rank) reads these weights
            result.completed.append(stage.name)
            self.progress.message(f"stage {stage.name}: done, weights in {final}")
            if self._interrupt.requested:  # during the stage's last step
                raise KeyboardInterrupt
            if budget == 0 and index + 1 < len(self.exp.stages):
                result.paused_at = (self.exp.stages[index + 1].name, 0)
                return result
        return result

    def _resume(self, rt: StageRuntime) -> int:
        expect = {"stage": rt.stage.name, "config_hash": self.exp.config_hash}
        latest = resume_latest(self.run_dir, rt.stage.name, rt.modules, rt.optimizers, expect)
        step = 0 if latest is None else int(latest[1]["step"])
        if self.dist.is_main:  # records of steps trained again (all of them, from step 0) go
            forget_logged_steps(self.run_dir / "metrics.jsonl", rt.stage.name, step)
        if latest is None:
            return 0
        ckpt, meta = latest
        for name, sched in rt.schedulers.items():
            sched.load_state_dict(meta["schedulers"][name])
        self.progress.message(f"stage {rt.stage.name}: resuming from {ckpt} (step {step})")
        return step

    def _checkpoint(self, rt: StageRuntime, step: int) -> None:
        if not self.dist.is_main:  # identical state on every rank: rank 0 writes it
            return
        directory = self.run_dir / "checkpoints" / f"{rt.stage.name}-{step:08d}"
        meta = {
            "stage": rt.stage.name,
            "step": step,
            "total_steps": rt.steps,
            "config_hash": self.exp.config_hash,
            "schedulers": {n: s.state_dict() for n, s in rt.schedulers.items()},
            "sampler": {"type": rt.stage.sampler.type, "position": step},
            "time": time.time(),
        }
        save_checkpoint(directory, rt.modules, rt.optimizers, meta)
        prune_checkpoints(self.run_dir, rt.stage.name, self.spec.train.keep_last)

    def _loop(self, rt: StageRuntime, start: int, stop: int) -> dict[str, float]:
        train = self.spec.train
        self.started = True
        self.progress.start_stage(rt.stage.name, rt.steps, start)
        sums: dict[str, Tensor] = {}
        count = 0
        last: dict[str, float] = {}
        saved = start  # the step of the newest checkpoint (or what was resumed)
        try:
            batches = step_batches(rt.data, start, stop, train.workers)
            for step in range(start, stop):
                if self._interrupt.requested:  # Ctrl-C during the step before: keep it, then stop
                    self._stop(rt, step, saved)
                batch = self._next_batch(rt, batches, step, saved)
                with first_step(rt.stage.name, step + 1, first=step == start):
                    values = self.train_step(rt, to_device(batch, self.device), step)
                for k, v in values.items():
                    sums[k] = sums[k] + v if k in sums else v
                count += 1
                done = step + 1
                if done % train.log_every == 0 or done == stop:
                    last = {k: float(v) / count for k, v in sums.items()}
                    last = distributed.average_values(last, self.dist.world, self.device)
                    self._log(rt, done, last)
                    sums, count = {}, 0
                else:
                    self.progress.update(done)
                if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == stop:
                    self._checkpoint(rt, done)
                    saved = done
                if (
                    self.dist.is_main
                    and train.sample_every
                    and (done % train.sample_every == 0 or done == rt.steps)
                ):
                    self._samples(rt, done, saved)
        finally:
            self.progress.end_stage()
        return last

    def _keep(self, rt: StageRuntime, step: int, saved: int) -> str:
        """Checkpoint the steps trained since the newest checkpoint (``saved``) before the run
        stops after ``step`` steps; where they are, for the message ("" when rank 0 alone knows)."""
        if step > saved:
            self._checkpoint(rt, step)
        return (
            f"steps 1-{step} are in {self.run_dir / 'checkpoints'}" if step and not self.dist.enabled else ""
        )

    def _stop(self, rt: StageRuntime, step: int, saved: int) -> None:
        """Stop for a Ctrl-C after ``step`` steps, checkpointing them first."""
        kept = self._keep(rt, step, saved)
        self.progress.message(f"stage {rt.stage.name}: interrupted after step {step} of {rt.steps}; {kept}")
        raise KeyboardInterrupt

    def _next_batch(self, rt: StageRuntime, batches: Iterator[Batch], step: int, saved: int) -> Batch:
        """The batch of ``step``; when its data cannot be read (a user error), the steps trained
        since the newest checkpoint are checkpointed first, so that a fixed file resumes there."""
        try:
            return next(batches)
        except UserError as exc:
            raise self._halted(rt, step, saved, exc, f"before step {step + 1} of {rt.steps}") from exc

    def _halted(self, rt: StageRuntime, step: int, saved: int, exc: UserError, when: str) -> UserError:
        """``exc`` (unreadable data) once the ``step`` steps trained are checkpointed, saying so."""
        kept = self._keep(rt, step, saved)
        where = f"stage {rt.stage.name}: stopped {when}"
        return UserError(f"{exc}\n{where}; {kept + '; ' if kept else ''}fix the data and run again to resume")

    def _samples(self, rt: StageRuntime, step: int, saved: int) -> None:
        """Let the task write its training samples, in eval mode and without gradients; data it
        cannot read stops the run as a training batch's would, the steps trained kept."""
        modes = {name: m.training for name, m in rt.modules.items()}
        for m in rt.modules.values():
            m.eval()
        try:
            with torch.no_grad():
                out = self.run_dir / "samples" / rt.stage.name
                rt.task.samples(rt.modules, rt.data.source, self.device, out, step)
        except UserError as exc:
            raise self._halted(
                rt, step, saved, exc, f"after step {step} of {rt.steps}, writing its samples"
            ) from exc
        finally:
            for name, m in rt.modules.items():
                m.train(modes[name])

    def train_step(self, rt: StageRuntime, batch: Any, step: int | None = None) -> dict[str, Tensor]:
        """One step: every phase's forward, weighted loss, backward and optimiser step. A loss or
        gradient that is not finite stops it before its optimiser step (:mod:`branchadapt.divergence`);
        ``step`` (0-based) lets the message name the step's data items."""
        scratch: dict[str, Any] = {}
        logged: dict[str, Tensor] = {}

        def failure(what: str, names: list[str] | None = None) -> Exception:
            items = rt.data.describe(step) if step is not None else []
            return diverged(rt.stage.name, -1 if step is None else step + 1, what, items, names or [])

        for phase in rt.phases:
            terms = rt.losses.get(phase.name)
            if not terms:
                continue
            with autocast(self.device, self.spec.precision):
                outputs = rt.task.forward(phase.name, rt.forward_modules, batch, scratch)
                values = {t.name: loss_value(t, t(outputs, batch)) for t in terms}
            total = torch.stack([t.weight * values[t.name] for t in terms]).sum()
            if not distributed.all_finite(total, self.dist):  # every rank stops together
                bad = [k for k, v in values.items() if not torch.isfinite(v)]
                raise failure(f"phase {phase.name}'s loss {bad}")
            optimizer = rt.optimizers[phase.name]
            optimizer.zero_grad(set_to_none=True)
            rt.task.backward(phase.name, total, scratch)  # under torchrun, DDP averages the gradients here
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if not finite_gradients(params):  # averaged under torchrun: the same on every rank
                raise failure(f"phase {phase.name}'s gradients", nonfinite_names(rt.modules))
            optimizer.step()
            rt.schedulers[phase.name].step()
            rt.task.after_step(phase.name, rt.modules)
            logged.update({f"loss/{k}": v.detach() for k, v in values.items()})
            logged[f"total/{phase.name}"] = total.detach()
        return logged

    def _log(self, rt: StageRuntime, step: int, metrics: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        record = {
            "stage": rt.stage.name,
            "step": step,
            "time": round(time.time(), 3),
            "it_s": round(self.progress.rate(step), 4),
            "lr": {n: s.get_last_lr()[0] for n, s in rt.schedulers.items()},
            **metrics,
        }
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self.progress.update(step, metrics)

"""``branchadapt evaluate``: per-group metrics of a finished run on a held-out split.

The task supplies the metrics (:meth:`~branchadapt.Task.evaluate`); this module rebuilds the run's
modules from its saved config, loads the final weights, and writes/prints the table.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from torch import nn

from .checkpoint import load_weights
from .config import Experiment
from .errors import UserError, naming
from .interfaces import Task
from .loading import ResolvedExperiment, describe, resolve
from .paths import files_not_required
from .plugins import PluginSet, default_plugins
from .report import atomic_write_text, replace_folder, write_html_report
from .rundir import final_weights

if TYPE_CHECKING:
    from .trainer import Trainer


def load_run(run_dir: Path, plugins: PluginSet | None = None) -> ResolvedExperiment:
    """The resolved experiment a run directory was made with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json); expected the directory of a run")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        experiment = saved["experiment"]
    except (ValueError, KeyError, TypeError) as exc:  # not JSON or not UTF-8, or not a run's record
        raise UserError(f"{path}: corrupt run config ({exc})") from exc
    try:
        spec = Experiment.model_validate(experiment)
    except ValidationError as exc:  # written by a branchadapt with other rules
        problems = "; ".join(describe(e, Experiment) for e in exc.errors())
        raise UserError(
            f"{path}: the run's experiment is not valid for this branchadapt version ({problems}); "
            "edit the value in config.json, or evaluate the run with the version that trained it"
        ) from exc
    plugins = plugins or default_plugins()
    source = Path(saved.get("source", path))
    plugins.load_modules(spec.plugins, search_dir=source.resolve().parent, where=f"{path}: plugins")
    with files_not_required():  # files the inference needs are checked where they are read
        return resolve(spec, source, plugins, saved["experiment"])


@dataclass
class LoadedStage:
    """A finished stage of a run, rebuilt exactly as training built it, final weights loaded."""

    experiment: ResolvedExperiment
    stage: str
    task: Task
    modules: dict[str, nn.Module]
    trainer: Trainer

    @property
    def device(self) -> torch.device:
        return self.trainer.device


def load_stage(run_dir: str | Path, stage: str | None = None, device: str | None = None) -> LoadedStage:
    """Rebuild a run's modules for ``stage`` (default: the last) in eval mode, on ``device``, with
    the stage's final weights: ``load_stage("runs/x").modules["model"]`` is the trained model."""
    from .trainer import Trainer

    run_dir = Path(run_dir)
    exp = load_run(run_dir)
    names = [s.name for s in exp.stages]
    stage = stage or names[-1]
    if stage not in names:
        raise UserError(f"--stage {stage!r} is not a stage of this run; expected one of {names}")
    weights = final_weights(run_dir, stage)
    if not weights.is_file():
        raise UserError(f"stage {stage!r} of {run_dir} has not finished (no {weights}); run it first")
    # evaluation runs in one process, also on rank 0 after a torchrun job (the group is gone)
    trainer = Trainer(exp, run_dir=Path(run_dir), device=device, join_process_group=False)
    task = trainer.build_task(initial_weights=False)  # the stage's final weights replace them
    modules = trainer.build_modules(task, exp.stages[names.index(stage)])
    load_weights(weights, modules)
    for module in modules.values():
        module.to(trainer.device).eval()
    return LoadedStage(exp, stage, task, modules, trainer)


def evaluate_run(
    run_dir: Path, stage: str | None = None, split: str = "test", device: str | None = None
) -> dict[str, Any]:
    """Evaluate a stage's final weights (default: the last stage) into ``eval/<stage>-<split>/``.

    Writes ``metrics.json`` and a self-contained ``report.html`` (table + the task's figures). The
    results are written into a new folder that replaces the earlier evaluation's only when
    complete: nothing of an earlier evaluation stays mixed in, and one that fails keeps it.
    """
    loaded = load_stage(run_dir, stage, device)
    exp, stage, task, modules, trainer = (
        loaded.experiment, loaded.stage, loaded.task, loaded.modules, loaded.trainer
    )  # fmt: skip
    source = trainer.build_source(split)  # an unknown split fails here, before anything is written
    source.training = False  # no training-time augmentation (set, not eval(): a source may own "train")
    final = Path(run_dir) / "eval" / f"{stage}-{split}"
    out_dir = final.with_name(f".new-{final.name}-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if not all(os.access(p, os.W_OK) for p in (final.parent, final) if p.exists()):
            raise UserError(f"{final} is not writable; the evaluation writes its results there")
        shutil.rmtree(out_dir, ignore_errors=True)  # left by a process killed mid-evaluation
        out_dir.mkdir()
    except OSError as exc:
        raise UserError(
            f"{final} cannot be created ({exc.strerror or exc}); is {run_dir} writable?"
        ) from None
    try:
        with torch.no_grad(), naming(exp.source):  # as training names it: the file, then the key
            metrics = task.evaluate(modules, source, trainer.device, out_dir)
        if metrics is None:
            raise UserError(f"task {exp.task.type!r} does not define an evaluation")
        report = {"stage": stage, "split": split, "config_hash": exp.config_hash, "groups": metrics}
        atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=1) + "\n")
        write_html_report(out_dir, f"{exp.spec.name}: stage {stage}, {split} split", metrics)
        replace_folder(out_dir, final)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # gone already when it replaced the earlier one
    report["path"] = str(final / "metrics.json")
    report["html"] = str(final / "report.html")
    return report


def metrics_table(report: dict[str, Any]) -> Table:
    """Metrics as rows and groups as columns (there are usually more metrics than groups)."""
    groups: dict[str, dict[str, float]] = report["groups"]
    metrics = list(dict.fromkeys(k for values in groups.values() for k in values))
    table = Table(title=f"stage {report['stage']} on the {report['split']} split")
    table.add_column("metric")
    for group in groups:
        table.add_column(group, justify="right")
    for m in metrics:
        table.add_row(m, *(f"{groups[g][m]:.4f}" if m in groups[g] else "-" for g in groups))
    return table


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    (console or Console(soft_wrap=True, markup=False)).print(metrics_table(report))

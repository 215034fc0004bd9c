"""The ``branchadapt`` command line: run, validate, plugins, schema (plugins may add more).

User errors print one message and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from . import distributed
from .errors import UserError, naming, out_of_memory, traceback_wanted
from .interfaces import PluginOptions, Task
from .loading import json_schema, load_experiment
from .optionsdoc import entries_named, markdown, option_rows
from .plugins import PluginSet, default_plugins
from .registry import KINDS

if TYPE_CHECKING:
    from .datacheck import DataReport


def _experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", type=Path, help="experiment TOML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a key, e.g. --set stages.transfer.steps=50 (value parsed as TOML)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from .rundir import load_for_run
    from .trainer import Trainer

    try:
        exp = load_for_run(args.experiment, args.overrides, args.run_dir)  # finished stages' files unneeded
    except UserError as exc:  # the file reads alike on every rank: under torchrun rank 0 says it once
        exc.quiet = exc.quiet or not distributed.from_env().is_main
        raise
    trainer = Trainer(exp, run_dir=args.run_dir, device=args.device)
    console = Console(stderr=True, soft_wrap=True, quiet=not trainer.dist.is_main, markup=False)
    ranks = f"  processes: {trainer.dist.world}" if trainer.dist.enabled else ""
    console.print(f"run directory: {trainer.run_dir}  device: {trainer.device}{ranks}", highlight=False)
    try:
        result = trainer.run(max_steps=args.max_steps)
    except BaseException as exc:
        distributed.teardown(trainer.dist, failed=True)
        if isinstance(exc, UserError) and not trainer.dist.is_main and not trainer.started:
            exc.quiet = True  # a set-up check every rank makes alike: rank 0 says it once
        raise
    distributed.teardown(trainer.dist)
    if not trainer.dist.is_main:  # under torchrun, rank 0 reports and evaluates
        return 0
    if result.paused_at:
        stage, step = result.paused_at
        console.print(f"paused in stage {stage} at step {step}; run the same command again to resume")
    else:
        console.print(f"done: stages {', '.join(result.completed)} in {result.run_dir}")
    if result.last_metrics:
        print(f"last metrics: {json.dumps({k: round(v, 5) for k, v in result.last_metrics.items()})}")
    if not result.paused_at and not args.no_eval:
        from .evaluation import evaluate_run, print_report

        if exp.task.cls.evaluate is not Task.evaluate:
            try:
                report = evaluate_run(trainer.run_dir, device=args.device)
            except Exception as exc:  # the training is done and kept: the run has succeeded
                if not isinstance(exc, UserError) and not out_of_memory(exc):
                    raise
                console.print(f"evaluation skipped: {exc}", highlight=False)
                return 0
            print_report(report)
            console.print(written(report))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_run, print_report

    report = evaluate_run(args.run_dir, stage=args.stage, split=args.split, device=args.device)
    print_report(report)
    Console(stderr=True, soft_wrap=True, markup=False).print(written(report))
    return 0


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def split_names(text: str) -> list[str]:
    """An argparse type: comma-separated data split names, at least one."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected split names such as train,test, got {text!r}")
    return names


def written(report: dict[str, Any]) -> str:
    """Where an evaluation's files are: its metrics, and its HTML report when one was written."""
    html = report.get("html")
    return f"metrics written to {report['path']}" + (f", report in {html}" if html else "")


def cmd_validate(args: argparse.Namespace) -> int:
    from .preflight import build_stages, check_stages
    from .progress import ProgressReporter
    from .trainer import Trainer

    exp = load_experiment(args.experiment, args.overrides)
    unknown = [s for s in args.data or () if s not in exp.data.cls.splits]
    if unknown:
        raise UserError(
            f"--data: no split {unknown[0]!r} in data source {exp.data.type!r}; "
            f"expected one or more of {', '.join(exp.data.cls.splits)} (comma-separated)"
        )
    # what a run checks before it writes (cheap: no item is read), then --data, then every stage
    # built as it starts (weight files read, models run on the first item). --data comes before
    # the build: a bad item the build reads would stop it with one message, where --data lists
    # every one. On the CPU whatever the file says: a check that needs no GPU.
    trainer = Trainer(exp, device="cpu", progress=ProgressReporter("plain"), join_process_group=False)
    source = check_stages(trainer, world=args.processes)
    with naming(exp.source):
        reports = read_every_item(exp, args.data) if args.data else []
    if any(r.problems for r in reports):
        return report_items(reports)
    built = build_stages(trainer, source)
    spec = exp.spec
    processes = f", batches split over {args.processes} processes" if args.processes > 1 else ""
    print(f"{args.experiment}: OK (config hash {exp.config_hash}{processes})")
    print(f"  groups: {', '.join(spec.groups)} (anchor {spec.anchor_group})")
    print(f"  model: {exp.model.type}  task: {exp.task.type}  data: {exp.data.type}")
    for stage, line in zip(exp.stages, built, strict=True):
        losses = ", ".join(f"{n}x{getattr(c.options, 'weight', 1):g}" for n, c in stage.losses.items())
        init = f", init from {stage.spec.init_from}" if stage.spec.init_from else ""
        print(
            f"  stage {stage.name}: {stage.spec.steps} steps, groups {', '.join(stage.groups)}, "
            f"splitter {stage.splitter.type}, sampler {stage.sampler.type}{init}; losses {losses}; "
            f"{line}"
        )
    return report_items(reports)


def read_every_item(exp: Any, splits: Sequence[str]) -> list[DataReport]:
    """``validate --data``: read every item of each split, with a progress bar on a terminal."""
    from rich.progress import Progress

    from .datacheck import check_data

    reports = []
    for split in splits:
        console = Console(stderr=True)
        with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task(f"reading the {split} data", total=None)

            def advance(done: int, total: int, task: Any = task, bar: Progress = bar) -> None:
                bar.update(task, completed=done, total=total)

            reports.append(check_data(exp, split, advance))
    return reports


def report_items(reports: Sequence[DataReport]) -> int:
    """Print what :func:`read_every_item` found; 2 when an item cannot be used."""
    failed = 0
    for report in reports:
        groups = ", ".join(f"{g} {sum(s.values())}" for g, s in report.sizes.items())
        print(f"  data ({report.split}): {report.items} items read ({groups})", end="")
        if not report.problems:
            print(", all usable")
            continue
        failed += len(report.problems)
        print(f", {len(report.problems)} cannot be used:")
        for message in report.problems[:20]:
            print(f"    {message}")
        if len(report.problems) > 20:
            print(f"    ... and {len(report.problems) - 20} more")
    if failed:
        items = "1 data item" if failed == 1 else f"{failed} data items"
        print(f"error: {items} cannot be used; fix or remove them", file=sys.stderr)
        return 2
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins: PluginSet = args.context
    if args.name is not None:
        return _print_options(plugins, args.name, args.kind, args.markdown)
    if args.markdown:
        raise UserError(
            "--markdown prints one plugin's options: give its name, e.g. branchadapt plugins ugatit --markdown"
        )
    table = Table(title="branchadapt plugins")
    for column in ("kind", "name", "from", "description"):
        table.add_column(column)
    for entry in plugins.registry:
        if args.kind in (None, entry.kind):
            table.add_row(entry.kind, entry.name, entry.origin, entry.summary)
    for name, (origin, help_text) in sorted(plugins.command_origins.items()):  # `branchadapt NAME ...`
        if args.kind is None:
            table.add_row("command", name, origin, help_text)
    Console(width=max(120, Console().width)).print(table)
    return 0


def _print_options(plugins: PluginSet, name: str, kind: str | None, as_markdown: bool) -> int:
    entries = entries_named(plugins.registry, name, kind)
    if as_markdown:
        print("\n\n".join(markdown(e) for e in entries))
        return 0
    console = Console(width=max(120, Console().width))
    for entry in entries:
        table = Table(title=f"{entry.kind} {entry.name!r} ({entry.origin}): {entry.summary}")
        for column in ("key", "default", "meaning"):
            table.add_column(column)
        for row in option_rows(getattr(entry.obj, "Options", PluginOptions)):
            table.add_row(row.key, row.default, row.description)
        console.print(table if table.row_count else f"{entry.kind} {entry.name!r}: no options")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(args.context), indent=2))
    return 0


def build_parser(plugins: PluginSet) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="branchadapt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="train an experiment (resumes its run directory)")
    _experiment_args(run)
    run.add_argument(
        "--run-dir", type=Path, default=None, help="default: run_dir of the file, else runs/<name>"
    )
    run.add_argument(
        "--device", default=None, help="override the experiment's device (auto, cpu, cuda, cuda:N, mps)"
    )
    run.add_argument(
        "--max-steps", type=positive_int, default=None, help="pause after N steps (resume by re-running)"
    )
    run.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    run.set_defaults(handler=cmd_run)
    evaluate = sub.add_parser("evaluate", help="per-group metrics of a finished run on a held-out split")
    evaluate.add_argument("run_dir", type=Path, help="run directory")
    evaluate.add_argument(
        "--stage", default=None, help="stage whose final weights to evaluate (default: last)"
    )
    evaluate.add_argument("--split", default="test", help="data split (default: test)")
    evaluate.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N, mps")
    evaluate.set_defaults(handler=cmd_evaluate)
    validate = sub.add_parser("validate", help="check an experiment file without running it")
    _experiment_args(validate)
    validate.add_argument(
        "--data",
        nargs="?",
        const=["train"],
        type=split_names,
        default=None,
        metavar="SPLITS",
        help="also read every item of the data once and list those that cannot be used "
        "(default split: train; e.g. --data train,test)",
    )
    validate.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        metavar="N",
        help="check that every stage's batch splits over N processes (torchrun's world size)",
    )
    validate.set_defaults(handler=cmd_validate)
    listing = sub.add_parser(
        "plugins", help="list every registered plugin name and plugin command, or one plugin's options"
    )
    listing.add_argument("name", nargs="?", default=None, help="show the options of the plugins of this name")
    listing.add_argument("--kind", default=None, choices=KINDS, help="only plugins of this kind")
    listing.add_argument("--markdown", action="store_true", help="the options as markdown tables")
    listing.set_defaults(handler=cmd_plugins)
    sub.add_parser("schema", help="print the JSON schema of experiment files").set_defaults(
        handler=cmd_schema
    )
    from .export import add_command as add_export

    add_export(sub)
    plugins.commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    command = None
    try:
        plugins = default_plugins()
        parser = build_parser(plugins)
        args = parser.parse_args(argv)
        command = args.command
        args.context = plugins
        handler = getattr(args, "handler", None)
        if handler is None:  # a plugin's command that did not say what runs it
            raise UserError(
                f"command {command!r} has no handler; its plugin's register_commands hook must call "
                "parser.set_defaults(handler=fn), fn(args) returning the exit code"
            )
        return int(handler(args) or 0)
    except UserError as exc:
        if not exc.quiet:
            if traceback_wanted() and exc.__cause__ is not None:
                traceback.print_exception(exc.__cause__)
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        resume = "; the latest checkpoint is kept, run the same command again to resume"
        print(f"interrupted{resume if command == 'run' else ''}", file=sys.stderr)
        return 130
    except Exception as exc:
        if not out_of_memory(exc):
            raise
        if traceback_wanted():
            traceback.print_exception(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        changed = (
            " (in another --run-dir: a changed experiment does not resume this one)"
            if command == "run"
            else ""
        )
        info = distributed.from_env()  # under torchrun, each process runs out on its own: say which
        where = f" (rank {info.rank} of {info.world})" if info.enabled else ""
        print(
            f"error{where}: out of memory: {type(exc).__name__}: {first}\nThis machine cannot hold what the "
            f"experiment asks for: lower the batch, the input size or the model's size{changed}",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The run directory's identity: the resolved config written once, checked on every re-run."""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w
from safetensors import SafetensorError, safe_open

from .config import Experiment
from .errors import UserError
from .loading import UNHASHED, ResolvedExperiment, config_hash, default_run_dir, load_experiment
from .plugins import PluginSet
from .report import atomic_write_text


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every leaf that differs between two config dumps."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def _hashed(dump: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dump.items() if k not in UNHASHED}


#: what a run directory holds once a run has trained (its config alone is not a run yet)
TRAINED = ("metrics.jsonl", "checkpoints", "stages")


def final_weights(run_dir: Path, stage: str) -> Path:
    """Where a finished stage's weights are (the file exists once the stage has finished)."""
    return Path(run_dir) / "stages" / stage / "final.safetensors"


def check_final_weights(run_dir: Path, stage: str) -> None:
    """A :class:`UserError` unless ``stage``'s final weights are a readable safetensors file."""
    path = final_weights(run_dir, stage)
    if not os.access(path, os.R_OK):
        raise UserError(
            f"{path}: permission denied (stage {stage}'s final weights exist, this user cannot read them)"
        )
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except (OSError, SafetensorError) as exc:
        raise UserError(
            f"{path}: stage {stage}'s final weights cannot be read ({exc}); delete the file to train "
            "the stage again from its latest checkpoint"
        ) from None


def load_for_run(
    path: str | Path,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    plugins: PluginSet | None = None,
) -> ResolvedExperiment:
    """:func:`~branchadapt.loading.load_experiment` for a run (re-)started in ``run_dir`` (default:
    the experiment's own): a stage that has finished there needs none of the files its options
    name (a loss's helper-network weights, say), and once every stage has finished nothing
    trains, so the model, task and data need none either; evaluation checks what it reads.
    A directory holding another experiment's run is refused later, by :func:`prepare_run_dir`."""

    def not_needed(spec: Experiment, source: Path) -> list[str]:
        where = Path(run_dir) if run_dir is not None else default_run_dir(spec, source)
        stages = [name for name, stage in spec.stages.items() if stage.enabled]
        done = [f"stages.{name}" for name in stages if final_weights(where, name).exists()]
        return [*done, "model", "task", "data"] if done and len(done) == len(stages) else done

    return load_experiment(path, overrides, plugins, files_not_needed=not_needed)


def has_trained(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds any training result (metrics, a checkpoint, a finished stage)."""
    return any((run_dir / name).exists() for name in TRAINED)


def prepare_run_dir(run_dir: Path, exp: ResolvedExperiment, write: bool = True) -> None:
    """Create ``run_dir`` with the resolved config, or check it holds this same experiment.

    A directory with a config but no training result (a run that stopped at set-up, e.g. on a
    wrong data path) takes the new config: there is nothing of the old run to protect. With
    ``write=False`` (every rank but rank 0 under torchrun) only the checks run, so that every
    rank refuses a mismatched directory alike instead of waiting for rank 0."""
    dump = exp.spec.model_dump(mode="json", exclude_none=True)
    # the file's absolute path: the experiment's relative paths are taken beside it, wherever the
    # run is evaluated from
    record = {"config_hash": config_hash(exp.spec), "source": str(exp.source.absolute()), "experiment": dump}
    saved_path = run_dir / "config.json"
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK):
        raise UserError(f"run directory {run_dir} is not writable; choose another with --run-dir")
    if saved_path.exists() and has_trained(run_dir):
        try:
            saved = json.loads(saved_path.read_text(encoding="utf-8"))
        except ValueError as exc:  # not JSON, or not even UTF-8 text
            raise UserError(f"{saved_path}: corrupt run config ({exc}); use another run directory") from exc
        if saved.get("config_hash") != record["config_hash"]:
            # the keys that made the hashes differ (train.*, device and the like may change freely)
            diffs = config_differences(_hashed(saved.get("experiment", {})), _hashed(dump))
            more = [f"... and {len(diffs) - 10} more"] if len(diffs) > 10 else []
            shown = "\n  ".join(diffs[:10] + more) or "(hash differs)"
            raise UserError(
                f"run directory {run_dir} holds a run of a different experiment; differences:\n  {shown}\n"
                "Use --run-dir DIR for a new run (nothing in the existing directory was changed)."
            )
        return
    if not write:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_path, json.dumps(record, indent=1))  # first: it makes the folder a run's
        atomic_write_text(run_dir / "config.toml", tomli_w.dumps(dump))
    except OSError as exc:
        raise UserError(
            f"run directory {run_dir} cannot be written ({exc.strerror or exc}); choose another with --run-dir"
        ) from None


#: the file a training process holds locked in its run directory (:func:`hold`)
LOCK = ".lock"


def refuse_foreign(run_dir: Path) -> None:
    """A :class:`UserError` when ``run_dir`` holds files but no run (no ``config.json``): a
    folder of the user's, whose files are not branchadapt's to overwrite (hidden ones, such as
    ``.DS_Store`` or this module's lock, do not count)."""
    if not run_dir.is_dir() or (run_dir / "config.json").exists():
        return
    found = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    if found:
        raise UserError(
            f"run directory {run_dir} holds files ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}) "
            "but no run (no config.json): they are not branchadapt's to overwrite; choose a new or "
            "empty folder with --run-dir"
        )


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Claim ``run_dir`` for one training process: a folder of the user's is refused
    (:func:`refuse_foreign`), and a second process (another terminal, a job started twice) is
    refused at once instead of training into the same checkpoints and metrics. The lock is the
    operating system's (``flock``), so a process that died holds nothing; where there is no
    ``fcntl`` (Windows) or the file system cannot lock (some network mounts), nothing is."""
    refuse_foreign(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"run directory {run_dir} cannot be written ({exc.strerror or exc}); choose another with --run-dir"
        ) from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = run_dir / LOCK
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process holds it (errors of a file system that cannot lock: below)
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UserError(
                f"run directory {run_dir} is in use by {holder}: wait for it to finish (it resumes from "
                "there when run again), or use another --run-dir"
            ) from None
        except OSError as exc:  # ENOLCK, ENOSYS, EOPNOTSUPP: a file system without locks
            warnings.warn(
                f"{run_dir}: the file system cannot lock ({exc.strerror}); not locked", stacklevel=2
            )
            yield
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"branchadapt run, PID {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def forget_logged_steps(metrics: Path, stage: str, step: int) -> None:
    """Drop ``stage``'s records after ``step`` from a metrics log: a run resumed from the
    checkpoint at ``step`` trains (and logs) those steps again. A last line cut short (the
    process was killed while writing it) is dropped too, so the next record starts a line."""
    if not metrics.is_file():
        return
    original = metrics.read_text(encoding="utf-8")
    lines = original.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] = "" if _record(lines[-1]) is _NOT_JSON else lines[-1] + "\n"

    def later(line: str) -> bool:  # a line that is not a record is not ours to judge: kept
        record = _record(line)
        return isinstance(record, dict) and record.get("stage") == stage and record.get("step", 0) > step

    text = "".join(line for line in lines if not later(line))
    if text != original:
        atomic_write_text(metrics, text)


_NOT_JSON = object()


def _record(line: str) -> Any:
    """The JSON value of a metrics line, or ``_NOT_JSON``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return _NOT_JSON

"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``<stage>-<step>/`` holding ``model.safetensors`` (every module's
state, keys prefixed by module name), ``optim.safetensors`` (optimiser state tensors) and
``meta.json`` (step, stage, config hash, RNG states, optimiser hyper-parameters, scheduler and
sampler position). It is written to a temporary directory and renamed into place, so a crash
never leaves a half-written checkpoint where the trainer would look for one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import CheckpointError, CheckpointMismatch
from .optimstate import checked_optimizer_states, optimizer_state
from .report import replace_folder
from .rng import rng_state, set_rng_state

FORMAT = 1


def module_state(modules: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """All modules' state in one flat dict (``<module>.<key>``), detached CPU copies."""
    return {
        f"{name}.{key}": value
        for name, module in modules.items()
        for key, value in state_copy(module).items()
    }


def state_copy(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict as detached, contiguous CPU copies (no storage shared with it)."""
    return {
        key: value.detach().to("cpu", copy=True).contiguous() for key, value in module.state_dict().items()
    }


def split_state(state: Mapping[str, Tensor], names: list[str] | None = None) -> dict[str, dict[str, Tensor]]:
    """Inverse of :func:`module_state`: ``<module>.<key>`` -> {module: {key: tensor}}."""
    out: dict[str, dict[str, Tensor]] = {n: {} for n in names or []}
    for key, value in state.items():
        module, _, rest = key.partition(".")
        out.setdefault(module, {})[rest] = value
    return out


def save_weights(
    path: str | Path, modules: Mapping[str, nn.Module], metadata: Mapping[str, str] | None = None
) -> None:
    """Atomically write every module's state to one safetensors file (keys ``<module>.<key>``)."""
    save_state(path, module_state(modules_mapping(modules)), metadata)


def save_state(
    path: str | Path, state: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Atomically write ``state`` (CPU tensors, none sharing storage: :func:`state_copy`) to one
    safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(dict(state), str(tmp), metadata=dict(metadata or {}))
        as_umask_says(tmp)
        os.replace(tmp, path)
    except BaseException:  # a failed write leaves no temporary file, and an earlier file as it was
        tmp.unlink(missing_ok=True)
        raise


def sniff_format(path: str | Path) -> str | None:
    """What a weights file is by its first bytes, whatever its name: ``"safetensors"`` (an 8-byte
    header length, then the JSON header), ``"torch"`` (a ``torch.save`` zip archive or a legacy
    pickle) or None (neither, or unreadable)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return None
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    return None


def is_safetensors(path: str | Path) -> bool:
    """Whether to read ``path`` as safetensors: its bytes say so, or it is named ``.safetensors``
    and its bytes are not a torch file's (a corrupt one then gets safetensors' own message)."""
    kind = sniff_format(path)
    return kind == "safetensors" or (kind is None and Path(path).suffix == ".safetensors")


def read_state(path: str | Path) -> object:
    """A weights file's contents, safetensors or torch (``weights_only``: no pickled code runs),
    told apart by :func:`is_safetensors`; the readers' own errors are left to the caller."""
    if is_safetensors(path):
        return load_file(str(path))
    with open(path, "rb") as fh:  # a handle: torch.load reads a path named .safetensors as one
        return torch.load(fh, map_location="cpu", weights_only=True)


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file; a missing or corrupt file is a user error naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied (the file exists but this user cannot read it)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        if sniff_format(path) == "torch":
            raise CheckpointError(
                f"{path}: not a safetensors file but, by its first bytes, a torch.save file (a zip "
                "archive or pickle); branchadapt reads and writes safetensors: convert it with "
                "safetensors.torch.save_file(torch.load(...), ...)"
            ) from exc
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_weights(path: str | Path, modules: Mapping[str, nn.Module]) -> None:
    """Load a :func:`save_weights` file into ``modules``; any key or shape difference is an error,
    raised before any module is changed."""
    modules = modules_mapping(modules)
    state = _checked_weights(path, modules)
    for name, module in modules.items():
        module.load_state_dict(state[name])


def _checked_weights(path: str | Path, modules: Mapping[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    """A weights file's state per module, once its keys and shapes match ``modules``'."""
    state = split_state(read_tensors(path), list(modules))
    problems = []
    for name, module in modules.items():
        problems.extend(state_differences(module.state_dict(), state.get(name, {}), f"{name}."))
    extra = sorted(set(state) - set(modules))
    if extra:
        problems.append(f"modules in the file but not in the model: {extra}")
    if problems:
        raise CheckpointError(f"{path} does not match the model:\n  " + "\n  ".join(problems))
    return state


def state_differences(own: Mapping[str, Tensor], other: Mapping[str, Tensor], prefix: str = "") -> list[str]:
    """Human-readable differences in names and shapes between two state dicts."""
    problems = []
    missing = sorted(set(own) - set(other))
    unexpected = sorted(set(other) - set(own))

    def few(keys: list[str]) -> str:
        shown = ", ".join(prefix + k for k in keys[:5])
        return shown + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")

    if missing:
        problems.append(f"missing in file: {few(missing)}")
    if unexpected:
        problems.append(f"not in model: {few(unexpected)}")
    shapes = [
        f"{prefix}{k}: file {tuple(other[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in other and other[k].shape != v.shape
    ]
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
    return problems


#: the process's file-creation mask (read once: reading it means setting it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def as_umask_says(path: Path) -> None:
    """Give a file safetensors wrote the permissions any other new file gets: safetensors creates
    its files readable by their owner alone, which a run shared with a group (or a CI user) cannot
    read back."""
    os.chmod(path, 0o666 & ~_UMASK)


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    directory: str | Path,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint directory (weights, optimiser, RNG, ``meta``: JSON values
    under keys of the caller's, not the reserved :data:`RESERVED_META`). A save that fails
    leaves nothing behind, and an earlier checkpoint at ``directory`` as it was."""
    modules, optimizers, meta = modules_mapping(modules), _optimizers(optimizers), dict(meta or {})
    taken = sorted(RESERVED_META & set(meta))
    if taken:
        raise TypeError(f"meta keys {taken} are the checkpoint's own; name yours otherwise")
    try:
        json.dumps(meta)
    except TypeError as exc:  # before anything is written
        raise TypeError(f"meta must hold JSON values (numbers, strings, lists, dicts): {exc}") from None
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        opt_tensors, opt_meta = optimizer_state(optimizers)
        rng_tensors, rng_meta = rng_state()
        save_state(tmp / "model.safetensors", module_state(modules))
        save_state(tmp / "state.safetensors", {**opt_tensors, **rng_tensors})
        full_meta = {"format": FORMAT, **meta, "optimizers": opt_meta, "rng": rng_meta}
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, directory)
    return directory


#: meta.json keys a checkpoint writes itself
RESERVED_META = frozenset({"format", "optimizers", "rng"})


def _mapping(value: Any, kind: type, what: str, example: str) -> Mapping[str, Any]:
    """``value`` if it maps names to ``kind`` objects, else a :class:`TypeError` saying so."""
    if not isinstance(value, Mapping) or not all(isinstance(v, kind) for v in value.values()):
        got = type(value).__name__ if not isinstance(value, Mapping) else "a mapping of other values"
        raise TypeError(
            f"{what}: expected a mapping of names to {kind.__name__} objects, e.g. {example}; got {got}"
        )
    return value


def modules_mapping(value: Any, what: str = "modules") -> Mapping[str, nn.Module]:
    """``value`` if it maps names to modules (``{"model": module}``), else a :class:`TypeError`."""
    return _mapping(value, nn.Module, what, "{'model': module}")


def _optimizers(value: Any) -> Mapping[str, torch.optim.Optimizer]:
    """``value`` (None: no optimisers) if it maps names to optimisers, else a :class:`TypeError`."""
    return _mapping(value or {}, torch.optim.Optimizer, "optimizers", "{'main': optimizer}")


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found: not a checkpoint directory") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def load_checkpoint(
    directory: str | Path,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    expect: Mapping[str, Any] | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into ``modules``/``optimizers``; ``expect`` meta values must match.

    With ``restore_rng`` (the default) the process-wide torch, numpy and Python random states are
    set to the checkpoint's as well, so that a resumed run draws what the uninterrupted one would.
    Returns the checkpoint's metadata."""
    modules, optimizers = modules_mapping(modules), _optimizers(optimizers)
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(f"{directory} is a file; expected the checkpoint's folder ({directory.parent})")
    meta = read_meta(directory)
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise CheckpointMismatch(
                f"{directory}: checkpoint {key} is {meta.get(key)!r}, this run expects {value!r}; "
                "it was written by a different experiment"
            )
    # everything is checked before anything is loaded: a refused checkpoint changes nothing
    weights = _checked_weights(directory / "model.safetensors", modules)
    state = read_tensors(directory / "state.safetensors")
    opt_tensors = {k: v for k, v in state.items() if not k.startswith("rng.")}
    opt_states = checked_optimizer_states(optimizers, opt_tensors, meta["optimizers"])
    for name, module in modules.items():
        module.load_state_dict(weights[name])
    for name, opt_state in opt_states.items():
        optimizers[name].load_state_dict(opt_state)
    if restore_rng:
        set_rng_state(state, meta["rng"])
    return meta


def stage_checkpoints(run_dir: str | Path, stage: str) -> list[Path]:
    """A stage's checkpoint directories (``<stage>-<step>``), oldest first; other folders there
    (a copy the user made, say) are not checkpoints."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = {}
    for p in root.iterdir():
        name, _, step = p.name.rpartition("-")
        if p.is_dir() and name == stage and step.isdigit():
            steps[p] = int(step)
    return sorted(steps, key=steps.__getitem__)


def latest_checkpoint(run_dir: str | Path, stage: str) -> Path | None:
    found = stage_checkpoints(run_dir, stage)
    return found[-1] if found else None


def resume_latest(
    run_dir: str | Path,
    stage: str,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    expect: Mapping[str, Any],
) -> tuple[Path, dict[str, Any]] | None:
    """Load the stage's latest checkpoint (:func:`load_checkpoint`) and return it with its
    metadata; None without one. One that cannot be read says how to resume from the one before."""
    found = stage_checkpoints(run_dir, stage)
    if not found:
        return None
    try:
        return found[-1], load_checkpoint(found[-1], modules, optimizers, expect=expect)
    except CheckpointMismatch:
        raise
    except CheckpointError as exc:
        before = f"from {found[-2]}" if len(found) > 1 else "the stage from its start"
        raise CheckpointError(
            f"{exc}\nIf this checkpoint is damaged, move {found[-1]} out of the run directory and run "
            f"again to resume {before}"
        ) from exc


def prune_checkpoints(run_dir: Path, stage: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of a stage."""
    for old in stage_checkpoints(run_dir, stage)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)

"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (bad config, unknown name, missing file,
mismatched checkpoint). The CLI prints its message and exits with code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

#: set to 1 to print the traceback of a user error's cause as well (``first_step``)
TRACEBACK_ENV = "BRANCHADAPT_TRACEBACK"


def traceback_wanted() -> bool:
    """Whether :data:`TRACEBACK_ENV` asks for tracebacks (set, and not 0, false, no or off)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class UserError(Exception):
    """A problem in the user's input; the message says where and what was expected."""

    exit_code = 2
    #: True when another process reports the same error (under torchrun, rank 0)
    quiet = False


class ConfigError(UserError):
    """An experiment file (or an override) that does not validate."""


class RegistryError(UserError):
    """An unknown or duplicate plugin name."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not match the model."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint written by another experiment or stage than the one reading it."""


class TrainingDiverged(UserError):
    """A loss or gradient that is no longer finite; the step was not applied."""


@contextmanager
def naming(source: object) -> Iterator[None]:
    """Begin the message of a :class:`UserError` raised inside with ``source`` (the experiment
    file) unless it already does: a plugin that refuses its options while it builds names only the
    key (``model.model: ...``)."""
    try:
        yield
    except UserError as exc:
        prefix = f"{source}: "
        if exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith(prefix):
            exc.args = (prefix + exc.args[0], *exc.args[1:])
        raise


def _not_options() -> tuple[type[BaseException], ...]:
    """Failures of the machine rather than of the experiment's options: left as they are."""
    import torch

    kinds: list[type[BaseException]] = [torch.OutOfMemoryError, MemoryError]
    dist_error = getattr(torch.distributed, "DistError", None)
    if isinstance(dist_error, type):
        kinds.append(dist_error)
    return tuple(kinds)


#: exceptions that are the machine's failures (out of memory, the process group), not the options'
_NOT_OPTIONS = _not_options()


#: how allocators other than CUDA's caching one say they ran out, in a plain ``RuntimeError``:
#: the CPU's, cuDNN's and cuBLAS's workspaces, and Apple's MPS backend
_OUT_OF_MEMORY_TEXT = (
    "can't allocate memory",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "MPS backend out of memory",
)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of memory: CUDA's ``OutOfMemoryError``, ``MemoryError``, or
    a plain ``RuntimeError`` of another allocator (:data:`_OUT_OF_MEMORY_TEXT`)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OUT_OF_MEMORY_TEXT)


def not_options(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine's failure (out of memory, the process group) rather than a
    sign that the experiment's options do not fit together."""
    return isinstance(exc, _NOT_OPTIONS) or out_of_memory(exc)


class StepFailed(UserError):
    """A stage's first step in this process raised; the original exception is the cause."""


@contextmanager
def first_step(stage: str, step: int, first: bool = True) -> Iterator[None]:
    """Turn an exception from a stage's first step (``first``) into a :class:`StepFailed`.

    That step is where options that do not fit together surface (a model built for other inputs
    than the data's, a loss expecting outputs the task does not give), as an error deep in torch;
    the message keeps the original one and says how to see its traceback (:data:`TRACEBACK_ENV`).
    Running out of memory and failures of the process group are left as they are, and so are
    later steps' errors: they ran the same code already."""
    if not first:
        yield
        return
    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if not_options(exc):
            raise
        hint = "" if traceback_wanted() else f"; set {TRACEBACK_ENV}=1 to see where it failed"
        raise StepFailed(
            f"stage {stage}: step {step} failed: {type(exc).__name__}: {exc}\n"
            "The model, task, losses and data of this experiment may not fit together (a model option "
            f"that does not match the data, say){hint}"
        ) from exc

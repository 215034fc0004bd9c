"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (bad config, unknown name, missing file,
mismatched checkpoint). The CLI prints its message and exits with code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


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


class TrainingDiverged(UserError):
    """A loss or gradient that is no longer finite; the step was not applied."""

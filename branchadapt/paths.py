"""Relative paths in plugin options are taken beside the experiment file.

An experiment names files (a data folder, initial weights, a helper network's weights) relative
to where it lives, so that it means the same from any working directory, and later from its run
directory (``evaluate``, ``export``, resume). The core validates an experiment's plugin options
inside :func:`relative_to` the experiment's folder, and :class:`~branchadapt.interfaces.PluginOptions`
makes each relative ``Path`` field (and each ``Path`` in a list or tuple field) absolute against
it, after the fields' own validators (which see the path as written); a plugin anchors a path
it keeps in another form (a string in a nested table) with :func:`anchor`. Outside such a
context (a library user calling ``ba.build``) paths stay as given, relative to the working
directory. ``~`` is expanded either way.

The experiment as written (its hash, ``config.toml``) keeps the paths as the file has them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

_BASE: ContextVar[Path | None] = ContextVar("branchadapt_paths_base", default=None)
_FILES_REQUIRED: ContextVar[bool] = ContextVar("branchadapt_files_required", default=True)


@contextmanager
def files_not_required() -> Iterator[None]:
    """Validate in here to skip checks that files named by options exist: a finished run's
    experiment re-read for inference needs only some of them (a training loss's weights are not
    among them), and those it uses are checked where they are read."""
    token = _FILES_REQUIRED.set(False)
    try:
        yield
    finally:
        _FILES_REQUIRED.reset(token)


def files_required() -> bool:
    """Whether option validators should check that the files they name exist (outside
    :func:`files_not_required`: an experiment about to run)."""
    return _FILES_REQUIRED.get()


@contextmanager
def relative_to(base: Path | str) -> Iterator[Path]:
    """Validate plugin options in here to take their relative paths beside ``base`` (a folder)."""
    folder = Path(base).expanduser().absolute()
    token = _BASE.set(folder)
    try:
        yield folder
    finally:
        _BASE.reset(token)


def anchor(path: Path | str) -> Path:
    """``path`` with ``~`` expanded and, when relative inside :func:`relative_to`, made absolute."""
    path = Path(path).expanduser()
    base = _BASE.get()
    return path if base is None or path.is_absolute() else base / path


def anchor_values(value: Any) -> Any:
    """:func:`anchor` applied to a ``Path``, or to each ``Path`` in a list or tuple; other values
    unchanged (the same object when nothing changed)."""
    if isinstance(value, Path):
        new = anchor(value)
        return value if new == value else new
    if type(value) in (list, tuple):  # not a named tuple's own type
        items = [anchor_values(v) for v in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(items)
    return value


__all__ = ["anchor", "anchor_values", "files_not_required", "files_required", "relative_to"]

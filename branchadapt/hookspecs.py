"""Hook specifications: one ``register_*`` hook per kind, plus one to add CLI commands.

A plugin is any module (or object) with functions marked ``@hookimpl``; each receives a
``register(cls, name=None)`` callable. Installed packages are found through the entry-point
group ``branchadapt``; local modules through ``plugins = ["pkg.module"]`` in an experiment file.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("branchadapt")
hookimpl = pluggy.HookimplMarker("branchadapt")

Register = Callable[..., None]


@hookspec
def register_backbones(register: Register) -> None:
    """Register :class:`~branchadapt.Backbone` subclasses: ``register(MyNet, name="mynet")``."""


@hookspec
def register_splitters(register: Register) -> None:
    """Register :class:`~branchadapt.BranchSplitter` subclasses."""


@hookspec
def register_losses(register: Register) -> None:
    """Register :class:`~branchadapt.LossTerm` subclasses."""


@hookspec
def register_samplers(register: Register) -> None:
    """Register :class:`~branchadapt.GroupSampler` subclasses."""


@hookspec
def register_tasks(register: Register) -> None:
    """Register :class:`~branchadapt.Task` subclasses."""


@hookspec
def register_data(register: Register) -> None:
    """Register :class:`~branchadapt.DataSource` subclasses."""


@hookspec
def register_commands(subparsers: argparse._SubParsersAction, context: Any) -> None:
    """Add sub-commands to the ``branchadapt`` CLI (``subparsers.add_parser(...)``).

    Set ``parser.set_defaults(handler=fn)``; ``fn(args)`` returns an exit code. ``context`` is the
    :class:`~branchadapt.plugins.PluginSet` the command can resolve names with.
    """

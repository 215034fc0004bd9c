"""Plugin discovery with pluggy: builtins, installed entry points and local modules.

Each hook implementation is called with a ``register`` bound to its plugin's origin, so the
registry can say which package (and version) every name came from, and name both sides of a
duplicate.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import UserError
from .registry import Registry

ENTRY_POINT_GROUP = "branchadapt"

#: hook name -> registry kind
HOOK_KINDS = {
    "register_backbones": "backbone",
    "register_splitters": "splitter",
    "register_losses": "loss",
    "register_samplers": "sampler",
    "register_tasks": "task",
    "register_data": "data",
}


def _core_version() -> str:
    try:
        return md.version("branchadapt")
    except md.PackageNotFoundError:
        return "source"


class PluginSet:
    """A pluggy manager plus the registry it fills; one per process is the usual case."""

    def __init__(self, entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("branchadapt")
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.origins: dict[int, str] = {}
        self.local_modules: list[str] = []
        from . import builtin

        self._add(builtin, "builtin", f"branchadapt {_core_version()} (builtin)")
        if entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            origin = f"{dist.name} {dist.version}" if dist is not None else f"entry point {ep.value}"
            if self.pm.get_plugin(ep.name) is not None or ep.value in self.local_modules:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide the others
                raise UserError(
                    f"plugin entry point {ep.name!r} = {ep.value!r} (from {origin}) failed to import: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self._add(plugin, ep.name, origin)

    def _add(self, plugin: Any, name: str, origin: str) -> None:
        if self.pm.is_registered(plugin):
            return
        self.pm.register(plugin, name=name)
        self.origins[id(plugin)] = origin
        for hook_name, kind in HOOK_KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=self._registrar(kind, origin))

    def _registrar(self, kind: str, origin: str) -> hookspecs.Register:
        def register(obj: type, name: str | None = None) -> None:
            self.registry.add(kind, name or getattr(obj, "name", None) or obj.__name__, obj, origin)

        return register

    def load_modules(self, modules: Iterable[str], search_dir: Path | None = None, where: str = "") -> None:
        """Import local plugin modules (``plugins = [...]`` in an experiment file)."""
        for module_path in modules:
            if module_path in self.local_modules:
                continue
            module = _import_local(module_path, search_dir, where)
            self.local_modules.append(module_path)
            self._add(module, f"local:{module_path}", f"{module_path} (local module)")

    def commands(self, subparsers: Any) -> None:
        self.pm.hook.register_commands(subparsers=subparsers, context=self)


@contextmanager
def _on_path(directory: Path | None) -> Iterator[None]:
    if directory is None:
        yield
        return
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def _import_local(module_path: str, search_dir: Path | None, where: str) -> ModuleType:
    with _on_path(search_dir):
        try:
            return importlib.import_module(module_path)
        except ModuleNotFoundError as exc:
            at = f"{where}: " if where else ""
            raise UserError(
                f"{at}plugin module {module_path!r} not found ({exc}); expected an importable module "
                f"on PYTHONPATH or beside the experiment file"
            ) from exc


_default: PluginSet | None = None


def default_plugins() -> PluginSet:
    """The process-wide plugin set (builtins + installed entry points), created on first use."""
    global _default
    if _default is None:
        _default = PluginSet()
    return _default


def reset_default_plugins() -> None:
    """Forget the process-wide plugin set (tests that install plugins on the fly use this)."""
    global _default
    _default = None

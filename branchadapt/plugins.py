"""Plugin discovery with pluggy: builtins, installed entry points and local modules.

Each hook implementation is called with a ``register`` bound to its plugin's origin, so the
registry can say which package (and version) every name came from, and name both sides of a
duplicate.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import re
import sys
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import RegistryError, UserError
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
        #: sub-command name -> (its plugin's origin, its help), filled by :meth:`commands`
        self.command_origins: dict[str, tuple[str, str]] = {}
        #: plugin name -> (its module path, its origin): names a clash's both sides
        self.sources: dict[str, tuple[str, str]] = {}
        from . import builtin

        self._add(builtin, "builtin", f"branchadapt {_core_version()} (builtin)")
        if entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            origin = f"{dist.name} {dist.version}" if dist is not None else f"entry point {ep.value}"
            if ep.value in self.local_modules:
                continue
            if ep.name in self.sources:
                value, first = self.sources[ep.name]
                if value == ep.value:  # the same module listed twice (one package seen on two paths)
                    continue
                raise RegistryError(
                    f"two plugins use the entry-point name {ep.name!r} (group {ENTRY_POINT_GROUP!r}): "
                    f"{value!r} from {first} and {ep.value!r} from {origin}; entry-point names share one "
                    f"namespace with branchadapt's own plugin sets, so one package must rename its entry point"
                )
            try:
                plugin = ep.load()
            except Exception as exc:  # stop, naming it: running without it would change which names exist
                fix = f"fix or uninstall {dist.name}" if dist is not None else "fix or uninstall it"
                raise UserError(
                    f"plugin entry point {ep.name!r} = {ep.value!r} (from {origin}) failed to import "
                    f"{failure(exc)}; {fix}"
                ) from exc
            self._add(plugin, ep.name, origin, ep.value)
            # a package's hooks are checked by name as a local module's are
            self._check_hooks(plugin, f"plugin entry point {ep.name!r} = {ep.value!r} (from {origin})")

    def _add(self, plugin: Any, name: str, origin: str, value: str | None = None) -> None:
        if self.pm.is_registered(plugin):
            return
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:  # a hook's arguments are not the hookspec's
            raise UserError(f"plugin {name!r} (from {origin}) {_hook_mismatch(exc)}") from exc
        self.origins[id(plugin)] = origin
        self.sources[name] = (value or str(getattr(plugin, "__name__", name)), origin)
        for hook_name, kind in HOOK_KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    try:
                        impl.function(register=self._registrar(kind, origin))
                    except UserError:
                        raise
                    except Exception as exc:
                        raise UserError(
                            f"plugin {name!r} (from {origin}) failed in its {hook_name} hook {failure(exc)}"
                        ) from exc

    def _registrar(self, kind: str, origin: str) -> hookspecs.Register:
        def register(obj: type, name: str | None = None) -> None:
            self.registry.add(kind, name or getattr(obj, "name", None) or obj.__name__, obj, origin)

        return register

    def load_modules(self, modules: Iterable[str], search_dir: Path | None = None, where: str = "") -> None:
        """Import local plugin modules (``plugins = [...]`` in an experiment file)."""
        for module_path in modules:
            if module_path in self.local_modules:
                continue
            module = import_beside(module_path, search_dir, where)
            self.local_modules.append(module_path)
            self._add(module, f"local:{module_path}", f"{module_path} (local module)")
            self._check_hooks(
                module,
                f"{where}: plugin module {module_path!r}" if where else f"plugin module {module_path!r}",
            )

    def _check_hooks(self, module: ModuleType, label: str) -> None:
        """A plugin module (local or an installed entry point) must implement branchadapt's hooks,
        by their names: one with none (a wrong module, or hooks without ``@branchadapt.hookimpl``)
        or with a misspelt one would otherwise register nothing."""
        callers = self.pm.get_hookcallers(module) or []
        unknown = sorted(  # pluggy's optionalhook marks a hook of a newer branchadapt: not a typo
            c.name
            for c in callers
            if c.spec is None and not all(i.optionalhook for i in c.get_hookimpls() if i.plugin is module)
        )
        known = sorted(name for name in vars(hookspecs) if name.startswith("register_"))
        if unknown:
            raise UserError(
                f"{label} marks {unknown} with @branchadapt.hookimpl, which are not branchadapt "
                f"hooks; expected {known}"
            )
        if not any(c.spec is not None for c in callers):  # optional hooks alone register nothing here
            raise UserError(
                f"{label} implements no branchadapt hook, so it registers nothing; expected "
                f"functions marked @branchadapt.hookimpl named one of {known}"
            )

    def commands(self, subparsers: Any) -> None:
        """Let every plugin add its sub-commands; a hook that fails names its plugin and origin."""
        for impl in self.pm.hook.register_commands.get_hookimpls():
            origin = self.origins.get(id(impl.plugin), impl.plugin_name)
            offered = {"subparsers": subparsers, "context": self}  # a hook may take fewer, as pluggy allows
            before = set(subparsers.choices)
            try:
                impl.function(**{k: v for k, v in offered.items() if k in (*impl.argnames, *impl.kwargnames)})
            except UserError:
                raise
            except Exception as exc:  # argparse's "conflicting subparser: run" included
                raise UserError(
                    f"plugin {impl.plugin_name!r} (from {origin}) failed in its register_commands hook "
                    f"{failure(exc)}"
                ) from exc
            helps = {a.dest: a.help or "" for a in getattr(subparsers, "_choices_actions", [])}
            for name in set(subparsers.choices) - before:
                self.command_origins[name] = (origin, helps.get(name, ""))


def _hook_mismatch(exc: pluggy.PluginValidationError) -> str:
    """What pluggy found wrong with a hook's arguments, with the arguments branchadapt passes."""
    found = re.search(r"for hook '(\w+)'", str(exc))
    spec = getattr(hookspecs, found.group(1), None) if found else None
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    expected = (
        f"; expected {spec.__name__}({', '.join(inspect.signature(spec).parameters)})"
        if spec is not None
        else ""
    )
    return f"has a hook branchadapt cannot call: {' '.join(lines[1:]) or exc}{expected}"


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


def raised_at(exc: BaseException) -> str:
    """``file:line`` where ``exc`` was raised (a syntax error: where the bad source is)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "(unknown location)"


def failure(exc: BaseException) -> str:
    """``at file:line: Type: message``: how a plugin's own exception is reported."""
    return f"at {raised_at(exc)}: {type(exc).__name__}: {exc}"


def import_beside(module_path: str, directory: Path | None, where: str = "") -> ModuleType:
    """Import ``module_path`` as a local plugin module is imported: from ``directory`` (the
    experiment file's folder) or ``sys.path``; a module that is missing, lacks a dependency or
    fails to import is a user error prefixed with ``where`` (the config key)."""
    at = f"{where}: " if where else ""
    with _on_path(directory):
        try:
            return importlib.import_module(module_path)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and missing != module_path and not module_path.startswith(missing + "."):
                raise UserError(
                    f"{at}plugin module {module_path!r} imports {missing!r}, which is not installed "
                    f"(at {raised_at(exc)})"
                ) from exc
            raise UserError(
                f"{at}plugin module {module_path!r} not found ({exc}); expected an importable module "
                f"on PYTHONPATH or beside the experiment file named on the command line"
            ) from exc
        except (TypeError, ValueError) as exc:  # "../x", "a/b", "": importlib's own words are obscure
            if module_path.isidentifier() or all(part.isidentifier() for part in module_path.split(".")):
                raise UserError(f"{at}plugin module {module_path!r} failed to import {failure(exc)}") from exc
            raise UserError(
                f"{at}{module_path!r} is not a module name; expected a dotted Python module name such as "
                "'my_plugin' or 'my_pkg.plugin' (a folder goes on PYTHONPATH, not in the name)"
            ) from exc
        except Exception as exc:
            raise UserError(f"{at}plugin module {module_path!r} failed to import {failure(exc)}") from exc


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

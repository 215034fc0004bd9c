"""Named implementations per kind, filled by plugins.

Names are unique per kind: a second registration is an error naming both origins, and an unknown
name is an error listing the closest registered names, so a typo in a config is a one-line fix.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import RegistryError
from .interfaces import Backbone, BranchSplitter, DataSource, GroupSampler, LossTerm, Task

#: kind name -> the base class its implementations must subclass
KINDS: dict[str, type] = {
    "backbone": Backbone,
    "splitter": BranchSplitter,
    "loss": LossTerm,
    "sampler": GroupSampler,
    "task": Task,
    "data": DataSource,
}


#: how messages name several implementations of a kind
PLURALS = {"backbone": "backbones", "splitter": "splitters", "loss": "losses", "sampler": "samplers",
           "task": "tasks", "data": "data sources"}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One registered implementation and where it came from."""

    kind: str
    name: str
    obj: type
    origin: str  # e.g. "branchadapt 0.1.0 (builtin)", "my-plugin 1.2 (entry point)"

    @property
    def summary(self) -> str:
        doc = (self.obj.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


def _kind(kind: str) -> str:
    """``kind`` if it is one of :data:`KINDS`, else a :class:`RegistryError` listing them."""
    if kind not in KINDS:
        raise RegistryError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


class Registry:
    """Maps (kind, name) to an implementation class."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, name: str, obj: Any, origin: str = "unknown") -> None:
        """Register ``obj`` under ``name``; duplicates and wrong base classes are errors."""
        base = KINDS[_kind(kind)]
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise RegistryError(
                f"{origin} registered {kind} {name!r} as {obj!r}, which is not a subclass of {base.__name__}"
            )
        if not name or not isinstance(name, str):
            raise RegistryError(f"{origin} registered a {kind} with an empty or non-string name")
        if inspect.isabstract(obj):
            missing = sorted(getattr(obj, "__abstractmethods__", ()))
            raise RegistryError(
                f"{origin} registered {kind} {name!r} ({obj.__module__}.{obj.__qualname__}), which is "
                f"abstract: it does not implement {missing}; expected a class defining them"
            )
        options = getattr(obj, "Options", None)
        wanted = getattr(base, "Options", None)
        if isinstance(wanted, type) and not (isinstance(options, type) and issubclass(options, wanted)):
            raise RegistryError(
                f"{origin} registered {kind} {name!r} with Options = {options!r}; expected a subclass of "
                f"{wanted.__module__.split('.')[0]}.{wanted.__name__} (it refuses unknown keys and "
                "values of the wrong TOML type, so a typo in an experiment cannot pass silently)"
            )
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise RegistryError(
                f"duplicate {kind} name {name!r}: registered by {existing.origin} "
                f"({existing.obj.__module__}.{existing.obj.__qualname__}) and by {origin} "
                f"({obj.__module__}.{obj.__qualname__})"
            )
        self._entries[kind][name] = Entry(kind, name, obj, origin)

    def get(self, kind: str, name: str, where: str | None = None) -> type:
        """The class registered as ``name``; unknown names list the closest matches."""
        return self.entry(kind, name, where).obj

    def entry(self, kind: str, name: str, where: str | None = None) -> Entry:
        """The :class:`Entry` (class and origin) registered as ``name``; unknown names list the
        closest matches, prefixed by ``where`` (the config key)."""
        entries = self._entries[_kind(kind)]
        if name in entries:
            return entries[name]
        raise RegistryError(self.unknown_message(kind, name, where))

    def unknown_message(self, kind: str, name: str, where: str | None = None) -> str:
        """What to say of ``name``, not a registered ``kind``: the closest names and all of them."""
        names = sorted(self._entries[kind])
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        at = f"{where}: " if where else ""
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        known = ", ".join(names) if names else "(none registered)"
        return f"{at}unknown {kind} {name!r}{hint} Registered {PLURALS[kind]}: {known}"

    def names(self, kind: str) -> list[str]:
        """The registered names of ``kind`` (one of :data:`KINDS`), sorted."""
        return sorted(self._entries[_kind(kind)])

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return name in self._entries.get(kind, {})

    def __iter__(self) -> Iterator[Entry]:
        for kind in KINDS:
            yield from (self._entries[kind][n] for n in sorted(self._entries[kind]))

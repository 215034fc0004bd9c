"""``branchadapt plugins NAME``: the options a registered implementation takes, as a table.

Each row is one key as an experiment file writes it (nested option tables as dotted keys), its
default in TOML (``required`` when it has none, ``none`` when unset) and the option's description.
The docs' option tables are this command's ``--markdown`` output.
"""

from __future__ import annotations

import difflib
import enum
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal, Union, get_args, get_origin

import tomli_w
from pydantic import BaseModel

from .errors import UserError
from .registry import Entry, Registry


@dataclass(frozen=True)
class OptionRow:
    key: str
    default: str
    description: str


def _plain(value: Any) -> Any:
    """``value`` as TOML can write it: enums by value, paths as strings, models as tables."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(mode="python"))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def toml_default(value: Any) -> str:
    """How an experiment file would write ``value`` on one line (``none`` for None)."""
    return "none" if value is None else _inline(_plain(value))


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def option_rows(options: type[BaseModel], prefix: str = "") -> Iterator[OptionRow]:
    """One row per key of ``options`` (a nested options model's keys as ``key.sub``)."""
    for name, field in options.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is not None and not field.is_required():
            yield from option_rows(nested, f"{prefix}{name}.")
            continue
        default = (
            "required" if field.is_required() else toml_default(field.get_default(call_default_factory=True))
        )
        description = " ".join((field.description or "").split())
        choices = _choices(field.annotation)
        if choices:
            description = f"{description} (one of: {', '.join(choices)})".lstrip()
        yield OptionRow(prefix + name, default, description)


def _choices(annotation: Any) -> list[str]:
    """The values a ``Literal`` (possibly in a union with bool or None) allows, as TOML; empty
    for anything else."""
    if get_origin(annotation) is Literal:
        return [toml_default(a) for a in get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [toml_default(member) for member in annotation]
    if get_origin(annotation) in (Union, types.UnionType):
        parts = [_choices(a) or (["true", "false"] if a is bool else []) for a in get_args(annotation)]
        literal = any(get_origin(a) is Literal for a in get_args(annotation))
        return [c for part in parts for c in part] if literal else []
    return []


def entries_named(registry: Registry, name: str, kind: str | None = None) -> list[Entry]:
    """Every registered implementation called ``name`` (of ``kind``, if given); none is an error
    listing the closest names."""
    found = [e for e in registry if e.name == name and kind in (None, e.kind)]
    if found:
        return found
    names = sorted({e.name for e in registry if kind in (None, e.kind)})
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    what = f"{kind} " if kind else ""
    raise UserError(f"no {what}plugin is registered as {name!r}{hint} (`branchadapt plugins` lists them)")


def markdown(entry: Entry) -> str:
    """The options of ``entry`` as a markdown table under a line naming it."""
    lines = [f"`{entry.name}` ({entry.kind}): {entry.summary}", ""]
    rows = list(option_rows(getattr(entry.obj, "Options", BaseModel)))
    if not rows:
        return "\n".join([*lines, "No options."])
    lines += ["| key | default | meaning |", "|---|---|---|"]
    for row in rows:
        key, default, text = (cell.replace("|", "\\|") for cell in (row.key, row.default, row.description))
        lines.append(f"| `{key}` | `{default}` | {text} |")
    return "\n".join(lines)

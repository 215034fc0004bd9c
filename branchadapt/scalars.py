"""Experiment values taken at their TOML type: ``"yes"`` is not a boolean, ``true`` not a number.

pydantic's lax mode turns the strings ``"yes"``, ``"on"`` or ``"1"`` into booleans, strings of
digits into numbers and booleans into numbers. A TOML file has typed values, so each of these
conversions hides a mistake (``fused_optimizers = "no"`` would switch the option *on*).
:class:`TomlTyped` refuses a scalar whose type the field does not take; whatever is not a plain
scalar field (lists, tables, ``Any``, paths, enums) is left to the field's own validation.
"""

from __future__ import annotations

import types
from pathlib import PurePath
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    ValidationInfo,
    WrapValidator,
    field_validator,
)

_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}
_SCALARS = (bool, int, float, str)
#: validators in a field's own type that see its raw value: such a field is not checked here
_OWN_VALIDATORS = (BeforeValidator, PlainValidator, WrapValidator)


def _scalar(value: Any) -> type | None:
    """The TOML scalar type of ``value``; None for anything else (a list, a table, None)."""
    return next((cls for cls in _SCALARS if isinstance(value, cls)), None)


def allowed(annotation: Any) -> list[Any] | None:
    """What a field annotated ``annotation`` takes: scalar types and, for ``Literal``, the
    literal values as ``(value,)``; None when it takes anything else too (then it is not checked)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return allowed(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        out: list[Any] = []
        for arg in get_args(annotation):
            own = [] if arg is type(None) else allowed(arg)
            if own is None:
                return None
            out += own
        return out
    if origin is Literal:
        values = get_args(annotation)
        return None if any(_scalar(v) is None for v in values) else [(v,) for v in values]
    if annotation in _SCALARS:
        return [annotation]
    if isinstance(annotation, type) and issubclass(annotation, (PurePath, str)):
        return [str]  # a path, or a string enum: any string, the field checks which
    return None


def _takes(entry: Any, value: Any) -> bool:
    kind = _scalar(value)
    if isinstance(entry, tuple):  # a literal: that very value, of the same TOML type
        return _scalar(entry[0]) is kind and entry[0] == value
    if entry is int and kind is float:  # 8.0 for an integer: what pydantic takes too
        return bool(value.is_integer())
    return kind is entry or (entry is float and kind is int)


def _toml(value: Any) -> str:
    return (
        str(value).lower()
        if isinstance(value, bool)
        else f'"{value}"'
        if isinstance(value, str)
        else repr(value)
    )


def _items(annotation: Any, value: Any) -> list[tuple[str, Any, Any]]:
    """(where, annotation, item) for the items of a TOML array or table ``value`` that a list,
    tuple or dict field annotated ``annotation`` holds; empty for anything else."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _items(args[0], value)
    if origin is Union or origin is types.UnionType:  # X | None: the items of X
        others = [a for a in args if a is not type(None)]
        return _items(others[0], value) if len(others) == 1 else []
    if isinstance(value, list) and origin in (list, tuple, set, frozenset) and args:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return [(f"[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value, strict=False))]
        return [(f"[{i}]", args[0], v) for i, v in enumerate(value)]
    if isinstance(value, dict) and origin is dict and len(args) == 2:
        return [(f".{k}", args[1], v) for k, v in value.items()]
    return []


def check_scalar(annotation: Any, value: Any) -> Any:
    """``value`` unchanged, or a ValueError when it is a scalar the field does not take as it is
    (pydantic would have converted it), or an array or table holding one (the message names the
    item as a key path, e.g. ``.clean: expected an integer, not a string``)."""
    for where, inner, item in _items(annotation, value):
        try:
            check_scalar(inner, item)
        except ValueError as exc:
            got = f" (got {item!r})" if _scalar(item) is not None else ""
            raise ValueError(f"{where}{'' if str(exc).startswith(('[', '.')) else ': '}{exc}{got}") from None
    kind = _scalar(value)
    entries = allowed(annotation)
    if kind is None or not entries or any(_takes(e, value) for e in entries):
        return value
    expected = [_NAMES[e] if isinstance(e, type) else _toml(e[0]) for e in entries]
    said = _NAMES[kind].split(" (")[0]  # "a string"
    if any(isinstance(e, tuple) and _scalar(e[0]) is kind for e in entries):  # the type, not the value
        said = f"another {said.split(' ', 1)[1]}"
    raise ValueError(f"expected {' or '.join(expected)}, not {said}")


class TomlTyped(BaseModel):
    """A model whose scalar fields take only values of their own TOML type (:func:`check_scalar`)
    and whose floats are finite (TOML's ``inf`` and ``nan`` are refused; a model may allow them
    with ``model_config = ConfigDict(allow_inf_nan=True)``)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _toml_type(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or any(isinstance(m, _OWN_VALIDATORS) for m in field.metadata):
            return value  # the field converts raw values itself (Annotated[..., BeforeValidator(...)])
        return check_scalar(field.annotation, value)


__all__ = ["TomlTyped", "allowed", "check_scalar"]

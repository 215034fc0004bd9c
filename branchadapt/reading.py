"""Reading an experiment file: TOML, the files it ``extends`` merged under it, and ``--set``
overrides applied to the result (validation is :mod:`branchadapt.loading`'s)."""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

from .config import deep_merge
from .errors import ConfigError


def read_toml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and the files it ``extends`` (relative to itself), merged child-over-base."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"{path}: extends forms a cycle: {cycle}")
    if not path.is_file():
        where = f"{_chain[-1]}: extends: " if _chain else ""
        what = "is a folder; expected a .toml file" if path.is_dir() else "not found"
        raise ConfigError(f"{where}experiment file {path} {what}")
    by = f" (the base of {_chain[-1]})" if _chain else ""
    try:
        data = tomllib.loads(
            path.read_text(encoding="utf-8-sig")
        )  # a byte-order mark (Windows editors): dropped
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}{by}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}{by}: not a UTF-8 text file ({exc})") from exc
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a file path string, got {parent!r}")
    base = read_toml(path.parent / parent, (*_chain, path))
    return deep_merge(base, data)


_KEY = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``dotted.key[0].path=value``; the value is parsed as TOML, else taken as a string."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    if re.search(r"(^|\.)(\.|$)|^\[", key.strip()):  # "a..b", ".a", "a.", "[0]": an empty key part
        raise ConfigError(f"--set {assignment!r}: {key.strip()!r} has an empty part; expected KEY.PATH=VALUE")
    parts: list[str | int] = []
    for name, index in _KEY.findall(key.strip()):
        parts.append(int(index) if index else name)
    if parts[0] == "extends":
        raise ConfigError(
            f"--set {assignment!r}: the base file is named in the experiment file, not with --set"
        )
    try:
        value: Any = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if text.strip()[:1] in ("[", "{", '"', "'"):  # meant as TOML, not as a bare string
            raise ConfigError(f"--set {assignment!r}: the value is not valid TOML ({exc})") from None
        value = text
    stages = data.get("stages")
    if (
        len(parts) >= 2
        and parts[0] == "stages"
        and isinstance(stages, dict)
        and stages
        and parts[1] not in stages
    ):
        # a new stage from --set (stages.NAME.key=... or stages.NAME={...}): a typo?
        close = difflib.get_close_matches(str(parts[1]), [str(k) for k in stages], n=1, cutoff=0.7)
        if close:
            raise ConfigError(
                f"--set {assignment!r}: there is no stage {parts[1]!r}; did you mean {close[0]!r}? "
                f"Stages: {', '.join(map(str, stages))} (a new stage from --set needs a name unlike theirs)"
            )
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        try:
            if isinstance(node, dict) and part not in node:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        except (KeyError, IndexError, TypeError) as exc:
            raise ConfigError(f"--set {assignment!r}: {key} does not exist ({exc})") from exc
    try:
        node[parts[-1]] = value
    except (IndexError, TypeError) as exc:
        raise ConfigError(f"--set {assignment!r}: cannot set {key} ({exc})") from exc

"""State-dict keys of a branched model: mapping other split depths, and mismatch messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from .errors import CheckpointError

BRANCHES = "branches"  # attribute of GroupBranches holding the per-group copies


def _router_heads(keys: Iterable[str], anchor: str) -> set[str]:
    """The ``<path>`` of every ``<path>.branches.<anchor>.`` in ``keys``: the branched stages. A
    backbone's own sub-module named ``branches`` (a ModuleList, say) has no child named after the
    anchor group, so its keys are left alone."""
    marker = f".{BRANCHES}.{anchor}."
    heads = set()
    for key in keys:
        start = key.find(marker)
        while start != -1:
            heads.add(key[:start])
            start = key.find(marker, start + 1)
    return heads


def plain_from_any(state: Mapping[str, Tensor], anchor: str) -> dict[str, Tensor]:
    """Strip ``<stage>.branches.<anchor>.`` from keys of any split depth; drop other groups."""
    heads = _router_heads(state, anchor)
    out = {}
    for key, value in state.items():
        for head in heads:
            prefix = f"{head}.{BRANCHES}."
            if key.startswith(prefix):
                group, _, tail = key[len(prefix) :].partition(".")
                key = f"{head}.{tail}" if group == anchor else ""
                break
        if key:
            out[key] = value
    return out


def check_shapes(own: Mapping[str, Tensor], state: Mapping[str, Tensor], source: str) -> None:
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise CheckpointError(diff_message(source, [], [], bad))


def diff_message(
    source: str, missing: list[str], unexpected: list[str], shapes: list[tuple[str, tuple, tuple]]
) -> str:
    def few(items: list[Any]) -> str:
        shown = ", ".join(str(i) for i in items[:6])
        return shown + (f" ... ({len(items)} in all)" if len(items) > 6 else "")

    lines = [f"{source} does not match the model:"]
    if missing:
        lines.append(f"  missing keys: {few(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {few(unexpected)}")
    if shapes:
        lines.append("  shape mismatch: " + few([f"{k} (file {a} vs model {b})" for k, a, b in shapes]))
    return "\n".join(lines)

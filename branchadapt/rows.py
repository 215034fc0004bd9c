"""Rows of a batch spread over nested arguments: select some, run parts separately, merge back.

A branched stage receives arbitrary (nested tuples, lists, dicts of) arguments whose tensors share
a leading batch dimension. These helpers pick a subset of rows from every such tensor, run a call
per part of the batch and reassemble the outputs in the original row order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from . import batching


def map_tensors(tree: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``tree`` with ``fn`` applied to every tensor leaf (torch's pytree: tuples, lists, dicts...)."""
    return tree_map(lambda leaf: fn(leaf) if isinstance(leaf, Tensor) else leaf, tree)


def tensors_in(tree: Any) -> list[Tensor]:
    """The tensor leaves of ``tree``, in order."""
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, Tensor)]


def select_rows(tree: Any, index: Tensor, batch: int) -> Any:
    """Rows ``index`` of every tensor whose dim 0 is the batch; other leaves pass unchanged."""
    return map_tensors(tree, lambda t: t.index_select(0, index) if batching.has_batch_dim(t, batch) else t)


def merge_rows(parts: list[Any], order: Tensor) -> Any:
    """Concatenate per-part outputs and undo the partition order (``order`` = concatenated positions)."""
    inverse = torch.argsort(order)
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts, 0).index_select(0, inverse.to(first.device))
    if isinstance(first, tuple | list):
        merged = [merge_rows([p[i] for p in parts], order) for i in range(len(first))]
        return type(first)(merged)
    if isinstance(first, dict):
        return {k: merge_rows([p[k] for p in parts], order) for k in first}
    return first  # non-tensor leaves (e.g. None) are the same in every part


def run_parts(
    parts: Sequence[tuple[Any, Tensor | None]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call: Callable[..., Any],
) -> Any:
    """Run ``call(key, *args, **kwargs)`` on each part's rows and reassemble the batch order."""
    if len(parts) == 1 and parts[0][1] is None:
        return call(parts[0][0], *args, **kwargs)
    batch = batch_size(args, kwargs)
    outputs, positions = [], []
    for key, index in parts:
        assert index is not None
        outputs.append(call(key, *select_rows(args, index, batch), **select_rows(kwargs, index, batch)))
        positions.append(index)
    return merge_rows(outputs, torch.cat(positions))


def batch_size(args: Any, kwargs: Any) -> int:
    """The leading dimension of the first tensor argument that has one."""
    found = [t.shape[0] for t in tensors_in((args, kwargs)) if t.dim()]
    if not found:
        raise ValueError("a branched stage needs at least one tensor argument with a batch dimension")
    return found[0]


def first_device(args: Any, kwargs: Any) -> torch.device:
    """The device of the first tensor among the arguments (CPU when there is none)."""
    found = tensors_in((args, kwargs))
    return found[0].device if found else torch.device("cpu")


__all__ = [
    "batch_size",
    "first_device",
    "map_tensors",
    "merge_rows",
    "run_parts",
    "select_rows",
    "tensors_in",
]

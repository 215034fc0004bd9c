"""Run the groups' copies of a branch stage as one call: stacked weights under ``torch.func.vmap``.

A branch stage holds one copy per group, and the plain way to run a mixed batch is a loop over the
groups, each copy on its own rows. Every operation then runs once per group on a fraction of the
batch, which costs more than the arithmetic when the inputs are small (per-operation dispatch and
kernel set-up). Stacking the copies' parameters along a new leading dimension and mapping the stage
over it with ``vmap`` runs each operation once for all groups (a convolution becomes one grouped
convolution); gradients reach every copy's own parameters through the stacking.

This needs every group to have the same number of rows, copies without buffers (running statistics
could not be updated per copy) and operations with vmap rules. vmap wraps every operation and moves
the copies' dimension around it, which on small maps costs more than the arithmetic; a backbone that
knows a cheaper way to run its copies at once hands the engine a :class:`StackedRule` for that
stage (:meth:`branchadapt.Backbone.stacked_rule`), called instead of vmap with the same inputs and
the same contract. When a stage cannot be mapped the
router falls back to the loop for good and says why once (:func:`run_stacked` raises
:class:`NotStackable`). Inside vmap, code that tests ``tensor.requires_grad`` sees ``False`` (the
tensors are vmap wrappers); a module with its own autograd function takes part by giving the
function a ``vmap`` rule (``torch.autograd.Function.vmap``), which sees the stacked tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .errors import not_options

#: ``stacked = "auto"`` stacks a CPU batch whose tensor inputs take at most this many bytes. On small
#: maps per-operation overhead dominates and one call for every copy wins; on large ones a loop is
#: faster on a CPU, each copy's smaller working set staying in cache (docs/performance.md).
AUTO_MAX_BYTES = 8 << 20


def small_or_on_accelerator(tree: Any, batch: int, limit: int) -> bool:
    """Whether the tensors with ``batch`` rows in ``tree`` take at most ``limit`` bytes, or live on
    an accelerator, where fewer, larger calls are the point: the rule of every ``"auto"`` switch
    that trades one large call for several small ones (``stacked``, ``fused``), each with its limit."""
    leaves = [t for t in tree_flatten(tree)[0] if has_batch_dim(t, batch)]
    if any(t.device.type != "cpu" for t in leaves):
        return True
    return sum(t.numel() * t.element_size() for t in leaves) <= limit


def worth_stacking(tree: Any, batch: int) -> bool:
    """``stacked = "auto"``: :func:`small_or_on_accelerator` with :data:`AUTO_MAX_BYTES`."""
    return small_or_on_accelerator(tree, batch, AUTO_MAX_BYTES)


class NotStackable(Exception):
    """This stage cannot run as one mapped call (the reason is the message)."""


class StackedRule(Protocol):
    """Several copies of one module run as one call, in place of ``vmap`` (module docstring).

    ``params[i]`` holds copy ``i``'s named parameters (names relative to the module). Every tensor in
    ``args`` and ``kwargs`` with the batch dimension arrives grouped by copy, ``(copies, rows, ...)``;
    the other arguments arrive unchanged. Returns what the module returns, every tensor with the
    same two leading dimensions: copy ``i``'s module on copy ``i``'s rows, as vmap over the copies
    would give it, gradients reaching each copy's parameters. ``training`` is the copies' mode.
    Raising ``TypeError``, ``ValueError``, ``RuntimeError`` or ``NotImplementedError`` makes the
    stage fall back to the loop over the copies for good (with a warning), as for vmap.

    The rows are grouped in the batch's memory layout (:func:`gather_rows`): channels_last inputs
    arrive as channels_last copies. Outputs whose ``(copies, rows)`` dimensions merge without a
    copy return to the batch's row order in their own layout.
    """

    def __call__(
        self,
        params: Sequence[Mapping[str, Tensor]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        training: bool,
    ) -> Any: ...


_is_batched = getattr(torch._C._functorch, "is_batchedtensor", None)  # private: absent means never


def is_vmapped(t: Tensor) -> bool:
    """Whether ``t`` is vmap's view of one copy inside :func:`run_stacked` (or any ``vmap``)."""
    return _is_batched is not None and bool(_is_batched(t))


def has_batch_dim(t: Any, batch: int) -> bool:
    """Whether ``t`` is a tensor whose first dimension is the batch (``batch`` rows)."""
    return isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch


def stackable(copies: Sequence[nn.Module]) -> str | None:
    """Why ``copies`` cannot be stacked, or None when they can."""
    if len(copies) < 2:
        return "fewer than two copies"
    if any(True for _ in copies[0].buffers()):
        return "the stage has buffers (per-copy running statistics cannot be updated under vmap)"
    return None


def meta_template(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` without storage, called with the stacked parameters."""
    return copy.deepcopy(module).to("meta")


def gather_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t.index_select(0, index)`` in ``t``'s own memory layout: a channels_last map (or any dense
    layout whose outermost dimension in memory is the first) gives a result laid out the same way,
    where ``index_select`` would return a contiguous one and undo the layout for what follows."""
    if t.dim() < 2 or t.is_contiguous():
        return t.index_select(0, index)
    order = sorted(range(t.dim()), key=lambda d: -t.stride()[d])
    dense = t.permute(order)
    if order[0] != 0 or not dense.is_contiguous():
        return t.index_select(0, index)
    return dense.index_select(0, index).permute([order.index(d) for d in range(t.dim())])


def _in_dims(tree: Any, batch: int) -> Any:
    """vmap's ``in_dims`` for ``tree``: 0 for tensors with the batch dimension, None otherwise."""
    return tree_map(lambda t: 0 if has_batch_dim(t, batch) else None, tree)


def run_stacked(
    params: Sequence[Mapping[str, Tensor]],
    template: nn.Module,
    positions: Sequence[Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: int,
    rule: StackedRule | None = None,
) -> Any:
    """Copy ``i`` (``template`` called with ``params[i]``, its named parameters) on the rows
    ``positions[i]`` (all of one length), as one vmap call, or one call of ``rule`` when given;
    ``template`` must be in the copies' train/eval mode.

    Returns the outputs in the batch's own row order, like the loop over the copies would.
    """
    rows = len(positions[0])
    if any(len(p) != rows for p in positions):
        raise ValueError("every copy needs the same number of rows")
    order = torch.cat(list(positions))
    groups = len(params)

    def grouped(t: Any) -> Any:
        if has_batch_dim(t, batch):
            return gather_rows(t, order.to(t.device)).view(groups, rows, *t.shape[1:])
        return t

    inputs = (tree_map(grouped, args), tree_map(grouped, kwargs))

    def one(params: dict[str, Tensor], a: tuple[Any, ...], k: dict[str, Any]) -> Any:
        return functional_call(template, params, a, k, strict=True)

    try:
        if rule is not None:
            out = rule(params, *inputs, training=template.training)
        else:
            stacked = {n: torch.stack([p[n] for p in params]) for n in params[0]}
            out = vmap(one, in_dims=(0, _in_dims(args, batch), _in_dims(kwargs, batch)))(stacked, *inputs)
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:
        if not_options(err):  # out of memory: the machine's limit, not a module vmap cannot take
            raise
        raise NotStackable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    inverse = torch.argsort(order)
    leaves, spec = tree_flatten(out)

    def ungrouped(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        flat = t.reshape(groups * rows, *t.shape[2:])
        return gather_rows(flat, inverse.to(flat.device))

    return tree_unflatten([ungrouped(t) for t in leaves], spec)


__all__ = [
    "AUTO_MAX_BYTES",
    "NotStackable",
    "StackedRule",
    "gather_rows",
    "has_batch_dim",
    "is_vmapped",
    "meta_template",
    "run_stacked",
    "small_or_on_accelerator",
    "stackable",
    "worth_stacking",
]

"""Parameter gradients from the leading rows of a batch only: live and detached rows in one call.

Selective back-propagation gives the shared parameters gradients from the live rows (the anchor
group) only, while the detached rows still back-propagate *through* the shared stages into their
own branch stages. Run as two calls (live rows with the parameters, detached rows with detached
views of them), every operation of the shared stages runs twice on a fraction of the batch, which
costs more than the arithmetic when the inputs are small. :class:`LiveRows` runs them as one call:
the batch is ordered live rows first, and every operation that combines a shared parameter with the
batch computes that parameter's gradient from the first ``live`` rows only:

- linear and convolution layers: the input gradient from every row, the weight and bias gradients
  from the live rows (no extra work: the weight gradient of the detached rows is never computed);
- element-wise operations (``x * p``, ``addcmul``, ...): the parameter-side operand is expanded along
  the rows by a gate whose backward sums the live rows only;
- operations on parameters alone (views, indexing, ``1 - p``) give *parameter-side* tensors, treated
  like the parameters when they meet the batch;
- custom autograd functions are opaque to a torch-function mode: one whose forward uses a shared
  parameter must run inside :func:`cooperating` (given its parameters) and take its weight
  gradients from the first rows that yields itself.

A group's own branch copy needs no restriction: :func:`paused` runs it outside the mode (its
per-operation hook is the mode's main cost on small inputs) unless it is given a tensor computed from
shared parameters alone.

Anything else that combines a shared parameter with the batch raises :class:`NotFusable`, and the
caller runs the groups as separate calls instead: the mode never guesses. It also assumes that the
model treats rows independently (no batch statistics), which only the model can promise
(:attr:`branchadapt.Backbone.rows_independent`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .batching import is_vmapped
from .device import autocast_dtype

aten = torch.ops.aten


class _ThreadState(threading.local):
    """Per thread, as torch's own mode stack is: both directions of a step may run at once."""

    def __init__(self) -> None:
        self.active: list[LiveRows] = []  # the active LiveRows modes, innermost last
        self.cooperating = 0  # depth of cooperating() blocks


_state = _ThreadState()
pause_in_branches = True  # False: branch copies run under the mode too (A/B runs of paused())


class NotFusable(Exception):
    """A shared parameter meets the batch in an operation the mode cannot restrict (the message says which)."""


def live_rows() -> int | None:
    """Rows (from the first) whose losses may reach the shared parameters; None: all of them."""
    active = _state.active
    return active[-1].live if active else None


@contextmanager
def cooperating(*params: Tensor | None) -> Iterator[int | None]:
    """Mark a custom autograd function's forward as honouring the live rows in its backward.

    ``params`` are the parameters the function computes gradients for. Yields the live-row count
    to keep for backward when one of them is a shared parameter of the active :class:`LiveRows`,
    else None: outside the mode, and for a group's own branch copy, whose weights take their
    gradient from every row it is given.
    """
    mode = _state.active[-1] if _state.active else None
    _state.cooperating += 1
    try:
        yield mode.live if mode is not None and any(mode._param_side(p) for p in params) else None
    finally:
        _state.cooperating -= 1


@contextmanager
def paused(inputs: Any) -> Iterator[None]:
    """Run a per-group stage without the active :class:`LiveRows` mode when nothing it is given is
    parameter-side: its parameters are that group's own, so no gradient needs restricting, and every
    operation skips the mode's Python hook (a per-operation cost that weighs on small inputs).

    The mode stays on when it is not the innermost torch-function mode (pausing it would reorder
    the stack) or when a tensor in ``inputs`` (the stage's arguments, any nesting) was computed
    from shared parameters alone.
    """
    mode = _state.active[-1] if _state.active and pause_in_branches else None
    if mode is None or not _innermost(mode) or any(mode._param_side(t) for t in tree_leaves(inputs)):
        yield
        return
    grad = mode._grad
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()
        mode._grad = grad


# torch's (private) torch-function mode stack of this thread: absent means "never innermost"
_stack_depth = getattr(torch._C, "_len_torch_function_stack", None)
_stack_at = getattr(torch._C, "_get_function_stack_at", None)


def _innermost(mode: TorchFunctionMode) -> bool:
    """Whether ``mode`` is the innermost torch-function mode of this thread."""
    if _stack_depth is None or _stack_at is None:
        return False
    depth = _stack_depth()
    return bool(depth > 0 and _stack_at(depth - 1) is mode)


def weight_rows(t: Tensor, live: int | None) -> Tensor:
    """The rows of ``t`` that weight gradients are taken from (``live`` from :func:`live_rows`)."""
    return t if live is None else t[:live]


def _autocast_operands(
    x: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The operands of a linear or convolution as autocast would run them: cast to its dtype when
    it is on for their device (outside the autograd functions below, so that the casts' own
    backward returns each gradient in its tensor's dtype), unchanged otherwise."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


class _Gate(torch.autograd.Function):
    """``t`` (one row) expanded to ``rows`` rows; its gradient sums the first ``live`` rows only."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, rows: int, live: int) -> Tensor:
        ctx.live = live
        return t.expand(rows, *t.shape[1:]).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        return grad[: ctx.live].sum(0, keepdim=True), None, None


class _LiveLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, live: int) -> Tensor:
        ctx.live, ctx.has_bias = live, bias is not None
        ctx.save_for_backward(x[:live], weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x_live, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g_x = grad @ weight if needs[0] else None
        g_live = grad[: ctx.live].reshape(-1, grad.shape[-1])
        g_w = g_live.t() @ x_live.reshape(-1, x_live.shape[-1]) if needs[1] else None
        g_b = g_live.sum(0) if ctx.has_bias and needs[2] else None
        return g_x, g_w, g_b, None


class _LiveConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        live: int,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
    ) -> Tensor:
        ctx.live, ctx.geometry, ctx.has_bias = live, (stride, padding, dilation, groups), bias is not None
        ctx.save_for_backward(x, weight)
        return aten.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        needs = ctx.needs_input_grad
        zeros = [0] * len(stride)
        g_x = g_w = g_b = None
        if needs[0]:
            g_x = aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, zeros, groups, [True, False, False]
            )[0]
        if needs[1] or (ctx.has_bias and needs[2]):
            live = ctx.live
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            mask = [False, needs[1], ctx.has_bias and needs[2]]
            _, g_w, g_b = aten.convolution_backward(
                grad[:live],
                x[:live],
                weight,
                bias_sizes,
                stride,
                padding,
                dilation,
                False,
                zeros,
                groups,
                mask,
            )
        return g_x, g_w, g_b, None, None, None, None, None


_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
# element-wise operations (by ``__name__``): a parameter-side operand broadcast along the rows is
# gated; anything not listed that mixes parameters and batch is refused
_POINTWISE = frozenset(
    {"add", "sub", "mul", "div", "true_divide", "rsub", "addcmul", "addcdiv", "where", "lerp",
     "maximum", "minimum", "add_", "sub_", "mul_", "div_", "addcmul_", "addcdiv_",
     "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__",
     "__imul__", "__truediv__", "__rtruediv__", "__itruediv__"}
)  # fmt: skip


def _tuple(value: Any, dims: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)] * dims


class LiveRows(TorchFunctionMode):
    """While active, ``shared`` parameters get gradients from the first ``live`` of ``rows`` rows only.

    The tensors of the batch are those whose first dimension has ``rows`` entries. Use it around
    one forward pass whose batch is ordered live rows first; backward needs nothing active.
    """

    def __init__(self, shared: Iterable[Tensor], rows: int, live: int) -> None:
        super().__init__()
        if not 0 < live < rows:
            raise ValueError(f"live rows must be between 1 and rows - 1 = {rows - 1}, got {live}")
        self.rows, self.live = rows, live
        # parameter-side tensors by id; holding them keeps their ids from being reused meanwhile
        self._side: dict[int, Tensor] = {id(p): p for p in shared}
        self._grad = True

    def __enter__(self) -> LiveRows:
        self._grad = torch.is_grad_enabled()
        _state.active.append(self)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        _state.active.pop()

    def _param_side(self, t: Any) -> bool:
        return id(t) in self._side  # only tensors are keys, and they stay alive: ids are unique

    def _touches_side(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether any argument (or an element of a list/tuple argument) is parameter-side: the
        fast exit for the many operations that use no shared parameter."""
        side = self._side
        for a in (*args, *kwargs.values()) if kwargs else args:
            if id(a) in side:
                return True
            if type(a) is list or type(a) is tuple:
                for t in a:
                    if id(t) in side:
                        return True
        return False

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if not self._touches_side(args, kwargs):
            return func(*args, **kwargs)
        flat = [*args, *kwargs.values()]
        flat += [t for a in flat if isinstance(a, list | tuple) for t in a]
        name = getattr(func, "__name__", repr(func))
        others = [t for t in flat if isinstance(t, Tensor) and not self._param_side(t)]
        if any(is_vmapped(t) for t in others):
            raise NotFusable(
                f"{name} uses a shared parameter inside vmap (stacked branch copies), where the rows "
                "of the batch cannot be told apart"
            )
        batch = [t for t in others if t.dim() and t.shape[0] == self.rows]
        if not torch.is_grad_enabled():
            if not self._grad or _state.cooperating:
                return func(*args, **kwargs)
            # gradients off inside a forward that records them: a custom autograd function. Working on
            # the parameters alone is harmless (and marked, so a later use with the batch is caught);
            # meeting the batch there makes a gradient this mode cannot restrict.
            if batch:
                raise NotFusable(
                    f"{name} uses a shared parameter with the batch with gradients off: inside a custom "
                    "autograd function that does not declare branchadapt.rowgrad.cooperating()"
                )
            return self._mark(func(*args, **kwargs))
        if not batch:
            if any(t.requires_grad for t in others):
                raise NotFusable(
                    f"{name} combines a shared parameter with a non-batch tensor that needs gradients"
                )
            return self._mark(func(*args, **kwargs))
        if func is F.linear:
            return self._linear(*args, **kwargs)
        if func in _CONVS:
            return self._conv(_CONVS[func], *args, **kwargs)
        if name in _POINTWISE:
            return self._pointwise(func, batch, args, kwargs)
        raise NotFusable(f"{name} combines a shared parameter with the batch (only linear, convolution and "
                         "element-wise operations can restrict its gradient to the live rows)")  # fmt: skip

    def _mark(self, out: Any) -> Any:
        """Mark the tensors in ``out`` as computed from shared parameters (and constants) alone."""
        for t in out if isinstance(out, list | tuple) else (out,):
            if isinstance(t, Tensor):
                self._side[id(t)] = t
        return out

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if self._param_side(x) or x.dim() < 2:
            raise NotFusable("linear with a shared parameter as its input")
        return _LiveLinear.apply(*_autocast_operands(x, weight, bias), self.live)

    def _conv(
        self,
        dims: int,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
    ) -> Tensor:
        if isinstance(padding, str) or self._param_side(x) or x.dim() != dims + 2:
            raise NotFusable(f"conv{dims}d with padding={padding!r} or a batch-free input")
        geometry = (_tuple(stride, dims), _tuple(padding, dims), _tuple(dilation, dims))
        return _LiveConv.apply(*_autocast_operands(x, weight, bias), self.live, *geometry, groups)

    def _pointwise(self, func: Callable[..., Any], batch: list[Tensor], args: tuple, kwargs: dict) -> Any:
        ndim = max(t.dim() for t in batch)

        def gate(t: Any) -> Any:
            if not self._param_side(t):
                return t
            if t.dim() > ndim:
                raise NotFusable(
                    f"{getattr(func, '__name__', func)}: a shared parameter has more dims than the batch"
                )
            shaped = t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))
            if shaped.shape[0] != 1:
                raise NotFusable(
                    f"a shared parameter of shape {tuple(t.shape)} is not broadcast along the rows"
                )
            return _Gate.apply(shaped, self.rows, self.live)

        return func(*[gate(a) for a in args], **{k: gate(v) for k, v in kwargs.items()})


__all__ = ["LiveRows", "NotFusable", "cooperating", "live_rows", "paused", "weight_rows"]

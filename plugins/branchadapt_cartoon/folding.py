"""Several groups' copies of a generator stage as one network: the copies folded into the channels.

With ``train.stack_branches`` the engine runs the groups' copies of a branch stage as one call
(:mod:`branchadapt.batching`). Its generic way, ``torch.func.vmap``, wraps every operation and
moves the copies' dimension around it: for an hourglass stage of the 64 px transfer stage that is
2.3x the operator calls of one copy on the same rows, and 1.18x its time; folded, 1.5x the calls
and 1.08x the time (an ad-hoc microbenchmark, docs/performance.md section 1.1). The generator offers the engine a rule of its own instead
(:meth:`.networks.UGATITGenerator.stacked_rule`, ``model.stacked_copies = "folded"``):

- copy ``k``'s channels become channels ``k*C ... (k+1)*C - 1`` of one map ``(rows, copies*C, H, W)``;
- every convolution becomes one grouped convolution (``groups = copies``) over the copies' weights
  concatenated along the output channels: the kernels vmap would run, without its wrapping;
- instance norms, ReLUs, padding, pooling, up-sampling and sums act per channel and run unchanged,
  the low-memory units included (they read the group count from the shapes);
- the hourglass unit concatenates its three maps per copy (``ConvBlock.copies``).

The network is a structural copy of the stage without storage, its convolutions' group counts
multiplied, called with the concatenated weights; values and gradients are those of the loop over
the copies up to rounding. A stage holding any other module (layer norms, linear layers, ...) is
not folded and keeps vmap.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from .hourglass import ConvBlock, HourGlass, HourGlassBlock, InstanceNorm
from .layout import is_channels_last
from .lowmem import NormReluConv, ReflectConv2d

#: modules that fold as they are: per-channel operations, containers, and the units handled above
FOLDABLE = frozenset(
    {
        nn.Sequential, nn.Identity, nn.ReLU, nn.Tanh, nn.Upsample, nn.AvgPool2d,
        nn.Conv2d, ReflectConv2d, NormReluConv, ConvBlock, HourGlassBlock, HourGlass,
    }
)  # fmt: skip


def unfoldable(module: nn.Module) -> str | None:
    """The first sub-module of ``module`` that cannot be folded (as ``"path (type)"``), or None."""
    for name, m in module.named_modules():
        norm = type(m) in (InstanceNorm, nn.InstanceNorm2d)
        if norm and not (m.affine or m.track_running_stats):  # type: ignore[union-attr]
            continue
        if type(m) not in FOLDABLE or (isinstance(m, nn.Conv2d) and m.padding_mode != "zeros"):
            return f"{name or '(the stage)'} ({type(m).__name__})"
    return None


def fold(x: Tensor) -> Tensor:
    """``(copies, rows, C, H, W)`` -> ``(rows, copies*C, H, W)`` (a view when ``rows`` is 1 in the
    default layout). Copies laid out channels_last give a channels_last map (one copy)."""
    if is_channels_last(x[0]):
        k, rows, c, h, w = x.shape
        return x.permute(1, 3, 4, 0, 2).reshape(rows, h, w, k * c).permute(0, 3, 1, 2)
    return x.transpose(0, 1).flatten(1, 2)


def unfold(y: Tensor, copies: int) -> Tensor:
    """The inverse of :func:`fold` for a map with any channel count per copy. A channels_last map
    gives copies laid out channels_last whose ``(copies, rows)`` dimensions merge without a copy."""
    if is_channels_last(y):
        per_copy = y.permute(0, 2, 3, 1).unflatten(3, (copies, -1))  # (rows, H, W, copies, C)
        return per_copy.permute(3, 0, 1, 2, 4).contiguous().permute(0, 1, 4, 2, 3)
    return y.unflatten(1, (copies, -1)).transpose(0, 1)


def folded_network(module: nn.Module, copies: int) -> nn.Module:
    """A storage-less copy of ``module`` for ``copies`` copies folded into its channels."""
    net = copy.deepcopy(module).to("meta")
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels = m.in_channels * copies, m.out_channels * copies
            m.groups *= copies
        if isinstance(m, nn.InstanceNorm2d):  # torch's own path (no gradients) checks the channel count
            m.num_features *= copies
        if isinstance(m, NormReluConv | ReflectConv2d):
            m.min_bytes = m.min_bytes * copies  # each copy's own map decides, as in the loop
        if isinstance(m, ConvBlock):
            m.copies, m.c_out = copies, m.c_out * copies
    return net


def _concat(weights: Sequence[Tensor], channels_last: bool) -> Tensor:
    """The copies' weights along the output channels; convolution weights laid out channels_last
    for a channels_last map (the layout the kernel would otherwise convert them to on every call)."""
    if not channels_last or weights[0].dim() != 4:
        return torch.cat(list(weights))
    return torch.cat([w.permute(0, 2, 3, 1) for w in weights]).permute(0, 3, 1, 2)


class FoldedCopies:
    """The :class:`branchadapt.batching.StackedRule` of a foldable generator stage (module docstring)."""

    def __init__(self, module: nn.Module) -> None:
        self.structure = copy.deepcopy(module).to("meta")
        # a unit whose input already has its output's channels never runs its 1x1 projection
        idle = tuple(
            f"{name}.ConvBlock4."
            for name, m in module.named_modules()
            if isinstance(m, ConvBlock) and m.ConvBlock4[2].in_channels == m.c_out
        )
        self.names = [n for n, _ in module.named_parameters() if not n.startswith(idle)]
        self.networks: dict[int, nn.Module] = {}

    def __call__(
        self,
        params: Sequence[Mapping[str, Tensor]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        training: bool,
    ) -> Any:
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor) or args[0].dim() != 5:
            raise TypeError("a folded stage takes one map, (copies, rows, C, H, W)")
        copies = len(params)
        net = self.networks.get(copies)
        if net is None:
            net = self.networks[copies] = folded_network(self.structure, copies)
        if net.training != training:
            net.train(training)
        x = fold(args[0])
        weights = {n: _concat([p[n] for p in params], is_channels_last(x)) for n in self.names}
        out = functional_call(net, weights, (x,), strict=False)
        return tree_map(lambda t: unfold(t, copies) if isinstance(t, Tensor) else t, out)


def folded_rule(module: nn.Module) -> FoldedCopies | None:
    """The folded rule for ``module``, or None when it holds a module that cannot be folded."""
    return None if unfoldable(module) is not None else FoldedCopies(module)


__all__ = ["FOLDABLE", "FoldedCopies", "fold", "folded_network", "folded_rule", "unfold", "unfoldable"]

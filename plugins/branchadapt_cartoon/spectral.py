"""Spectral normalisation that divides the cheaper side: the weight or the layer's output.

Same maths, parameters, buffers and state-dict keys as ``torch.nn.utils.spectral_norm`` (one
power iteration per training forward, ``weight_orig`` / ``weight_u`` / ``weight_v``, eps 1e-12),
so photo2cartoon checkpoints load unchanged. The difference is where ``1 / sigma`` is applied:
``conv(x, W / sigma) + b == conv(x, W) / sigma + b``. The classic hook always divides the weight,
a full read and write of it in the forward pass and again in the backward pass; for the
discriminators' last layers (up to 33 MB of weights on a 10x10 map) that memory traffic costs
more than the convolution itself on a CPU. Here a layer divides whichever is smaller: its weight
(early, wide-map layers) or its output (late, weight-heavy layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-12  # torch.nn.utils.spectral_norm's default


class _SpectralNormed:
    """Power iteration and sigma, shared by the conv and linear variants."""

    weight_orig: nn.Parameter
    weight_u: Tensor
    weight_v: Tensor
    training: bool

    def sigma(self) -> Tensor:
        """The weight's largest singular value estimate (power iteration when training)."""
        mat = self.weight_orig.flatten(1)
        u, v = self.weight_u, self.weight_v
        if self.training:
            with torch.no_grad():
                v = F.normalize(torch.mv(mat.t(), u), dim=0, eps=EPS, out=v)
                u = F.normalize(torch.mv(mat, v), dim=0, eps=EPS, out=u)
                # the in-place updated buffers must not be the tensors autograd saved
                u, v = u.clone(), v.clone()
        return torch.dot(u, torch.mv(mat, v))

    def _normalised(
        self, x: Tensor, op: Callable[[Tensor, Tensor, Tensor | None], Tensor], bias: Tensor | None
    ) -> Tensor:
        sigma = self.sigma()
        if self.weight_orig.numel() <= x.numel():
            return op(x, self.weight_orig / sigma, bias)
        out = op(x, self.weight_orig, None) / sigma
        return out if bias is None else out + bias.view(-1, *([1] * (out.dim() - 2)))


class SNConv2d(_SpectralNormed, nn.Conv2d):
    """``nn.Conv2d`` under spectral norm (made by :func:`spectral_norm`)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._normalised(x, self._conv_forward, self.bias)


class SNLinear(_SpectralNormed, nn.Linear):
    """``nn.Linear`` under spectral norm (made by :func:`spectral_norm`)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._normalised(x, F.linear, self.bias)


_CLASSES: dict[type[nn.Module], type[nn.Conv2d] | type[nn.Linear]] = {
    nn.Conv2d: SNConv2d,
    nn.Linear: SNLinear,
}


def spectral_norm(module: nn.Conv2d | nn.Linear) -> nn.Module:
    """Put ``module`` under spectral norm in place (like ``torch.nn.utils.spectral_norm``)."""
    if type(module) not in _CLASSES:
        raise TypeError(f"spectral_norm supports nn.Conv2d and nn.Linear, not {type(module).__name__}")
    weight = module._parameters.pop("weight")
    assert weight is not None
    with torch.no_grad():
        rows, cols = weight.shape[0], weight[0].numel()
        u = F.normalize(weight.new_empty(rows).normal_(0, 1), dim=0, eps=EPS)
        v = F.normalize(weight.new_empty(cols).normal_(0, 1), dim=0, eps=EPS)
    module.register_parameter("weight_orig", weight)
    module.register_buffer("weight_u", u)
    module.register_buffer("weight_v", v)
    module.__class__ = _CLASSES[type(module)]
    return module


__all__ = ["SNConv2d", "SNLinear", "spectral_norm"]

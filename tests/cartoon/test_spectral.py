"""Output-side spectral norm against ``torch.nn.utils.spectral_norm``: values, gradients, buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from branchadapt_cartoon.spectral import SNConv2d, SNLinear, spectral_norm


def _pair(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(torch's spectral norm, ours) on identical copies, with identical u/v vectors."""
    classic = nn.utils.spectral_norm(copy.deepcopy(module))
    ours = spectral_norm(copy.deepcopy(module))
    with torch.no_grad():
        ours.weight_u.copy_(classic.weight_u)
        ours.weight_v.copy_(classic.weight_v)
    return classic, ours


CASES = [
    # (module, input): small weight on a wide map divides the weight; large weight on a small map
    # divides the output; a linear layer of each kind
    (nn.Conv2d(3, 4, 4, 2), (2, 3, 16, 16)),
    (nn.Conv2d(64, 128, 4, 1), (2, 64, 5, 5)),
    (nn.Conv2d(64, 1, 4, 1, bias=False), (1, 64, 6, 6)),
    (nn.Linear(8, 3), (5, 8)),
    (nn.Linear(256, 64), (2, 256)),
]


@pytest.mark.parametrize(("module", "shape"), CASES)
def test_same_outputs_gradients_and_power_iteration_as_torch(module, shape):
    torch.manual_seed(0)
    classic, ours = _pair(module.double())
    assert set(ours.state_dict()) == set(classic.state_dict())
    for step in range(3):  # power iteration state carries over between calls
        ours.train(step < 2)
        classic.train(step < 2)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        out_c, out_o = classic(x), ours(x)
        torch.testing.assert_close(out_o, out_c, rtol=1e-10, atol=1e-12)
        upstream = torch.randn_like(out_c)
        params_c = [x, classic.weight_orig, *([classic.bias] if classic.bias is not None else [])]
        params_o = [x, ours.weight_orig, *([ours.bias] if ours.bias is not None else [])]
        grads_c = torch.autograd.grad((out_c * upstream).sum(), params_c)
        grads_o = torch.autograd.grad((out_o * upstream).sum(), params_o)
        for a, b in zip(grads_o, grads_c, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours.weight_u, classic.weight_u, rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.weight_v, classic.weight_v, rtol=0, atol=1e-12)


def test_both_code_paths_are_exercised_and_classic_checkpoints_load():
    small, large = spectral_norm(nn.Conv2d(3, 4, 4, 2)), spectral_norm(nn.Conv2d(64, 128, 4, 1))
    assert isinstance(small, SNConv2d) and isinstance(spectral_norm(nn.Linear(2, 2)), SNLinear)
    assert small.weight_orig.numel() <= torch.zeros(2, 3, 16, 16).numel()  # divides the weight
    assert large.weight_orig.numel() > torch.zeros(2, 64, 5, 5).numel()  # divides the output
    classic = nn.utils.spectral_norm(nn.Conv2d(64, 128, 4, 1))
    large.load_state_dict(classic.state_dict())
    assert torch.equal(large.weight_u, classic.weight_u)
    with pytest.raises(TypeError, match=r"Conv2d and nn\.Linear, not Conv1d"):
        spectral_norm(nn.Conv1d(2, 2, 3))

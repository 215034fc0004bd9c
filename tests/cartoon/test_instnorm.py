"""The training instance norm: torch's outputs, statistics and gradients, also under vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import branchadapt_cartoon.instnorm as instnorm
from branchadapt_cartoon.instnorm import instance_norm, norm_stats


@pytest.mark.parametrize("fast", [True, False])
def test_statistics_are_the_batch_norm_kernels(monkeypatch, fast):
    monkeypatch.setattr(instnorm, "FAST_MIN_NUMEL", 0 if fast else 10**9)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64) * 4 + 2
    out, mean, invstd = norm_stats(x, 1e-5)
    t_out, t_mean, t_invstd = torch.ops.aten.native_batch_norm(
        x.reshape(1, 6, 5, 7), None, None, None, None, True, 0.0, 1e-5
    )
    assert out.shape == x.shape and mean.shape == invstd.shape == (6,)
    torch.testing.assert_close(out, t_out.view_as(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, t_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(invstd, t_invstd, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fast", [True, False])
def test_gradient_and_vmap_match_torchs_instance_norm(monkeypatch, fast):
    monkeypatch.setattr(instnorm, "FAST_MIN_NUMEL", 0 if fast else 10**9)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(instance_norm, (x,))
    out = instance_norm(x)
    assert (type(out.grad_fn).__name__ == "_InstanceNormBackward") == fast  # the fast forward or torch's
    assert out._base is None  # not a view: no CopySlices behind an in-place ReLU
    stacked = torch.randn(3, 2, 4, 5, 5, dtype=torch.float64)  # copies, rows, C, H, W
    weights = torch.randn(2, 4, 5, 5, dtype=torch.float64)

    def grad_of(norm):  # type: ignore[no-untyped-def]
        return torch.func.vmap(torch.func.grad(lambda t: (norm(t).relu() * weights).sum()))(stacked)

    torch.testing.assert_close(grad_of(instance_norm), grad_of(F.instance_norm), rtol=1e-10, atol=1e-12)


def test_small_inputs_take_torchs_kernel_large_ones_the_fast_forward():
    small = torch.randn(1, 4, 8, 8, requires_grad=True)  # 256 elements
    large = torch.randn(1, 16, 64, 64, requires_grad=True)  # 65,536 = FAST_MIN_NUMEL
    assert type(instance_norm(small).grad_fn).__name__ != "_InstanceNormBackward"
    assert type(instance_norm(large).grad_fn).__name__ == "_InstanceNormBackward"


class _Spy:
    """``torch.ops.aten`` recording which ops were looked up."""

    def __init__(self) -> None:
        self.used: list[str] = []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        self.used.append(name)
        return getattr(torch.ops.aten, name)


@pytest.mark.parametrize("channels", [4, 12])  # the plain-ops backward up to 8 channels, torch's above
@pytest.mark.parametrize("fast", [True, False])
def test_channels_last_input_keeps_its_layout_and_torchs_values(monkeypatch, fast, channels):
    monkeypatch.setattr(instnorm, "FAST_MIN_NUMEL", 0 if fast else 10**9)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the plain backward needs 2 threads
    spy = _Spy()
    monkeypatch.setattr(instnorm, "aten", spy)
    torch.manual_seed(0)
    x = torch.randn(2, channels, 6, 5, dtype=torch.float64) * 3 + 1
    cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = instance_norm(cl)
    # no layout copy: a channels_last map stays channels_last through the norm and its gradient
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    grad = torch.randn_like(x)
    (out * grad).sum().backward()
    assert cl.grad is not None and cl.grad.is_contiguous(memory_format=torch.channels_last)
    plain = x.clone().requires_grad_()
    ref = F.instance_norm(plain, eps=1e-5)
    (ref * grad).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cl.grad, plain.grad, rtol=1e-10, atol=1e-10)
    kernel = "native_batch_norm_backward" in spy.used
    assert kernel == (channels > instnorm.PLAIN_BACKWARD_MAX_CHANNELS)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one thread: torch's kernel, faster there
    spy.used.clear()
    cl.grad = None
    instance_norm(cl).sum().backward()
    assert "native_batch_norm_backward" in spy.used


def test_vmap_over_a_non_leading_dimension(monkeypatch):
    """Under vmap the layout of a batched map cannot be queried: the norm must not ask twice."""
    monkeypatch.setattr(instnorm, "FAST_MIN_NUMEL", 0)
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)  # mapped over dim 1
    ours = torch.func.vmap(instance_norm, in_dims=1)(x)
    for k in range(3):
        torch.testing.assert_close(ours[k], F.instance_norm(x[:, k], eps=1e-5), rtol=1e-10, atol=1e-10)


def test_under_vmap_torchs_batch_norm_not_a_python_function(monkeypatch):
    """Stacked branch copies: a Python autograd function under vmap costs more than it saves."""
    monkeypatch.setattr(instnorm, "FAST_MIN_NUMEL", 0)  # every unbatched input would take it

    def refuse(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("the autograd function ran under vmap")

    stacked = torch.randn(3, 2, 4, 5, 5, dtype=torch.float64)  # copies, rows, C, H, W
    weights = torch.randn(3, 2, 4, 5, 5, dtype=torch.float64)

    def grad_of(norm):  # type: ignore[no-untyped-def]
        x = stacked.clone().requires_grad_()  # autograd outside vmap, as the branched model runs it
        out = torch.func.vmap(norm)(x)
        (out.relu() * weights).sum().backward()
        return out, x.grad

    expected = grad_of(lambda t: F.instance_norm(t, eps=1e-5))
    monkeypatch.setattr(instnorm, "_instance_norm_apply", refuse)
    for got, want in zip(grad_of(instance_norm), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(AssertionError, match="autograd function"):  # the guard itself works
        instance_norm(stacked[0].requires_grad_())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_var_mean_hw_is_torchs_var_mean(layout):
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 7, 6, dtype=torch.float64) * 4 + 3).contiguous(memory_format=layout)
    x.requires_grad_()
    got, want = instnorm.var_mean_hw(x), torch.var_mean(x, dim=(2, 3), keepdim=True)
    assert type(got[0].grad_fn).__name__ == "_VarMeanBackward"
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(instnorm.var_mean_hw, (x,))
    gv, gm = torch.randn_like(got[0]), torch.randn_like(got[1])
    (mine,) = torch.autograd.grad(got, x, (gv, gm))
    assert mine.is_contiguous(memory_format=layout)
    torch.testing.assert_close(mine, torch.autograd.grad(want, x, (gv, gm))[0], rtol=1e-12, atol=1e-12)


def test_var_mean_hw_under_vmap(monkeypatch):
    x = torch.randn(3, 2, 4, 5, 5, dtype=torch.float64)
    want = torch.var_mean(x, dim=(3, 4), keepdim=True)
    for kernels in (True, False):  # torch's op under vmap by default; the function's vmap rule works
        monkeypatch.setattr(instnorm, "vmap_kernels", kernels)
        for a, b in zip(torch.func.vmap(instnorm.var_mean_hw)(x), want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_var_mean_hw_of_one_element_maps_is_torchs_nan_variance():
    x = torch.randn(2, 3, 1, 1, requires_grad=True)
    with pytest.warns(UserWarning, match="degrees of freedom"):  # torch's own, as without the plugin
        var, mean = instnorm.var_mean_hw(x)
    assert torch.isnan(var).all() and torch.equal(mean, x.detach())

"""Reflection padding whose gradient is folded with strided slices: torch's values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import branchadapt_cartoon.padding as padding
from branchadapt_cartoon.padding import ReflectionPad2d, reflect_pad, reflect_pad_backward


def _torch_grad(grad: torch.Tensor, pad: int) -> torch.Tensor:
    x = torch.empty(*grad.shape[:-2], grad.shape[-2] - 2 * pad, grad.shape[-1] - 2 * pad, dtype=grad.dtype)
    return torch.ops.aten.reflection_pad2d_backward(grad, x, [pad] * 4)


@pytest.mark.parametrize(
    ("shape", "pad"),
    [((2, 8, 64, 64), 1), ((1, 3, 70, 50), 3), ((2, 4, 40, 36), 2), ((2, 2, 4, 4), 1), ((1, 2, 3, 5), 1)],
)
@pytest.mark.parametrize("fold_everything", [False, True])
def test_backward_equals_torchs_kernel(monkeypatch, shape, pad, fold_everything):
    if fold_everything:  # small maps too (the default leaves them to torch's kernel)
        monkeypatch.setattr(padding, "FOLD_MIN_NUMEL", 0)
    torch.manual_seed(0)
    grad = torch.randn(*shape[:2], shape[2] + 2 * pad, shape[3] + 2 * pad, dtype=torch.float64)
    torch.testing.assert_close(
        reflect_pad_backward(grad, pad), _torch_grad(grad, pad), rtol=1e-12, atol=1e-12
    )


def test_large_maps_are_folded_and_small_ones_left_to_torch(monkeypatch):
    calls = []
    kernel = torch.ops.aten.reflection_pad2d_backward

    class Spy:
        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            if name == "reflection_pad2d_backward":
                return lambda *a: calls.append(a[0].shape) or kernel(*a)
            return getattr(torch.ops.aten, name)

    monkeypatch.setattr(padding.torch.ops, "aten", Spy())
    reflect_pad_backward(torch.randn(1, 16, 66, 66), 1)  # 69,696 elements: folded
    assert calls == []
    reflect_pad_backward(torch.randn(1, 8, 18, 18), 1)  # 2,592: torch's kernel
    assert calls == [torch.Size([1, 8, 18, 18])]


def test_reflect_pad_is_torchs_pad_with_the_folded_gradient(monkeypatch):
    monkeypatch.setattr(padding, "FOLD_MIN_NUMEL", 0)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    out = reflect_pad(x, 2)
    assert type(out.grad_fn).__name__ == "_ReflectPadBackward"
    torch.testing.assert_close(out, F.pad(x, (2,) * 4, mode="reflect"), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: reflect_pad(t, 2), (x,))
    with torch.no_grad():  # nothing recorded: torch's pad itself
        assert reflect_pad(x, 2).grad_fn is None
    assert reflect_pad(x, 0) is x
    monkeypatch.setattr(padding, "FOLD_MIN_NUMEL", 2 * 3 * 13 * 11 + 1)  # the padded map is smaller:
    assert type(reflect_pad(x, 2).grad_fn).__name__ != "_ReflectPadBackward"  # torch's pad and gradient


def test_module_replaces_nn_reflection_pad():
    ours, theirs = ReflectionPad2d(1), nn.ReflectionPad2d(1)
    assert isinstance(ours, nn.ReflectionPad2d) and ours.state_dict() == {} and repr(ours) == repr(theirs)
    x = torch.randn(1, 16, 70, 70, requires_grad=True)
    out = ours(x)
    assert type(out.grad_fn).__name__ == "_ReflectPadBackward"
    upstream = torch.randn_like(out)
    (g_ours,) = torch.autograd.grad(out, x, upstream)
    (g_theirs,) = torch.autograd.grad(theirs(x), x, upstream)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-6)


def test_vmap_of_the_gradient(monkeypatch):
    """Stacked branch copies run the pad under ``torch.func.vmap``."""
    monkeypatch.setattr(padding, "FOLD_MIN_NUMEL", 0)
    x = torch.randn(3, 2, 2, 8, 8, dtype=torch.float64)
    weights = torch.randn(2, 2, 10, 10, dtype=torch.float64)

    def loss(t: torch.Tensor, pad_fn) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return (pad_fn(t) * weights).sum()

    ours = torch.func.vmap(torch.func.grad(lambda t: loss(t, lambda u: reflect_pad(u, 1))))(x)
    theirs = torch.func.vmap(
        torch.func.grad(lambda t: loss(t, lambda u: F.pad(u, (1,) * 4, mode="reflect")))
    )(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_under_vmap_torchs_pad_not_a_python_function(monkeypatch):
    """Stacked branch copies: a Python autograd function under vmap costs more than the fold saves."""
    monkeypatch.setattr(padding, "FOLD_MIN_NUMEL", 0)  # every unbatched input would be folded

    def refuse(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("the autograd function ran under vmap")

    monkeypatch.setattr(padding, "_reflect_pad_apply", refuse)
    stacked = torch.randn(3, 2, 2, 8, 8, dtype=torch.float64)  # copies, rows, C, H, W
    weights = torch.randn(3, 2, 2, 10, 10, dtype=torch.float64)

    def grad_of(pad_fn):  # type: ignore[no-untyped-def]
        x = stacked.clone().requires_grad_()  # autograd outside vmap, as the branched model runs it
        out = torch.func.vmap(pad_fn)(x)
        (out * weights).sum().backward()
        return out, x.grad

    ours = grad_of(lambda t: reflect_pad(t, 1))
    theirs = grad_of(lambda t: F.pad(t, (1,) * 4, mode="reflect"))
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    x = stacked[0]
    with pytest.raises(AssertionError, match="autograd function"):  # the guard itself works
        reflect_pad(x.requires_grad_(), 1)


def test_channels_last_gradient_keeps_its_layout(monkeypatch):
    monkeypatch.setattr(padding, "FOLD_MIN_NUMEL", 0)
    grad = torch.randn(2, 3, 10, 12, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ours = reflect_pad_backward(grad, 1)
    like = grad.new_empty(2, 3, 8, 10)
    theirs = torch.ops.aten.reflection_pad2d_backward(grad.contiguous(), like, [1] * 4)
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_vmap_over_a_non_leading_dimension(monkeypatch):
    """Under vmap the layout of a batched map cannot be queried: the fold must not ask twice."""
    monkeypatch.setattr(padding, "FOLD_MIN_NUMEL", 0)
    grad = torch.randn(2, 3, 2, 10, 10, dtype=torch.float64)  # mapped over dim 1
    ours = torch.func.vmap(lambda g: reflect_pad_backward(g, 1), in_dims=1)(grad)
    like = torch.empty(2, 2, 8, 8, dtype=torch.float64)
    for k in range(3):
        theirs = torch.ops.aten.reflection_pad2d_backward(grad[:, k], like, [1] * 4)
        torch.testing.assert_close(ours[k], theirs, rtol=1e-12, atol=1e-12)

"""fast_apply: the plugin's setup_context-style autograd functions without per-call signature binding."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from branchadapt_cartoon.fastapply import fast_apply
from branchadapt_cartoon.instnorm import _InstanceNorm
from branchadapt_cartoon.padding import _ReflectPad


@pytest.fixture
def signatures(monkeypatch):
    """Counts inspect.signature calls (torch's binding of setup_context-style functions uses it)."""
    calls = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def test_the_twin_gives_the_functions_values_and_gradients_without_binding(signatures):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    _ReflectPad.apply(x, 2)
    assert signatures, "torch binds setup_context-style functions here: this test measures nothing"
    signatures.clear()
    fast = fast_apply(_ReflectPad)
    out = fast(x, 2)
    assert signatures == []
    assert type(out.grad_fn).__name__ == "_ReflectPadBackward"  # the name in profiles is unchanged
    torch.testing.assert_close(out, F.pad(x, (2,) * 4, mode="reflect"), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: fast(t, 2), (x,))
    norm = fast_apply(_InstanceNorm)
    out, mean, invstd = norm(x, 1e-5)
    assert not mean.requires_grad and not invstd.requires_grad  # setup_context's marks hold
    torch.testing.assert_close(out, F.instance_norm(x, eps=1e-5))
    assert torch.autograd.gradcheck(lambda t: norm(t, 1e-5)[0], (x,))


def test_under_a_torch_func_transform_the_original_runs():
    fast = fast_apply(_ReflectPad)
    x = torch.randn(3, 2, 4, 6, 6, dtype=torch.float64)  # copies, rows, C, H, W
    out = torch.func.vmap(lambda t: fast(t, 1))(x)  # the twin has no vmap rule: this needs the original
    torch.testing.assert_close(out, torch.stack([F.pad(t, (1,) * 4, mode="reflect") for t in x]))


def test_functions_without_setup_context_are_refused():
    class Classic(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            return x * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            return g * 2

    with pytest.raises(TypeError, match="no setup_context"):
        fast_apply(Classic)

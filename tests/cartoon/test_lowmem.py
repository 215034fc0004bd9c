"""The low-memory convolution units: the same values and gradients as the unfused modules, less saved."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from branchadapt_cartoon.lowmem import NormReluConv, ReflectConv2d, reflect_conv2d, unfused
from branchadapt_cartoon.networks import InstanceNorm, UGATITGenerator


@pytest.fixture(autouse=True)
def _every_unit_saves_memory(monkeypatch):
    """These tests use small maps, which by default take the plain path (``min_bytes``)."""
    monkeypatch.setattr(NormReluConv, "min_bytes", 0)
    monkeypatch.setattr(ReflectConv2d, "min_bytes", 0)


def saved_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    """Bytes of the distinct storages autograd keeps for backward while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize(
    ("pad", "stride", "bias", "kernel"), [(1, 1, False, 3), (1, 2, True, 3), (3, 1, False, 7)]
)
def test_reflect_conv_is_pad_then_conv_in_value_and_gradient(pad, stride, bias, kernel):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64, requires_grad=True)
    conv = ReflectConv2d(4, 5, kernel, stride, reflect=pad, bias=bias).double()
    out = conv(x)
    reference = F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), conv.weight, conv.bias, stride)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(out)
    params = [x, conv.weight] + ([conv.bias] if bias else [])
    ours = torch.autograd.grad((out * upstream).sum(), params)
    theirs = torch.autograd.grad((reference * upstream).sum(), params)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, w: reflect_conv2d(x, w, None, pad, stride), (x[:1, :2, :8, :8].detach().requires_grad_(), conv.weight[:, :2].detach().requires_grad_())
    )  # fmt: skip


def test_reflect_conv_keeps_the_unpadded_input_not_the_padded_map():
    x = torch.randn(1, 8, 32, 32, requires_grad=True)
    conv = ReflectConv2d(8, 8, 3, reflect=1, bias=False)
    ours, _ = saved_bytes(lambda: conv(x))
    with unfused():
        plain, _ = saved_bytes(lambda: conv(x))
    weight = conv.weight.numel() * 4
    assert ours == x.numel() * 4 + weight
    assert plain == x.numel() * 4 + 8 * 34 * 34 * 4 + weight  # and the padded map


def _unit(c_in: int = 4, c_out: int = 6) -> NormReluConv:
    return NormReluConv(
        InstanceNorm(c_in), nn.Identity(), ReflectConv2d(c_in, c_out, 3, reflect=1, bias=False)
    )


def test_norm_relu_conv_is_bit_identical_to_the_unfused_modules():
    torch.manual_seed(1)
    unit = _unit()
    x = (torch.randn(3, 4, 16, 16) * 2 + 0.5).requires_grad_()
    upstream = torch.randn(3, 6, 16, 16)
    results = []
    for ctx in (contextlib.nullcontext(), unfused()):
        with ctx:
            out = unit(x)
            grads = torch.autograd.grad((out * upstream).sum(), (x, unit[3].weight))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    # and the unfused maths is what it claims: IN -> ReLU -> reflection pad -> conv
    reference = F.conv2d(F.pad(F.relu(F.instance_norm(x)), (1,) * 4, mode="reflect"), unit[3].weight)
    torch.testing.assert_close(results[0][0], reference, rtol=1e-5, atol=1e-5)


def test_norm_relu_conv_keeps_only_the_norm_input():
    unit = _unit(8, 8)
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    ours, _ = saved_bytes(lambda: unit(x))
    with unfused():
        plain, _ = saved_bytes(lambda: unit(x))
    stats_and_weight = 2 * 2 * 8 * 4 + unit[3].weight.numel() * 4
    assert ours == x.numel() * 4 + stats_and_weight
    assert plain >= 2.9 * x.numel() * 4  # norm input, ReLU output, padded map


def test_detached_weight_gets_no_gradient_but_the_input_does():
    """Selective back-propagation runs shared units with detached parameter views."""
    unit = _unit()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    weight = unit[3].weight.detach()
    out = torch.func.functional_call(unit, {"3.weight": weight}, (x,))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert unit[3].weight.grad is None


def test_inference_takes_the_plain_path():
    unit = _unit()
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = unit(x)
    assert out.grad_fn is None
    y = unit(x.requires_grad_())
    assert type(y.grad_fn).__name__ == "_NormReluPadConvBackward"


def test_bf16_autocast_matches_the_unfused_modules():
    torch.manual_seed(2)
    unit = _unit()
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    results = []
    for ctx in (contextlib.nullcontext(), unfused()):
        with ctx:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = unit(x)
            grads = torch.autograd.grad(out.float().square().sum(), (x, unit[3].weight))
        results.append((out, *grads))
    assert results[0][0].dtype == results[1][0].dtype == torch.bfloat16
    assert results[0][2].dtype == torch.float32  # the weight's gradient in the weight's dtype
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_generator_saves_about_half_and_trains_to_the_same_gradients():
    torch.manual_seed(3)
    gen = UGATITGenerator(UGATITGenerator.Options(width=8, image_size=32, low_memory_min_mb=0))
    x = torch.randn(2, 3, 32, 32)

    def step() -> torch.Tensor:
        image, cam, heatmap = gen(x)
        return image.square().mean() + cam.sum() + heatmap.mean()

    ours, loss = saved_bytes(step)
    params = [p for name, p in gen.named_parameters() if ".ConvBlock4." not in name]  # ConvBlock4: unused
    grads = torch.autograd.grad(loss, params)
    with unfused():
        plain, loss_plain = saved_bytes(step)
        grads_plain = torch.autograd.grad(loss_plain, params)
    assert ours < 0.6 * plain
    assert torch.equal(loss, loss_plain)
    for a, b in zip(grads, grads_plain, strict=True):
        assert torch.equal(a, b)
    units = [m for m in gen.modules() if isinstance(m, NormReluConv)]
    assert len(units) == 4 * 14 * 3  # every hourglass unit is fused


def test_rejects_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="affine"):
        NormReluConv(nn.InstanceNorm2d(4, affine=True), nn.Identity(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="unpadded"):
        NormReluConv(InstanceNorm(4), nn.Identity(), nn.Conv2d(4, 4, 3, padding=1))


@pytest.mark.usefixtures("own_kernels_on_small_maps")
def test_compiled_hourglass_unit_matches_eager():
    """``train.compile = "units"`` compiles ConvBlocks, whose units are these autograd functions,
    with the plugins' pad gradient and instance-norm forward inside (on maps of any size here)."""
    import copy

    from branchadapt_cartoon.networks import ConvBlock

    torch.manual_seed(4)
    block = ConvBlock(8, 16).double()  # c_in != c_out: the residual's own instance norm runs too
    compiled = copy.deepcopy(block)
    compiled.compile()
    for size in (16, 32):  # the second size recompiles with dynamic shapes
        x = torch.randn(2, 8, size, size, dtype=torch.float64, requires_grad=True)
        outs, grads = [], []
        for module in (block, compiled):
            out = module(x)
            outs.append(out)
            grads.append(
                torch.autograd.grad(out.square().sum(), [x, *module.parameters()], allow_unused=True)
            )
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-9)
        for a, b in zip(*grads, strict=True):
            if a is None:
                assert b is None
            else:
                torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(
    ("kind", "stride", "bias"),
    [("norm_relu_conv", 1, False), ("reflect_conv", 2, True), ("reflect_conv", 1, False)],
)
def test_units_under_vmap_match_the_loop_over_copies_and_keep_only_the_input(
    monkeypatch, grouped, kind, stride, bias
):
    """Stacked branch copies (``train.stack_branches``): the units' vmap rules run norm and padding once
    over every copy's rows and the convolutions grouped or one per copy, keeping only the input."""
    from torch.func import functional_call, vmap

    from branchadapt_cartoon import lowmem_stacked

    monkeypatch.setattr(lowmem_stacked, "GROUPED_MAX_MACS", 10**12 if grouped else 0)
    calls = []
    choose = lowmem_stacked._grouped
    monkeypatch.setattr(lowmem_stacked, "_grouped", lambda *a: calls.append(choose(*a)) or calls[-1])
    torch.manual_seed(0)
    if kind == "norm_relu_conv":
        unit: nn.Module = NormReluConv(
            InstanceNorm(4), nn.Identity(), ReflectConv2d(4, 6, 3, stride, reflect=1, bias=bias)
        )
    else:
        unit = ReflectConv2d(4, 6, 3, stride, reflect=1, bias=bias)
    copies = 3
    # grouped kernels accumulate in another order: compare them in float64, dense ones bit for bit
    dtype = torch.float64 if grouped else torch.float32
    params = {
        n: torch.randn(copies, *p.shape, dtype=dtype, requires_grad=True) for n, p in unit.named_parameters()
    }
    x = torch.randn(copies, 2, 4, 10, 10, dtype=dtype, requires_grad=True)

    def stacked():  # type: ignore[no-untyped-def]
        return vmap(lambda p, xi: functional_call(unit, p, (xi,)))(params, x)

    saved, out = saved_bytes(stacked)
    assert calls == [grouped]  # the unit's own rule ran, with the requested convolution kind
    grads = torch.autograd.grad(out.square().sum(), [x, *params.values()])
    loop = torch.stack(
        [functional_call(unit, {n: p[i] for n, p in params.items()}, (x[i],)) for i in range(copies)]
    )
    want = torch.autograd.grad(loop.square().sum(), [x, *params.values()])
    exact = {"rtol": 1e-10, "atol": 1e-12} if grouped else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(out, loop, **exact)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, **exact)
    size = x.element_size()
    weights = sum(p.numel() for p in params.values()) * size
    statistics = 2 * copies * 2 * 4 * size if kind == "norm_relu_conv" else 0  # mean, inverse std per row
    assert saved <= x.numel() * size + weights + statistics  # the input only: no rectified or padded maps


def test_units_below_min_bytes_keep_their_maps_and_the_generator_option_sets_it():
    unit = _unit(8, 8)
    x = torch.randn(1, 8, 32, 32, requires_grad=True)  # 32 KiB
    unit.min_bytes = unit[3].min_bytes = x.numel() * 4  # at the threshold: the low-memory path
    at, _ = saved_bytes(lambda: unit(x))
    unit.min_bytes = unit[3].min_bytes = x.numel() * 4 + 1  # below it: the plain modules, which keep more
    below, _ = saved_bytes(lambda: unit(x))
    with unfused():
        plain, _ = saved_bytes(lambda: unit(x))
    assert at < below == plain
    gen = UGATITGenerator(UGATITGenerator.Options(width=8, image_size=32, low_memory_min_mb=0.5))
    sizes = {m.min_bytes for m in gen.modules() if isinstance(m, NormReluConv | ReflectConv2d)}
    assert sizes == {2**19}
    default = UGATITGenerator(UGATITGenerator.Options(width=8, image_size=32))
    assert {m.min_bytes for m in default.modules() if isinstance(m, NormReluConv)} == {8 * 2**20}

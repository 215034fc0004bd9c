"""Stacked branch copies folded into the channels: the loop's values and gradients, without vmap."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from branchadapt import BranchedModel, Participation, batching
from branchadapt_cartoon import folding
from branchadapt_cartoon.networks import UGATITGenerator


def generator(**options) -> UGATITGenerator:
    torch.manual_seed(0)
    return UGATITGenerator(UGATITGenerator.Options(width=8, image_size=32, n_blocks=1, **options)).double()


class ConvLayouts(TorchDispatchMode):
    """Records whether each convolution's input is channels_last, and its group count."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.convolution.default:
            self.seen.append((args[0].is_contiguous(memory_format=torch.channels_last), args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stage", ["ConvBlock1", "HourGlass1", "HourGlass4", "ConvBlock2"])
@pytest.mark.parametrize(
    ("low_memory", "channels_last"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_each_branch_stage_folded_gives_the_loop_over_copies(
    monkeypatch, request, stage, low_memory, channels_last
):
    """Three copies, two rows each (the fold copies rather than views), every unit on its plain
    or its low-memory path (which reads the convolution's group count from the shapes), in either
    layout: channels_last copies fold into a channels_last map and come back in that layout."""
    if channels_last:  # the norms' and pads' channels_last paths on these small maps, as at 128 px
        request.getfixturevalue("own_kernels_on_small_maps")
    gen = generator(low_memory_min_mb=0 if low_memory else 1000)
    module = gen.get_submodule(stage)
    copies = 3
    params = [
        {n: (p * (1 + 0.2 * torch.randn_like(p))).requires_grad_() for n, p in module.named_parameters()}
        for _ in range(copies)
    ]
    c_in = 3 if stage.startswith("ConvBlock") else 8  # ConvBlock2 takes HourGlass4's 3-channel side output
    x = torch.randn(copies, 2, c_in, 32, 32, dtype=torch.double)
    if channels_last:  # each copy's rows NHWC, as run_stacked groups a channels_last batch
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    x.requires_grad_()
    rule = folding.folded_rule(module)
    assert rule is not None
    paths = []
    if low_memory:  # the low-memory autograd functions really ran, on the folded (grouped) maps
        from branchadapt_cartoon import lowmem

        real = lowmem._groups
        monkeypatch.setattr(lowmem, "_groups", lambda x, w: paths.append(real(x, w)) or paths[-1])
    with ConvLayouts() as layouts:
        out = rule(params, (x,), {}, training=True)
    assert not low_memory or (paths and set(paths) == {copies})
    assert layouts.seen and {g for _, g in layouts.seen} == {copies}  # every convolution grouped
    assert {cl for cl, _ in layouts.seen} == {channels_last}  # and in the copies' layout throughout
    assert out[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    if channels_last:  # (copies, rows) merge without a copy, as run_stacked reshapes them
        assert out.reshape(copies * 2, *out.shape[2:]).data_ptr() == out.data_ptr()
    flat = [p for ps in params for p in ps.values()]
    grads = torch.autograd.grad(out.square().sum(), [x, *flat], allow_unused=True)
    loop = torch.stack([functional_call(module, params[i], (x[i],)) for i in range(copies)])
    want = torch.autograd.grad(loop.square().sum(), [x, *flat], allow_unused=True)
    torch.testing.assert_close(out, loop, rtol=1e-10, atol=1e-12)
    assert sum(g is not None for g in want) > len(flat) // 2
    for got, expected in zip(grads, want, strict=True):
        assert (got is None) == (expected is None)  # the same parameters learn (idle projections: none)
        if expected is not None:
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("training", [True, False])
def test_a_folded_stage_without_gradients_gives_the_loop_and_no_warning(training):
    """Without gradients (the discriminator's fakes under `task.reuse_fakes = false`, samples) the
    instance norms take torch's own path, which checks the channel count it was built for."""
    module = generator().HourGlass1
    params = [{n: p * (1 + 0.1 * i) for n, p in module.named_parameters()} for i in range(3)]
    x = torch.randn(3, 2, 8, 32, 32, dtype=torch.double)
    rule = folding.folded_rule(module)
    assert rule is not None
    module.train(training)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = rule(params, (x,), {}, training=training)
        loop = torch.stack([functional_call(module, params[i], (x[i],)) for i in range(3)])
    torch.testing.assert_close(out, loop, rtol=1e-10, atol=1e-12)


def test_the_generator_folds_its_hourglass_stages_and_leaves_the_others_to_vmap():
    gen = generator()
    names = gen.stage_names()
    split = BranchedModel(gen, ("a", "b", "c"), names[:2] + names[-4:])  # top 4 reaches UpBlock2 (LIN)
    rules = {p: split.backbone.get_submodule(p).rule for p in split.branch_paths}
    assert {p for p, r in rules.items() if isinstance(r, folding.FoldedCopies)} == {
        "ConvBlock1", "HourGlass1", "HourGlass3", "HourGlass4", "ConvBlock2"
    }  # fmt: skip
    assert rules["UpBlock2"] is None  # a layer-instance norm mixes a copy's channels
    assert folding.unfoldable(generator().UpBlock2) == "3 (LIN)"
    vmap_gen = BranchedModel(generator(stacked_copies="vmap"), ("a", "b"), names[:2])
    assert all(vmap_gen.backbone.get_submodule(p).rule is None for p in vmap_gen.branch_paths)


@pytest.mark.parametrize(("mode", "channels_last"), [("folded", False), ("vmap", False), ("folded", True)])
def test_stacked_generator_trains_like_the_loop_either_way(monkeypatch, request, mode, channels_last):
    if channels_last:  # the norms' and pads' channels_last paths on these small maps, as at 128 px
        request.getfixturevalue("own_kernels_on_small_maps")
    gen = generator(stacked_copies=mode, low_memory_min_mb=0, channels_last=channels_last)
    names = gen.stage_names()
    groups = ("anchor", "b", "c", "d")
    loop = BranchedModel(gen, groups, names[:2] + names[-3:], {g: Participation.DETACHED for g in groups[1:]})
    with torch.no_grad():
        for p in loop.branch_parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p))  # the groups' copies differ
    stacked = copy.deepcopy(loop)
    stacked.stacked = True
    vmapped = []
    real_vmap = batching.vmap
    monkeypatch.setattr(batching, "vmap", lambda *a, **k: vmapped.append(1) or real_vmap(*a, **k))
    x = torch.randn(8, 3, 32, 32, dtype=torch.double)
    ids = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    outs = {}
    for name, model in (("loop", loop), ("stacked", stacked)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every stage stacks: no fallback to the loop
            img, cam, _ = model(x, groups=ids)
        (img.square().mean() + cam.square().mean()).backward()
        outs[name] = img.detach()
    # folded: every one of these five stages folds; vmap: each stage is one vmap call
    assert len(vmapped) == (0 if mode == "folded" else 5)
    torch.testing.assert_close(outs["stacked"], outs["loop"], rtol=1e-9, atol=1e-11)
    for (n, p), q in zip(loop.named_parameters(), stacked.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-11, msg=n)


def test_a_folded_rule_refuses_what_it_was_not_built_for():
    rule = folding.folded_rule(generator().ConvBlock2)
    assert rule is not None
    x = torch.randn(2, 1, 8, 32, 32, dtype=torch.double)
    params = [dict(generator().ConvBlock2.named_parameters())] * 2
    with pytest.raises(TypeError, match="one map"):
        rule(params, (x, x), {}, training=True)
    with pytest.raises(TypeError, match="one map"):
        rule(params, (x[0],), {}, training=True)
    assert folding.folded_rule(nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3))) is None
    assert folding.folded_rule(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")) is None

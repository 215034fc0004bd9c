"""Stacked branch copies (one vmap call for several groups): the loop's values and gradients."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import branchadapt as ba
from branchadapt import BranchedModel, Participation

GROUPS = ["anchor", "b", "c"]


class Net(ba.Backbone):
    """low (conv + instance norm) -> mid (BatchNorm: shared statistics) -> top (conv)."""

    def __init__(self, low: nn.Module | None = None) -> None:
        super().__init__()
        self.low = low or nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.top = nn.Conv2d(4, 2, 3, padding=1)

    def stage_names(self) -> list[str]:
        return ["low", "mid", "top"]

    def forward(self, x):
        return self.top(self.mid(self.low(x)))


class CountCalls(nn.Module):
    """A stage whose own forward counts its calls (vmap calls a storage-less copy instead)."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        type(self).calls += 1
        return torch.relu(self.conv(x))


class NeedsItem(nn.Module):
    """A stage no vmap can map (data-dependent Python control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if float(y.detach().mean()) > 0 else y


def pair(policy: Participation, low: nn.Module | None = None) -> tuple[BranchedModel, BranchedModel]:
    torch.manual_seed(0)
    loop = BranchedModel(
        Net(low), GROUPS, ["low", "top"], {"anchor": Participation.LIVE, "b": policy, "c": policy}
    )
    with torch.no_grad():  # the groups' copies differ, so a copy mix-up would show
        for p in loop.branch_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    stacked = copy.deepcopy(loop)
    stacked.stacked = True
    return loop, stacked


def run(model: BranchedModel, ids: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    x = torch.randn(len(ids), 2, 6, 6)
    model.zero_grad(set_to_none=True)
    out = model(x, groups=torch.tensor(ids))
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy", [Participation.LIVE, Participation.DETACHED, Participation.FROZEN])
def test_stacked_copies_give_the_loops_outputs_and_gradients(policy):
    loop, stacked = pair(policy)
    ids = [1, 0, 2, 1, 2, 0, 2, 1, 0]  # three rows per group, interleaved
    out_loop, grads_loop = run(loop, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the loop
        out_stacked, grads_stacked = run(stacked, ids)
    torch.testing.assert_close(out_stacked, out_loop, rtol=1e-5, atol=1e-6)
    assert grads_stacked.keys() == grads_loop.keys()  # the same parameters learn (selective BP kept)
    for name, grad in grads_loop.items():
        torch.testing.assert_close(grads_stacked[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if policy is not Participation.LIVE:  # a batch of few-shot groups only: shared stage untouched
        _, few_only = run(stacked, [1, 2, 2, 1])
        assert few_only and not any(n.startswith("backbone.mid.") for n in few_only)


def test_stacked_mode_really_maps_and_unequal_groups_fall_back_to_the_loop():
    loop, stacked = pair(Participation.LIVE, low=CountCalls())
    CountCalls.calls = 0
    run(stacked, [0, 1, 2, 0, 1, 2])
    assert CountCalls.calls == 1  # one call over the three copies (a storage-less template)
    CountCalls.calls = 0
    run(loop, [0, 1, 2, 0, 1, 2])
    assert CountCalls.calls == 3
    CountCalls.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unequal row counts: this batch loops, silently
        out_stacked, grads_stacked = run(stacked, [0, 1, 1, 2])
    assert CountCalls.calls == 3
    out_loop, grads_loop = run(loop, [0, 1, 1, 2])
    torch.testing.assert_close(out_stacked, out_loop)
    assert grads_stacked.keys() == grads_loop.keys()
    router = stacked.backbone.low
    assert router._unstackable is None  # the next equal batch is stacked again


def test_auto_stacks_small_batches_on_a_cpu_and_loops_large_ones(monkeypatch):
    from branchadapt import batching

    loop, stacked = pair(Participation.LIVE, low=CountCalls())
    stacked.stacked = "auto"
    ids = [0, 1, 2, 0, 1, 2]
    x_bytes = len(ids) * 2 * 6 * 6 * 4  # run()'s input, the low stage's: 6 rows of 2 x 6 x 6 floats
    monkeypatch.setattr(batching, "AUTO_MAX_BYTES", x_bytes)
    CountCalls.calls = 0
    out_small, _ = run(stacked, ids)
    assert CountCalls.calls == 1  # at the limit: one mapped call
    monkeypatch.setattr(batching, "AUTO_MAX_BYTES", x_bytes - 1)
    CountCalls.calls = 0
    out_large, _ = run(stacked, ids)
    assert CountCalls.calls == 3  # over it: the loop, and only for this batch
    torch.testing.assert_close(out_small, out_large)
    torch.testing.assert_close(out_large, run(loop, ids)[0])
    assert stacked.backbone.low._unstackable is None
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        stacked.stacked = "yes"  # type: ignore[assignment]


def test_a_stage_that_cannot_be_mapped_warns_once_and_loops_for_good():
    loop, stacked = pair(Participation.DETACHED, low=NeedsItem())
    ids = [0, 1, 2, 0, 1, 2]
    with pytest.warns(UserWarning, match="not stacked"):
        out_stacked, grads_stacked = run(stacked, ids)
    out_loop, grads_loop = run(loop, ids)
    torch.testing.assert_close(out_stacked, out_loop)
    assert grads_stacked.keys() == grads_loop.keys()
    assert stacked.backbone.low._unstackable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        run(stacked, ids)


class RuleNet(Net):
    """Net whose ``low`` stage has a stacked rule of its own: each copy through ``functional_call``
    (a correct rule by construction), recording its calls."""

    calls: list[dict] = []
    fail = False

    def stacked_rule(self, path, module):
        if path != "low":
            return None
        template = copy.deepcopy(module)

        def rule(params, args, kwargs, training):
            type(self).calls.append(
                {"copies": len(params), "shape": tuple(args[0].shape), "training": training}
            )
            if type(self).fail:
                raise TypeError("this rule takes no such input")
            outs = [
                torch.func.functional_call(template, dict(p), (args[0][i],)) for i, p in enumerate(params)
            ]
            return torch.stack(outs)

        return rule


def test_a_backbones_stacked_rule_replaces_vmap_with_the_loops_values_and_gradients(monkeypatch):
    from branchadapt import batching

    torch.manual_seed(0)
    loop = BranchedModel(RuleNet(), GROUPS, ["low", "top"])
    with torch.no_grad():
        for p in loop.branch_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    stacked = copy.deepcopy(loop)
    stacked.stacked = True
    assert stacked.backbone.low.rule is not None and stacked.backbone.top.rule is None
    vmapped = []
    real_vmap = batching.vmap
    monkeypatch.setattr(batching, "vmap", lambda *a, **k: vmapped.append(1) or real_vmap(*a, **k))
    RuleNet.calls = []
    ids = [1, 0, 2, 1, 2, 0]
    out_loop, grads_loop = run(loop, ids)
    assert RuleNet.calls == []  # the loop never asks the rule
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out_stacked, grads_stacked = run(stacked, ids)
    assert RuleNet.calls == [{"copies": 3, "shape": (3, 2, 2, 6, 6), "training": True}]  # grouped by copy
    assert vmapped == [1]  # the top stage, which has no rule, still maps with vmap
    torch.testing.assert_close(out_stacked, out_loop)
    assert grads_stacked.keys() == grads_loop.keys()
    for name, grad in grads_loop.items():
        torch.testing.assert_close(grads_stacked[name], grad, msg=name)
    stacked.eval()
    with torch.no_grad():
        stacked(torch.randn(3, 2, 6, 6), groups=torch.tensor([0, 1, 2]))
    assert RuleNet.calls[-1]["training"] is False


def test_a_failing_rule_warns_once_and_loops_for_good(monkeypatch):
    loop = BranchedModel(RuleNet(), GROUPS, ["low", "top"])
    stacked = copy.deepcopy(loop)
    stacked.stacked = True
    monkeypatch.setattr(RuleNet, "fail", True)
    RuleNet.calls = []
    with pytest.warns(UserWarning, match="not stacked: TypeError: this rule takes no such input"):
        out, _ = run(stacked, [0, 1, 2])
    torch.testing.assert_close(out, run(loop, [0, 1, 2])[0])
    assert len(RuleNet.calls) == 1
    run(stacked, [0, 1, 2])
    assert len(RuleNet.calls) == 1  # the stage loops for good


def test_stages_with_buffers_are_not_stacked():
    loop, stacked = pair(
        Participation.LIVE, low=nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known from the structure, documented: no warning
        out_stacked, _ = run(stacked, [0, 1, 2])
    assert "buffers" in stacked.backbone.low._unstackable
    out_loop, _ = run(loop, [0, 1, 2])
    torch.testing.assert_close(out_stacked, out_loop)
    # each copy's running statistics moved, as in the loop
    for g in GROUPS:
        torch.testing.assert_close(
            stacked.backbone.low.branches[g][1].running_mean, loop.backbone.low.branches[g][1].running_mean
        )


def test_train_stack_branches_trains_the_same_weights(small_experiment, tmp_path, monkeypatch):
    from branchadapt import batching
    from branchadapt.checkpoint import read_tensors
    from branchadapt.trainer import Trainer

    mapped_calls = []
    real = batching.run_stacked
    monkeypatch.setattr(batching, "run_stacked", lambda *a, **k: mapped_calls.append(1) or real(*a, **k))
    finals = {}
    for value in (False, True):
        exp = ba.load_experiment(small_experiment(), [f"train.stack_branches={str(value).lower()}"])
        trainer = Trainer(exp, run_dir=tmp_path / f"run-{value}", device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the MLP's branch stages map: no fallback
            trainer.run()
        rt = trainer.build_stage(1, exp.stages[1], trainer.build_source())
        assert rt.modules["model"].stacked is value
        assert all(r.stacked is value for r in rt.modules["model"].modules() if hasattr(r, "_unstackable"))
        assert bool(mapped_calls) is value  # the transfer stage's few-shot groups ran stacked
        finals[value] = read_tensors(tmp_path / f"run-{value}" / "stages" / "transfer" / "final.safetensors")
    assert finals[True].keys() == finals[False].keys()
    for key, value in finals[False].items():
        torch.testing.assert_close(finals[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_gather_rows_keeps_the_layout_that_index_select_would_undo():
    from branchadapt.batching import gather_rows

    index = torch.tensor([2, 0, 3, 1, 0])
    cl = torch.randn(4, 5, 3, 6).contiguous(memory_format=torch.channels_last)
    cl3d = torch.randn(4, 5, 2, 3, 6).contiguous(memory_format=torch.channels_last_3d)
    plain = torch.randn(4, 5, 3, 6)
    rows_inner = torch.randn(5, 4, 3).transpose(0, 1)  # the rows are not outermost in memory
    for t in (cl, cl3d, plain, rows_inner, torch.randn(4)):
        got = gather_rows(t, index)
        torch.testing.assert_close(got, t.index_select(0, index), rtol=0, atol=0)
    assert not cl.index_select(0, index).is_contiguous(memory_format=torch.channels_last)  # why it exists
    assert gather_rows(cl, index).is_contiguous(memory_format=torch.channels_last)
    assert gather_rows(cl3d, index).is_contiguous(memory_format=torch.channels_last_3d)
    assert gather_rows(plain, index).is_contiguous()


def test_a_rule_gets_channels_last_rows_grouped_in_that_layout_and_may_return_it():
    from torch.func import functional_call

    from branchadapt.batching import run_stacked

    torch.manual_seed(0)
    copies = [nn.Conv2d(3, 4, 3, padding=1) for _ in range(2)]
    params = [dict(c.named_parameters()) for c in copies]
    seen = []

    def rule(params, args, kwargs, training):  # type: ignore[no-untyped-def]
        x = args[0]
        seen.append(all(x[i].is_contiguous(memory_format=torch.channels_last) for i in range(len(x))))
        outs = [functional_call(copies[0], p, (x[i],)) for i, p in enumerate(params)]
        return torch.stack([o.permute(0, 2, 3, 1) for o in outs]).permute(0, 1, 4, 2, 3)  # copies stay NHWC

    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    positions = [torch.tensor([3, 0]), torch.tensor([1, 2])]
    out = run_stacked(params, copies[0], positions, (x,), {}, batch=4, rule=rule)
    assert seen == [True]
    assert out.is_contiguous(memory_format=torch.channels_last)  # the batch back in its own layout
    want = torch.empty_like(out)
    for c, rows in zip(copies, positions, strict=True):
        want[rows] = c(x[rows])
    torch.testing.assert_close(out, want)


def test_running_out_of_memory_in_a_stacked_call_is_raised_not_taken_as_unstackable(monkeypatch):
    from branchadapt import batching

    stacked = BranchedModel(Net(), GROUPS, ["low", "top"])
    stacked.stacked = True

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(batching, "vmap", lambda *a, **k: full)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not stacked" warning: stacking stays on
        with pytest.raises(RuntimeError, match="can't allocate memory"):
            run(stacked, [0, 1, 2])
    assert stacked.stacked is True

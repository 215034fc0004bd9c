"""Selective back-propagation and routing, proven on a small model by inspecting ``.grad``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import branchadapt as ba
from branchadapt import BranchedModel, Participation


class Tiny(ba.Backbone):
    """low -> mid (BatchNorm, so eval-mode matters) -> top."""

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Linear(4, 8)
        self.mid = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.top = nn.Linear(8, 2)

    def stage_names(self) -> list[str]:
        return ["low", "mid", "top"]

    def forward(self, x):
        return self.top(self.mid(self.low(x)))


GROUPS = ["anchor", "few"]


def make(policy: Participation) -> BranchedModel:
    torch.manual_seed(0)
    return BranchedModel(Tiny(), GROUPS, ["low", "top"], {"anchor": Participation.LIVE, "few": policy})


def shared_grads(model: BranchedModel) -> list[torch.Tensor | None]:
    return [p.grad for p in model.shared_parameters()]


def grads_of(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def backward_for(model: BranchedModel, group: int, n: int = 4) -> None:
    model.zero_grad(set_to_none=True)
    x = torch.randn(n, 4)
    out = model(x, groups=torch.full((n,), group))
    out.pow(2).sum().backward()


@pytest.mark.parametrize("policy", list(Participation))
def test_anchor_updates_shared_stages(policy):
    model = make(policy)
    backward_for(model, 0)
    assert all(g is not None and g.abs().sum() > 0 for g in shared_grads(model))
    assert all(g is not None and g.abs().sum() > 0 for g in grads_of(model.backbone.low.branches["anchor"]))
    # the other group's branch takes no part in an anchor-only batch
    assert all(g is None for g in grads_of(model.backbone.low.branches["few"]))


def test_live_group_updates_shared_stages():
    model = make(Participation.LIVE)
    backward_for(model, 1)
    assert all(g is not None and g.abs().sum() > 0 for g in shared_grads(model))


@pytest.mark.parametrize("policy", [Participation.DETACHED, Participation.FROZEN])
def test_detached_and_frozen_leave_shared_without_gradient(policy):
    model = make(policy)
    backward_for(model, 1)
    assert all(g is None for g in shared_grads(model))
    # ...while gradients still pass through the shared stages into the group's LOW branch
    low = grads_of(model.backbone.low.branches["few"])
    top = grads_of(model.backbone.top.branches["few"])
    assert all(g is not None and g.abs().sum() > 0 for g in low + top)
    assert all(g is None for g in grads_of(model.backbone.low.branches["anchor"]))


def test_mixed_batch_gradients_equal_sum_of_parts():
    """In a mixed batch the shared gradient is exactly the anchor samples' contribution."""
    model = make(Participation.DETACHED)
    model.eval()  # BatchNorm in eval mode so per-part statistics don't differ
    x = torch.randn(6, 4)
    ids = torch.tensor([0, 1, 0, 1, 1, 0])
    model.zero_grad(set_to_none=True)
    model(x, groups=ids).pow(2).sum().backward()
    mixed = [p.grad.clone() for p in model.shared_parameters()]
    model.zero_grad(set_to_none=True)
    keep = ids == 0
    model(x[keep], groups=ids[keep]).pow(2).sum().backward()
    anchor_only = [p.grad for p in model.shared_parameters()]
    for a, b in zip(mixed, anchor_only, strict=True):
        torch.testing.assert_close(a, b)


def test_frozen_runs_shared_stages_in_eval_mode():
    model = make(Participation.FROZEN)
    bn = model.backbone.mid[1]
    before = bn.running_mean.clone()
    model(torch.randn(4, 4), groups=torch.ones(4, dtype=torch.long))
    assert torch.equal(bn.running_mean, before)  # frozen: buffers untouched
    assert bn.training  # and the mode is restored
    detached = make(Participation.DETACHED)
    bn = detached.backbone.mid[1]
    before = bn.running_mean.clone()
    x = torch.randn(4, 4) * 3 + 1
    out = detached(x, groups=torch.ones(4, dtype=torch.long))
    # detached: normalises with the batch's statistics, but the shared running statistics are
    # shared state the few-shot group must not update either
    assert torch.equal(bn.running_mean, before)
    assert not torch.allclose(out, make(Participation.FROZEN)(x, groups=torch.ones(4, dtype=torch.long)))
    detached(x, groups=torch.zeros(4, dtype=torch.long))  # the anchor group (live) does update them
    assert not torch.equal(bn.running_mean, before)


def test_routing_matches_each_groups_own_model():
    model = make(Participation.DETACHED)
    with torch.no_grad():
        for p in model.backbone.low.branches["few"].parameters():
            p.add_(0.5)  # make the branches differ
    model.eval()
    x = torch.randn(5, 4)
    ids = torch.tensor([1, 0, 1, 1, 0])
    out = model(x, groups=ids)
    for gi, group in enumerate(GROUPS):
        single = model.extract(group).eval()
        torch.testing.assert_close(out[ids == gi], single(x[ids == gi]))


def test_branches_start_as_copies_and_are_independent():
    model = make(Participation.DETACHED)
    a, b = model.backbone.low.branches["anchor"], model.backbone.low.branches["few"]
    assert torch.equal(a.weight, b.weight)
    assert a.weight.data_ptr() != b.weight.data_ptr()


def test_no_deep_copy_of_shared_stages_per_step(monkeypatch):
    model = make(Participation.DETACHED)
    n_params = sum(1 for _ in model.parameters())

    def forbidden(*args, **kwargs):
        raise AssertionError("deepcopy during a step")

    monkeypatch.setattr(copy, "deepcopy", forbidden)
    x = torch.randn(4, 4)
    model(x, groups=torch.tensor([0, 1, 0, 1])).sum().backward()
    assert sum(1 for _ in model.parameters()) == n_params


def test_groups_required_when_branched():
    model = make(Participation.DETACHED)
    with pytest.raises(ValueError, match="groups"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="group ids"):
        model(torch.randn(2, 4), groups=torch.tensor([0, 5]))


def test_split_depth_is_one_number():
    net = ba.build_backbone("mlp", in_features=4, hidden=[8, 8, 8], out_features=2)
    stages = net.stage_names()
    assert stages == ["input", "hidden1", "hidden2", "head"]
    for low in range(4):
        model = ba.branch(copy.deepcopy(net), GROUPS, low=low, top=1)
        assert model.branch_stages == tuple(stages[:low] + ([] if low >= 4 else ["head"]))
        n_copies = sum(1 for k in model.state_dict() if ".branches.few." in k)
        assert n_copies == 2 * len(model.branch_stages)  # weight + bias of each Linear


def test_load_flexible_from_plain_and_from_other_depth():
    torch.manual_seed(1)
    plain = ba.branch(
        ba.build_backbone("mlp", in_features=4, hidden=[8], out_features=2), GROUPS, splitter="single"
    )
    deep = ba.branch(
        ba.build_backbone("mlp", in_features=4, hidden=[8], out_features=2), GROUPS, low=2, top=0
    )
    deep.load_flexible(plain.state_dict(), anchor="anchor")
    for group in GROUPS:
        for k, v in deep.group_state_dict(group).items():
            assert torch.equal(v, plain.state_dict()[k])
    shallow = ba.branch(
        ba.build_backbone("mlp", in_features=4, hidden=[8], out_features=2), GROUPS, low=1, top=1
    )
    shallow.load_flexible(deep.state_dict(), anchor="anchor")  # through the anchor's branches
    assert torch.equal(shallow.backbone.input.branches["few"][0].weight, plain.backbone.input[0].weight)
    wrong = ba.branch(
        ba.build_backbone("mlp", in_features=4, hidden=[9], out_features=2), GROUPS, low=1, top=1
    )
    with pytest.raises(ba.CheckpointError, match="shape mismatch"):
        wrong.load_flexible(deep.state_dict(), anchor="anchor")


class TwoPartStem(ba.Backbone):
    """A logical stage made of two sibling modules (like a CNN stem: conv + norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.body = nn.Linear(8, 2)

    def stage_names(self) -> list[str]:
        return ["stem", "body"]

    def stage_paths(self, stage: str) -> list[str]:
        return ["conv", "norm"] if stage == "stem" else [stage]

    def forward(self, x):
        return self.body(self.norm(self.conv(x)))


def test_stage_spanning_several_modules_is_branched_as_a_whole():
    model = BranchedModel(TwoPartStem(), GROUPS, ["stem"], {"few": Participation.DETACHED})
    assert model.branch_stages == ("stem",) and model.branch_paths == ("conv", "norm")
    branched = {k for k in model.state_dict() if ".branches." in k}
    assert branched == {
        f"backbone.{m}.branches.{g}.{p}" for m in ("conv", "norm") for g in GROUPS for p in ("weight", "bias")
    }
    backward_for(model, 1)
    assert all(g is None or g.abs().sum() == 0 for g in shared_grads(model))
    assert all(g.abs().sum() > 0 for g in grads_of(model.backbone.norm.branches["few"]))
    plain = {f"backbone.{k}" for k in TwoPartStem().state_dict()}
    assert set(model.group_state_dict("few")) == plain

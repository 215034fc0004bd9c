"""Selective back-propagation and routing, proven on a small model by inspecting ``.grad``."""

from __future__ import annotations

import copy
import warnings

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


SHARED = ["mid.0.weight", "mid.0.bias", "mid.1.weight", "mid.1.bias"]  # Tiny's unbranched stage


def shared_grads(model: BranchedModel, expected: list[str] = SHARED) -> list[torch.Tensor | None]:
    """The gradients of the parameters outside every branch, found by name (not through the
    model's own ``shared_parameters()``, which must agree)."""
    named = dict(model.backbone.named_parameters())
    shared = [name for name in named if ".branches." not in name]
    assert shared == expected
    assert [id(p) for p in model.shared_parameters()] == [id(named[n]) for n in expected]
    return [named[n].grad for n in expected]


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
    mixed = [g.clone() for g in shared_grads(model)]
    model.zero_grad(set_to_none=True)
    keep = ids == 0
    model(x[keep], groups=ids[keep]).pow(2).sum().backward()
    anchor_only = shared_grads(model)
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
    assert all(g is None or g.abs().sum() == 0 for g in shared_grads(model, ["body.weight", "body.bias"]))
    assert all(g.abs().sum() > 0 for g in grads_of(model.backbone.norm.branches["few"]))
    plain = {f"backbone.{k}" for k in TwoPartStem().state_dict()}
    assert set(model.group_state_dict("few")) == plain


def test_a_top_deeper_than_the_backbone_branches_every_stage():
    net = ba.build_backbone("mlp", in_features=4, hidden=[8, 8], out_features=2)
    for low, top in [(0, 3), (0, 5), (1, 9)]:
        model = ba.branch(copy.deepcopy(net), GROUPS, low=low, top=top)
        assert model.branch_stages == ("input", "hidden1", "head"), (low, top)


def test_the_groups_vector_must_have_one_integer_per_row():
    model = make(Participation.DETACHED)
    x = torch.randn(4, 4)
    for groups, match in [
        ([0, 1], "2 entries for a batch of 4 rows"),
        ([1], "1 entries for a batch of 4 rows"),
        ([0, 1, 0, 1, 0], "5 entries for a batch of 4 rows"),
        ([0.0, 1.7, 0.0, 1.0], "integer group indices, got torch.float32"),
        (torch.zeros(2, 2, dtype=torch.long), r"shape \(2, 2\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            model(x, groups=groups)
    assert model(x, groups=(0, 1, 1, 0)).shape == (4, 2)


def test_group_names_that_do_not_exist_are_errors_not_silent_choices():
    net = ba.build_backbone("mlp", in_features=4, hidden=[8], out_features=2)
    with pytest.raises(ba.UserError, match="anchor 'anchr' is not one of the groups"):
        ba.branch(copy.deepcopy(net), GROUPS, anchor="anchr")
    with pytest.raises(ba.UserError, match=r"overrides: 'Few' is not one of the groups"):
        ba.branch(copy.deepcopy(net), GROUPS, overrides={"Few": "live"})
    with pytest.raises(ba.UserError, match=r"participation names groups \['Few'\]"):
        BranchedModel(copy.deepcopy(net), GROUPS, ["input"], {"Few": Participation.DETACHED})
    for groups, match in [([], "at least one group"), (["a", "a"], "distinct"), (["a.b"], "without a dot")]:
        with pytest.raises(ba.UserError, match=match):
            ba.branch(copy.deepcopy(net), groups)
    model = ba.branch(copy.deepcopy(net), ("anchor", "few"), anchor="anchor")  # any sequence of names
    for call in (model.group_state_dict, model.extract, lambda g: list(model.branch_parameters(g))):
        with pytest.raises(ba.UserError, match=r"unknown group 'typo'; this model's groups are"):
            call("typo")


def test_a_branched_backbone_cannot_be_branched_again():
    net = ba.build_backbone("mlp", in_features=4, hidden=[8], out_features=2)
    ba.branch(net, GROUPS)
    with pytest.raises(ba.UserError, match="already branched"):
        ba.branch(net, GROUPS)


class MultiBranch(nn.Module):
    """A block summing parallel paths kept in its own ``branches`` (as HRNet's modules do)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)])

    def forward(self, x):
        return sum(b(x) for b in self.branches)


class OwnBranches(ba.Backbone):
    """Sub-modules named ``branches`` in a stage that gets branched and in a shared one."""

    def __init__(self) -> None:
        super().__init__()
        self.low = MultiBranch(4, 8)
        self.mid = MultiBranch(8, 8)
        self.top = nn.Linear(8, 2)

    def stage_names(self) -> list[str]:
        return ["low", "mid", "top"]

    def forward(self, x):
        return self.top(self.mid(self.low(x)))


def test_a_backbones_own_modules_named_branches_load_from_plain_and_other_depths():
    torch.manual_seed(2)
    plain = OwnBranches()
    x = torch.randn(3, 4)
    for low, top in [(1, 1), (2, 0), (0, 1)]:
        model = ba.branch(OwnBranches(), GROUPS, low=low, top=top)
        model.load_flexible({f"backbone.{k}": v for k, v in plain.state_dict().items()}, anchor="anchor")
        for g in range(2):
            torch.testing.assert_close(model(x, groups=[g] * 3), plain(x))
        other = ba.branch(OwnBranches(), GROUPS, low=2, top=1)
        other.load_flexible(model.state_dict(), anchor="anchor")  # another depth, through the anchor
        torch.testing.assert_close(other(x, groups=[1] * 3), plain(x))


def test_loading_into_more_groups_keeps_each_trained_branch():
    net = ba.build_backbone("mlp", in_features=4, hidden=[8], out_features=2)
    torch.manual_seed(3)
    three = ba.branch(copy.deepcopy(net), ["anchor", "a", "b"], low=1, top=1)
    with torch.no_grad():
        for p in three.branch_parameters("a"):
            p.add_(1.0)  # "a" trained away from the anchor
    four = ba.branch(copy.deepcopy(net), ["anchor", "a", "b", "new"], low=1, top=1)
    four.load_flexible(three.state_dict(), anchor="anchor")
    for group in ("anchor", "a", "b"):
        assert all(
            torch.equal(four.group_state_dict(group)[k], v) for k, v in three.group_state_dict(group).items()
        )
    new, anchor = four.group_state_dict("new"), three.group_state_dict("anchor")
    assert new.keys() == anchor.keys() and all(torch.equal(new[k], anchor[k]) for k in new)


def test_load_flexible_takes_an_unwrapped_backbones_own_state():
    torch.manual_seed(2)
    net = ba.build_backbone("mlp", in_features=4, hidden=[8], out_features=2)
    own = {k: v.clone() for k, v in net.state_dict().items()}  # keys without "backbone."
    model = ba.branch(
        ba.build_backbone("mlp", in_features=4, hidden=[8], out_features=2), GROUPS, low=1, top=1
    )
    model.load_flexible(own, anchor="anchor")
    for group in GROUPS:
        got = model.group_state_dict(group)
        assert got.keys() == {f"backbone.{k}" for k in own}
        assert all(torch.equal(got[f"backbone.{k}"], v) for k, v in own.items())


def test_the_routing_is_the_call_s_alone():
    """After a call, the backbone run on its own (or a branch stage recomputed later, as
    activation checkpointing would) is refused, instead of silently using the last call's groups."""
    model = make(Participation.DETACHED)
    x = torch.randn(4, 4)
    model(x, groups=torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ba.UserError, match=r"a branch stage ran outside its branched model's call"):
        model.backbone(x)
    with pytest.raises(ba.UserError, match=r"outside its branched model's call"):
        make(Participation.DETACHED).backbone(x)  # never called: the same message
    # the model's own calls keep working, each routed by its own groups
    model.eval()
    with torch.no_grad():
        model.backbone.low.branches["few"].weight.add_(1.0)  # the two groups' branches now differ
        for group, index in (("anchor", 0), ("few", 1)):
            out = model(x, groups=torch.full((4,), index))
            torch.testing.assert_close(out, model.extract(group).eval()(x))


def test_library_misuse_is_named():
    """What a researcher plausibly passes by mistake gets a message saying what is expected."""
    with pytest.raises(TypeError, match=r"takes a branchadapt\.Backbone .*got Sequential"):
        ba.branch(nn.Sequential(nn.Linear(2, 2)), GROUPS)
    with pytest.raises(ba.UserError, match=r"groups: expected a list of group names, got the string 'abc'"):
        ba.branch(Tiny(), "abc")
    model = make(Participation.DETACHED).eval()
    x = torch.randn(2, 4)
    by_name = model(x, groups=["few", "anchor"])  # names work as well as indices
    torch.testing.assert_close(by_name, model(x, groups=torch.tensor([1, 0])))
    with pytest.raises(ValueError, match=r"groups names \['zz'\] are not groups of this model"):
        model(x, groups=["few", "zz"])
    with pytest.raises(ba.UserError, match=r"unknown group 'zzz'"):
        model.load_flexible(model.state_dict(), "zzz")


def test_checkpoint_functions_say_what_they_take(tmp_path):
    model = make(Participation.DETACHED)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(
        TypeError,
        match=r"modules: expected a mapping of names to Module objects, e\.g\. \{'model': module\}; got BranchedModel",
    ):
        ba.save_checkpoint(tmp_path / "c", model, {"main": opt})
    with pytest.raises(TypeError, match=r"optimizers: expected a mapping of names to Optimizer objects"):
        ba.save_checkpoint(tmp_path / "c", {"model": model}, opt)
    with pytest.raises(TypeError, match=r"meta keys \['format', 'rng'\] are the checkpoint's own"):
        ba.save_checkpoint(tmp_path / "c", {"model": model}, {"main": opt}, {"format": 2, "rng": 1})
    with pytest.raises(TypeError, match=r"meta must hold JSON values"):
        ba.save_checkpoint(tmp_path / "c", {"model": model}, {"main": opt}, {"loss": torch.tensor(1.0)})
    assert not list(tmp_path.iterdir())  # a refused save writes nothing, not even a temporary folder
    ba.save_checkpoint(tmp_path / "c", {"model": model}, {"main": opt}, {"epoch": 3})
    with pytest.raises(
        ba.CheckpointError, match=r"model\.safetensors is a file; expected the checkpoint's folder"
    ):
        ba.load_checkpoint(tmp_path / "c" / "model.safetensors", {"model": model})
    with pytest.raises(TypeError, match=r"modules: expected a mapping"):
        ba.load_weights(tmp_path / "w.safetensors", model)
    assert ba.load_checkpoint(tmp_path / "c", {"model": model}, {"main": opt})["epoch"] == 3


class Bypassing(Tiny):
    """Calls its low stage through a reference taken at init: the branch router never runs."""

    def __init__(self) -> None:
        super().__init__()
        self._low = self.low.forward

    def forward(self, x):
        return self.top(self.mid(self._low(x)))


def test_a_forward_that_bypasses_its_branch_stages_is_warned_about_once():
    model = ba.branch(Bypassing(), GROUPS, low=1, top=0)
    x = torch.randn(4, 4)
    with pytest.warns(UserWarning, match=r"Bypassing's forward ran none of its branch stages \['low'\]"):
        model(x, groups=torch.tensor([0, 0, 1, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        model(x, groups=torch.tensor([0, 0, 1, 1]))
        make(Participation.DETACHED)(x, groups=torch.tensor([0, 0, 1, 1]))  # a stage-calling forward: silent

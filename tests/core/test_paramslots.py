"""ParamSlots: named parameters resolved once, read without walking the module tree."""

from __future__ import annotations

import torch
from torch import nn

from branchadapt.paramslots import ParamSlots


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    net.add_module("tied", net[0])  # a parameter reachable twice is listed once, as named_parameters does
    return net


def test_names_and_order_match_named_parameters() -> None:
    net = _net()
    slots = ParamSlots(net)
    expected = list(net.named_parameters())
    assert slots.names == [n for n, _ in expected]
    assert [id(p) for p in slots.tensors()] == [id(p) for _, p in expected]
    assert len(slots) == 4


def test_keep_filters_by_name() -> None:
    slots = ParamSlots(_net(), keep=lambda n: n.endswith("bias"))
    assert slots.names == ["0.bias", "1.1.bias"]


def test_a_parameter_replaced_on_its_module_is_seen_without_rebuilding() -> None:
    net = _net()
    slots = ParamSlots(net)
    fresh = nn.Parameter(torch.zeros(2, 4))
    net[1][1].weight = fresh
    assert dict(slots.items())["1.1.weight"] is fresh
    net.load_state_dict({k: torch.ones_like(v) for k, v in net.state_dict().items()}, assign=True)
    assert all(torch.equal(p, torch.ones_like(p)) for p in slots.tensors())

"""Rows of a batch in nested arguments: selection, per-part calls and reassembly (branchadapt.rows)."""

from __future__ import annotations

import pytest
import torch

from branchadapt import rows


def test_select_rows_takes_batch_rows_and_leaves_other_leaves_alone() -> None:
    x = torch.arange(12.0).view(4, 3)
    scale = torch.tensor([2.0, 3.0, 4.0])  # no batch dimension of 4: passes unchanged
    tree = {"x": x, "aux": (scale, "label", None)}
    picked = rows.select_rows(tree, torch.tensor([3, 1]), batch=4)
    assert torch.equal(picked["x"], x[[3, 1]])
    assert picked["aux"][0] is scale and picked["aux"][1:] == ("label", None)


def test_run_parts_restores_the_batch_order_of_nested_outputs() -> None:
    x = torch.arange(5.0)
    parts = [("even", torch.tensor([0, 2, 4])), ("odd", torch.tensor([1, 3]))]
    offset = {"even": 100.0, "odd": 200.0}

    def call(key: str, t: torch.Tensor, *, k: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return t + offset[key], {"k": k * 10}

    out, extra = rows.run_parts(parts, (x,), {"k": x.clone()}, call)
    assert out.tolist() == [100.0, 201.0, 102.0, 203.0, 104.0]
    assert extra["k"].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]


def test_a_single_whole_part_is_called_once_on_the_whole_batch() -> None:
    seen = []
    x = torch.ones(3, 2)
    rows.run_parts([("all", None)], (x,), {}, lambda key, t: seen.append((key, t)) or t)
    assert len(seen) == 1 and seen[0][0] == "all" and seen[0][1] is x


def test_batch_size_and_device_come_from_the_first_tensor_with_a_batch() -> None:
    args = (torch.tensor(1.0), [torch.zeros(6, 2)])
    assert rows.batch_size(args, {}) == 6
    assert rows.first_device(args, {}) == torch.device("cpu")
    assert [id(t) for t in rows.tensors_in({"a": args})] == [id(args[0]), id(args[1][0])]
    with pytest.raises(ValueError, match="batch dimension"):
        rows.batch_size((torch.tensor(1.0),), {"s": "text"})

"""What a loss term returns must be one value: anything else is named, not a torch error."""

from __future__ import annotations

import pytest
import torch

import branchadapt as ba
from branchadapt.builtin.example import CrossEntropy
from branchadapt.cli import main
from branchadapt.interfaces import loss_value


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (torch.ones(4), "a tensor of shape (4,)"),
        (torch.ones(2, 2), "a tensor of shape (2, 2)"),
        (torch.ones(0), "a tensor of shape (0,)"),
        (1.5, "float"),
        ((torch.ones(()),), "tuple"),
        (None, "NoneType"),
    ],
)
def test_a_loss_that_returns_anything_but_one_value_is_named(value, got):
    term = CrossEntropy(name="ce")
    with pytest.raises(ba.UserError) as info:
        loss_value(term, value)
    assert str(info.value) == (
        f"loss 'ce' (branchadapt.builtin.example.CrossEntropy) returned {got}; expected a scalar tensor "
        "(reduce a per-sample loss with .mean(), say)"
    )


def test_one_value_in_any_shape_or_dtype_is_a_float_scalar():
    term = CrossEntropy(name="ce")
    out = loss_value(term, torch.tensor([2.0], dtype=torch.float64, requires_grad=True))
    assert out.shape == () and out.dtype == torch.float32 and out.requires_grad


def test_a_run_with_a_per_sample_loss_stops_naming_it(small_experiment, tmp_path, monkeypatch, capsys):
    def per_sample(self, outputs, batch):  # type: ignore[no-untyped-def]
        return torch.nn.functional.cross_entropy(outputs["logits"], outputs["target"], reduction="none")

    monkeypatch.setattr(CrossEntropy, "forward", per_sample)
    path = small_experiment()
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run"), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert (
        "error: loss 'cross_entropy' (branchadapt.builtin.example.CrossEntropy) returned a tensor of " in err
    )
    assert "shape (4,)" in err and "Traceback" not in err

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


def test_a_model_with_fewer_logits_than_the_data_has_classes_is_named(small_experiment, tmp_path, capsys):
    path = small_experiment()  # 3 classes
    assert main(["run", str(path), "--set", "model.out_features=2", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "error: loss 'cross_entropy': the data has class index 2, but the model gives 2 logits per " in err
    assert "must be at least 3" in err and "Traceback" not in err


def test_a_later_batchs_class_beyond_the_logits_is_named_too():
    term = CrossEntropy(name="ce")
    logits = torch.zeros(2, 3)
    assert float(term({"logits": logits, "target": torch.tensor([0, 1])}, {})) > 0  # checked: fine
    with pytest.raises(ba.UserError, match=r"loss 'ce': the data has class index 5, but the model gives 3"):
        term({"logits": logits, "target": torch.tensor([0, 5])}, {})  # caught from torch's IndexError


def test_class_indices_are_checked_against_the_class_dimension_of_k_dimensional_logits():
    term = CrossEntropy(name="ce")
    logits = torch.randn(2, 10, 3)  # (N, C, d1): classes on dim 1
    target = torch.tensor([[7, 1, 2], [0, 9, 3]])
    assert float(term({"logits": logits, "target": target}, {})) > 0
    with pytest.raises(ba.UserError, match="class index 12, but the model gives 10 logits"):
        CrossEntropy(name="ce")({"logits": logits, "target": target + 3}, {})

"""``export``: a group's plain model traced at the data's input size, without the data if need be."""

from __future__ import annotations

import onnx
import pytest

import branchadapt as ba
from branchadapt.export import export_run
from branchadapt.trainer import Trainer


@pytest.fixture
def finished(small_experiment, tmp_path):
    exp = ba.load_experiment(small_experiment(steps=2))
    Trainer(exp, run_dir=tmp_path / "run", device="cpu").run()
    return tmp_path / "run"


def _input_dims(path) -> list[object]:
    shape = onnx.load(str(path)).graph.input[0].type.tensor_type.shape
    return [d.dim_param or d.dim_value for d in shape.dim]


def test_onnx_is_traced_with_the_data_s_inputs_or_the_backbone_s_without_the_data(finished, monkeypatch):
    done = export_run(finished, "b")
    assert done.note is None and _input_dims(done.path)[1:] == [6]

    # the data cannot be read any more (moved, another machine): the weights are enough
    def gone(self, split="train"):
        raise ba.UserError("data.root: /gone is not a folder")

    monkeypatch.setattr(Trainer, "build_source", gone)
    again = export_run(finished, "c")
    assert "traced at the backbone's own input size" in again.note and "/gone" in again.note
    assert _input_dims(again.path)[1:] == [6]  # the mlp's own example inputs

"""``export``: a group's plain model traced at the data's input size, as the run recorded it or
from the data, and without either if need be."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import branchadapt as ba
from branchadapt.export import export_run, random_input, recorded_inputs
from branchadapt.trainer import Trainer


@pytest.fixture
def finished(small_experiment, tmp_path):
    exp = ba.load_experiment(small_experiment(steps=2))
    Trainer(exp, run_dir=tmp_path / "run", device="cpu").run()
    return tmp_path / "run"


def _input_dims(path) -> list[object]:
    shape = onnx.load(str(path)).graph.input[0].type.tensor_type.shape
    return [d.dim_param or d.dim_value for d in shape.dim]


def _forget_recorded_inputs(run_dir) -> None:
    """Re-write the last stage's final weights without the inputs record (a run of an older version)."""
    path = sorted(run_dir.glob("stages/*/final.safetensors"))[-1]
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta.pop("inputs")) == {"model": [["float32", [6]]]}
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_onnx_is_traced_with_the_inputs_the_run_recorded_without_reading_the_data(finished, monkeypatch):
    def gone(self, split="train"):
        raise AssertionError("the data was read")

    monkeypatch.setattr(Trainer, "build_source", gone)
    done = export_run(finished, "b")
    assert done.note is None and _input_dims(done.path)[1:] == [6]
    weights = sorted(finished.glob("stages/*/final.safetensors"))[-1]
    (x,) = recorded_inputs(weights, "model", batch_size=3)
    assert x.shape == (3, 6) and x.dtype == torch.float32 and x.min() >= -1 and x.max() < 1
    assert recorded_inputs(weights, "critic") is None  # a module the task made no inputs for
    assert recorded_inputs(finished / "config.json", "model") is None  # not a weights file


def test_without_a_record_onnx_is_traced_with_the_data_s_inputs_or_the_backbone_s(finished, monkeypatch):
    _forget_recorded_inputs(finished)
    done = export_run(finished, "b")
    assert done.note is None and _input_dims(done.path)[1:] == [6]

    # the data cannot be read any more (moved, another machine): the weights are enough
    def gone(self, split="train"):
        raise ba.UserError("data.root: /gone is not a folder")

    monkeypatch.setattr(Trainer, "build_source", gone)
    again = export_run(finished, "c")
    assert "traced at the backbone's own input size" in again.note and "/gone" in again.note
    assert _input_dims(again.path)[1:] == [6]  # the mlp's own example inputs

    # a data source that would regenerate its data into a cache it cannot write
    def unwritable(self, split="train"):
        raise NotADirectoryError(20, "Not a directory", "/cache/a-file/sub")

    monkeypatch.setattr(Trainer, "build_source", unwritable)
    third = export_run(finished, "a", out=str(finished / "third.onnx"))
    assert "traced at the backbone's own input size" in third.note and "/cache/a-file/sub" in third.note
    assert third.path.is_file()


def test_the_supervised_task_gives_inputs_only_for_the_module_it_feeds(small_experiment, tmp_path):
    exp = ba.load_experiment(small_experiment())
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    task, source = trainer.build_task(initial_weights=False), trainer.build_source("train")
    (x,) = task.example_inputs("model", source, 3)
    assert x.shape == (3, 6)
    assert task.example_inputs("critic", source, 3) is None  # a subclass's extra module: not tried


def test_an_existing_output_file_is_refused_unless_overwrite(finished, run_cli):
    weights = finished / "stages" / "transfer" / "final.safetensors"
    if not weights.exists():  # the small experiment's last stage, whatever its name
        weights = sorted(finished.glob("stages/*/final.safetensors"))[-1]
    before = weights.read_bytes()
    out = run_cli("export", str(finished), "--group", "b", "--format", "safetensors", "--out", str(weights))
    assert (
        out.returncode == 2
        and f"error: --out {weights}: " in out.stderr
        and "belongs to the run" in out.stderr
    )
    assert weights.read_bytes() == before  # the run's own weights are not replaced
    first = run_cli("export", str(finished), "--group", "b", "--format", "safetensors")
    assert first.returncode == 0, first.stderr
    again = run_cli("export", str(finished), "--group", "b", "--format", "safetensors")
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    forced = run_cli("export", str(finished), "--group", "b", "--format", "safetensors", "--overwrite")
    assert forced.returncode == 0, forced.stderr


def test_overwriting_an_onnx_export_removes_an_earlier_one_s_weights_file(finished):
    pytest.importorskip("onnxscript")
    target = finished / "model.onnx"
    stale = finished / "model.onnx.data"
    stale.write_bytes(b"weights of an earlier export too large for one file")
    with pytest.raises(ba.UserError, match=r"model\.onnx\.data exists; pass --overwrite"):
        export_run(finished, "b", out=str(target))
    export_run(finished, "b", out=str(target), overwrite=True)
    assert target.is_file() and not stale.exists()  # the new model holds its weights itself
    unrelated = finished / "weights.safetensors.data"
    unrelated.write_bytes(b"not ours")
    export_run(finished, "b", fmt="safetensors", out=str(finished / "weights.safetensors"))
    assert unrelated.read_bytes() == b"not ours"


def test_an_output_named_for_the_other_format_is_refused_before_anything_is_read(tmp_path):
    for fmt, out, other in (("safetensors", "x.onnx", "onnx"), ("onnx", "X.SafeTensors", "safetensors")):
        with pytest.raises(ba.UserError, match=rf"--out .*{out}: the name says {other}, but --format is {fmt}; "
                           rf"name it .*\.{fmt} or pass --format {other}"):  # fmt: skip
            export_run(tmp_path / "no-run", "b", fmt, out=tmp_path / out)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "record",
    [
        {"model": [["float32", [-3]]]},  # a negative size
        {"model": [["float32", ["6"]]]},  # a size as text
        {"model": [["float32", [True]]]},
        {"model": [["float8_e4m3fn", [6]]]},  # no random values for it
        {"model": [["Tensor", [6]]]},  # not a dtype
        {"model": [["float32", [1 << 20, 1 << 20]]]},  # more elements than any input here
        {"model": [["float32"]]},
        {"model": "float32"},
        {"model": []},
        ["model"],
    ],
)
def test_a_damaged_inputs_record_is_not_believed_and_export_falls_back_to_the_data(finished, record):
    path = sorted(finished.glob("stages/*/final.safetensors"))[-1]
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "inputs": json.dumps(record)})
    assert recorded_inputs(path, "model") is None
    done = export_run(finished, "b")  # traced with the data's inputs instead
    assert done.note is None and _input_dims(done.path)[1:] == [6]


def test_random_inputs_follow_the_recorded_dtype():
    gen = torch.Generator().manual_seed(0)
    floats = random_input((2, 3), torch.bfloat16, gen)
    assert (
        floats.dtype == torch.bfloat16 and floats.min() >= -1 and floats.max() < 1 and floats.abs().sum() > 0
    )
    ids = random_input((4,), torch.int64, gen)
    assert ids.dtype == torch.int64 and not ids.any()


def _graph_names(path) -> tuple[list[str], list[str]]:
    graph = onnx.load(str(path)).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def test_the_onnx_graph_names_its_inputs_and_outputs_as_the_backbone_declares(tmp_path, monkeypatch):
    from branchadapt.builtin.example import MLPBackbone
    from branchadapt.export import export_onnx

    net = ba.build_backbone("mlp").eval()
    export_onnx(net, tmp_path / "plain.onnx")
    assert _graph_names(tmp_path / "plain.onnx") == (["input0"], ["output0"])  # nothing declared: numbered

    monkeypatch.setattr(MLPBackbone, "input_names", ("features",))
    monkeypatch.setattr(MLPBackbone, "output_names", ("logits",))
    export_onnx(net, tmp_path / "named.onnx")
    assert _graph_names(tmp_path / "named.onnx") == (["features"], ["logits"])

    monkeypatch.setattr(MLPBackbone, "output_names", ("logits", "extra"))  # the forward has one output
    with pytest.raises(
        ba.UserError, match=r"MLPBackbone\.output_names = \('logits', 'extra'\): expected 1 distinct"
    ):
        export_onnx(net, tmp_path / "wrong.onnx")
    assert not (tmp_path / "wrong.onnx").exists()

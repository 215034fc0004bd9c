"""The digits recipe end to end through the CLI (tiny sizes), and every baseline file validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import branchadapt as ba
from branchadapt.cli import main as cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = [
    "stages.basic.steps=4",
    "stages.transfer.steps=3",
    "stages.basic.sampler.per_group=8",
    "stages.transfer.sampler.per_group=2",
    "data.per_class={clean=2, rotated_noisy=1, inverted=1, blurred=1}",
    "data.test_per_class=1",
    "model.kwargs={channels=[8, 16, 32, 64], stem_width=8}",
    "train.progress='plain'",
]


def test_recipe_trains_two_stages_and_prints_per_group_accuracy(tmp_path, run_cli):
    sets = [a for s in TINY for a in ("--set", s)]
    out = run_cli("run", str(EXAMPLES / "digits.toml"), "--run-dir", str(tmp_path / "run"), *sets)
    assert out.returncode == 0, out.stderr
    assert "done: stages basic, transfer" in out.stderr
    table = out.stdout[out.stdout.index("stage transfer on the test split") :]
    assert "accuracy" in table and all(g in table for g in ("clean", "rotated_noisy", "inverted", "blurred"))
    metrics = json.loads((tmp_path / "run" / "eval" / "transfer-test" / "metrics.json").read_text())
    assert set(metrics["groups"]) == {"clean", "rotated_noisy", "inverted", "blurred"}
    assert all(0 <= m["accuracy"] <= 1 for m in metrics["groups"].values())
    # the transfer stage branched the stem and layer1 for every group
    config = json.loads((tmp_path / "run" / "config.json").read_text())["experiment"]
    assert config["stages"]["transfer"]["splitter"]["low"] == 2
    # one group's model as ONNX, traced at the data's 32 px (not timm's default input size)
    exported = run_cli("export", str(tmp_path / "run"), "--group", "inverted")
    assert exported.returncode == 0, exported.stderr
    import onnx

    graph = onnx.load(str(tmp_path / "run" / "export" / "model-inverted.onnx")).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 32, 32] and isinstance(dims[0], str)  # a dynamic batch


@pytest.mark.parametrize(
    "path",
    [*sorted(p.name for p in (EXAMPLES / "digits").glob("*.toml")), "../digits.toml", "../digits_da.toml"],
)
def test_every_digits_file_validates(path, capsys):
    assert cli(["validate", str(EXAMPLES / "digits" / path)]) == 0
    assert ": OK" in capsys.readouterr().out


def test_validate_reads_the_weights_file_the_experiment_names(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert (
        cli(["validate", str(EXAMPLES / "digits.toml"), "--set", f"model.weights='{tmp_path}/junk.pt'"]) == 2
    )
    captured = capsys.readouterr()
    assert f"model.weights: cannot read {tmp_path}/junk.pt" in captured.err and "OK" not in captured.out


def test_a_relative_weights_file_is_taken_beside_the_experiment(tmp_path, monkeypatch, capsys):
    from branchadapt_timm.backbone import TimmBackbone, TimmOptions

    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "digits.toml").write_text(
        'extends = "{}"\n[model]\nweights = "w.safetensors"\n'.format((EXAMPLES / "digits.toml").as_posix())
    )
    ba.save_weights(
        folder / "w.safetensors", {"backbone": TimmBackbone(TimmOptions(model="resnet10t", num_classes=10))}
    )
    monkeypatch.chdir(tmp_path)  # not the experiment's folder
    assert cli(["validate", "exp/digits.toml"]) == 0, capsys.readouterr().err  # the file was read
    exp = ba.load_experiment(folder / "digits.toml")
    assert exp.model.options.weights == folder / "w.safetensors"


def test_the_initial_weights_file_is_read_only_by_a_fresh_stage(tmp_path, capsys):
    """Checkpoints and final weights hold every weight: a resume, the next stage, evaluate and
    export need not find the initial file any more."""
    from branchadapt_timm.backbone import TimmBackbone, TimmOptions

    weights = tmp_path / "init.safetensors"
    small = TimmOptions(
        model="resnet10t", num_classes=10, kwargs={"channels": [8, 16, 32, 64], "stem_width": 8}
    )
    ba.save_weights(weights, {"backbone": TimmBackbone(small)})
    run = ["run", str(EXAMPLES / "digits.toml"), "--run-dir", str(tmp_path / "run")]
    sets = [a for s in [*TINY, f"model.weights='{weights.as_posix()}'"] for a in ("--set", s)]
    assert cli([*run, *sets, "--max-steps", "2"]) == 0  # paused in the first stage
    weights.unlink()
    assert cli([*run, *sets, "--no-eval"]) == 0, capsys.readouterr().err  # resumed, then the next stage
    assert cli(["evaluate", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert cli(["export", str(tmp_path / "run"), "--group", "clean", "--format", "safetensors"]) == 0
    capsys.readouterr()
    assert cli(["validate", str(EXAMPLES / "digits.toml"), *sets]) == 2  # a fresh start needs it
    assert f"model.weights: {weights} does not exist" in capsys.readouterr().err


def test_a_model_timm_refuses_at_build_time_is_named_with_the_experiment_file(tmp_path, capsys):
    exp = EXAMPLES / "digits.toml"
    bad = ["--set", "model.model='resnet10x'"]
    assert cli(["run", str(exp), "--run-dir", str(tmp_path / "run"), *bad]) == 2
    expected = f"error: {exp}: model.model: 'resnet10x' is not a timm model; closest: resnet10t"
    assert expected in capsys.readouterr().err
    assert cli(["validate", str(exp), *bad]) == 2
    assert expected in capsys.readouterr().err


def test_a_loss_reading_an_output_the_task_does_not_give_is_refused_before_training(tmp_path, capsys):
    # the feature alignment of digits_da's transfer stage reads the features task.features gives
    run = ["run", str(EXAMPLES / "digits_da.toml"), "--run-dir", str(tmp_path / "run")]
    assert cli([*run, "--set", "task.features=false"]) == 2
    err = capsys.readouterr().err
    assert (
        "stages.transfer.losses.feature_alignment: loss 'feature_alignment' reads task outputs ['features']"
        in err
    )
    assert not (tmp_path / "run").exists()  # refused before the first stage trained, nothing written


def test_baselines_mean_what_they_say(capsys):
    cli(["validate", str(EXAMPLES / "digits" / "finetune_all.toml")])
    finetune = capsys.readouterr().out
    assert "stage transfer: 150 steps, groups rotated_noisy, inverted, blurred, splitter single" in finetune
    cli(["validate", str(EXAMPLES / "digits" / "mixed.toml")])
    mixed = capsys.readouterr().out
    assert "stage basic: 450 steps, groups clean, rotated_noisy, inverted, blurred" in mixed
    assert "stage transfer" not in mixed


def test_a_branching_that_breaks_a_later_stage_is_refused_before_the_first_stage_trains(tmp_path, capsys):
    """EVA's stem holds its rotary embedding, which cannot run per group: before, stage basic
    trained first and the transfer stage failed at its first step."""
    run = ["run", str(EXAMPLES / "digits.toml"), "--run-dir", str(tmp_path / "run")]
    sets = ["model.model='eva02_tiny_patch14_224'", "model.kwargs={img_size=32, patch_size=4, depth=2}",
            "stages.transfer.splitter.low=1"]  # fmt: skip
    assert cli([*run, *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert "stages.transfer: module 'model' cannot take inputs shaped as the data's ((4, 3, 32, 32))" in err
    assert not (tmp_path / "run").exists()

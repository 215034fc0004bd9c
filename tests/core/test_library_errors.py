"""Library calls given the wrong thing say what was expected (no raw pydantic, torch or KeyError)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

import branchadapt as ba

ROOT = Path(__file__).resolve().parents[2]


def test_bad_options_name_the_component_and_the_key():
    with pytest.raises(ba.ConfigError) as caught:
        ba.build("splitter", "branches", low=-1, topp=2)
    message = str(caught.value)
    assert message.startswith("splitter 'branches': low: Input should be greater than or equal to 0 (got -1)")
    assert "topp: unknown key; did you mean top?" in message and "https://" not in message
    with pytest.raises(ba.ConfigError, match=r"backbone 'mlp': hidden: List should have at least 1 item"):
        ba.build_backbone("mlp", hidden=[])


def test_unknown_kinds_devices_and_precisions():
    with pytest.raises(ba.RegistryError, match="unknown kind 'lossess'; expected one of backbone"):
        ba.registry().names("lossess")
    assert "cross_entropy" in ba.registry().names("loss")
    with pytest.raises(ba.UserError, match="device: 'gpu' is not a device; expected auto, cpu"):
        ba.select_device("gpu")
    for precision in ("BF16", "bfloat16", "fp16"):
        with pytest.raises(ValueError, match=f"precision '{precision}': expected one of 'fp32', 'bf16'"):
            ba.autocast(torch.device("cpu"), precision)
    with ba.autocast("cpu", "bf16"):  # a device name is enough
        assert torch.is_autocast_enabled("cpu")
    with ba.autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_a_negative_seed_is_a_config_error(small_experiment):
    with pytest.raises(ba.ConfigError, match=r"seed: Input should be greater than or equal to 0 \(got -1\)"):
        ba.load_experiment(small_experiment(), ["seed=-1"])
    with pytest.raises(
        TypeError, match=r"overrides must be a list of 'KEY\.PATH=VALUE' strings, got the string 'seed=1'"
    ):
        ba.load_experiment(small_experiment(), "seed=1")  # type: ignore[arg-type]


def test_checkpoints_take_str_paths_and_refuse_another_optimizer(tmp_path):
    model = torch.nn.Linear(2, 2)
    adam = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    adam.step()
    where = str(tmp_path / "ckpt")  # a str, as docs/library.md writes it
    ba.save_checkpoint(where, {"model": model}, {"main": adam}, {"step": 1})
    assert (
        ba.load_checkpoint(where, {"model": model}, {"main": torch.optim.Adam(model.parameters())})["step"]
        == 1
    )
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ba.CheckpointError, match="phase 'main' is Adam's, this run's optimiser is SGD"):
        ba.load_checkpoint(where, {"model": model}, {"main": sgd})


def test_a_refused_checkpoint_changes_nothing(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    adam = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    adam.step()
    ba.save_checkpoint(tmp_path / "ckpt", {"model": model}, {"main": adam}, {"step": 1})
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    wrong = {
        "another optimiser": ({"main": torch.optim.SGD(fresh.parameters(), lr=0.1)}, "is Adam's"),
        "another phase": (
            {"gen": torch.optim.Adam(fresh.parameters())},
            "no optimiser state for phase 'gen'",
        ),
        "other parameter groups": (
            {
                "main": torch.optim.Adam(
                    [{"params": fresh[0].parameters()}, {"params": fresh[1].parameters()}]
                )
            },
            r"parameter groups of \[4\] parameters saved, this run's optimiser has \[2, 2\]",
        ),
    }
    for optimizers, message in wrong.values():
        with pytest.raises(ba.CheckpointError, match=message):
            ba.load_checkpoint(tmp_path / "ckpt", {"model": fresh}, optimizers)
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # weights untouched
        assert all(not opt.state for opt in optimizers.values())
    ba.load_checkpoint(tmp_path / "ckpt", {"model": fresh}, {"main": torch.optim.Adam(fresh.parameters())})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.state_dict().items())


def test_a_torch_file_given_as_safetensors_says_what_it_is(tmp_path):
    from branchadapt.checkpoint import is_safetensors, read_tensors, sniff_format

    torch.save({"w": torch.ones(2)}, tmp_path / "zip.safetensors")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.safetensors", _use_new_zipfile_serialization=False)
    ba.save_weights(tmp_path / "real.bin", {"m": torch.nn.Linear(1, 1)})
    (tmp_path / "junk.safetensors").write_bytes(b"not weights at all")
    assert [sniff_format(tmp_path / n) for n in ("zip.safetensors", "legacy.safetensors", "real.bin")] == [
        "torch",
        "torch",
        "safetensors",
    ]
    assert sniff_format(tmp_path / "junk.safetensors") is None and is_safetensors(
        tmp_path / "junk.safetensors"
    )
    assert is_safetensors(tmp_path / "real.bin") and not is_safetensors(tmp_path / "zip.safetensors")
    for name in ("zip.safetensors", "legacy.safetensors"):
        with pytest.raises(
            ba.CheckpointError, match=r"not a safetensors file but, by its first bytes, a torch\.save file"
        ):
            read_tensors(tmp_path / name)
    with pytest.raises(ba.CheckpointError, match="not a readable safetensors file"):
        read_tensors(tmp_path / "junk.safetensors")


def test_the_package_ships_its_type_hints():
    assert (ROOT / "branchadapt" / "py.typed").is_file()
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setup["package-data"]["branchadapt"]  # in the wheel, not only the checkout


def test_naming_prefixes_the_experiment_file_once():
    from branchadapt.errors import ConfigError, naming

    with pytest.raises(ConfigError) as info, naming("exp.toml"):
        raise ConfigError("model.width: too wide")
    assert str(info.value) == "exp.toml: model.width: too wide"
    with pytest.raises(ba.UserError) as info, naming("exp.toml"):
        raise ba.UserError("exp.toml: already named")
    assert str(info.value) == "exp.toml: already named"
    with pytest.raises(ValueError, match=r"^not a user error$"), naming("exp.toml"):
        raise ValueError("not a user error")  # bugs keep their message and traceback


def test_a_finished_runs_model_loads_by_its_run_directory(small_experiment, tmp_path):
    from branchadapt.checkpoint import read_tensors
    from branchadapt.cli import main
    from branchadapt.evaluation import load_stage

    run = tmp_path / "run"
    assert main(["run", str(small_experiment()), "--run-dir", str(run), "--no-eval"]) == 0
    loaded = load_stage(str(run))  # a str, as a script writes it
    model = loaded.modules["model"]
    assert loaded.stage == "transfer" and isinstance(model, ba.BranchedModel) and not model.training
    saved = read_tensors(run / "stages" / "transfer" / "final.safetensors")
    assert all(torch.equal(saved[f"model.{k}"], v) for k, v in model.state_dict().items())
    assert load_stage(run, "basic").modules["model"].state_dict().keys() != model.state_dict().keys()

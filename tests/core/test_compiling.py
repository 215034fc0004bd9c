"""Regional compilation (``train.compile = "units"``): in place, exact, selective BP intact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import branchadapt as ba
from branchadapt import BranchedModel, Participation
from branchadapt.compiling import compile_units, compiles_units, unit_types


class Unit(nn.Module):
    """A repeated block: norm, activation, linear, residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(torch.relu(self.norm(x)))


class Stack(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a, self.b = Unit(width), Unit(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class UnitNet(ba.Backbone):
    compile_unit_types = (Unit,)

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Linear(4, 8)
        self.mid = Stack(8)
        self.top = nn.Linear(8, 2)

    def stage_names(self) -> list[str]:
        return ["low", "mid", "top"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.mid(self.low(x)))


def branched() -> BranchedModel:
    torch.manual_seed(0)
    policy = {"anchor": Participation.LIVE, "few": Participation.DETACHED}
    return BranchedModel(UnitNet(), ["anchor", "few"], ["low", "top"], policy)


def test_units_are_found_through_the_branched_model_and_compiled_in_place() -> None:
    model = branched()
    keys = list(model.state_dict())
    assert unit_types([model]) == (Unit,)
    assert compile_units([model]) == 2  # the two units of the shared middle
    assert all(u._compiled_call_impl is not None for u in model.modules() if isinstance(u, Unit))
    assert list(model.state_dict()) == keys  # checkpoints are unchanged
    assert compile_units([nn.Linear(2, 2)]) == 0  # nothing declared, nothing compiled


def test_compiled_step_matches_eager_and_keeps_selective_backprop() -> None:
    eager = branched()
    compiled = copy.deepcopy(eager)
    assert compile_units([compiled]) == 2
    x = torch.randn(6, 4)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    grads = []
    for model in (eager, compiled):
        out = model(x, groups=groups)
        # only the few-shot rows in the loss: shared parameters must get no gradient at all
        out[3:].square().sum().backward()
        assert all(p.grad is None or not p.grad.any() for p in model.shared_parameters())
        model.zero_grad(set_to_none=True)
        out = model(x, groups=groups)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g_eager, g_compiled in zip(*grads, strict=True):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6)


def test_trainer_compiles_units_and_trains_the_same_weights(small_experiment, tmp_path, monkeypatch):
    from branchadapt.builtin.example import MLPBackbone
    from branchadapt.checkpoint import read_tensors
    from branchadapt.trainer import Trainer

    monkeypatch.setattr(MLPBackbone, "compile_unit_types", (nn.Sequential,))
    path = small_experiment(steps=2)
    finals = {}
    for mode in ("off", "units", "auto"):  # auto: units on CUDA only, so off here
        exp = ba.load_experiment(path, [f'train.compile="{mode}"'])
        trainer = Trainer(exp, run_dir=tmp_path / mode, device="cpu")
        messages: list[str] = []
        monkeypatch.setattr(trainer.progress, "message", messages.append)
        assert trainer.run().completed == ["basic", "transfer"]
        compiled = [m.split(":")[1].split(" backbone")[0].strip() for m in messages if "units compiled" in m]
        # basic: the input and hidden stages; transfer: the input stage is a branch (3 group copies)
        assert compiled == (["2", "4"] if mode == "units" else []), messages
        finals[mode] = read_tensors(tmp_path / mode / "stages" / "transfer" / "final.safetensors")
    assert finals["off"].keys() == finals["units"].keys()
    for key, value in finals["off"].items():
        torch.testing.assert_close(finals["units"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_compile_setting_is_validated(small_experiment):
    with pytest.raises(ba.ConfigError, match=r"train\.compile"):
        ba.load_experiment(small_experiment(), ['train.compile="everything"'])


def test_auto_compiles_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [compiles_units(m, cpu) for m in ("off", "units", "auto")] == [False, True, False]
    assert [compiles_units(m, cuda) for m in ("off", "units", "auto")] == [False, True, True]

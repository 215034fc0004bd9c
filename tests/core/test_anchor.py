"""The configured anchor group, not the first one, is the group whose losses update the shared
stages; a splitter's per-group overrides apply to it as to any other group."""

from __future__ import annotations

import torch

import branchadapt as ba
from branchadapt import Participation
from branchadapt.checkpoint import read_tensors
from branchadapt.loading import ResolvedExperiment
from branchadapt.trainer import Trainer


def _experiment(
    small_experiment, anchor: str | None, overrides: list[str] | None = None
) -> ResolvedExperiment:
    path = small_experiment(steps=2)
    text = path.read_text()
    if anchor is not None:
        text = f'anchor = "{anchor}"\n' + text
    path.write_text(text)
    return ba.load_experiment(path, overrides=overrides or [])


def _transfer_model(exp: ResolvedExperiment, tmp_path) -> ba.BranchedModel:
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    runtime = trainer.build_stage(1, exp.stages[1], trainer.build_source(), check_only=True)
    model = runtime.modules["model"]
    assert isinstance(model, ba.BranchedModel)
    return model


def test_the_configured_anchor_is_the_live_group(small_experiment, tmp_path):
    first = _transfer_model(_experiment(small_experiment, None), tmp_path)
    assert first.participation == {
        "a": Participation.LIVE,
        "b": Participation.DETACHED,
        "c": Participation.DETACHED,
    }
    exp = _experiment(small_experiment, "b")
    assert exp.spec.anchor_group == "b"
    model = _transfer_model(exp, tmp_path)
    assert model.participation == {
        "a": Participation.DETACHED,
        "b": Participation.LIVE,
        "c": Participation.DETACHED,
    }


def test_overrides_apply_to_the_anchor_too(small_experiment, tmp_path):
    exp = _experiment(
        small_experiment, "b", ['stages.transfer.splitter.overrides={b = "frozen", c = "live"}']
    )
    model = _transfer_model(exp, tmp_path)
    assert model.participation == {
        "a": Participation.DETACHED,
        "b": Participation.FROZEN,
        "c": Participation.LIVE,
    }


def test_only_the_anchor_s_rows_update_the_shared_stages_in_training(small_experiment, tmp_path):
    """Trained with anchor b, the shared weights move; with b detached as well, no group is live
    and the transfer stage leaves them exactly as the basic stage left them."""

    def shared_after(
        overrides: list[str], run: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        exp = _experiment(small_experiment, "b", overrides)
        trainer = Trainer(exp, run_dir=tmp_path / run, device="cpu")
        trainer.run()
        basic = read_tensors(tmp_path / run / "stages" / "basic" / "final.safetensors")
        final = read_tensors(tmp_path / run / "stages" / "transfer" / "final.safetensors")
        shared = [k for k in final if ".branches." not in k and k.endswith("weight")]
        assert shared  # the middle layer is shared
        return {k: basic[k] for k in shared}, {k: final[k] for k in shared}

    before, after = shared_after([], "live")
    assert all(not torch.equal(before[k], after[k]) for k in before)
    before, after = shared_after(['stages.transfer.splitter.overrides={b = "detached"}'], "none_live")
    assert all(torch.equal(before[k], after[k]) for k in before)

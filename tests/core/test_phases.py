"""Several optimiser phases per step, each with its own optimiser and parameters."""

from __future__ import annotations

import torch
from torch import nn

import branchadapt as ba
from branchadapt.plugins import default_plugins
from branchadapt.trainer import Trainer


class TwoPhase(ba.Task):
    """'critic' updates a scorer on detached predictions, then 'main' updates the model."""

    def build(self):
        return {"model": self.context.build_backbone(), "critic": nn.Linear(3, 1)}

    def phases(self):
        return [ba.Phase("critic", ("critic",)), ba.Phase("main", ("model",))]

    def forward(self, phase, modules, batch, scratch):
        data = batch["train"]
        if "logits" not in scratch:
            scratch["logits"] = modules["model"](data["x"], groups=data["group"])
            scratch["calls"] = 0
        scratch["calls"] += 1
        logits = scratch["logits"]
        if phase == "critic":
            return {"score": modules["critic"](logits.detach()), "calls": scratch["calls"]}
        return {"logits": logits, "target": data["y"], "score": modules["critic"](logits)}


class CriticLoss(ba.LossTerm):
    default_phase = "critic"

    def forward(self, outputs, batch):
        return outputs["score"].pow(2).mean()


def test_each_phase_updates_only_its_modules(small_experiment, tmp_path):
    plugins = default_plugins()
    plugins.registry.add("task", "two_phase", TwoPhase, "test")
    plugins.registry.add("loss", "critic_l2", CriticLoss, "test")
    path = small_experiment(
        steps=3,
        extra="\n[stages.transfer.losses.critic_l2]\nweight = 0.5\n[stages.transfer.optim.critic]\nlr = 0.5\n",
    )
    text = path.read_text().replace('type = "supervised"', 'type = "two_phase"')
    path.write_text(text)
    exp = ba.load_experiment(path)
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    trainer.run(max_steps=3)  # the basic stage (one phase: critic has no loss there)
    source = trainer.build_source()
    rt = trainer.build_stage(1, exp.stages[1], source)
    assert set(rt.optimizers) == {"critic", "main"}
    assert rt.optimizers["critic"].param_groups[0]["lr"] == 0.5
    assert rt.optimizers["main"].param_groups[0]["lr"] == 1e-2
    model_params = {id(p) for p in rt.modules["model"].parameters()}
    critic_params = {id(p) for p in rt.modules["critic"].parameters()}
    assert {id(p) for g in rt.optimizers["critic"].param_groups for p in g["params"]} == critic_params
    assert {id(p) for g in rt.optimizers["main"].param_groups for p in g["params"]} == model_params
    critic_before = [p.clone() for p in rt.modules["critic"].parameters()]
    model_before = [p.clone() for p in rt.modules["model"].parameters()]
    values = trainer.train_step(rt, rt.data[0])
    assert set(values) == {"loss/critic_l2", "loss/cross_entropy", "total/critic", "total/main"}
    assert all(
        not torch.equal(a, b) for a, b in zip(critic_before, rt.modules["critic"].parameters(), strict=True)
    )
    changed = [
        not torch.equal(a, b) for a, b in zip(model_before, rt.modules["model"].parameters(), strict=True)
    ]
    assert any(changed)

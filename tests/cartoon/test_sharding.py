"""Data-parallel equivalence of the paper recipe: the gradient of the global batch equals the mean
of the gradients of the ranks' shards (the property under which DDP's all-reduce reproduces
one-process training). Checked in one process on the transfer stage, both phases, all losses."""

from __future__ import annotations

import copy
from typing import Any

import torch

import branchadapt as ba
from branchadapt.data import StepData
from branchadapt.trainer import StageRuntime, Trainer


def _grads(rt: StageRuntime, batch: ba.Batch, phase: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    for name, module in rt.modules.items():
        module.load_state_dict(state[name])  # spectral-norm vectors too: every pass starts alike
        module.zero_grad(set_to_none=True)
    scratch: dict[str, Any] = {}
    if phase == "generator":
        rt.task.forward("discriminator", rt.modules, batch, scratch)  # the translations it reuses
    outputs = rt.task.forward(phase, rt.modules, batch, scratch)
    total = torch.stack([t.weight * t(outputs, batch) for t in rt.losses[phase]]).sum()
    total.backward()
    return {
        f"{m}.{n}": p.grad.clone()
        for m, module in rt.modules.items()
        for n, p in module.named_parameters()
        if p.grad is not None
    }


def test_shard_gradients_average_to_the_global_batch_gradient(tiny_cartoon, tmp_path):
    exp = ba.load_experiment(tiny_cartoon(steps=1, extra='[sampler]\ntype = "per_group"\nper_group = 2\n'))
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    trainer.run()
    rt = trainer.build_stage(1, exp.stages[1], trainer.build_source())
    data = rt.data
    full = data[0]
    groups = list(data.group_index)
    shards = [StepData(data.source, data.sampler, groups, data.seed, data.stage, r, 2)[0] for r in (0, 1)]
    assert all(len(s["photo"]["group"]) * 2 == len(full["photo"]["group"]) for s in shards)
    assert sorted(shards[0]["photo"]["group"].tolist()) == list(
        range(len(groups))
    )  # every group on every rank
    state = copy.deepcopy({name: m.state_dict() for name, m in rt.modules.items()})
    for phase in ("discriminator", "generator"):
        g_full = _grads(rt, full, phase, state)
        g_shards = [_grads(rt, s, phase, state) for s in shards]
        assert set(g_full) == set(g_shards[0]) | set(g_shards[1])
        scale = max(g.abs().max() for g in g_full.values())
        for key, g in g_full.items():
            parts = [s.get(key, torch.zeros_like(g)) for s in g_shards]  # absent on a rank: DDP adds zeros
            torch.testing.assert_close((parts[0] + parts[1]) / 2, g, rtol=1e-3, atol=1e-5 * scale, msg=key)

"""The translator's step with both directions at once (``task.concurrent``) gives the serial step's gradients."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import branchadapt as ba
from branchadapt import concurrency
from branchadapt.trainer import Trainer


def _gradients(config, tmp_path, concurrent: bool, monkeypatch) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after both phases' backward passes of one transfer-stage step
    (no optimiser step in between), from the same initial weights and batch."""
    torch.manual_seed(0)
    exp = ba.load_experiment(config, [f"task.concurrent={str(concurrent).lower()}"])
    trainer = Trainer(exp, run_dir=tmp_path / f"run-{concurrent}", device="cpu")
    spec = exp.stages[1]  # branched: live and detached groups, per-group copies
    spec = dataclasses.replace(spec, spec=spec.spec.model_copy(update={"init_from": None}))
    rt = trainer.build_stage(1, spec, trainer.build_source())
    threads: set[str] = set()
    run = concurrency.run_concurrently

    def spy(calls):  # type: ignore[no-untyped-def]
        return run([lambda c=c: (threads.add(threading.current_thread().name), c())[1] for c in calls])

    monkeypatch.setattr("branchadapt_cartoon.task.run_concurrently", spy)
    batch, scratch = rt.data[0], {}
    for phase in ("discriminator", "generator"):
        outputs = rt.task.forward(phase, rt.forward_modules, batch, scratch)
        total = sum(t.weight * t(outputs, batch) for t in rt.losses[phase])
        rt.task.backward(phase, total, scratch)
    assert scratch == {}  # the split backward consumed what the forward kept
    assert any(n.startswith("branchadapt-concurrent") for n in threads) is concurrent
    return {
        f"{name}.{key}": p.grad.clone()
        for name, module in rt.modules.items()
        for key, p in module.named_parameters()
        if p.grad is not None
    }


def test_concurrent_step_gives_the_serial_gradients(tiny_cartoon, tmp_path, monkeypatch):
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = tiny_cartoon(steps=2)
        serial = _gradients(config, tmp_path, False, monkeypatch)
        concurrent = _gradients(config, tmp_path, True, monkeypatch)
    finally:
        torch.set_num_threads(saved)
    assert serial.keys() == concurrent.keys()
    assert any(k.startswith("gen_") for k in serial) and any(k.startswith("dis_") for k in serial)
    # one intra-op thread instead of two changes summation orders: float32 rounding only
    for key, expected in serial.items():
        scale = expected.norm()
        if scale > 1e-3:  # biases before an instance norm have a gradient of rounding noise
            assert (concurrent[key] - expected).norm() <= 1e-3 * scale, key


def test_a_wrong_value_is_named(tiny_cartoon):
    with pytest.raises(ba.ConfigError, match=r"task\.concurrent.*'sometimes'"):
        ba.load_experiment(tiny_cartoon(steps=2), ["task.concurrent=sometimes"])


def test_the_cartoon_task_refuses_it_when_built_under_torchrun(monkeypatch):
    from branchadapt_cartoon.task import Translate, TranslateOptions

    monkeypatch.setenv("WORLD_SIZE", "2")
    context = ba.TaskContext(groups=("a",), anchor="a", build_backbone=lambda: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ba.UserError, match=r"task\.concurrent = true cannot run under torchrun"):
        Translate(TranslateOptions(concurrent=True), context)
    Translate(TranslateOptions(concurrent="auto"), context)  # serial there: allowed

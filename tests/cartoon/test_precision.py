"""The paper's transfer stage under bf16 autocast (``precision = "bf16"``): branches, fused rows and
stacked copies train in bf16 without falling back."""

from __future__ import annotations

import dataclasses
import threading
import warnings

import torch

import branchadapt as ba
from branchadapt import BranchedModel
from branchadapt.trainer import Trainer


def test_transfer_stage_trains_under_bf16_with_fused_rows_and_stacked_copies(tiny_cartoon, tmp_path):
    overrides = ['precision="bf16"', "train.fuse_participation=true", "train.stack_branches=true"]
    exp = ba.load_experiment(tiny_cartoon(steps=2), overrides)
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    spec = exp.stages[1]  # branched, live and detached groups
    spec = dataclasses.replace(spec, spec=spec.spec.model_copy(update={"init_from": None}))
    rt = trainer.build_stage(1, spec, trainer.build_source())
    generators = [m for m in rt.modules.values() if isinstance(m, BranchedModel)]
    assert generators and all(m.fused is True for m in generators)
    before = {k: v.clone() for k, v in rt.modules["gen_a2b"].state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to separate calls or a loop warns: not here
        logged = trainer.train_step(rt, rt.data[0])
    assert logged and all(torch.isfinite(v) for v in logged.values())
    assert all(m._unfusable is None for m in generators)
    after = rt.modules["gen_a2b"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it learned
    assert all(after[k].dtype == before[k].dtype for k in before)  # fp32 weights stay fp32


def test_bf16_runs_both_directions_at_once_under_autocast(tiny_cartoon, tmp_path, monkeypatch):
    """With two threads, the bf16 step still runs the directions on worker threads (autocast is
    thread-local in torch; the workers enter the caller's), and their convolutions run in bf16."""
    from branchadapt import concurrency

    seen: list[tuple[str, bool, bool]] = []  # worker thread, caller's autocast, worker's autocast
    run = concurrency.run_concurrently

    def spy(calls):  # type: ignore[no-untyped-def]
        caller = torch.is_autocast_enabled("cpu")  # on for the forward passes, off for the backward ones

        def probe(c):  # type: ignore[no-untyped-def]
            seen.append((threading.current_thread().name, caller, torch.is_autocast_enabled("cpu")))
            return c()

        return run([lambda c=c: probe(c) for c in calls])

    monkeypatch.setattr("branchadapt_cartoon.task.run_concurrently", spy)
    exp = ba.load_experiment(tiny_cartoon(steps=2), ['precision="bf16"'])
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    rt = trainer.build_stage(0, exp.stages[0], trainer.build_source())
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        logged = trainer.train_step(rt, rt.data[0])
    finally:
        torch.set_num_threads(saved)
    assert all(torch.isfinite(v) for v in logged.values())
    on_workers = [
        (caller, worker) for name, caller, worker in seen if name.startswith("branchadapt-concurrent")
    ]
    assert (True, True) in on_workers  # forward passes ran on the workers, under autocast
    assert all(caller == worker for caller, worker in on_workers)

"""The paper's transfer stage under bf16 autocast (``precision = "bf16"``): branches, fused rows and
stacked copies train in bf16 without falling back."""

from __future__ import annotations

import dataclasses
import threading
import warnings

import pytest
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


def _decoder_dtypes_and_gradient(
    bf16_decoder: bool, grad: bool = True
) -> tuple[set, torch.dtype, torch.Tensor | None]:
    from branchadapt_cartoon.networks import UGATITGenerator

    torch.manual_seed(0)
    gen = UGATITGenerator(UGATITGenerator.Options(width=8, image_size=32, bf16_decoder=bf16_decoder))
    seen: set = set()
    for i in range(1, gen.n_blocks + 1):
        for conv in ("conv1", "conv2"):  # (the block's output adds its fp32 input: fp32 either way)
            gen.get_submodule(f"DecodeBlock{i}.{conv}").register_forward_hook(
                lambda m, a, out: seen.add(out.dtype)
            )
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.set_grad_enabled(grad):
        out = gen(x)[0]
    if not grad:
        return seen, out.dtype, None
    (out * noise).sum().backward()
    return seen, out.dtype, torch.cat([p.grad.flatten() for p in gen.parameters() if p.grad is not None])


def test_bf16_decoder_runs_only_the_decoder_blocks_in_bf16_and_stays_close_to_fp32():
    """``model.bf16_decoder``: the decoder's residual blocks convolve in bf16 when training, the
    output is fp32, and the weight gradient stays within a few per cent of fp32's (the generator
    under full autocast is 20-40 % off, benchmarks/bf16_sources.py)."""
    seen, out_dtype, g16 = _decoder_dtypes_and_gradient(True)
    assert seen == {torch.bfloat16} and out_dtype == torch.float32
    seen32, _, g32 = _decoder_dtypes_and_gradient(False)
    assert seen32 == {torch.float32}
    assert g16 is not None and g32 is not None
    error = float((g16 - g32).norm() / g32.norm())
    assert 0 < error < 0.05, error  # changed (bf16 did run) but close


def test_bf16_decoder_is_for_training_only():
    seen, out_dtype, _ = _decoder_dtypes_and_gradient(True, grad=False)  # inference, sampling, export
    assert seen == {torch.float32} and out_dtype == torch.float32


def test_bf16_decoder_auto_is_for_large_training_inputs_on_fast_bf16_hardware(monkeypatch):
    from branchadapt_cartoon import precision

    small, large = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 128, 128)
    monkeypatch.setattr(precision, "fast_bf16", lambda device: True)
    assert precision.bf16_decoder_applies("auto", large)
    assert not precision.bf16_decoder_applies("auto", small)  # a tie at 64 px: left in fp32
    assert precision.bf16_decoder_applies(True, small) and not precision.bf16_decoder_applies(False, large)
    with torch.no_grad():
        assert not precision.bf16_decoder_applies(True, large)  # inference stays fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not precision.bf16_decoder_applies(True, large)  # precision = "bf16" already covers it
    monkeypatch.setattr(precision, "fast_bf16", lambda device: False)
    assert not precision.bf16_decoder_applies("auto", large)  # no AMX / no bf16 GPU: fp32
    assert not precision.fast_bf16(torch.device("meta"))


@pytest.mark.parametrize(("fast", "side", "expected"), [(True, 128, torch.bfloat16), (False, 128, torch.float32),
                                                        (True, 64, torch.float32)])  # fmt: skip
def test_bf16_decoder_auto_decides_on_the_input_images_size(monkeypatch, fast, side, expected):
    """``auto`` looks at the image the generator gets, not at the decoder's smaller feature maps."""
    from branchadapt_cartoon import precision
    from branchadapt_cartoon.networks import UGATITGenerator

    monkeypatch.setattr(precision, "fast_bf16", lambda device: fast)
    gen = UGATITGenerator(UGATITGenerator.Options(width=4, image_size=side, n_blocks=1))
    seen: list[torch.dtype] = []
    gen.get_submodule("DecodeBlock1.conv1").register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    gen(torch.zeros(1, 3, side, side))
    assert seen == [expected]


@pytest.mark.parametrize("stacked", [True, False])
def test_bf16_decoder_blocks_as_branch_copies_train(tiny_cartoon, tmp_path, stacked):
    """Branched deep enough to give every group its own decoder block, the bf16 block trains as
    stacked copies under vmap and as a loop (in bf16), with fused live and detached rows."""
    overrides = [
        "model.bf16_decoder=true",
        "stages.transfer.splitter.top=6",  # ConvBlock2, HourGlass4-3, UpBlock2-1 and the last decoder block
        f"train.stack_branches={str(stacked).lower()}",
        "train.fuse_participation=true",
    ]
    exp = ba.load_experiment(tiny_cartoon(steps=2), overrides)
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    spec = exp.stages[1]
    spec = dataclasses.replace(spec, spec=spec.spec.model_copy(update={"init_from": None}))
    rt = trainer.build_stage(1, spec, trainer.build_source())
    gen = rt.modules["gen_a2b"]
    last = f"DecodeBlock{gen.backbone.n_blocks}"
    router = gen.backbone.get_submodule(last)
    assert gen.branch_paths[-6] == last and "DecodeBlock1" not in gen.branch_paths[:-6]
    seen: list[torch.dtype] = []
    for copy in router.branches.values():  # called one by one in a loop
        copy.conv1.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback from stacked copies or fused rows
        logged = trainer.train_step(rt, rt.data[0])
    assert logged and all(torch.isfinite(v) for v in logged.values())
    after = gen.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if f"{last}.branches" in k)
    assert router._unstackable is None and gen._unfusable is None
    if not stacked:  # (under vmap torch's CPU autocast does not reach the convolutions: fp32 there)
        assert seen and set(seen) == {torch.bfloat16}

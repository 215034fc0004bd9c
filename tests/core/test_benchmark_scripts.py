"""The issue-7 analysis scripts run end to end at a tiny size and print what they promise.

Not timings (those live in benchmarks/ and docs/performance.md): a smoke run per script, plus the
one property the bf16 check rests on: fp32 gradients agree with float64 ones.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def benchmark_module(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (and what it imports from there) without leaving the folder
    on ``sys.path``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--threads", "1", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    return [r for r in rows if re.match(first_cell, r[0])]


def test_bf16_check_compares_both_precisions_with_float64() -> None:
    out = run("bf16_check.py", "--size", "32", "--width", "4", "--train", "1", "--batches", "1")
    rows = table_rows(out, r"(discriminator|generator): ")
    assert {r[0] for r in rows} == {
        f"{phase}: {m}" for phase, ms in (("discriminator", ("dis_ga", "dis_la", "dis_gb", "dis_lb")),
                                          ("generator", ("gen_a2b", "gen_b2a"))) for m in ms
    }  # fmt: skip
    for _, fp32_cos, fp32_err, bf16_cos, bf16_err in rows:
        assert float(fp32_cos) > 0.9999 and float(fp32_err) < 1e-2  # fp32 is float64 up to rounding
        assert -1.0 <= float(bf16_cos) <= 1.0 and float(bf16_err) >= 0.0
    losses = table_rows(out, r"(adv_d|cam_d|adv_g|cycle|identity|cam_g|face_id)$")
    assert len(losses) == 7 and all(float(r[1]) < 1e-4 for r in losses)


def test_bf16_sources_rounds_one_place_at_a_time() -> None:
    out = run("bf16_sources.py", "--size", "32", "--width", "4", "--train", "1", "--repeats", "1")
    rows = [r for r in table_rows(out, r"(none|autocast|backward|forward)") if len(r) == 4]  # the error table
    (fp32,) = [r for r in rows if r[0] == "none (fp32)"]
    assert float(fp32[2]) > 0.9999 and float(fp32[3]) < 1e-2  # unrounded fp32 is float64 up to rounding
    per_stage = [r[1] for r in rows if r[0].startswith("forward") and r[1] != "everywhere"]
    assert per_stage[:3] == ["ConvBlock1", "HourGlass1", "HourGlass2"] and per_stage[-1] == "ConvBlock2"
    assert len(per_stage) == len(set(per_stage)) == 20  # each of the 4-block generator's 20 stages once
    errors = [float(r[3]) for r in rows if r is not fp32]
    # each rounding changes the gradient, so no hook silently did nothing (a no-op gives fp32's error)
    assert all(e > float(fp32[3]) for e in errors), rows
    assert "backward convolutions' operands" in [r[0] for r in rows]
    timed = table_rows(out, r"(none \(fp32\)|everywhere|the decoder|\+ FC|backward convolutions in)")
    assert [r[0] for r in timed][-5:] == ["none (fp32)", "everywhere", "the decoder's residual blocks",
                                          "+ FC, HourGlass3-4, ConvBlock2", "backward convolutions in bf16"]  # fmt: skip
    assert timed[-5][2] == "1.00" and all(float(r[1]) > 0 for r in timed[-5:])


def test_bf16_backward_convolutions_keep_the_fp32_forward_and_round_only_the_backward() -> None:
    import torch
    import torch.nn.functional as F

    bf16_backward = benchmark_module("bf16_backward")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    conv, point = torch.nn.Conv2d(8, 6, 3, padding=1), torch.nn.Conv2d(8, 6, 1)
    g = torch.randn(2, 6, 16, 16)

    def grads(module: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x.grad = None
        module.zero_grad()
        out = module(x)
        out.backward(g)
        return out.detach(), [x.grad.clone(), *(p.grad.clone() for p in module.parameters())]

    plain_out, plain = grads(conv)
    with bf16_backward.patched():
        assert F.conv2d is bf16_backward.conv2d
        out, rounded = grads(conv)
        _, point_plain = grads(point)  # a 1x1 convolution keeps its fp32 backward
        with torch.no_grad():
            assert not F.conv2d(x, conv.weight).requires_grad  # nothing recorded, nothing changed
    assert F.conv2d is bf16_backward._PLAIN
    assert torch.equal(out, plain_out)  # the forward pass stays fp32, bit for bit
    for a, b in zip(rounded, plain, strict=True):
        assert a.dtype == torch.float32 and not torch.equal(a, b)  # the backward did run in bf16
        assert (a - b).norm() / b.norm() < 2e-2  # ... and stays within bf16's rounding
    _, point_ref = grads(point)
    assert all(torch.equal(a, b) for a, b in zip(point_plain, point_ref, strict=True))


def test_profile_step_splits_the_step_and_bounds_it() -> None:
    # 2 threads: the default step would run its directions on worker threads the profiler misses
    out = run(
        "profile_step.py", "--sizes", "32", "--width", "4", "--steps", "1", "--threads", "2",
        "--set", "model.channels_last=true",
    )  # fmt: skip
    assert "overrides: model.channels_last=true" in out
    (row,) = table_rows(out, r"32$")
    step, maths, rest, bound = (float(row[i]) for i in (1, 2, 4, 5))
    assert abs(maths + rest - step) < 0.02 * step + 0.01  # the split adds up to the step
    assert rest <= bound <= step + 0.01  # convolutions at peak: not slower than measured (2-decimal table)


def test_optimisation_variants_undo_one_optimisation_each_and_keep_the_maths() -> None:
    import copy

    import torch

    optimisations = benchmark_module("optimisations")
    from branchadapt_cartoon.critics import Discriminator
    from branchadapt_cartoon.networks import UGATITGenerator
    from branchadapt_cartoon.spectral import SNConv2d

    torch.manual_seed(0)
    gen = UGATITGenerator(UGATITGenerator.Options(width=8, image_size=32))
    two_pass = copy.deepcopy(gen)
    optimisations._use_two_pass_lin(two_pass)
    swapped = [
        m for m in two_pass.modules() if getattr(m.forward, "__func__", None) is optimisations._two_pass_lin
    ]
    assert len(swapped) == 2 * 4 + 2  # two AdaLINs per decoder block, one LIN per up-sampling block
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(two_pass(x)[0], gen(x)[0], rtol=1e-4, atol=1e-5)
    plain_norms = copy.deepcopy(gen)
    optimisations._use_torch_instance_norm(plain_norms)
    out = plain_norms.HourGlass1.HG[3](x[:, :1].expand(2, 8, 32, 32).clone().requires_grad_())
    assert out._base is not None  # torch's own instance norm again (a view)
    from branchadapt_cartoon.lowmem import NormReluConv, ReflectConv2d

    unfused = copy.deepcopy(gen)
    optimisations._unfuse(unfused)
    units = (NormReluConv, ReflectConv2d)
    assert all(not m.fused for m in unfused.modules() if isinstance(m, units))
    assert all(m.fused for m in gen.modules() if isinstance(m, units))  # only that copy
    xg = x.clone().requires_grad_()
    assert torch.equal(unfused(xg)[0], gen(xg)[0])
    with optimisations._classic_spectral_norm():
        classic = Discriminator(width=4, n_layers=3)
    ours = Discriminator(width=4, n_layers=3)
    assert type(classic.model[1]) is torch.nn.Conv2d and classic.model[1]._forward_pre_hooks
    assert isinstance(ours.model[1], SNConv2d)
    from branchadapt_cartoon import instnorm, padding

    seen: dict[str, list[bool]] = {"pad": [], "norm": []}
    reflect_pad, fast = padding.reflect_pad, instnorm._fast
    thresholds = padding.FOLD_MIN_NUMEL, instnorm.FAST_MIN_NUMEL
    padding.FOLD_MIN_NUMEL = instnorm.FAST_MIN_NUMEL = 0  # 32 px maps are below both
    # the discriminators' pads call padding.reflect_pad, the generators' norms instnorm._fast
    padding.reflect_pad = lambda x, p: seen["pad"].append(padding.fold_enabled) or reflect_pad(x, p)  # type: ignore[assignment]
    instnorm._fast = lambda x: seen["norm"].append(instnorm.fast_forward) or fast(x)  # type: ignore[assignment]
    try:
        for name in ("torch pad backward", "torch IN forward"):
            step, _ = optimisations.variant(name, 32, 4)
            step(0)
    finally:
        padding.reflect_pad, instnorm._fast = reflect_pad, fast
        padding.FOLD_MIN_NUMEL, instnorm.FAST_MIN_NUMEL = thresholds
    # each switch is off in its own variant's steps only, and on again afterwards
    assert seen["pad"] and seen["norm"] and padding.fold_enabled and instnorm.fast_forward
    from branchadapt_cartoon import fastapply

    bound: list[bool] = []
    norm_apply = instnorm._instance_norm_apply
    instnorm._instance_norm_apply = lambda *a: bound.append(fastapply.enabled) or norm_apply(*a)
    instnorm.FAST_MIN_NUMEL = 0
    try:
        for name in ("default", "signature-bound autograd functions"):
            step, _ = optimisations.variant(name, 32, 4)
            step(0)
    finally:
        instnorm._instance_norm_apply, instnorm.FAST_MIN_NUMEL = norm_apply, thresholds[1]
    assert True in bound and False in bound and fastapply.enabled
    assert False in seen["pad"] and True in seen["pad"] and False in seen["norm"] and True in seen["norm"]

    out = run("optimisations.py", "--size", "32", "--width", "4", "--steps", "1", "--warmup", "0",
              "--only", "two-pass LIN", "torch instance norm", "unfused units", "classic spectral norm",
              "for-loop Adam", "torch pad backward", "torch IN forward", "torch IN backward",
              "torch var_mean", "--set", "task.concurrent=false")  # fmt: skip
    assert "(interleaved); overrides: task.concurrent=false" in out
    names = ["default", "for-loop Adam", "two-pass LIN", "torch instance norm", "unfused units",
             "classic spectral norm", "torch pad backward", "torch IN forward", "torch IN backward",
             "torch var_mean"]  # fmt: skip
    rows = table_rows(out, "(" + "|".join(names) + ")$")
    assert [r[0] for r in rows] == names
    # system CPU per step: counted, and (with 1 thread) at most the step's own time
    assert all(float(r[1]) > 0 and 0 <= float(r[4]) < 2 * float(r[1]) + 0.01 for r in rows)
    # the transfer stage's switches (branch copies): off in their own variant's steps only
    from branchadapt import rowgrad

    flags: list[tuple[bool, bool, bool]] = []
    paused = rowgrad.paused

    def recording(inputs):  # type: ignore[no-untyped-def]
        flags.append((rowgrad.pause_in_branches, instnorm.vmap_kernels, padding.vmap_kernels))
        return paused(inputs)

    rowgrad.paused = recording  # type: ignore[assignment]
    try:
        for name in ("live-row mode in branch copies", "autograd functions under vmap"):
            step, _ = optimisations.variant(name, 32, 4, stage=1)
            step(0)
    finally:
        rowgrad.paused = paused  # type: ignore[assignment]
    assert (False, True, True) in flags and (True, False, False) in flags
    assert all(f in {(False, True, True), (True, False, False)} for f in flags)
    assert rowgrad.pause_in_branches and instnorm.vmap_kernels and padding.vmap_kernels
    variants = ["serial directions", "live-row mode in branch copies", "autograd functions under vmap",
                "branch copies under vmap"]  # fmt: skip
    transfer = run("optimisations.py", "--size", "32", "--width", "4", "--steps", "1", "--warmup", "0",
                   "--stage", "2", "--only", *variants, "1 thread", "--skip", "1 thread")  # fmt: skip
    assert "stage 2 step at 32 px" in transfer
    assert [r[0] for r in table_rows(transfer, "(" + "|".join(["default", *variants]) + ")$")] == [
        "default",
        *variants,
    ]
    kernels = table_rows(out, "(for-loop|foreach|fused)$")  # the optimiser steps alone
    assert [r[0] for r in kernels] == ["for-loop", "foreach", "fused"] and all(
        float(r[1]) > 0 for r in kernels
    )


def test_the_whole_generators_variant_compiles_each_backbone_in_place_and_runs_serially() -> None:
    """Built only (compiling is lazy, and minutes long at real sizes): every backbone of the stage
    is compiled whole, the discriminators are not, and the directions run one after the other."""
    from branchadapt.compiling import has_compiled
    from branchadapt.interfaces import Backbone

    optimisations = benchmark_module("optimisations")
    built = {}
    real_build = optimisations.build

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        built["trainer"], built["rt"] = real_build(*args, **kwargs)
        return built["trainer"], built["rt"]

    optimisations.build = spy
    try:
        optimisations.variant("torch.compile, whole generators", 32, 4)
    finally:
        optimisations.build = real_build
    backbones = [m for mod in built["rt"].modules.values() for m in mod.modules() if isinstance(m, Backbone)]
    assert len(backbones) == 2 and all(has_compiled(b) for b in backbones)
    others = [m for name, m in built["rt"].modules.items() if not name.startswith("gen")]
    assert others and not any(has_compiled(m) for m in others)
    assert built["rt"].task.options.concurrent is False  # as "auto" runs compiled modules


def test_memory_table_shows_what_the_low_memory_units_save() -> None:
    # 32 px maps are below the units' default size threshold: make every unit save memory
    out = run("memory.py", "--size", "32", "--width", "4", "--steps", "1", "--low-memory-min-mb", "0")
    rows = {r[0]: r for r in table_rows(out, r"(basic|transfer)")}
    assert set(rows) == {
        "basic",
        "transfer, no branches",
        "transfer, branches",
        "transfer, branches as a loop",
        "transfer, branches as a loop, unfused units",
        "transfer, branches, fused rows",
        "transfer, branches, serial directions",
    }
    saved = {name: float(r[3]) for name, r in rows.items()}
    distinct = {name: float(r[4]) for name, r in rows.items()}
    # the most alive at once is part of everything saved in the step, and backward frees some of it
    # before the generator phase saves more
    assert all(0 < saved[name] <= distinct[name] for name in rows)
    assert saved["basic"] < distinct["basic"]
    loop = saved["transfer, branches as a loop"]
    assert loop < 0.75 * saved["transfer, branches as a loop, unfused units"]
    assert saved["basic"] < loop  # a quarter of the batch
    # stacked copies: the low-memory units keep only their inputs under vmap too
    assert saved["transfer, branches"] < 1.1 * loop
    assert "low-memory units (loop): saved activations" in out
    assert "stacked branches: saved activations" in out
    assert "fused rows: saved activations" in out
    # the counted step runs serially whatever the setting, so the two directions' rows count alike
    assert saved["transfer, branches, serial directions"] == saved["transfer, branches"]
    assert "both directions at once (the default) vs serial directions: peak RSS" in out


def test_memory_counts_saved_storages_once_and_releases_them_with_the_graph() -> None:
    import torch

    counter = benchmark_module("memory")._SavedStorages()
    x = torch.randn(1000, requires_grad=True)  # 4000 bytes per map below
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda held: held.tensor):
        z = x * 2
        first = z.sin() * z.cos()  # z saved twice (one storage), sin(z) and cos(z) once each
        second = (x * 3).exp()  # exp saves its 4000-byte result
    assert counter.live == counter.peak == 4 * 4000
    first.sum().backward()  # backward frees the first graph's saved tensors
    assert counter.live == 4000 and counter.peak == 4 * 4000
    del second  # so does dropping a graph that never ran backward
    assert counter.live == 0 and counter.total == 4 * 4000
    assert torch.allclose(x.grad, 2 * torch.cos(2 * x.detach()) ** 2 - 2 * torch.sin(2 * x.detach()) ** 2)


def test_branch_batching_times_every_variant_and_checks_vmap_against_the_loop() -> None:
    out = run("branch_batching.py", "--sizes", "32", "--width", "4", "--repeat", "1")
    rows = table_rows(out, r"32$")
    assert [r[1] for r in rows] == ["low (ConvBlock1 + HourGlass1)", "top (HourGlass4 + ConvBlock2)"]
    for row in rows:
        one, loop, unfused, mapped, loop_ratio, vmap_ratio, diff = (float(c) for c in row[2:])
        assert min(one, loop, unfused, mapped) > 0
        assert abs(loop_ratio - loop / one) < 0.01 + 0.03 * loop_ratio  # the ratios are of these times
        assert abs(vmap_ratio - mapped / loop) < 0.01 + 0.03 * vmap_ratio
        assert diff < 1e-4  # vmap over stacked copies computes the loop's gradients


def printed_ratio(seconds: float, base: float) -> object:
    """``seconds / base`` within what printing the times (3 decimals) and the ratio (2) can change."""
    ratio = seconds / base
    return pytest.approx(ratio, abs=0.006 + ratio * (0.0005 / seconds + 0.0005 / base))


def test_step_time_compares_every_transfer_variant_in_one_run() -> None:
    out = run("step_time.py", "--sizes", "32", "--width", "4", "--steps", "1", "--warmup", "0",
              "--skip-reference", "--no-bf16")  # fmt: skip
    (row,) = table_rows(out, r"32$")
    ours, plain, overhead = map(float, row[1:4])
    # loop, stacked, fused, separate, vmap copies
    variants = [tuple(map(float, row[i : i + 2])) for i in range(4, 14, 2)]
    naive, copying, ref = map(float, row[14:17])
    assert min(ours, plain, naive, ref, *(t for t, _ in variants)) > 0
    assert overhead == printed_ratio(ours, plain)
    for seconds, ratio in variants:
        assert ratio == printed_ratio(seconds, plain)
    assert 0 < copying < naive  # the copies are timed inside the naive step
    assert row[17] == "-"  # --no-bf16
    low, high = map(float, row[18].split("-"))  # one step per configuration: one round
    assert low == high == pytest.approx(overhead, abs=0.011)
    serial, plain_serial = map(float, row[19:21])  # both directions one after the other, both sides
    assert min(serial, plain_serial) > 0 and float(row[21]) == printed_ratio(serial, plain_serial)
    start = float(re.search(r"measured peak (\d+) GFLOP/s", out).group(1))  # type: ignore[union-attr]
    # ours's FLOPs per step, GFLOP/s, of peak, and the peak: the higher of the start's and the row's
    gflop, rate, of_peak, peak = map(float, row[22:26])
    assert len(row) == 26 and peak >= start
    assert gflop > 0 and rate == pytest.approx(gflop / ours, rel=0.02, abs=1)
    assert of_peak == pytest.approx(rate / peak, rel=0.05, abs=0.0051 + 0.51 / peak)  # printed rounded


def test_grad_check_times_each_phase_against_the_step() -> None:
    out = run("grad_check.py", "--size", "32", "--width", "4", "--repeat", "2", "--threads", "1")
    rows = {r[0]: r for r in table_rows(out, "(discriminator|generator)$")}
    assert set(rows) == {"discriminator", "generator"}
    step = float(re.search(r"one step: ([\d.]+) s", out).group(1))  # type: ignore[union-attr]
    for _, count, elements, ours, norm, share in rows.values():
        assert int(count) > 0 and float(elements) >= 0 and float(norm) >= 0  # tiny here: printed 0.0
        assert float(share) == pytest.approx(float(ours) / 1e3 / step, abs=0.00051 + 0.051e-3 / step)


def test_data_loading_compares_loader_throughput_with_training() -> None:
    out = run("data_loading.py", "--sizes", "32", "--width", "4", "--batches", "4", "--workers", "1")
    (row,) = table_rows(out, r"32$")
    train, *loaders = (float(c) for c in row[1:5])
    assert train > 0 and min(loaders) > 0
    assert float(row[5].rstrip("x")) == pytest.approx(max(loaders) / train, rel=0.01, abs=1)


def test_step_time_only_times_the_variants_asked_for() -> None:
    out = run("step_time.py", "--sizes", "32", "--width", "4", "--steps", "1", "--warmup", "0",
              "--skip-reference", "--only", "loop")  # fmt: skip
    (row,) = table_rows(out, r"32$")
    assert float(row[1]) > 0 and float(row[2]) > 0 and float(row[4]) > 0  # ours, no branches, loop
    assert row[6:18] == ["-"] * 12  # stacked, fused, separate, vmap, naive, copying, ref, bf16: not run
    assert row[19:22] == ["-"] * 3  # serial directions, with and without branches: not run


def test_kernel_table_times_torch_and_the_replacements_on_every_shape() -> None:
    out = run("kernels.py", "--repeat", "1")
    rows = table_rows(out, r"\(")
    assert len(rows) == 8  # benchmarks/kernels.py SHAPES
    for row in rows:
        pad_torch, pad_fold, pad_ratio, in_torch, in_ours, in_ratio = (float(v) for v in row[2:])
        for slow, fast, ratio in ((pad_torch, pad_fold, pad_ratio), (in_torch, in_ours, in_ratio)):
            assert slow > 0 and fast > 0 and ratio > 0
            if fast >= 0.1:  # printed to 3 decimals: the ratio is recomputable where they are large
                assert ratio == pytest.approx(slow / fast, rel=0.02, abs=0.01)
    convs = table_rows(out, r"\d+, \d+ -> \d+, \d+², \d+$")
    assert len(convs) == 9  # benchmarks/kernels.py CONVS
    for row in convs:
        onednn, cl, cl_ratio = float(row[1]), float(row[4]), float(row[5])
        assert onednn > 0 and cl > 0 and cl_ratio > 0
        if row[0].endswith(", 1"):  # the im2col kernel takes no groups
            assert float(row[2]) > 0 and float(row[3]) > 0
        else:
            assert row[2:4] == ["-", "-"]
    norms = table_rows(out, "(IN backward|var_mean fwd\\+bwd)$")
    assert [r[0] for r in norms] == ["IN backward"] * 5 + ["var_mean fwd+bwd"] * 8  # NORM_, VAR_SHAPES
    assert [r[2] for r in norms[5:7]] == ["default", "channels_last"]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 and float(r[5]) > 0 for r in norms)


def test_allocator_table_times_both_settings_in_fresh_processes() -> None:
    out = run(
        "allocator.py", "--sizes", "32", "--width", "4", "--rounds", "1", "--steps", "1", "--warmup", "0"
    )
    (row,) = table_rows(out, r"32$")
    assert row[1] == "ours"
    default, retained, ratio = (float(v) for v in row[2:5])
    assert default > 0 and retained > 0 and ratio == pytest.approx(retained / default, abs=0.01)
    faults = [float(v.replace(",", "")) for v in row[5].split(" -> ")]
    assert len(faults) == 2 and min(faults) > 0
    one_arena, vs_retained = float(row[8]), float(row[9])
    assert one_arena > 0 and vs_retained == pytest.approx(one_arena / retained, abs=0.01)
    assert len(row[10].split(", ")) == 3


def test_one_config_runs_each_configuration_in_its_own_process() -> None:
    out = run(
        "one_config.py", "--size", "32", "--width", "4", "--stage", "2", "--steps", "1", "--rounds", "1",
        "--config", "default=", "--config", "plain=model.channels_last=false;task.concurrent=false",
        "--config", "naive=<naive>",
        "--config", "bwd+clw=<bf16 backward>;<channels_last weights>;model.channels_last=true",
    )  # fmt: skip
    # (the markers that only set the process's environment are tested on child_env below; the
    # order of the rounds on rounds_order)
    names = {"default", "plain", "naive", "bwd+clw"}
    rows = {row[0]: row for row in table_rows(out, "(" + "|".join(map(re.escape, names)) + ")$")}
    assert set(rows) == names and rows["default"][2] == "1.00"
    assert all(float(row[1]) > 0 and float(row[5].replace(",", "")) > 100 for row in rows.values())
    # the kernel's share of a step (system CPU time, minor page faults): counted, and a part of it
    assert all(
        0 <= float(row[6]) < 2 * float(row[1]) + 0.01 and float(row[7].replace(",", "")) >= 0
        for row in rows.values()
    )
    # only the naive configuration copies the shared stages, and its copying is part of its step
    assert all(float(row[3]) == 0 for name, row in rows.items() if name != "naive")
    assert 0 < float(rows["naive"][3]) < float(rows["naive"][1])


def test_one_config_counts_the_same_flops_with_the_directions_at_once_or_not() -> None:
    # with 2 threads the default runs both directions on worker threads, which a FLOP counter on
    # the calling thread would not see: the count comes from serial steps in a process of its own
    out = run(
        "one_config.py", "--size", "32", "--width", "4", "--stage", "1", "--steps", "1", "--threads", "2",
        "--flops", "--config", "default=", "--config", "serial=task.concurrent=false",
    )  # fmt: skip
    steps = {row[0]: float(row[1]) for row in table_rows(out, "(default|serial)$") if len(row) == 8}
    flops = {row[0]: row[1:] for row in table_rows(out, "(default|serial)$") if len(row) == 4}
    assert set(flops) == set(steps) == {"default", "serial"}
    peak = float(re.search(r"measured peak, (\d+) GFLOP/s", out).group(1))  # type: ignore[union-attr]
    assert flops["default"][0] == flops["serial"][0] and float(flops["default"][0]) > 0
    for name, (gflop, rate, of_peak) in flops.items():
        assert float(rate) == pytest.approx(float(gflop) / steps[name], rel=0.05, abs=1)
        # printed rounded: the rate to 1 GFLOP/s, the fraction to 0.01
        assert float(of_peak) == pytest.approx(float(rate) / peak, rel=0.05, abs=0.0051 + 0.51 / peak)


def test_rounds_run_every_configuration_once_each_and_reverse_every_other_round() -> None:
    rounds_order = benchmark_module("interleave").rounds_order
    assert "".join(rounds_order("abc", 4)) == "abccbaabccba"
    assert list(rounds_order(("x",), 0)) == []


def test_one_config_markers_set_the_allocator_environment_of_their_process_only() -> None:
    one_config = benchmark_module("one_config")
    assert one_config.child_env("<one arena>;model.width=4")["MALLOC_ARENA_MAX"] == "1"
    assert one_config.child_env("<top pad>")["MALLOC_TOP_PAD_"] == str(256 << 20)
    assert one_config.child_env("model.width=4;<huge pages>")["THP_MEM_ALLOC_ENABLE"] == "1"
    plain = one_config.child_env("model.width=4")
    assert not {"MALLOC_ARENA_MAX", "MALLOC_TOP_PAD_", "THP_MEM_ALLOC_ENABLE"} & (
        set(plain) - set(os.environ)
    )


def test_inference_table_times_eager_both_layouts_and_onnxruntime() -> None:
    out = run("inference.py", "--size", "32", "--width", "4", "--batch", "2", "--repeat", "2", "--no-compile")
    rows = {row[0]: row for row in table_rows(out, r"(eager|torch\.compile|onnxruntime)")}
    assert set(rows) == {"eager", "eager, channels_last", "onnxruntime"}  # --no-compile: no compiled row
    for name, (_, rate, setup, diff) in rows.items():
        assert float(rate) > 0
        assert float(diff) < 1e-4, name  # every runtime computes the eager model's output
        assert (setup == "-") is name.startswith("eager")


def test_gil_samples_counts_step_samples_per_function(tmp_path, capsys, monkeypatch) -> None:
    gil_samples = benchmark_module("gil_samples")

    raw = tmp_path / "ours.txt"
    raw.write_text(
        'process 7:"python one_config.py";<module> (one_config.py:9);build (step_time.py:97);deepcopy (copy.py:1) 50\n'
        'process 7:"python one_config.py";Thread._bootstrap (threading.py:1);worker (c.py:2);norm_stats (i.py:3) 30\n'
        'process 7:"python one_config.py";<module> (one_config.py:9);train_step (trainer.py:1) 10\n'
        'process 7:"python one_config.py" 4\n'
    )
    total, leaves = gil_samples.read(raw)
    assert total == 44  # the model's building is left out
    assert leaves == {"norm_stats": 30, "train_step": 10, "(no Python frame)": 4}
    half = tmp_path / "plain.txt"
    half.write_text(
        'process 8:"python one_config.py";<module> (one_config.py:9);train_step (trainer.py:1) 22\n'
    )
    monkeypatch.setattr("sys.argv", ["gil_samples.py", "--rate", "200", "--steps", "2", str(raw), str(half)])
    gil_samples.main()
    rows = table_rows(capsys.readouterr().out, r"(ours|plain)\.txt")
    assert [r[:4] for r in rows] == [
        ["ours.txt", "44", "0.110", "1.00"],
        ["plain.txt", "22", "0.055", "0.50"],
    ]
    assert rows[0][4].startswith("norm_stats (30), train_step (10)")

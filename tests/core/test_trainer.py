"""Trainer: stages, phases, metrics, checkpoints, bit-identical resume, mismatch refusal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import branchadapt as ba
from branchadapt.checkpoint import read_tensors, stage_checkpoints
from branchadapt.optim import build_optimizer, build_scheduler
from branchadapt.preflight import stage_sizes
from branchadapt.trainer import Trainer


def train(path: Path, run_dir: Path, overrides=(), max_steps=None):
    exp = ba.load_experiment(path, overrides)
    trainer = Trainer(exp, run_dir=run_dir, device="cpu")
    return trainer, trainer.run(max_steps=max_steps)


def final_state(run_dir: Path, stage: str = "transfer") -> dict[str, torch.Tensor]:
    return read_tensors(run_dir / "stages" / stage / "final.safetensors")


def test_two_stage_run_writes_everything(small_experiment, tmp_path):
    _, result = train(small_experiment(), tmp_path / "run")
    run = tmp_path / "run"
    assert result.completed == ["basic", "transfer"] and result.paused_at is None
    saved = json.loads((run / "config.json").read_text())
    assert saved["experiment"]["stages"]["transfer"]["splitter"]["low"] == 1
    assert (run / "config.toml").read_text().startswith("name = ")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("basic", s) for s in (2, 4, 6)] + [
        ("transfer", s) for s in (2, 4, 6)
    ]
    assert all(r["loss/cross_entropy"] > 0 and "it_s" in r and r["lr"]["main"] > 0 for r in records)
    # keep_last = 2 of the checkpoints at steps 2, 4, 6
    assert [p.name for p in stage_checkpoints(run, "basic")] == ["basic-00000004", "basic-00000006"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # the transfer model has per-group branches for every group
    state = final_state(run)
    assert {k.split(".branches.")[1].split(".")[0] for k in state if ".branches." in k} == {"a", "b", "c"}


def test_transfer_stage_starts_from_basic_weights(small_experiment, tmp_path):
    path = small_experiment()
    train(path, tmp_path / "run", overrides=["stages.transfer.enabled=false"])
    basic = final_state(tmp_path / "run", "basic")
    exp = ba.load_experiment(path)
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    runtime = trainer.build_stage(1, exp.stages[1], trainer.build_source())
    model = runtime.modules["model"]
    for group in ("a", "b", "c"):
        for key, value in model.group_state_dict(group).items():
            assert torch.equal(value, basic[f"model.{key}"]), key


NOISY_MLP = """
import random

import numpy as np
import torch

import branchadapt as ba
from branchadapt.builtin.example import MLPBackbone


class NoisyMLP(MLPBackbone):
    \"\"\"An mlp whose training forward draws from torch's, numpy's and Python's global generators.\"\"\"

    def forward(self, x):
        if self.training:
            noise = torch.randn(x.shape) + float(np.random.randn()) + random.gauss(0.0, 1.0)
            x = x + 0.1 * noise
        return super().forward(x)


@ba.hookimpl
def register_backbones(register):
    register(NoisyMLP, name="noisy_mlp")
"""


@pytest.mark.parametrize("variant", ["plain", "random draws and a decaying schedule"])
def test_resume_is_bit_identical(small_experiment, tmp_path, capfd, variant):
    path = small_experiment(steps=6, ckpt=3)
    if variant != "plain":  # what a resume must restore besides weights and optimiser state
        (tmp_path / "noisy_mlp.py").write_text(NOISY_MLP)
        text = path.read_text().replace('type = "mlp"', 'type = "noisy_mlp"')
        path.write_text(
            'plugins = ["noisy_mlp"]\n' + text + '[optim.default.schedule]\ntype = "linear_decay"\n'
        )
    train(path, tmp_path / "straight")
    _, first = train(path, tmp_path / "resumed", max_steps=3)
    assert first.paused_at == ("basic", 3)
    capfd.readouterr()
    _, second = train(path, tmp_path / "resumed", max_steps=5)  # finishes basic, 2 steps into transfer
    assert second.paused_at == ("transfer", 2)
    assert "stage basic: resuming from " in (said := capfd.readouterr()).out + said.err
    assert "basic-00000003 (step 3)" in said.out + said.err
    train(path, tmp_path / "resumed")
    for stage in ("basic", "transfer"):
        a, b = final_state(tmp_path / "straight", stage), final_state(tmp_path / "resumed", stage)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (stage, key)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_data_keeps_the_steps_trained_and_resumes_after_the_fix(
    small_experiment, tmp_path, monkeypatch, workers
):
    from branchadapt.data import StepData

    path = small_experiment(steps=6, ckpt=3)
    overrides = [f"train.workers={workers}"]
    train(path, tmp_path / "straight", overrides)
    fetch = StepData.__getitem__

    def broken(self, step):  # the transfer stage's 5th batch holds a file that cannot be read
        if self.stage == 1 and step == 4:
            raise ba.UserError("data/b/7.png: cannot decode the image")
        return fetch(self, step)

    monkeypatch.setattr(StepData, "__getitem__", broken)  # worker processes fork with it
    with pytest.raises(ba.UserError) as caught:
        train(path, tmp_path / "run", overrides)
    message = str(caught.value)
    assert message.startswith("data/b/7.png: cannot decode the image\n")  # the data's own message first
    assert "stage transfer: stopped before step 5 of 6; steps 1-4 are in" in message
    assert "Traceback" not in message and "worker" not in message
    assert [p.name for p in stage_checkpoints(tmp_path / "run", "transfer")] == [
        "transfer-00000003",
        "transfer-00000004",  # written when the data failed: checkpoint_every = 3
    ]
    monkeypatch.setattr(StepData, "__getitem__", fetch)  # the file fixed
    train(path, tmp_path / "run", overrides)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_with_other_config_is_refused_and_changes_nothing(small_experiment, tmp_path):
    path = small_experiment()
    train(path, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(
        ba.UserError, match=r"(?s)different experiment.*optim.default.lr: 0.01 -> 0.02"
    ) as info:
        # the train.* change alone would resume: it is not listed among the differences
        train(path, tmp_path / "run", overrides=["optim.default.lr=0.02", 'train.progress="none"'])
    assert "optim.default.lr" in str(info.value) and "progress" not in str(info.value)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}


def test_a_run_dir_that_never_trained_takes_the_corrected_config(small_experiment, tmp_path):
    # a run that stopped at set-up (before its first step) left only its config; the data and
    # batch checks run before even that is written
    from branchadapt.rundir import prepare_run_dir

    path = small_experiment()
    with pytest.raises(ba.UserError, match="have no training data"):
        train(path, tmp_path / "run", overrides=["data.counts.a=0"])
    assert not (tmp_path / "run").exists()
    prepare_run_dir(tmp_path / "run", ba.load_experiment(path, ["data.counts.a=1"]))
    assert (tmp_path / "run" / "config.json").exists()
    train(path, tmp_path / "run")  # the corrected command reuses the directory
    assert (tmp_path / "run" / "stages" / "transfer" / "final.safetensors").exists()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["experiment"]["data"]["counts"]["a"] == 64


def test_a_later_stage_without_data_stops_the_run_before_the_first_step(small_experiment, tmp_path):
    # group b trains only in the transfer stage: its missing data must not wait for basic to finish
    with pytest.raises(ba.UserError, match=r"stages\.transfer: groups \['b'\] have no training data"):
        train(small_experiment(), tmp_path / "run", overrides=["data.counts.b=0"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ba.UserError, match=r"data\.counts: \['d'\] are not groups of the experiment"):
        train(small_experiment(), tmp_path / "run", overrides=["data.counts.d=5"])


def test_a_run_dir_that_is_a_file_is_a_user_error(small_experiment, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ba.UserError, match=r"run directory .*notes.txt is a file; expected a folder"):
        train(small_experiment(), tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_weights_files_take_str_paths_as_well(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ba.build_backbone("mlp", in_features=6, hidden=[8], out_features=3)
    ba.save_weights("out/w.safetensors", {"model": model})  # a str, as a researcher types it
    other = ba.build_backbone("mlp", in_features=6, hidden=[8], out_features=3)
    ba.load_weights("out/w.safetensors", {"model": other})
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_checkpoint_for_another_model_is_refused(small_experiment, tmp_path):
    path = small_experiment()
    train(path, tmp_path / "run", max_steps=2)
    ckpt = stage_checkpoints(tmp_path / "run", "basic")[-1]
    other = ba.branch(
        ba.build_backbone("mlp", in_features=6, hidden=[17, 16], out_features=3), ["a"], splitter="single"
    )
    with pytest.raises(
        ba.CheckpointError,
        match=r"shape mismatch: model\.backbone\.input\.0\.weight: file \(16, 6\) vs model \(17, 6\)",
    ):
        ba.load_checkpoint(ckpt, {"model": other})
    renamed = {"net": other}
    with pytest.raises(ba.CheckpointError, match="modules in the file but not in the model"):
        ba.load_checkpoint(ckpt, renamed)
    same = ba.branch(
        ba.build_backbone("mlp", in_features=6, hidden=[16, 16], out_features=3), ["a"], splitter="single"
    )
    with pytest.raises(ba.CheckpointError, match="config_hash"):
        ba.load_checkpoint(ckpt, {"model": same}, expect={"config_hash": "0000"})


def test_corrupt_checkpoint_is_a_clear_error(small_experiment, tmp_path):
    path = small_experiment()
    train(path, tmp_path / "run", max_steps=2)
    ckpt = stage_checkpoints(tmp_path / "run", "basic")[-1]
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ba.CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        train(path, tmp_path / "run")


def test_bf16_autocast_switch_trains(small_experiment, tmp_path):
    path = small_experiment(steps=2)
    _, result = train(path, tmp_path / "bf16", overrides=['precision="bf16"'])
    assert result.completed == ["basic", "transfer"]
    train(path, tmp_path / "fp32")
    low, full = final_state(tmp_path / "bf16"), final_state(tmp_path / "fp32")
    assert all(torch.isfinite(v).all() for v in low.values())
    # the same seed and batches: only the forward's precision differs, and it shows in the weights
    assert any(not torch.equal(low[k], full[k]) for k in full)


def test_each_batch_row_carries_the_group_its_item_was_planned_for(small_experiment):
    from branchadapt.builtin.example import ClusterData
    from branchadapt.builtin.samplers import PerGroupOptions, PerGroupSampler
    from branchadapt.data import StepData

    groups = ["a", "b", "c"]
    source = ClusterData(ClusterData.Options(counts={"a": 8, "b": 5, "c": 6}), groups, Path("."))
    sampler = PerGroupSampler(PerGroupOptions(per_group=2), source.sizes(), seed=0)
    data = StepData(source, sampler, groups, seed=0)
    for step in range(3):
        picks = data.plan(step)["train"]
        batch = data[step]["train"]
        assert (
            batch["group"].tolist() == [groups.index(g) for g, _ in picks]
            and len(set(batch["group"].tolist())) == 3
        )
        want = torch.stack([source.get(g, "train", i, None)["x"] for g, i in picks])
        assert torch.equal(batch["x"], want)  # each row is its planned item


def test_optimizer_and_schedule_options():
    p = torch.nn.Parameter(torch.zeros(2))
    spec = ba.Experiment.model_fields["optim"].annotation  # dict[str, OptimSpec]
    from branchadapt.config import OptimSpec

    opt = build_optimizer(OptimSpec(type="adamw", lr=0.1, betas=(0.5, 0.9), weight_decay=0.01), [p])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.5, 0.9) and opt.param_groups[0]["weight_decay"] == 0.01
    sched = build_scheduler(OptimSpec(lr=1.0, schedule={"type": "linear_decay", "start": 0.5}), opt, 10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0] / 0.1)
        opt.step()
        sched.step()
    assert lrs[:5] == [1.0] * 5 and lrs[5] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.2)
    assert spec is not None


def _adam_run(fused: bool) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    from branchadapt.config import OptimSpec

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64))
    opt = build_optimizer(OptimSpec(lr=1e-2, betas=(0.5, 0.999), weight_decay=1e-4), [p], fused=fused)
    for _ in range(5):
        p.grad = torch.sin(p.detach() * 3)
        opt.step()
    return opt, p.detach()


def test_fused_optimizer_kernels_are_the_same_maths():
    fused, a = _adam_run(True)
    plain, b = _adam_run(False)
    assert fused.param_groups[0]["fused"] is True
    assert not plain.param_groups[0]["fused"]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    from branchadapt.config import OptimSpec

    ints = torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    # no fused kernel for integers: torch's default
    assert not build_optimizer(OptimSpec(), [ints]).param_groups[0]["fused"]


@pytest.mark.parametrize("fused", [True, False])
def test_trainer_builds_fused_optimizers_unless_switched_off(small_experiment, tmp_path, fused):
    exp = ba.load_experiment(small_experiment(), [f"train.fused_optimizers={str(fused).lower()}"])
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    runtime = trainer.build_stage(0, exp.stages[0], trainer.build_source())
    assert runtime.optimizers and all(
        bool(g["fused"]) is fused for opt in runtime.optimizers.values() for g in opt.param_groups
    )


def test_resume_keeps_this_runs_optimizer_kernels(tmp_path):
    from branchadapt.optimstate import load_optimizer_state, optimizer_state

    saved, _ = _adam_run(False)
    tensors, meta = optimizer_state({"main": saved})
    resumed, _ = _adam_run(True)
    load_optimizer_state({"main": resumed}, tensors, json.loads(json.dumps(meta)))
    assert resumed.param_groups[0]["fused"] is True  # the checkpoint's foreach choice is not imposed
    assert torch.equal(resumed.state_dict()["state"][0]["exp_avg"], saved.state_dict()["state"][0]["exp_avg"])


def test_evaluate_reports_per_group_accuracy(small_experiment, tmp_path, run_cli):
    from branchadapt.evaluation import evaluate_run

    _, _ = train(small_experiment(), tmp_path / "run")
    report = evaluate_run(tmp_path / "run", device="cpu")
    saved = json.loads((tmp_path / "run" / "eval" / "transfer-test" / "metrics.json").read_text())
    assert "accuracy" in (tmp_path / "run" / "eval" / "transfer-test" / "report.html").read_text()
    assert saved["groups"] == report["groups"] and set(saved["groups"]) == {"a", "b", "c"}
    # recompute group b's accuracy by hand from its own extracted model
    exp = ba.load_experiment(tmp_path / "exp.toml")
    test = exp.data.cls(exp.data.options, ("a", "b", "c"), tmp_path, "test")
    model = ba.branch(
        ba.build_backbone("mlp", in_features=6, hidden=[16, 16], out_features=3),
        ["a", "b", "c"],
        low=1,
        top=1,
    )
    ba.load_weights(tmp_path / "run" / "stages" / "transfer" / "final.safetensors", {"model": model})
    single = model.extract("b").eval()
    items = [test.get("b", "train", i, None) for i in range(test.sizes()["b"]["train"])]
    x = torch.stack([it["x"] for it in items])
    y = torch.tensor([it["y"] for it in items])
    expected = float((single(x).argmax(1) == y).float().mean())
    assert report["groups"]["b"]["accuracy"] == pytest.approx(expected)
    out = run_cli("evaluate", str(tmp_path / "run"), "--stage", "basic")
    assert out.returncode == 0, out.stderr
    assert "stage basic on the test split" in out.stdout and "accuracy" in out.stdout
    bad = run_cli("evaluate", str(tmp_path))
    assert bad.returncode == 2 and "not a run directory" in bad.stderr
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    nope = run_cli("evaluate", str(tmp_path / "run"), "--split", "nope")
    assert nope.returncode == 2 and "Traceback" not in nope.stderr
    assert "data split 'nope' does not exist; ClusterData has 'train', 'test'" in nope.stderr
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before  # nothing written


def test_an_evaluation_that_refuses_an_option_names_the_experiment_file_then_the_key(
    small_experiment, tmp_path, monkeypatch
):
    from branchadapt.builtin.example import SupervisedTask
    from branchadapt.evaluation import evaluate_run

    path = small_experiment()
    train(path, tmp_path / "run")

    def refuses(self, modules, source, device, out_dir):  # type: ignore[no-untyped-def]
        raise ba.UserError("task.judge: weights file /gone.pth does not exist")

    monkeypatch.setattr(SupervisedTask, "evaluate", refuses)
    with pytest.raises(ba.UserError, match=rf"^{re.escape(str(path))}: task\.judge: weights file /gone\.pth"):
        evaluate_run(tmp_path / "run", device="cpu")


def test_evaluation_reads_its_split_without_training_augmentation(small_experiment, tmp_path, monkeypatch):
    from branchadapt import evaluation
    from branchadapt.builtin.example import ClusterData, SupervisedTask

    train(small_experiment(), tmp_path / "run")
    seen = []
    original = SupervisedTask.evaluate

    def evaluate(self, modules, source, device, out_dir):
        seen.append((source.split, source.training))
        return original(self, modules, source, device, out_dir)

    monkeypatch.setattr(SupervisedTask, "evaluate", evaluate)
    # a source keeping its own data under a base-class name: evaluation sets the flag, calls nothing
    monkeypatch.setattr(ClusterData, "train", [], raising=False)
    evaluation.evaluate_run(tmp_path / "run", split="train", device="cpu")
    assert seen == [("train", False)]  # evaluation mode: a source must not augment


def test_task_samples_are_written_every_n_steps_in_eval_mode(small_experiment, tmp_path, monkeypatch):
    from branchadapt.builtin.example import SupervisedTask

    calls = []

    def samples(self, modules, source, device, out_dir, step):
        calls.append((out_dir.name, step, [m.training for m in modules.values()], torch.is_grad_enabled()))
        return []

    monkeypatch.setattr(SupervisedTask, "samples", samples)
    _, result = train(small_experiment(steps=6), tmp_path / "run", ["train.sample_every=4"])
    assert result.completed == ["basic", "transfer"]
    # every 4 steps and at the end of each stage, modules in eval mode, no autograd
    assert [(stage, step) for stage, step, _, _ in calls] == [
        ("basic", 4),
        ("basic", 6),
        ("transfer", 4),
        ("transfer", 6),
    ]
    assert all(modes == [False] for _, _, modes, _ in calls)
    assert not any(grad for *_, grad in calls)


@pytest.fixture
def sigint_default():
    """SIGINT handled as in a terminal (a script's background job, pytest's included, ignores it)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_keeps_the_step_in_progress_and_resumes_after_it(
    small_experiment, tmp_path, monkeypatch, sigint_default
):
    import os
    import signal

    path = small_experiment(steps=6, ckpt=5)
    train(path, tmp_path / "straight")
    exp = ba.load_experiment(path)
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    plain_step = Trainer.train_step
    calls = []

    def step_with_ctrl_c(self, rt, batch, step=None):
        calls.append(rt.stage.name)
        if len(calls) == 6 + 3:  # the transfer stage's 3rd step: the signal arrives mid-step
            os.kill(os.getpid(), signal.SIGINT)
        return plain_step(self, rt, batch, step)

    monkeypatch.setattr(Trainer, "train_step", step_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    assert calls.count("transfer") == 3  # the step in progress finished, no other began
    assert [p.name for p in stage_checkpoints(tmp_path / "run", "transfer")] == ["transfer-00000003"]
    monkeypatch.setattr(Trainer, "train_step", plain_step)
    train(path, tmp_path / "run")
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_stage_logs_each_step_once(small_experiment, tmp_path):
    path = small_experiment(steps=6, ckpt=2)
    import shutil

    train(path, tmp_path / "run", max_steps=5)  # basic logged at 2, 4 and 5, checkpointed at 4 and 5
    # a hard kill after step 5 was logged but before its checkpoint was written
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "basic-00000005")
    log = tmp_path / "run" / "metrics.jsonl"
    train(path, tmp_path / "run")  # resumes from step 4
    steps = [(r["stage"], r["step"]) for r in map(json.loads, log.read_text().splitlines())]
    assert steps == [("basic", s) for s in (2, 4, 6)] + [("transfer", s) for s in (2, 4, 6)]


def test_folders_that_are_not_checkpoints_are_left_alone(small_experiment, tmp_path):
    path = small_experiment(steps=6, ckpt=2)
    train(path, tmp_path / "run", max_steps=4)
    backup = tmp_path / "run" / "checkpoints" / "basic-backup"
    backup.mkdir()
    assert [p.name for p in stage_checkpoints(tmp_path / "run", "basic")] == [
        "basic-00000002",
        "basic-00000004",
    ]
    train(path, tmp_path / "run")
    assert backup.is_dir()


def test_a_run_directory_that_cannot_be_written_is_a_user_error(small_experiment, tmp_path, monkeypatch):
    import branchadapt.rundir as rundir

    path = small_experiment()
    monkeypatch.setattr(
        Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only file system"))
    )
    with pytest.raises(
        ba.UserError, match=r"run directory .*new cannot be written \(Read-only file system\)"
    ):
        train(path, tmp_path / "new")
    monkeypatch.undo()
    train(path, tmp_path / "run", max_steps=2)
    monkeypatch.setattr(rundir.os, "access", lambda *a: False)
    with pytest.raises(ba.UserError, match=r"run directory .*run is not writable"):
        train(path, tmp_path / "run")


def test_a_long_config_difference_says_how_many_more(small_experiment, tmp_path, monkeypatch):
    path = small_experiment()
    monkeypatch.chdir(tmp_path)
    train(path.name, tmp_path / "run")  # a relative experiment path
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["source"] == str(path)  # absolute: the run's relative paths resolve from anywhere
    changes = [f"stages.transfer.steps={7 + i}" for i in range(1)] + [
        "optim.default.lr=0.02",
        "seed=4",
        "optim.default.weight_decay=0.1",
        "data.features=7",
        "model.in_features=7",
        "model.hidden=[8, 8, 8]",
    ]
    with pytest.raises(ba.UserError) as caught:
        train(path, tmp_path / "run", overrides=changes)
    lines = str(caught.value).splitlines()
    assert sum(1 for line in lines if ": " in line and " -> " in line) == 10
    assert re.search(r"^  \.\.\. and \d+ more$", "\n".join(lines), re.M)


def test_a_batch_that_does_not_split_over_the_processes_stops_before_anything_is_written(
    small_experiment, tmp_path
):
    from branchadapt.distributed import DistInfo

    path = small_experiment()  # basic: 4 items of one group a step; transfer: 2 of each of 3 groups
    exp = ba.load_experiment(path, ["stages.transfer.sampler.per_group=1"])
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    trainer.dist = DistInfo(rank=0, world=2)  # what torchrun --nproc-per-node 2 would give
    with pytest.raises(ba.ConfigError) as caught:
        trainer.run()
    assert (
        "stages.transfer.sampler (per_group): the global batch of stream 'train' has 3 items, not a "
        in str(caught.value)
    )
    assert "multiple of the 2 processes" in str(caught.value)
    assert not (tmp_path / "run").exists()  # stage basic did not train first


def test_a_group_missing_a_stream_the_others_have_is_pointed_out(small_experiment, tmp_path, capsys):
    exp = ba.load_experiment(small_experiment())
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")

    class Source:
        def sizes(self):
            return {
                "a": {"photo": 5, "cartoon": 5},
                "b": {"photo": 3, "cartoon": 0},
                "c": {"photo": 2, "cartoon": 1},
            }

    sizes = stage_sizes(trainer, exp.stages[1], Source())
    assert sizes["b"] == {"photo": 3, "cartoon": 0}
    err = capsys.readouterr().err
    assert (
        "note: stages.transfer: group b has no items in stream(s) ['cartoon'] that other groups have" in err
    )
    assert "group c" not in err and "group a" not in err


def test_a_gradient_that_is_not_finite_stops_the_run_before_it_reaches_the_weights(
    small_experiment, tmp_path, monkeypatch
):
    from branchadapt.interfaces import Task

    exp = ba.load_experiment(small_experiment(steps=6, ckpt=2))
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    built = []
    plain_build, plain_backward = Trainer.build_stage, Task.backward

    def build_stage(self, *args):
        built.append(plain_build(self, *args))
        return built[-1]

    def backward(self, phase, loss, scratch):  # the third step's gradient of one weight turns NaN
        plain_backward(self, phase, loss, scratch)
        backward.calls += 1
        if backward.calls == 3:
            next(built[-1].modules["model"].parameters()).grad[0, 0] = float("nan")

    backward.calls = 0
    monkeypatch.setattr(Trainer, "build_stage", build_stage)
    monkeypatch.setattr(Task, "backward", backward)
    with pytest.raises(ba.TrainingDiverged) as caught:
        trainer.run()
    message = str(caught.value)
    assert message.startswith(
        "stage basic, step 3: phase main's gradients not finite (1 parameter, first model."
    )
    assert "that update was not applied" in message and "The step's data: a/train[" in message
    weights = built[-1].modules["model"].state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())  # the NaN never reached a weight
    saved = read_tensors(tmp_path / "run" / "checkpoints" / "basic-00000002" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_gradient_check_finds_any_non_finite_value_of_any_float_dtype(bad):
    from branchadapt.divergence import finite_gradients

    params = [
        torch.nn.Parameter(torch.zeros(5, dtype=d)) for d in (torch.float32, torch.float64, torch.bfloat16)
    ]
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped
    for p in params[:3]:
        p.grad = torch.full_like(p, 1e30 if p.dtype == torch.float64 else 3.0)
    assert finite_gradients(params)
    for p in params[:3]:
        p.grad[4] = bad
        assert not finite_gradients(params), p.dtype
        p.grad[4] = 1.0
    assert finite_gradients(params) and params[0].grad[0] == 3.0  # checking leaves the gradients alone


def test_an_evaluation_that_cannot_write_its_results_says_so(small_experiment, tmp_path, monkeypatch):
    import branchadapt.evaluation as evaluation

    train(small_experiment(), tmp_path / "run")
    # a read-only run directory: readable, not writable
    monkeypatch.setattr(evaluation.os, "access", lambda path, mode: mode != evaluation.os.W_OK)
    with pytest.raises(ba.UserError, match=r"eval/transfer-test is not writable"):
        evaluation.evaluate_run(tmp_path / "run", device="cpu")
    monkeypatch.undo()
    monkeypatch.setattr(
        Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only file system"))
    )
    with pytest.raises(ba.UserError, match=r"eval/basic-test cannot be created \(Read-only file system\)"):
        evaluation.evaluate_run(tmp_path / "run", stage="basic", device="cpu")


def test_an_ignored_sigint_stays_ignored():
    import signal

    from branchadapt.interrupt import StopRequest

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a script's background job
    try:
        with StopRequest():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with StopRequest() as request:
            assert signal.getsignal(signal.SIGINT) == request._handle
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_validate_checks_the_batch_split_for_a_number_of_processes(small_experiment, capsys):
    from branchadapt.cli import main as cli

    path = str(small_experiment())
    odd = ["--set", "stages.transfer.sampler.per_group=1"]  # 3 groups: 3 items a step
    assert cli(["validate", path, *odd]) == 0  # one process: any batch
    assert cli(["validate", path, *odd, "--processes", "2"]) == 2
    err = capsys.readouterr().err
    assert "stages.transfer.sampler (per_group): the global batch of stream 'train' has 3 items" in err
    assert cli(["validate", path, *odd, "--processes", "3"]) == 2  # every stage: basic has 4 items
    assert "stages.basic.sampler (per_group): the global batch of stream 'train' has 4 items" in (
        capsys.readouterr().err
    )
    assert cli(["validate", path, *odd, "--set", "stages.basic.sampler.per_group=3", "--processes", "3"]) == 0
    assert "batches split over 3 processes)" in capsys.readouterr().out
    # with --data the cheap check still comes first: no item is read for a batch that cannot split
    import branchadapt.datacheck as datacheck

    def reads(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("every item read before the batch split was checked")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datacheck, "check_data", reads)
        assert cli(["validate", path, *odd, "--processes", "2", "--data"]) == 2
    assert "the global batch of stream 'train' has 3 items" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse: at least 1
        cli(["validate", path, "--processes", "0"])
    assert usage.value.code == 2 and "--processes: expected at least 1, got 0" in capsys.readouterr().err


def test_a_metrics_record_cut_short_by_a_kill_is_dropped_on_resume(small_experiment, tmp_path):
    path, run = small_experiment(), tmp_path / "run"
    train(path, run, max_steps=4)  # checkpoint and records at steps 2 and 4 of basic
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as fh:
        fh.write('{"stage": "basic", "step": 6, "lo')  # killed while writing the next record
    train(path, run)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole
    assert [(r["stage"], r["step"]) for r in records] == [("basic", s) for s in (2, 4, 6)] + [
        ("transfer", s) for s in (2, 4, 6)
    ]


def test_a_damaged_latest_checkpoint_says_how_to_resume_from_the_one_before(small_experiment, tmp_path):
    import shutil

    path, run = small_experiment(), tmp_path / "run"
    train(path, run, max_steps=4)  # checkpoints at steps 2 and 4
    latest = run / "checkpoints" / "basic-00000004"
    (latest / "state.safetensors").write_bytes(b"\0" * 10)  # damaged on disk
    with pytest.raises(ba.CheckpointError) as caught:
        train(path, run)
    assert not isinstance(caught.value, ba.CheckpointMismatch)
    assert f"move {latest} out of the run directory and run again to resume from " in str(caught.value)
    assert str(caught.value).endswith("basic-00000002")
    shutil.move(latest, tmp_path / "damaged")
    _, result = train(path, run)  # from step 2: the same weights as a run never interrupted
    assert result.completed == ["basic", "transfer"]
    train(path, tmp_path / "whole")
    resumed, whole = final_state(run), final_state(tmp_path / "whole")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_stage_started_again_from_step_0_drops_its_earlier_records(small_experiment, tmp_path):
    import shutil

    path, run = small_experiment(), tmp_path / "run"
    train(path, run, max_steps=4)
    shutil.rmtree(run / "checkpoints")  # killed before its first checkpoint, say: a rerun starts at 0
    metrics = run / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [2, 4]
    with metrics.open("a") as fh:
        fh.write('{"stage": "basic", "step": 5, "lo')  # killed while writing
    train(path, run)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("basic", s) for s in (2, 4, 6)] + [
        ("transfer", s) for s in (2, 4, 6)
    ]


def test_an_evaluation_replaces_the_earlier_one_whole_and_a_failed_one_keeps_it(
    small_experiment, tmp_path, monkeypatch
):
    from branchadapt.builtin.example import SupervisedTask
    from branchadapt.evaluation import evaluate_run

    run = tmp_path / "run"
    train(small_experiment(steps=2), run)
    first = evaluate_run(run)
    folder = Path(first["path"]).parent
    (folder / "stale.png").write_bytes(b"an earlier evaluation's figure")
    second = evaluate_run(run)
    assert second["path"] == first["path"] and not (folder / "stale.png").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "report.html"]
    kept = (folder / "metrics.json").read_bytes()

    def fails(self, modules, source, device, out_dir):  # type: ignore[no-untyped-def]
        (out_dir / "half.png").write_bytes(b"written before the failure")
        raise ba.UserError("test/b/3.png: cannot decode")

    monkeypatch.setattr(SupervisedTask, "evaluate", fails)
    with pytest.raises(ba.UserError, match="cannot decode"):
        evaluate_run(run)
    assert (folder / "metrics.json").read_bytes() == kept and not (folder / "half.png").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no half-written folder

"""The command line: user errors exit 2 with one message and never a traceback."""

from __future__ import annotations

import pytest

from branchadapt.cli import main


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "does-not-exist.toml"], "not found"),
        (["validate", "{bad}"], "not valid TOML"),
        (["run", "{exp}", "--device", "cuda:3"], "CUDA is not available"),
        (["run", "{exp}", "--set", "stages.basic.sampler.type=per_grup"], "did you mean 'per_group'"),
        (["validate", "{exp}", "--set", "nonsense"], "expected KEY.PATH=VALUE"),
        (
            ["validate", "{exp}", "--set", "stages.tranfer.steps=3"],
            "no stage 'tranfer'; did you mean 'transfer'?",
        ),
        (["validate", "{exp}", "--set", "device=tpu"], "expected auto, cpu, cuda, cuda:N or mps (got 'tpu')"),
        (["run", "{exp}", "--run-dir", "{bad}"], "is a file; expected a folder"),
    ],
)
def test_user_errors_exit_2(args, expected, small_experiment, tmp_path, run_cli):
    exp = small_experiment()
    bad = tmp_path / "bad.toml"
    bad.write_text("[stages\n")
    out = run_cli(*[a.format(exp=exp, bad=bad) for a in args], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and expected in out.stderr
    assert "Traceback" not in out.stderr


def test_max_steps_must_be_positive(small_experiment, tmp_path, run_cli):
    out = run_cli("run", str(small_experiment()), "--max-steps", "-5", cwd=tmp_path)
    assert out.returncode == 2 and "argument --max-steps: expected at least 1, got -5" in out.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_run_prints_progress_lines_and_resumes(small_experiment, tmp_path, run_cli):
    exp = small_experiment(steps=4)
    run_dir = tmp_path / "run"
    first = run_cli("run", str(exp), "--run-dir", str(run_dir), "--max-steps", "2")
    assert first.returncode == 0, first.stderr
    assert "[basic] step 2/4" in first.stderr and "it/s" in first.stderr and "eta" in first.stderr
    assert "paused in stage basic at step 2" in first.stderr
    second = run_cli("run", str(exp), "--run-dir", str(run_dir))
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr and "basic-00000002" in second.stderr
    assert "done: stages basic, transfer" in second.stderr


def test_corrupt_checkpoint_via_cli(small_experiment, tmp_path, run_cli):
    exp = small_experiment(steps=4)
    run_dir = tmp_path / "run"
    assert run_cli("run", str(exp), "--run-dir", str(run_dir), "--max-steps", "2").returncode == 0
    meta = run_dir / "checkpoints" / "basic-00000002" / "meta.json"
    meta.write_text("{ truncated")
    out = run_cli("run", str(exp), "--run-dir", str(run_dir))
    assert out.returncode == 2
    assert "meta.json: corrupt checkpoint metadata" in out.stderr
    assert meta.read_text() == "{ truncated"  # nothing already written is lost


def test_plain_progress_lines_show_every_metric_and_the_rich_line_the_totals_first():
    from branchadapt.progress import format_metrics

    metrics = {f"loss/term{i}": float(i) for i in range(8)} | {"total/generator": 9.0}
    assert (
        format_metrics(metrics) == " ".join(f"loss/term{i}={i:.4g}" for i in range(8)) + " total/generator=9"
    )
    short = format_metrics(metrics, limit=3).split()
    assert short == ["total/generator=9", "loss/term0=0", "loss/term1=1"]


def test_validate_checks_and_builds_what_a_run_would_without_writing(small_experiment, tmp_path, run_cli):
    exp = small_experiment()
    ok = run_cli("validate", str(exp), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    # every stage built: 6-16-16-3 has 435 weights; the transfer stage adds two more groups'
    # copies of the lowest (6x16 + 16) and top (16x3 + 3) layers
    assert "stage basic: 6 steps" in ok.stdout and "trainable parameters model 435\n" in ok.stdout
    assert "trainable parameters model 761\n" in ok.stdout
    # a group without training data is found as a run would find it, before anything is written
    empty = run_cli("validate", str(exp), "--set", "data.counts={a=64,b=0,c=8}", cwd=tmp_path)
    assert empty.returncode == 2
    assert "stages.transfer: groups ['b'] have no training data" in empty.stderr
    assert "OK" not in empty.stdout
    # a model built for other inputs than the data's is run on them (one row per group of the stage)
    shapes = run_cli("validate", str(exp), "--set", "model.in_features=5", cwd=tmp_path)
    assert shapes.returncode == 2
    assert "stages.basic: module 'model' cannot take inputs shaped as the data's ((1, 6))" in shapes.stderr
    assert "mat1 and mat2 shapes cannot be multiplied" in shapes.stderr
    key = run_cli("validate", str(exp), "--set", "task.input_key=z", cwd=tmp_path)
    assert key.returncode == 2 and "Traceback" not in key.stderr
    assert (
        "task 'supervised' cannot make inputs for module 'model' from the data: KeyError: 'z'" in key.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.toml"]


BAD_LOSS = """
import torch
import branchadapt as ba

class Misfit(ba.LossTerm):
    \"\"\"Multiplies the logits by a vector of another length: torch's error, at the first step.\"\"\"
    def forward(self, outputs, batch):
        return (outputs["logits"] @ torch.ones(5)).mean()

@ba.hookimpl
def register_losses(register):
    register(Misfit, name="misfit")
"""


def test_a_first_step_that_fails_is_one_message_with_its_cause(small_experiment, tmp_path, run_cli):
    (tmp_path / "misfit_loss.py").write_text(BAD_LOSS)
    exp = small_experiment(steps=2)
    exp.write_text('plugins = ["misfit_loss"]\n' + exp.read_text())
    bad = ["--set", "losses.misfit.weight=1"]
    out = run_cli("run", str(exp), *bad, cwd=tmp_path)
    assert out.returncode == 2
    assert "error: stage basic: step 1 failed: RuntimeError: size mismatch" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "set BRANCHADAPT_TRACEBACK=1" in out.stderr
    shown = run_cli("run", str(exp), *bad, cwd=tmp_path, env={"BRANCHADAPT_TRACEBACK": "1"})
    assert shown.returncode == 2 and "Traceback" in shown.stderr and "misfit_loss.py" in shown.stderr
    fixed = run_cli("run", str(exp), "--no-eval", cwd=tmp_path)  # the same run directory takes the fix
    assert fixed.returncode == 0, fixed.stderr


def test_a_model_that_cannot_take_the_data_is_refused_before_anything_is_written(
    small_experiment, tmp_path, run_cli
):
    exp = small_experiment(steps=2)
    # found by running every stage's models on inputs shaped as the data's, before the first step
    out = run_cli("run", str(exp), "--set", "model.in_features=5", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "stages.basic: module 'model' cannot take inputs shaped as the data's ((1, 6))" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.toml"]  # no run directory


def test_only_the_first_step_s_errors_are_turned_into_user_errors():
    from branchadapt.errors import StepFailed, first_step

    boom = "stage s: step 4 failed: RuntimeError: boom"
    with pytest.raises(StepFailed, match=boom) as info, first_step("s", 4):
        raise RuntimeError("boom")
    assert isinstance(info.value.__cause__, RuntimeError)
    # a later step ran the same code: a bug, as it is
    with pytest.raises(RuntimeError, match="boom"), first_step("s", 5, first=False):
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), first_step("s", 1):
        raise KeyboardInterrupt
    # the machine's failures, not the options': as they are
    import torch

    with pytest.raises(torch.OutOfMemoryError), first_step("s", 1):
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_a_loss_reading_what_the_task_does_not_give_is_refused_before_anything_is_written(
    small_experiment, tmp_path, monkeypatch
):
    import branchadapt as ba
    from branchadapt.builtin.example import CrossEntropy
    from branchadapt.trainer import Trainer

    monkeypatch.setattr(CrossEntropy, "reads", ("logits", "features"))
    trainer = Trainer(ba.load_experiment(small_experiment()), run_dir=tmp_path / "run", device="cpu")
    with pytest.raises(
        ba.ConfigError,
        match=r"stages\.basic\.losses\.cross_entropy: loss 'cross_entropy' "
        r"reads task outputs \['features'\], which task 'supervised' does not give",
    ):
        trainer.run()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["optim.mian", "stages.transfer.optim.mian"])
def test_an_optimiser_for_a_phase_the_task_lacks_is_refused_before_anything_is_written(
    small_experiment, tmp_path, capsys, key
):
    path = small_experiment()
    assert main(["validate", str(path), "--set", f"{key}.lr=0.5"]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: {key}: 'mian' is not a phase of task 'supervised'; expected one of ['main'] or "
        "'default'\n"
    )
    assert main(["run", str(path), "--set", f"{key}.lr=0.5", "--run-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    assert main(["validate", str(path), "--set", "optim.main.lr=0.5"]) == 0  # the phase's own name


def test_initial_weights_options_must_name_options_with_defaults(small_experiment, monkeypatch):
    import branchadapt as ba
    from branchadapt.builtin.example import MLPBackbone
    from branchadapt.runtime import backbone_factory

    exp = ba.load_experiment(small_experiment())
    monkeypatch.setattr(MLPBackbone, "initial_weights_options", ("hidden",))
    assert backbone_factory(exp.model, initial_weights=False)().options.hidden == MLPBackbone.Options().hidden
    assert backbone_factory(exp.model)().options.hidden == [16, 16]
    monkeypatch.setattr(MLPBackbone, "initial_weights_options", ("weights",))  # not an option
    with pytest.raises(TypeError, match=r"initial_weights_options names \['weights'\]"):
        backbone_factory(exp.model, initial_weights=False)


def test_trying_inputs_lets_out_of_memory_through_and_skips_finished_stages(
    small_experiment, tmp_path, monkeypatch
):
    import torch

    import branchadapt as ba
    from branchadapt.preflight import check_inputs, check_stages
    from branchadapt.trainer import Trainer

    trainer = Trainer(ba.load_experiment(small_experiment()), run_dir=tmp_path / "run", device="cpu")
    source = check_stages(trainer)
    check_inputs(trainer, source)  # the experiment's models take its data

    def full(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("out of memory")

    def cpu_full(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    for failure, kind in ((full, torch.OutOfMemoryError), (cpu_full, RuntimeError)):
        with monkeypatch.context() as patch:
            patch.setattr(ba.BranchedModel, "forward", failure)
            with pytest.raises(kind) as caught:  # the machine's limit, not a bad option
                check_inputs(trainer, source)
            assert not isinstance(caught.value, ba.UserError)
    trainer.run()
    monkeypatch.setattr(ba.BranchedModel, "forward", full)
    check_inputs(trainer, source)  # both stages finished: nothing is built or run again


def test_running_out_of_memory_is_one_message_not_a_misfit_and_keeps_the_checkpoint(
    small_experiment, tmp_path, monkeypatch, capsys
):
    import branchadapt as ba

    path = small_experiment()
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--run-dir", str(run_dir), "--max-steps", "2", "--no-eval"]) == 0
    written = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    calls = {"n": 0}
    forward = ba.BranchedModel.forward

    def full_later(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1  # the check before the run passes; a training step runs out
        if calls["n"] > 2:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"
            )
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ba.BranchedModel, "forward", full_later)
    assert main(["run", str(path), "--run-dir", str(run_dir), "--no-eval"]) == 1
    err = capsys.readouterr().err
    assert "\nerror: out of memory: RuntimeError: [enforce fail" in err, err
    assert "may not fit together" not in err and "a changed experiment does not resume this one" in err
    assert all(p.read_bytes() == data for p, data in written.items())  # nothing written is lost


def test_under_torchrun_a_process_that_runs_out_of_memory_names_its_rank(tmp_path, monkeypatch, capsys):
    import torch

    from branchadapt import cli, rundir

    def out_of_memory(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rundir, "load_for_run", out_of_memory)  # what `run` loads the experiment with
    assert cli.main(["run", str(tmp_path / "x.toml")]) == 1
    assert capsys.readouterr().err.startswith("error: out of memory: OutOfMemoryError: CUDA out of memory")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["run", str(tmp_path / "x.toml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error (rank 1 of 2): out of memory: OutOfMemoryError: CUDA out of memory"), err


def test_running_out_of_memory_in_the_evaluation_after_training_skips_it(
    small_experiment, tmp_path, monkeypatch, capfd
):
    from branchadapt.builtin.example import SupervisedTask

    def full(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(SupervisedTask, "evaluate", full)
    assert main(["run", str(small_experiment(steps=2)), "--run-dir", str(tmp_path / "run")]) == 0
    out = "".join(capfd.readouterr())
    assert "done: stages basic, transfer" in out and "evaluation skipped: [enforce fail" in out

    def bug(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("a bug in the task")

    monkeypatch.setattr(SupervisedTask, "evaluate", bug)
    with pytest.raises(ZeroDivisionError):  # a bug is not hidden
        main(["run", str(small_experiment(steps=2)), "--run-dir", str(tmp_path / "run")])


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory", True),
        ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
        ("MPS backend out of memory (MPS allocated: 8.00 GB)", True),
        ("mat1 and mat2 shapes cannot be multiplied (4x6 and 5x16)", False),
    ],
)
def test_out_of_memory_is_told_from_a_misfit_by_the_allocators_words(message, expected):
    import torch

    from branchadapt.errors import not_options, out_of_memory

    assert out_of_memory(RuntimeError(message)) is expected
    assert not_options(RuntimeError(message)) is expected
    assert out_of_memory(ValueError(message)) is False  # only the allocators' RuntimeError
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) and out_of_memory(MemoryError())

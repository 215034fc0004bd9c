"""The command line: user errors exit 2 with one message and never a traceback."""

from __future__ import annotations

import pytest


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

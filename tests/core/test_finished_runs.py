"""A re-run needs only the files of what it will run: a finished stage's options may name files
that are gone, and a finished run trains nothing, reading neither data nor models."""

from __future__ import annotations

import pytest

import branchadapt as ba
from branchadapt.rundir import final_weights, load_for_run
from branchadapt.trainer import Trainer

# a loss and a sampler whose options name a file that must exist when the experiment will use it
FILE_LOSS = """
from pathlib import Path

from pydantic import model_validator

import branchadapt as ba
from branchadapt.builtin.example import CrossEntropy, CrossEntropyOptions
from branchadapt.builtin.samplers import PerGroupOptions, PerGroupSampler
from branchadapt.paths import files_required


def table_exists(options):
    if files_required() and not options.table.is_file():
        raise ValueError(f"table: file {options.table} does not exist")
    return options


class TableOptions(CrossEntropyOptions):
    table: Path
    _exists = model_validator(mode="after")(table_exists)


class TableSamplerOptions(PerGroupOptions):
    table: Path
    _exists = model_validator(mode="after")(table_exists)


class TableLoss(CrossEntropy):
    Options = TableOptions


class TableSampler(PerGroupSampler):
    Options = TableSamplerOptions


@ba.hookimpl
def register_losses(register):
    register(TableLoss, name="table_ce")


@ba.hookimpl
def register_samplers(register):
    register(TableSampler, name="table_per_group")
"""


@pytest.fixture
def table_experiment(small_experiment, tmp_path):
    """The small two-stage experiment, each stage's loss naming its own file beside the experiment."""
    (tmp_path / "table_loss.py").write_text(FILE_LOSS)
    for name in ("basic.txt", "transfer.txt"):
        (tmp_path / name).write_text("x")
    path = small_experiment(steps=2, ckpt=2)
    text = path.read_text().replace("[losses.cross_entropy]\nweight = 1.0\n", "")
    text += '[stages.basic.losses.table_ce]\ntable = "basic.txt"\n'
    text += '[stages.transfer.losses.table_ce]\ntable = "transfer.txt"\n'
    path.write_text('plugins = ["table_loss"]\n' + text)
    return path


def test_a_finished_stages_files_are_not_needed_by_a_re_run_but_an_unfinished_ones_are(
    table_experiment, tmp_path, run_cli
):
    run_dir = tmp_path / "run"
    first = run_cli("run", str(table_experiment), "--run-dir", str(run_dir), "--max-steps", "2")
    assert first.returncode == 0, first.stderr
    assert final_weights(run_dir, "basic").exists() and not final_weights(run_dir, "transfer").exists()
    (tmp_path / "basic.txt").unlink()  # moved since stage basic trained: it will not train again
    # a new run needs it, under its key
    with pytest.raises(ba.ConfigError, match=r"stages\.basic\.losses\.table_ce: .*basic\.txt does not exist"):
        load_for_run(table_experiment, run_dir=tmp_path / "elsewhere")
    (tmp_path / "transfer.txt").unlink()  # the stage still to train does need its own
    out = run_cli("run", str(table_experiment), "--run-dir", str(run_dir))
    assert out.returncode == 2 and "stages.transfer.losses.table_ce" in out.stderr, out.stderr
    assert "basic.txt" not in out.stderr  # only what will be read is asked for
    (tmp_path / "transfer.txt").write_text("x")
    second = run_cli("run", str(table_experiment), "--run-dir", str(run_dir))
    assert second.returncode == 0, second.stderr
    assert "done: stages basic, transfer" in second.stderr
    assert final_weights(run_dir, "transfer").exists()


def test_a_finished_run_re_run_trains_nothing_and_reads_no_data_or_stage_files(
    table_experiment, tmp_path, run_cli, monkeypatch
):
    run_dir = tmp_path / "run"
    assert run_cli("run", str(table_experiment), "--run-dir", str(run_dir)).returncode == 0
    weights = {p: p.read_bytes() for p in run_dir.rglob("*.safetensors")}
    metrics = (run_dir / "metrics.jsonl").read_text()
    for name in ("basic.txt", "transfer.txt"):
        (tmp_path / name).unlink()
    out = run_cli("run", str(table_experiment), "--run-dir", str(run_dir), "--no-eval")
    assert out.returncode == 0, out.stderr
    assert f"every stage has finished in {run_dir}: nothing to train" in out.stderr
    assert "done: stages basic, transfer" in out.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*.safetensors")} == weights
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing trained, nothing logged
    # nor is the data read or a model built: the trainer would fail if it tried
    from branchadapt.builtin import example

    def refuse(*args, **kwargs):
        raise AssertionError("built by a run with nothing to train")

    monkeypatch.setattr(example.ClusterData, "__init__", refuse)
    monkeypatch.setattr(example.SupervisedTask, "__init__", refuse)
    result = Trainer(load_for_run(table_experiment, run_dir=run_dir), run_dir=run_dir).run()
    assert result.completed == ["basic", "transfer"] and result.paused_at is None


def test_a_finished_run_of_another_experiment_is_still_refused(table_experiment, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    assert run_cli("run", str(table_experiment), "--run-dir", str(run_dir)).returncode == 0
    out = run_cli("run", str(table_experiment), "--run-dir", str(run_dir), "--set", "seed=4")
    assert out.returncode == 2 and "holds a run of a different experiment" in out.stderr
    assert "seed: 3 -> 4" in out.stderr


def test_a_file_of_a_top_level_default_every_stage_inherits_is_needed_until_they_have_finished(
    small_experiment, tmp_path
):
    (tmp_path / "table_loss.py").write_text(FILE_LOSS)
    (tmp_path / "sampler.txt").write_text("x")
    path = small_experiment(steps=2)
    text = path.read_text().replace('sampler = { type = "per_group", per_group = 2 }\n', "")
    text = text.replace('sampler = { type = "per_group", per_group = 4 }\n', "")
    text = text.replace(
        "[train]", '[sampler]\ntype = "table_per_group"\ntable = "sampler.txt"\nper_group = 2\n[train]'
    )
    path.write_text('plugins = ["table_loss"]\n' + text)
    run_dir = tmp_path / "run"
    Trainer(load_for_run(path, run_dir=run_dir), run_dir=run_dir).run(max_steps=2)  # stage basic only
    assert final_weights(run_dir, "basic").exists() and not final_weights(run_dir, "transfer").exists()
    (tmp_path / "sampler.txt").unlink()
    with pytest.raises(
        ba.ConfigError, match=r"\n  sampler: table: file .*sampler\.txt does not exist"
    ) as info:
        load_for_run(path, run_dir=run_dir)  # stage transfer still samples with it (named where written)
    assert str(info.value).count("sampler.txt") == 1
    final_weights(run_dir, "transfer").parent.mkdir(parents=True)
    final_weights(run_dir, "transfer").write_bytes(b"")  # as if it had finished too
    assert [s.name for s in load_for_run(path, run_dir=run_dir).stages] == ["basic", "transfer"]


def test_without_run_dir_the_experiments_own_relative_run_dir_is_looked_at(
    table_experiment, tmp_path, monkeypatch
):
    table_experiment.write_text('run_dir = "out/here"\n' + table_experiment.read_text())
    run_dir = tmp_path / "out" / "here"  # beside the experiment file, whatever the working directory
    Trainer(load_for_run(table_experiment), run_dir=run_dir).run(max_steps=2)
    (tmp_path / "basic.txt").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exp = load_for_run(table_experiment)  # stage basic has finished in out/here: its file is not needed
    assert exp.run_dir == run_dir
    with pytest.raises(ba.ConfigError, match=r"stages\.basic\.losses\.table_ce: .*basic\.txt does not exist"):
        load_for_run(table_experiment, run_dir=elsewhere / "new")  # another run directory: a new run

"""What a run directory protects: a folder that holds no run is not written into, one training
process holds a run at a time, and damaged run files are named, exit 2, without a traceback."""

from __future__ import annotations

import pytest

import branchadapt as ba
from branchadapt.rundir import LOCK, hold
from branchadapt.trainer import Trainer


def _run(path, run_dir, **kwargs):
    return Trainer(ba.load_experiment(path), run_dir=run_dir, device="cpu").run(**kwargs)


def test_a_folder_that_holds_no_run_is_not_written_into(small_experiment, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.toml").write_text("# my own notes\n")
    with pytest.raises(
        ba.UserError, match=r"mine holds files \(config\.toml\) but no run \(no config\.json\)"
    ):
        _run(small_experiment(steps=2), folder)
    assert [p.name for p in folder.iterdir()] == ["config.toml"]  # not even a lock file left
    assert (folder / "config.toml").read_text() == "# my own notes\n"
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".DS_Store").write_bytes(b"")  # a file manager's: does not make the folder the user's
    assert _run(small_experiment(steps=2), hidden).completed == ["basic", "transfer"]


def test_a_file_system_that_cannot_lock_trains_unlocked_with_a_warning(
    small_experiment, tmp_path, monkeypatch
):
    import errno
    import fcntl

    def cannot(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", cannot)
    with pytest.warns(UserWarning, match=r"the file system cannot lock \(No locks available\); not locked"):
        assert _run(small_experiment(steps=2), tmp_path / "run").completed == ["basic", "transfer"]


def test_one_training_process_holds_a_run_directory(small_experiment, tmp_path):
    path, run = small_experiment(steps=4, ckpt=2), tmp_path / "run"
    _run(path, run, max_steps=2)
    in_use = r"run is in use by branchadapt run, PID \d+ on .*: wait for it"
    # another process training there (flock: a second open file of this process conflicts too)
    with hold(run), pytest.raises(ba.UserError, match=in_use):
        _run(path, run)
    # another experiment started there meanwhile is refused before it writes anything (its config)
    config = (run / "config.json").read_bytes()
    with hold(run), pytest.raises(ba.UserError, match=in_use):
        Trainer(ba.load_experiment(path, ["seed=4"]), run_dir=run, device="cpu").run()
    assert (run / "config.json").read_bytes() == config
    assert _run(path, run).completed == ["basic", "transfer"]  # released: resumes
    assert (run / LOCK).exists()


def test_damaged_run_files_are_named(small_experiment, tmp_path, run_cli):
    path, run = small_experiment(steps=2), tmp_path / "run"
    _run(path, run)
    final = run / "stages" / "transfer" / "final.safetensors"
    final.write_bytes(final.read_bytes()[:100])
    done = run_cli("run", str(path), "--run-dir", str(run))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{final}: stage transfer's final weights cannot be read" in done.stderr
    assert "delete the file to train the stage again" in done.stderr
    final.unlink()  # as the message says: the stage trains again from its last checkpoint
    assert run_cli("run", str(path), "--run-dir", str(run), "--no-eval").returncode == 0
    (run / "config.json").write_bytes(b"\xff\xfe\x00binary")
    done = run_cli("run", str(path), "--run-dir", str(run))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{run / 'config.json'}: corrupt run config" in done.stderr


def test_weights_files_get_the_permissions_of_any_new_file(small_experiment, tmp_path, monkeypatch):
    import os
    import stat

    from branchadapt import checkpoint

    run = tmp_path / "run"
    _run(small_experiment(steps=2), run)
    umask = os.umask(0o022)
    os.umask(umask)
    files = [*run.glob("stages/*/final.safetensors"), *run.glob("checkpoints/*/*.safetensors")]
    assert len(files) >= 3
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}  # safetensors alone: 0600
    # a file this user may not read is said to be so (tests run as root, who reads anything)
    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: False)
    with pytest.raises(ba.CheckpointError, match=r"final\.safetensors: permission denied"):
        checkpoint.read_tensors(files[0])


SAMPLING_TASK = """
import branchadapt as ba
from branchadapt.builtin.example import SupervisedTask


class Sampling(SupervisedTask):
    def samples(self, modules, source, device, out_dir, step):
        if step >= 4:
            raise ba.UserError("data/a/3.png: cannot decode the image")
        return []


@ba.hookimpl
def register_tasks(register):
    register(Sampling, name="sampling")
"""


def test_data_a_sample_grid_cannot_read_stops_the_run_with_the_steps_kept(small_experiment, tmp_path):
    path = small_experiment(steps=6, ckpt=100)  # no checkpoint before the stage's end
    (tmp_path / "sampling.py").write_text(SAMPLING_TASK)
    text = path.read_text().replace('type = "supervised"', 'type = "sampling"')
    path.write_text('plugins = ["sampling"]\n' + text.replace("[train]\n", "[train]\nsample_every = 2\n"))
    with pytest.raises(ba.UserError) as caught:
        _run(path, tmp_path / "run")
    message = str(caught.value)
    assert message.startswith("data/a/3.png: cannot decode the image\nstage basic: stopped after step 4 of 6")
    assert "steps 1-4 are in" in message and "fix the data and run again to resume" in message
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["basic-00000004"]


def test_a_saved_experiment_the_rules_now_refuse_is_named_not_called_corrupt(small_experiment, tmp_path):
    import json

    from branchadapt.evaluation import load_run

    run = tmp_path / "run"
    _run(small_experiment(steps=2), run)
    record = json.loads((run / "config.json").read_text())
    record["experiment"]["name"] = "../elsewhere"  # what an older branchadapt let through
    (run / "config.json").write_text(json.dumps(record))
    with pytest.raises(
        ba.UserError,
        match=r"config\.json: the run's experiment is not valid for this branchadapt version \(name: ",
    ):
        load_run(run)

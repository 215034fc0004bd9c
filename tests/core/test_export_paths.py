"""Where ``export`` (and ``translate``) may write: never over the run's own files, and a folder
that cannot be written is a user error that leaves nothing behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import branchadapt as ba
import branchadapt.checkpoint as checkpoint
from branchadapt.export import export_run
from branchadapt.trainer import Trainer


@pytest.fixture
def finished(small_experiment, tmp_path):
    exp = ba.load_experiment(small_experiment(steps=2))
    Trainer(exp, run_dir=tmp_path / "run", device="cpu").run()
    return tmp_path / "run"


def _snapshot(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _run_files(run_dir: Path) -> list[Path]:
    """One of each kind of file a run keeps: its configs, metrics, a checkpoint's, a stage's weights."""
    checkpoint = sorted(run_dir.glob("checkpoints/*/model.safetensors"))[-1]
    weights = sorted(run_dir.glob("stages/*/final.safetensors"))[-1]
    files = [run_dir / "config.json", run_dir / "config.toml", run_dir / "metrics.jsonl", checkpoint, weights]
    assert all(p.is_file() for p in files)
    return files


def test_the_run_s_own_files_are_never_export_outputs_even_with_overwrite(finished, tmp_path):
    before = _snapshot(finished)
    config = finished / "config.json"
    (tmp_path / "link.safetensors").symlink_to(config)
    (tmp_path / "alias").symlink_to(finished, target_is_directory=True)
    stage = sorted(finished.glob("stages/*"))[-1]
    refused = [
        *_run_files(finished),
        finished / "export" / ".." / "config.json",  # resolved, not taken by its name
        tmp_path / "link.safetensors",  # a symlink to the run's config
        tmp_path / "alias" / "metrics.jsonl",  # through a symlink to the run directory
        stage / "group-b.safetensors",  # a new file, but inside the stage's folder
        finished / "checkpoints" / "new" / "x.safetensors",  # a new folder inside checkpoints/
        finished / "checkpoints",  # an existing folder: the file would go inside it
        f"{finished / 'stages'}/",  # a folder named with a trailing slash
    ]
    for out in refused:
        with pytest.raises(ba.UserError, match=r"belongs to the run") as err:
            export_run(finished, "b", fmt="safetensors", out=str(out), overwrite=True)
        assert f"--out {out}: " in str(err.value), str(err.value)  # names the path it refuses
        assert _snapshot(finished) == before, out  # nothing replaced, nothing added
    assert not (finished / "checkpoints" / "new").exists()
    # the run dir given through the symlink: its files are still its own
    with pytest.raises(ba.UserError, match=r"belongs to the run"):
        export_run(tmp_path / "alias", "b", fmt="safetensors", out=str(config), overwrite=True)
    assert _snapshot(finished) == before

    # the run's export folder, the run folder itself and elsewhere stay allowed
    for out in (
        None,
        finished / "export" / "b.safetensors",
        finished / "b.safetensors",
        tmp_path / "b.safetensors",
    ):
        done = export_run(finished, "b", fmt="safetensors", out=None if out is None else str(out))
        assert done.path.is_file() and set(load_file(str(done.path)))
    assert {p: b for p, b in _snapshot(finished).items() if p in before} == before


def test_the_cli_refuses_a_run_file_with_one_message_and_exit_2(finished, run_cli):
    config = finished / "config.json"
    before = config.read_bytes()
    out = run_cli(
        "export",
        str(finished),
        "--group",
        "b",
        "--format",
        "safetensors",
        "--overwrite",
        "--out",
        str(config),
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: --out {config}: {config} belongs to the run"), out.stderr
    assert "Traceback" not in out.stderr
    assert config.read_bytes() == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_an_out_folder_that_cannot_be_written_is_a_user_error(finished, run_cli):
    # /proc takes no new files, not even from root: a folder that cannot be written, genuinely
    for out in ("/proc/x.onnx", "/proc/sub/x.safetensors"):
        fmt = Path(out).suffix[1:]
        result = run_cli("export", str(finished), "--group", "b", "--format", fmt, "--out", out)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: --out {out}: cannot write in {Path(out).parent} ("), (
            result.stderr
        )
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_folder_without_write_permission_is_a_user_error_and_nothing_is_left(finished, monkeypatch):
    # the tests run as root, whom chmod 555 does not stop: the refusal a user would get is simulated
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    target = finished / "made" / "deeper" / "b.onnx"
    with pytest.raises(ba.UserError) as err:
        export_run(finished, "b", out=str(target))
    assert str(err.value) == (
        f"--out {target}: cannot write in {target.parent} (Permission denied); choose another --out"
    )
    assert not (finished / "made").exists()  # the folders made for it are gone again


def test_a_write_that_fails_keeps_the_earlier_export_and_leaves_no_temporary_files(finished, monkeypatch):
    folder = finished / "export"
    earlier = export_run(finished, "b", fmt="safetensors").path
    before = earlier.read_bytes()
    real = save_file

    def unwritable(state, filename, metadata=None):  # safetensors' own error, from a real failed write
        real(state, "/proc/no/such/folder.safetensors", metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", unwritable)
    with pytest.raises(
        ba.UserError,
        match=rf"^{earlier}: cannot write in {folder} \(No such file or directory\); choose another --out$",
    ):
        export_run(finished, "b", fmt="safetensors", overwrite=True)
    with pytest.raises(SafetensorError):  # what the export used to let through
        unwritable({"x": torch.zeros(1)}, "x")
    assert earlier.read_bytes() == before
    assert os.listdir(folder) == [earlier.name]  # no temporary folder or file left

    pytest.importorskip("onnxscript")
    onnx = export_run(finished, "b").path
    before = onnx.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", disk_full)
    with pytest.raises(ba.UserError, match=r"cannot write in .*export \(No space left on device\)"):
        export_run(finished, "b", overwrite=True)
    assert onnx.read_bytes() == before
    assert sorted(os.listdir(folder)) == sorted([earlier.name, onnx.name])


def test_translate_never_writes_into_the_run_s_checkpoints_or_stages(tmp_path):
    cv2 = pytest.importorskip("cv2")
    translate = pytest.importorskip("branchadapt_cartoon.translate")
    import numpy as np

    run = tmp_path / "run"
    for folder in ("checkpoints/basic-00000002", "stages/basic"):
        (run / folder).mkdir(parents=True)
    (run / "config.json").write_text("{}")
    photos = tmp_path / "in"
    photos.mkdir()
    for name in ("final.png", "b.png"):
        cv2.imwrite(str(photos / name), np.full((8, 8, 3), 100, np.uint8))
    groups = ("men", "kids")
    for output in (run / "stages" / "basic", run / "checkpoints", run / "export" / ".." / "stages"):
        with pytest.raises(ba.UserError, match=r"belongs to the run") as err:
            translate.plan_jobs(photos, output, "men", groups, overwrite=True, run_dir=run)
        assert str(err.value).startswith(f"{output}: "), str(err.value)
    # a single image named into the stage's folder
    with pytest.raises(ba.UserError, match=r"stages belongs to the run"):
        translate.plan_jobs(photos / "b.png", run / "stages" / "basic" / "x.png", "men", groups, run_dir=run)
    # the run folder itself, and elsewhere, are fine
    assert len(translate.plan_jobs(photos, run / "translated", "men", groups, run_dir=run)) == 2
    assert len(translate.plan_jobs(photos, tmp_path / "out", "men", groups, run_dir=run)) == 2

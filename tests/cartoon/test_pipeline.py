"""The paper recipe end to end at 32 px: train two stages, checkpoint, resume, evaluate, translate."""

from __future__ import annotations

import json
import shutil

import cv2
import pytest
import torch

import branchadapt as ba
from branchadapt.checkpoint import read_tensors
from branchadapt.trainer import Trainer

ABLATIONS = [
    "cartoon/basic_only.toml",
    "cartoon/baseline1_mixed.toml",
    "cartoon/baseline2_finetune.toml",
    "cartoon/baseline3_per_group.toml",
    "cartoon/no_selective_bp.toml",
]


def train(path, run_dir, max_steps=None):
    trainer = Trainer(ba.load_experiment(path), run_dir=run_dir, device="cpu")
    return trainer.run(max_steps=max_steps)


def test_two_stage_run_trains_samples_evaluates_and_translates(
    tiny_cartoon, tmp_path, run_cli, monkeypatch, capsys
):
    exp = tiny_cartoon()
    run = tmp_path / "run"
    done = run_cli("run", str(exp), "--run-dir", str(run))
    assert done.returncode == 0, done.stderr
    assert "women" in done.stdout and "a2b/ssim" in done.stdout  # the per-group metric table
    assert (run / "stages" / "basic" / "final.safetensors").is_file()
    assert (run / "stages" / "transfer" / "final.safetensors").is_file()
    # transfer weights hold one branch per group for the low/top stages, and the shared middle once
    keys = read_tensors(run / "stages" / "transfer" / "final.safetensors").keys()
    for group in ("women", "men", "kids", "elderly"):
        assert any(f".branches.{group}." in k for k in keys)
    grids = sorted((run / "samples" / "transfer").glob("*.png"))
    assert {p.name.split("-")[0] for p in grids} == {"women", "men", "kids", "elderly"}
    img = cv2.imread(str(grids[0]))
    assert img.shape[0] > 32 * 2 and img.shape[1] > 32 * 3  # rows of input | translation | cycle
    metrics = json.loads((run / "eval" / "transfer-test" / "metrics.json").read_text())["groups"]
    assert set(metrics) == {"women", "men", "kids", "elderly"}
    for values in metrics.values():
        assert {"a2b/l1", "a2b/psnr", "a2b/ssim", "a2b/id", "a2b/traits", "b2a/l1"} <= set(values)
        assert 0 <= values["a2b/ssim"] <= 1 and 0 <= values["a2b/traits"] <= 1
    translated = sorted((run / "eval" / "transfer-test" / "translated" / "kids").glob("*.png"))
    assert [p.name for p in translated] == ["00000.png", "00001.png", "00002.png"]
    report = (run / "eval" / "transfer-test" / "report.html").read_text()
    assert "data:image/png;base64" in report and "a2b/psnr" in report

    # translate a folder of group sub-folders, with CAM heatmaps
    src = tmp_path / "inputs"
    for group in ("men", "kids"):
        (src / group).mkdir(parents=True)
        photo = cv2.imread(str(next((tmp_path.parent).rglob(f"test/photo/{group}/00000.png"))))
        cv2.imwrite(str(src / group / "face.png"), cv2.resize(photo, (48, 48)))
    out = tmp_path / "out"
    done = run_cli("translate", str(run), str(src), str(out), "--cam")
    assert done.returncode == 0, done.stderr
    assert "translate: 2/2 images" in done.stderr  # no terminal, no live bar: progress as lines
    for group in ("men", "kids"):
        assert cv2.imread(str(out / group / "face.png")).shape == (32, 32, 3)
        assert (out / group / "face_cam.png").is_file()
    before = (out / "men" / "face.png").read_bytes()
    (out / "kids" / "face.png").write_bytes(b"edited by hand")
    again = run_cli("translate", str(run), str(src), str(out))  # an earlier translation is kept
    assert again.returncode == 2 and "2 output file(s) exist already" in again.stderr
    assert (out / "kids" / "face.png").read_bytes() == b"edited by hand"
    again = run_cli("translate", str(run), str(src), str(out), "--overwrite")
    assert again.returncode == 0, again.stderr
    assert (out / "men" / "face.png").read_bytes() == before  # the same translation, written again
    assert cv2.imread(str(out / "kids" / "face.png")).shape == (32, 32, 3)
    assert len(list(out.rglob("*_cam.png"))) == 2  # kept (never delete a file), and named:
    assert "note: 2 file(s) named as heatmaps of replaced outputs" in again.stderr
    done = run_cli(
        "translate", str(run), str(src / "men" / "face.png"), str(out / "one.tif"), "--group", "men"
    )
    assert done.returncode == 0, done.stderr
    assert (out / "one.tif").is_file() and cv2.imread(str(out / "one.tif")).shape == (32, 32, 3)
    done = run_cli(
        "translate", str(run), str(src / "men" / "face.png"), str(out / "b.png"), "--direction", "b2a"
    )
    assert done.returncode == 2 and "--group" in done.stderr
    done = run_cli("translate", str(run), str(src / "men"), str(out / "m"), "--group", "nobody")
    assert done.returncode == 2 and "nobody" in done.stderr
    # a folder into an existing image file: refused, the file kept
    (out / "single.png").write_bytes(b"keep")
    done = run_cli("translate", str(run), str(src / "men"), str(out / "single.png"), "--group", "men")
    assert done.returncode == 2 and "expected a folder, not an image file" in done.stderr
    assert "Traceback" not in done.stderr and (out / "single.png").read_bytes() == b"keep"
    # an image damaged past its header, after one translated: says what was written before it
    shutil.copy(src / "men" / "face.png", src / "men" / "other.png")
    (src / "men" / "zz.png").write_bytes((src / "men" / "face.png").read_bytes()[:80])
    done = run_cli(
        "translate", str(run), str(src / "men"), str(out / "cut"), "--group", "men", "--batch-size", "2"
    )
    assert done.returncode == 2 and "zz.png: cannot decode" in done.stderr, done.stderr
    assert f"2 image(s) before it were translated into {out / 'cut'}" in done.stderr
    assert sorted(p.name for p in (out / "cut").iterdir()) == ["face.png", "other.png"]
    (src / "men" / "zz.png").unlink()
    (src / "men" / "other.png").unlink()

    # uneven or missing test pairs: said, and an evaluation with none keeps the earlier results
    from branchadapt.evaluation import evaluate_run
    from branchadapt_cartoon.data import FaceImages

    plain_sizes = FaceImages.sizes

    def uneven(self):
        sizes = plain_sizes(self)
        return {**sizes, "kids": {"photo": 3, "cartoon": 2}, "men": {"photo": 3, "cartoon": 0}}

    monkeypatch.setattr(FaceImages, "sizes", uneven)
    assert set(evaluate_run(run, device="cpu")["groups"]) == {"women", "kids", "elderly"}
    err = capsys.readouterr().err
    assert "group kids: 3 photos and 2 cartoons in the 'test' split; the first 2 of each" in err
    assert "group men: 3 photos and 0 cartoons in the 'test' split; left out" in err
    written = (run / "eval" / "transfer-test" / "metrics.json").read_bytes()
    monkeypatch.setattr(FaceImages, "sizes", lambda self: {g: {} for g in plain_sizes(self)})
    with pytest.raises(ba.UserError, match="no paired photos and cartoons in the 'test' split of any group"):
        evaluate_run(run, device="cpu")
    assert (run / "eval" / "transfer-test" / "metrics.json").read_bytes() == written


def test_resume_gives_bit_identical_weights(tiny_cartoon, tmp_path):
    exp = tiny_cartoon(steps=4)
    train(exp, tmp_path / "straight")
    paused = train(exp, tmp_path / "resumed", max_steps=6)  # stops inside the transfer stage
    assert paused.paused_at == ("transfer", 2)
    train(exp, tmp_path / "resumed")
    a = read_tensors(tmp_path / "straight" / "stages" / "transfer" / "final.safetensors")
    b = read_tensors(tmp_path / "resumed" / "stages" / "transfer" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_validates_and_runs(ablation, tiny_cartoon, tmp_path, run_cli):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    checked = run_cli("validate", str(examples / ablation))
    assert checked.returncode == 0, checked.stderr
    result = train(tiny_cartoon(base=ablation, steps=2), tmp_path / "run")
    assert result.paused_at is None and result.completed


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_ablation_has_a_cpu_sized_variant_making_the_same_change(ablation, run_cli):
    from pathlib import Path

    from branchadapt.reading import read_toml
    from branchadapt.rundir import config_differences

    examples = Path(__file__).resolve().parents[2] / "examples"
    cpu = examples / "cartoon_cpu" / Path(ablation).name
    checked = run_cli("validate", str(cpu))
    assert checked.returncode == 0, checked.stderr

    def change(variant: Path, base: Path) -> list[str]:
        return [
            d for d in config_differences(read_toml(base), read_toml(variant)) if not d.startswith("name:")
        ]

    full = change(examples / ablation, examples / "cartoon.toml")
    assert full and change(cpu, examples / "cartoon_cpu.toml") == full


def test_selective_bp_in_the_transfer_stage_leaves_shared_stages_to_the_anchor(tiny_cartoon, tmp_path):
    """One real training step: few-shot groups' samples never reach the shared parameters."""
    exp = ba.load_experiment(tiny_cartoon(steps=2))
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    trainer.run()
    rt = trainer.build_stage(1, exp.stages[1], trainer.build_source())
    gen = rt.modules["gen_a2b"]
    batch = rt.data[0]
    for stream in batch.values():  # keep only few-shot samples
        keep = stream["group"] != 0
        for k in list(stream):
            stream[k] = stream[k][keep]
    scratch: dict = {}
    rt.task.forward("discriminator", rt.modules, batch, scratch)
    outputs = rt.task.forward("generator", rt.modules, batch, scratch)
    total = sum(t.weight * t(outputs, batch) for t in rt.losses["generator"])
    total.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in gen.shared_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.branch_parameters("men"))
    assert all(p.grad is None for p in gen.branch_parameters("women"))


def test_translation_runs_the_default_layout_on_cpu_and_channels_last_on_cuda():
    from branchadapt_cartoon.translate import inference_layout

    assert inference_layout(torch.device("cpu")) == torch.contiguous_format
    assert inference_layout(torch.device("cuda")) == torch.channels_last


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # a light generator checks the size only with gradients on, as in training
        ("model.image_size=48", "module 'gen_a2b' cannot take inputs shaped as the data's ((1, 3, 32, 32)): "
         "UserError: model.image_size is 48 but the images are 32x32 px"),
        # the discriminators are not branched: they get the images alone
        ("task.global_layers=6", "module 'dis_ga' cannot take inputs shaped as the data's ((1, 3, 32, 32)): "
         "UserError: a 6-layer discriminator needs images of at least"),
    ],
)  # fmt: skip
def test_a_model_that_does_not_fit_the_data_is_refused_before_anything_is_written(
    override, expected, tiny_cartoon, tmp_path, run_cli
):
    path = tiny_cartoon()
    run_dir = tmp_path / "run"
    out = run_cli("run", str(path), "--run-dir", str(run_dir), "--set", override)
    assert out.returncode == 2, out.stderr
    assert f"{path}: stages.basic: {expected}" in out.stderr
    assert not run_dir.exists()  # refused before the run directory, not at the first step

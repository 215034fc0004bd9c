"""``branchadapt export``: one group's generator as ONNX (onnxruntime parity, dynamic batch) and
as a plain safetensors state; bad requests exit 2 and write nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import branchadapt as ba
from branchadapt.checkpoint import read_tensors
from branchadapt.evaluation import load_stage
from branchadapt.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_cartoon_text):
    """One tiny trained run shared by this module's tests (each export writes its own file)."""
    folder = tmp_path_factory.mktemp("export")
    config = folder / "tiny.toml"
    config.write_text(tiny_cartoon_text(steps=2))
    run = folder / "run"
    Trainer(ba.load_experiment(config), run_dir=run, device="cpu").run()
    return run


def test_onnx_export_matches_the_groups_eager_generator(trained, run_cli, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    done = run_cli("export", str(trained), "--group", "men", "--format", "onnx")
    assert done.returncode == 0, done.stderr
    path = trained / "export" / "gen_a2b-men.onnx"
    assert path.is_file() and f"written to {path}" in done.stdout
    assert "onnxruntime vs eager: max abs difference" in done.stdout
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    # the file stands alone: copied elsewhere without anything beside it, it still loads
    alone = tmp_path / "deployed.onnx"
    alone.write_bytes(path.read_bytes())
    path = alone
    # independent check: another batch size (the batch dimension is dynamic), men's own branches
    men = load_stage(trained).modules["gen_a2b"].extract("men").eval()
    women = load_stage(trained).modules["gen_a2b"].extract("women").eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["translated", "cam_logits", "heatmap"]
    image = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want, other = men(x)[0].numpy(), women(x)[0].numpy()
    assert image.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(image, want, atol=1e-4)
    assert np.abs(image - other).max() > 1e-3  # the export carries men's branches, not the anchor's


def test_safetensors_export_is_the_plain_backbone_state(trained, run_cli):
    done = run_cli(
        "export", str(trained), "--group", "kids", "--format", "safetensors", "--module", "gen_b2a"
    )
    assert done.returncode == 0, done.stderr
    state = read_tensors(trained / "export" / "gen_b2a-kids.safetensors")
    plain = ba.build_backbone("ugatit", width=4, image_size=32, n_blocks=1)
    plain.load_state_dict(state)  # strict: exactly the plain backbone's keys
    kids = load_stage(trained).modules["gen_b2a"].extract("kids")
    for key, value in kids.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    # --out naming an existing folder writes the file inside it; a file in the way is refused
    folder = trained / "mine"
    folder.mkdir()
    done = run_cli("export", str(trained), "--group", "kids", "--format", "safetensors", "--out", str(folder))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in folder.iterdir()] == ["gen_a2b-kids.safetensors"]
    # a folder that does not exist yet, named with a trailing slash, is made and written into
    done = run_cli(
        "export", str(trained), "--group", "kids", "--format", "safetensors", "--out", f"{trained}/new/"
    )
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (trained / "new").iterdir()] == ["gen_a2b-kids.safetensors"]
    (trained / "notes.txt").write_text("keep")
    done = run_cli("export", str(trained), "--group", "kids", "--out", str(trained / "notes.txt" / "x.onnx"))
    assert (
        done.returncode == 2
        and "notes.txt is a file, not a folder" in done.stderr
        and "Traceback" not in done.stderr
    )
    assert (trained / "notes.txt").read_text() == "keep"


def test_bad_requests_exit_2_and_write_nothing(trained, run_cli):
    for args, message in (
        (["--group", "cats"], "--group 'cats' is not a group of this run"),
        (["--group", "men", "--module", "dis_ga"], "--module 'dis_ga' is not a branched module"),
        (["--group", "men", "--stage", "warmup"], "--stage 'warmup' is not a stage of this run"),
    ):
        before = _listing(trained / "export")
        done = run_cli("export", str(trained), *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert _listing(trained / "export") == before  # nothing written, nothing removed


def _listing(folder):
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir()) if folder.exists() else []


def test_export_traces_at_the_recorded_data_size_without_generating_the_data(trained, monkeypatch, tmp_path):
    from branchadapt.export import export_run, recorded_inputs
    from branchadapt.rundir import final_weights
    from branchadapt_toonfaces import ToonFaces

    def regenerate(self):
        raise AssertionError("export generated the toonfaces data again")

    monkeypatch.setattr(ToonFaces, "ensure", regenerate)  # as if the cache had been deleted
    (x,) = recorded_inputs(final_weights(trained, "transfer"), "gen_b2a", batch_size=1)
    assert x.shape == (1, 3, 32, 32)  # the data's size, recorded by the run
    done = export_run(trained, "elderly", module="gen_b2a", out=tmp_path / "b2a.onnx")
    assert done.note is None and done.path.is_file()

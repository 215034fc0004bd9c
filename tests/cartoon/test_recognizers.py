"""Face recognizers of the face-ID loss: photo2cartoon-compatible MobileFaceNet and timm models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import branchadapt as ba
from branchadapt.errors import CheckpointError, UserError
from branchadapt_cartoon.recognizers import MobileFaceNet, TimmRecognizer, photo2cartoon_crop


def _random_mobilefacenet(seed: int) -> MobileFaceNet:
    torch.manual_seed(seed)
    net = MobileFaceNet(MobileFaceNet.Options(allow_random=True))
    with torch.no_grad():  # non-trivial BN statistics, so a missed buffer would show
        for name, buf in net.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(torch.rand_like(buf) * 0.5 + (0.75 if name.endswith("var") else -0.25))
    return net.eval()


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_mobilefacenet_keys_match_photo2cartoon_file() -> None:
    state = _random_mobilefacenet(0).state_dict()
    assert len(state) == 333
    assert sum(p.numel() for p in _random_mobilefacenet(0).parameters()) == 1_200_512
    shapes = {
        "conv1.conv.weight": (64, 3, 3, 3),
        "conv2_dw.prelu.weight": (64,),
        "conv_23.conv.conv.weight": (128, 64, 1, 1),
        "conv_3.model.3.conv_dw.conv.weight": (128, 1, 3, 3),
        "conv_4.model.5.project.bn.running_var": (128,),
        "conv_45.conv_dw.conv.weight": (512, 1, 3, 3),
        "conv_5.model.1.project.conv.weight": (128, 256, 1, 1),
        "conv_6_sep.conv.weight": (512, 128, 1, 1),
        "conv_6_dw.conv.weight": (512, 1, 7, 7),
        "linear.weight": (512, 512),
        "bn.running_mean": (512,),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert not any(k.startswith("conv_6_dw.prelu") for k in state)


def test_mobilefacenet_torch_file_loads_strictly_and_reproduces(tmp_path: Path) -> None:
    ref = _random_mobilefacenet(0)
    path = tmp_path / "model_mobilefacenet.pth"
    torch.save(ref.state_dict(), path)
    torch.save(ref.state_dict(), tmp_path / "misnamed.safetensors")  # read by its content
    torch.manual_seed(1)  # a different random init, overwritten by the file
    misnamed = MobileFaceNet(MobileFaceNet.Options(weights=tmp_path / "misnamed.safetensors")).eval()
    net = MobileFaceNet(MobileFaceNet.Options(weights=path)).eval()
    assert all(
        torch.equal(a, b)
        for a, b in zip(misnamed.state_dict().values(), net.state_dict().values(), strict=True)
    )
    x = _images(2, 64)
    with torch.no_grad():
        emb, expected = net(x), ref(x)
    assert emb.shape == (2, 512)
    assert torch.equal(emb, expected)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(emb[0], emb[1])


def test_mobilefacenet_safetensors_and_legacy_keys(tmp_path: Path) -> None:
    ref = _random_mobilefacenet(0)
    state = {f"module.{k}": v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "mfn.safetensors"))
    net = MobileFaceNet(MobileFaceNet.Options(weights=tmp_path / "mfn.safetensors")).eval()
    x = _images(1, 256)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))


def test_mobilefacenet_needs_weights(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"losses\.face_id\.recognizer\.weights"):
        MobileFaceNet()
    missing = tmp_path / "nowhere" / "model_mobilefacenet.pth"
    with pytest.raises(UserError, match="does not exist") as err:
        MobileFaceNet(MobileFaceNet.Options(weights=missing))
    assert str(missing) in str(err.value)


def test_mobilefacenet_wrong_keys_name_them(tmp_path: Path) -> None:
    state = _random_mobilefacenet(0).state_dict()
    state["fc.weight"] = state.pop("linear.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        MobileFaceNet(MobileFaceNet.Options(weights=tmp_path / "bad.pth"))
    assert "linear.weight" in str(err.value) and "fc.weight" in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        MobileFaceNet(MobileFaceNet.Options(weights=tmp_path / "junk.pth"))


def test_photo2cartoon_crop_box() -> None:
    x = torch.arange(256 * 256.0).view(1, 1, 256, 256)
    # top = int(256/2.1*0.47) = 57, bottom = int(256 - 256/2.1*0.3) = 219, left = int(128 - 81) = 47
    assert torch.equal(photo2cartoon_crop(x), x[..., 57:219, 47:209])


def test_timm_recognizer(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="weights"):
        TimmRecognizer(TimmRecognizer.Options(model="test_resnet"))
    with pytest.raises(UserError, match="unknown timm model"):
        TimmRecognizer(TimmRecognizer.Options(model="no_such_net_xyz", allow_random=True))
    torch.manual_seed(0)
    ref = TimmRecognizer(TimmRecognizer.Options(model="test_resnet", allow_random=True, input_size=64)).eval()
    x = _images(2, 40)
    with torch.no_grad():
        emb = ref(x)
    assert emb.shape == (2, ref.model.num_features)
    head = {"fc.weight": torch.zeros(10, ref.model.num_features), "fc.bias": torch.zeros(10)}
    save_file({**ref.model.state_dict(), **head}, str(tmp_path / "r.safetensors"))  # a head is ignored
    torch.manual_seed(1)
    net = TimmRecognizer(
        TimmRecognizer.Options(model="test_resnet", weights=tmp_path / "r.safetensors", input_size=64)
    ).eval()
    with torch.no_grad():
        assert torch.equal(net(x), emb)
    assert net.stage_names() == ["model"]


def test_an_evaluation_recognizer_without_its_file_is_found_when_the_experiment_loads(tiny_cartoon, tmp_path):
    from branchadapt_cartoon.evaluation import _recognizer

    spec = f'task.eval_recognizer={{type="mobilefacenet", weights="{(tmp_path / "x.pth").as_posix()}"}}'
    with pytest.raises(ba.ConfigError, match=r"task\.eval_recognizer: weights: file .*x\.pth does not exist"):
        ba.load_experiment(tiny_cartoon(), [spec])
    # built later (the file gone since): the message names the evaluation's own key
    with pytest.raises(ba.UserError, match=r"^task\.eval_recognizer: .*set task\.eval_recognizer\.weights"):
        _recognizer({"type": "mobilefacenet", "weights": str(tmp_path / "x.pth")})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ('task.eval_recognizer={type="nosuch"}', r"task\.eval_recognizer: type: unknown backbone 'nosuch'"),
        ('task.eval_recognizer={weights="x"}', r"task\.eval_recognizer: needs a 'type'"),
        ('losses.face_id.recognizer={type="nosuch"}', r"losses\.face_id\.recognizer: type: unknown backbone"),
        (
            'losses.face_id.recognizer={type="toonfaces_id", foo=1}',
            r"losses\.face_id\.recognizer: foo: unknown key",
        ),
        (  # a later stage's own: found before the first stage trains, under its own key
            'stages.transfer.losses.face_id.recognizer={type="mobilefacenet", weights="gone.pth"}',
            r"stages\.transfer\.losses\.face_id\.recognizer: weights: file .*gone\.pth does not exist",
        ),
    ],
)
def test_a_recognizer_table_is_checked_when_the_experiment_loads_under_its_key(
    tiny_cartoon, override, expected
):
    exp = tiny_cartoon()
    with pytest.raises(ba.ConfigError, match=expected) as info:
        ba.load_experiment(exp, [override])
    assert str(info.value).startswith(f"{exp}: 1 problem")


@pytest.mark.parametrize("key", ["task.eval_recognizer", "losses.face_id.recognizer"])
def test_a_recognizer_that_needs_weights_and_has_none_is_refused_at_load(tiny_cartoon, key):
    with pytest.raises(
        ba.ConfigError, match=rf"{key}: weights: MobileFaceNet needs a weights file and none is set"
    ):
        ba.load_experiment(tiny_cartoon(), [f'{key}={{type="mobilefacenet"}}'])
    exp = ba.load_experiment(tiny_cartoon(), [f'{key}={{type="mobilefacenet", allow_random=true}}'])
    assert exp.spec.name  # random weights asked for: allowed (tests)


def test_a_finished_runs_experiment_loads_without_the_training_losss_recognizer_file(tiny_cartoon, tmp_path):
    from branchadapt.evaluation import load_run
    from branchadapt.rundir import prepare_run_dir

    weights = tmp_path / "face.safetensors"
    save_file(ba.build_backbone("mobilefacenet", allow_random=True).state_dict(), str(weights))
    spec = f'losses.face_id.recognizer={{type="mobilefacenet", weights="{weights.as_posix()}"}}'
    prepare_run_dir(tmp_path / "run", ba.load_experiment(tiny_cartoon(), [spec]))
    weights.unlink()  # the run copied to another machine, or the file moved since training
    with pytest.raises(ba.ConfigError, match=r"weights: file .*face\.safetensors does not exist"):
        ba.load_experiment(tiny_cartoon(), [spec])  # a run about to train needs it
    loaded = load_run(tmp_path / "run")  # inference (export, translate, evaluate) does not
    assert loaded.stages[0].losses["face_id"].options.recognizer["weights"] == str(weights)


def test_re_running_a_run_needs_the_recognizer_file_of_a_stage_still_to_train_only(tiny_cartoon, tmp_path):
    from branchadapt.rundir import final_weights, load_for_run

    gone = (tmp_path / "gone.safetensors").as_posix()
    spec = f'stages.basic.losses.face_id.recognizer={{type="mobilefacenet", weights="{gone}"}}'
    run = tmp_path / "run"
    with pytest.raises(ba.ConfigError, match=r"stages\.basic\.losses\.face_id\.recognizer: weights: file"):
        load_for_run(tiny_cartoon(), [spec], run)  # stage basic will train
    final_weights(run, "basic").parent.mkdir(parents=True)
    final_weights(run, "basic").write_bytes(b"")  # finished: it will not
    exp = load_for_run(tiny_cartoon(), [spec], run)
    assert exp.stages[0].losses["face_id"].options.recognizer["weights"] == gone


@pytest.mark.parametrize("key", ["task.eval_recognizer", "losses.face_id.recognizer"])
def test_a_recognizer_file_that_cannot_be_loaded_is_refused_when_the_experiment_loads(
    tiny_cartoon, tmp_path, key
):
    """Found before any training, under the key that names it: a truncated file or one of
    another model (the evaluation's recognizer was only built after every stage had trained)."""
    good = tmp_path / "mfn.pth"
    torch.save(ba.build_backbone("mobilefacenet", allow_random=True).state_dict(), good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"x": torch.zeros(3)}, tmp_path / "other.pth")
    for name, problem in (
        ("cut.pth", "is not a readable safetensors file"),
        ("other.pth", "does not match the model"),
    ):
        spec = f'{key}={{type="mobilefacenet", weights="{(tmp_path / name).as_posix()}"}}'
        with pytest.raises(ba.ConfigError, match=rf"{key}: weights: MobileFaceNet: .*{name} {problem}"):
            ba.load_experiment(tiny_cartoon(), [spec])
    spec = f'{key}={{type="mobilefacenet", weights="{good.as_posix()}"}}'
    assert ba.load_experiment(tiny_cartoon(), [spec]).spec.name

"""Importing a photo2cartoon checkpoint built from the reference sheet's names and shapes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import branchadapt as ba
from branchadapt_cartoon.networks import UGATITGenerator
from branchadapt_cartoon.photo2cartoon import import_weights, load_into, read_checkpoint

SECTIONS = {}


@pytest.fixture(autouse=True)
def _sections(reference_sections):
    SECTIONS.update(reference_sections)


def reference_state(section: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(shape, generator=g) for k, shape in SECTIONS[section].items()}


def gen() -> UGATITGenerator:
    return UGATITGenerator(UGATITGenerator.Options(width=32, image_size=256))


@pytest.mark.parametrize("wrapped", [True, False])
def test_inference_file_and_bare_state_dict_load(tmp_path, wrapped):
    state = reference_state("generator")
    path = tmp_path / "photo2cartoon_weights.pt"
    torch.save({"genA2B": state} if wrapped else state, path)
    model = gen()
    assert import_weights(path, {"gen_a2b": model, "gen_b2a": gen()}) == ["gen_a2b"]
    assert torch.equal(model.cam.gap_fc.weight, state["gap_fc.weight"])
    assert torch.equal(model.DecodeBlock3.norm2.c_beta[2].bias, state["DecodeBlock3.norm2.c_beta.2.bias"])


def test_training_checkpoint_fills_generators_and_discriminators(tmp_path):
    from branchadapt_cartoon.critics import Discriminator

    ckpt = {"genA2B": reference_state("generator"), "genB2A": reference_state("generator"),
            "disGA": reference_state("global"), "disLA": reference_state("local")}  # fmt: skip
    torch.save(ckpt, tmp_path / "p2c_params_0100000.pt")
    modules = {"gen_a2b": gen(), "gen_b2a": gen(), "dis_ga": Discriminator(32, 7, n_groups=4),
               "dis_la": Discriminator(32, 5)}  # fmt: skip
    assert import_weights(tmp_path / "p2c_params_0100000.pt", modules) == [
        "gen_a2b",
        "gen_b2a",
        "dis_ga",
        "dis_la",
    ]
    assert torch.equal(modules["dis_ga"].conv.weight_orig, ckpt["disGA"]["conv.weight_orig"])


def test_mismatches_are_reported_by_name(tmp_path):
    state = reference_state("generator")
    state.pop("FC.0.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ba.CheckpointError, match=r"missing keys: FC\.0\.bias") as err:
        load_into(gen(), state, "x.pt", generator=True)
    assert "unexpected keys: extra.weight" in str(err.value)
    small = UGATITGenerator(UGATITGenerator.Options(width=16, image_size=256))
    with pytest.raises(ba.CheckpointError, match=r"shape mismatch: ConvBlock1\.1\.weight"):
        load_into(small, reference_state("generator"), "x.pt", generator=True)


def test_missing_and_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(ba.UserError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(
        ba.UserError, match=r"bad\.pt: not a photo2cartoon checkpoint torch can load"
    ) as caught:
        read_checkpoint(bad)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message and message.endswith("file of state dicts")
    # a pickle of Python objects: refused unread, without torch's advice to load it unsafely
    torch.save({"genA2B": tmp_path}, tmp_path / "objects.pt")  # a Path object
    with pytest.raises(ba.UserError) as caught:
        read_checkpoint(tmp_path / "objects.pt")
    assert "objects.pt: holds Python objects besides tensors, which branchadapt does not unpickle" in str(
        caught.value
    )
    assert "weights_only set to False" not in str(caught.value) and "two options" not in str(caught.value)


def test_the_file_is_read_only_where_its_weights_are_used(tiny_cartoon, tmp_path):
    """A stage that starts from an earlier one, or a finished run loaded for inference, replaces
    the imported weights at once: the file need not be there any more."""
    from branchadapt.trainer import Trainer

    exp = ba.load_experiment(tiny_cartoon(), [f'task.photo2cartoon="{(tmp_path / "gone.pt").as_posix()}"'])
    trainer = Trainer(exp, run_dir=tmp_path / "run", device="cpu")
    with pytest.raises(
        ba.UserError, match=r"^task\.photo2cartoon: .*gone\.pt: photo2cartoon checkpoint not found"
    ):
        trainer.build_task().build()  # the first stage's fresh modules: read
    assert "gen_a2b" in trainer.build_task(initial_weights=False).build()  # weights to follow: not read


def test_relative_weight_paths_are_taken_beside_the_experiment_file(tiny_cartoon, tmp_path, monkeypatch):
    exp_file = tiny_cartoon()
    state = ba.build_backbone("mobilefacenet", allow_random=True).state_dict()
    save_file(state, str(tmp_path / "id.safetensors"))  # the recognizers' files must exist and load
    (tmp_path / "sub").mkdir()
    torch.save(state, tmp_path / "sub" / "face.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exp = ba.load_experiment(
        exp_file,
        [
            'task.photo2cartoon="p2c.pt"',
            'task.eval_recognizer={type="mobilefacenet", weights="id.safetensors"}',
            'stages.basic.losses.face_id.recognizer={type="mobilefacenet", weights="sub/face.pt"}',
        ],
    )
    assert exp.task.options.photo2cartoon == tmp_path / "p2c.pt"
    assert exp.task.options.eval_recognizer["weights"] == str(tmp_path / "id.safetensors")
    face_id = exp.stages[0].losses["face_id"].options.recognizer
    assert face_id == {"type": "mobilefacenet", "weights": str(tmp_path / "sub" / "face.pt")}
    assert exp.spec.task.options()["photo2cartoon"] == "p2c.pt"  # the experiment as written (hash, config)
    # a problem elsewhere in the file: the options are still checked beside it (no false "missing")
    with pytest.raises(ba.ConfigError) as info:
        ba.load_experiment(
            exp_file, ['task.eval_recognizer={type="mobilefacenet", weights="id.safetensors"}', "seed=-5"]
        )
    assert "1 problem" in str(info.value) and "does not exist" not in str(info.value)

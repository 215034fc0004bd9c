"""The timm plugin set: stage discovery, selective BP on a timm model, weights, data, losses, recipes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import branchadapt as ba
from branchadapt import BranchedModel, Participation
from branchadapt_timm.backbone import TimmBackbone, TimmOptions
from branchadapt_timm.digits import DOMAINS, Digits, DigitsOptions
from branchadapt_timm.losses import Entropy, EntropyOptions

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def backbone(name: str, **kwargs) -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone(TimmOptions(model=name, kwargs=kwargs))


@pytest.mark.parametrize(
    ("name", "kwargs", "stages"),
    [
        ("resnet10t", {}, {"stem": ["conv1", "bn1", "act1"], "layer1": ["maxpool", "layer1"], "layer2": ["layer2"],
                           "layer3": ["layer3"], "layer4": ["layer4"], "head": ["global_pool", "fc"]}),
        ("mobilenetv3_small_050", {}, {"stem": ["conv_stem", "bn1"], "blocks.0": ["blocks.0"],
                                       "blocks.1": ["blocks.1"], "blocks.3": ["blocks.2", "blocks.3"],
                                       "blocks.5": ["blocks.4", "blocks.5"],
                                       "head": ["global_pool", "conv_head", "norm_head", "act2", "flatten", "classifier"]}),
        ("convnext_atto", {}, {"stem": ["stem"], "stages.0": ["stages.0"], "stages.1": ["stages.1"],
                               "stages.2": ["stages.2"], "stages.3": ["stages.3"], "head": ["norm_pre", "head"]}),
    ],
)  # fmt: skip
def test_stage_discovery_follows_timm_feature_info(name, kwargs, stages):
    b = backbone(name, **kwargs)
    assert b.stage_names() == list(stages)
    assert {s: [p.removeprefix("model.") for p in b.stage_paths(s)] for s in b.stage_names()} == stages
    # every parameter of the model lives in exactly one stage
    owned = [
        n for s in b.stage_names() for p in b.stage_paths(s) for n, _ in b.get_submodule(p).named_parameters()
    ]
    assert len(owned) == len(list(b.parameters()))


def test_vit_stages_and_its_own_parameters_stay_shared():
    b = backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    assert b.stage_names() == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    model = ba.branch(b, ["a", "b"], low=1, top=0)
    shared = {id(p) for p in model.shared_parameters()}
    assert id(model.backbone.model.pos_embed) in shared and id(model.backbone.model.cls_token) in shared
    assert model(torch.randn(2, 3, 32, 32), groups=[0, 1]).shape == (2, 10)


@pytest.mark.parametrize("low", [1, 2, 3])
def test_depth_k_branches_exactly_the_first_k_stages(low):
    b = backbone("resnet10t")
    names = b.stage_names()
    model = ba.branch(b, ["a", "b"], low=low, top=0)
    branched = {
        k.split(".branches.")[0].removeprefix("backbone.model.")
        for k in model.state_dict()
        if ".branches." in k
    }
    expected = {p.removeprefix("model.") for s in names[:low] for p in b.stage_paths(s)}
    assert branched == {p for p in expected if list(b.get_submodule("model." + p).state_dict())}


def test_selective_bp_gradients_on_a_timm_model():
    model = BranchedModel(backbone("resnet10t"), ("anchor", "few"), ["stem", "layer1"],
                          {"anchor": Participation.LIVE, "few": Participation.DETACHED})  # fmt: skip
    model.train()
    x = torch.randn(4, 3, 32, 32)
    model(x, groups=[1, 1, 1, 1]).logsumexp(1).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.shared_parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.branch_parameters("few") if p.grad is not None) > 0
    assert all(p.grad is None for p in model.branch_parameters("anchor"))
    model.zero_grad(set_to_none=True)
    model(x, groups=[0, 0, 1, 1]).logsumexp(1).sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in model.shared_parameters() if p.grad is not None) > 0


def test_weights_from_safetensors_and_torch_files(tmp_path):
    src = backbone("resnet10t")
    state = {k: v.clone() for k, v in src.model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        b = TimmBackbone(TimmOptions(model="resnet10t", weights=tmp_path / f))
        assert torch.equal(b.model.fc.weight, src.model.fc.weight)
    with pytest.raises(ba.CheckpointError, match="does not match"):
        TimmBackbone(TimmOptions(model="resnet10t", num_classes=5, weights=tmp_path / "w.pt"))
    with pytest.raises(ba.UserError, match="does not exist"):
        TimmBackbone(TimmOptions(model="resnet10t", weights=tmp_path / "nope.pt"))
    with pytest.raises(ba.UserError, match="resnet18"):
        TimmBackbone(TimmOptions(model="resnet18x"))


def test_digits_are_deterministic_and_domains_differ():
    a = Digits(DigitsOptions(), DOMAINS, Path("."), "train")
    b = Digits(DigitsOptions(), DOMAINS, Path("."), "train")
    test = Digits(DigitsOptions(), DOMAINS, Path("."), "test")
    assert a.sizes()["clean"]["train"] == 1000 and a.sizes()["blurred"]["train"] == 50
    assert test.sizes()["blurred"]["train"] == 300
    for g in DOMAINS:
        assert np.array_equal(a.image(g, 3)[0], b.image(g, 3)[0]) and a.image(g, 3)[1] == 3
        assert not np.array_equal(a.image(g, 3)[0], test.image(g, 3)[0])  # test images are other draws
    clean, inv, blur = (a.image(g, 0)[0] for g in ("clean", "inverted", "blurred"))
    assert clean.mean() > 0.6 and inv.mean() < 0.4  # dark-on-light vs light-on-dark
    assert blur.max() - blur.min() < 0.4  # low contrast


def test_entropy_loss_known_values():
    term = Entropy(EntropyOptions(skip_group=None))
    uniform = {"logits": torch.zeros(3, 10), "group": torch.zeros(3, dtype=torch.long)}
    assert float(term(uniform, {})) == pytest.approx(math.log(10))
    sure = {"logits": torch.tensor([[50.0] + [0.0] * 9]), "group": torch.tensor([1])}
    assert float(term(sure, {})) == pytest.approx(0.0, abs=1e-6)
    only_anchor = Entropy(EntropyOptions(skip_group=0))
    assert float(only_anchor(uniform, {})) == 0.0


@pytest.mark.parametrize("recipe", ["digits.toml", "digits/finetune_all.toml", "digits/frozen_shared.toml",
                                    "digits/mixed.toml"])  # fmt: skip
def test_recipes_validate_and_run_tiny(recipe, tmp_path, run_cli):
    sets = ["stages.basic.steps=3", "stages.transfer.steps=3", "data.per_class.clean=2", "data.test_per_class=1",
            "model.model=resnet10t", "train.progress=plain", "stages.basic.sampler.per_group=4"]  # fmt: skip
    if recipe.endswith("mixed.toml"):
        sets = [s for s in sets if "per_group=4" not in s]
    args = [a for s in sets for a in ("--set", s)]
    out = run_cli("run", str(EXAMPLES / recipe), "--run-dir", str(tmp_path / "run"), *args)
    assert out.returncode == 0, out.stderr
    assert "accuracy" in out.stdout and "rotated_noisy" in out.stdout

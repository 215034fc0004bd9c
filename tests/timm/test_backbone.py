"""The timm backbone: stages from feature_info, branching by depth, selective BP, weights, names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import branchadapt as ba
from branchadapt import BranchedModel, GroupBranches, Participation
from branchadapt_timm.backbone import TimmBackbone, TimmOptions, discover_stages

SMALL_RESNET = {"channels": [8, 16, 32, 64], "stem_width": 8}


def backbone(name: str, **options) -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone(TimmOptions(model=name, **{"num_classes": 10, **options}))


def plain(b: TimmBackbone) -> dict[str, list[str]]:
    return {s: [p.removeprefix("model.") for p in b.stage_paths(s)] for s in b.stage_names()}


# ---------------------------------------------------------------------------- stage discovery
@pytest.mark.parametrize(
    ("name", "kwargs", "stages"),
    [
        ("resnet10t", SMALL_RESNET, {
            "stem": ["conv1", "bn1", "act1", "maxpool"], "layer1": ["layer1"], "layer2": ["layer2"],
            "layer3": ["layer3"], "layer4": ["layer4"], "head": ["global_pool", "fc"]}),
        ("mobilenetv3_small_050", {}, {
            "stem": ["conv_stem", "bn1"], "blocks.0": ["blocks.0"], "blocks.1": ["blocks.1"],
            "blocks.3": ["blocks.2", "blocks.3"], "blocks.5": ["blocks.4", "blocks.5"],
            "head": ["global_pool", "conv_head", "norm_head", "act2", "flatten", "classifier"]}),
        ("tinynet_e", {}, {
            "stem": ["conv_stem", "bn1"], "blocks.0": ["blocks.0"], "blocks.1": ["blocks.1"],
            "blocks.2": ["blocks.2"], "blocks.4": ["blocks.3", "blocks.4"], "blocks.6": ["blocks.5", "blocks.6"],
            "head": ["conv_head", "bn2", "global_pool", "classifier"]}),
        ("convnext_atto", {"dims": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}, {
            "stem": ["stem"], "stages.0": ["stages.0"], "stages.1": ["stages.1"], "stages.2": ["stages.2"],
            "stages.3": ["stages.3"], "head": ["norm_pre", "head"]}),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 48}, {
            "stem": ["patch_embed", "pos_drop", "patch_drop", "norm_pre"], "blocks.0": ["blocks.0"],
            "blocks.1": ["blocks.1"], "blocks.2": ["blocks.2"], "head": ["norm", "fc_norm", "head_drop", "head"]}),
    ],
)  # fmt: skip
def test_stages_follow_timm_feature_info(name, kwargs, stages):
    b = backbone(name, kwargs=kwargs)
    assert plain(b) == stages
    # stages are disjoint and cover every parameter except those held by the model itself
    paths = [p for s in b.stage_names() for p in b.stage_paths(s)]
    assert len(paths) == len(set(paths))
    in_stages = {id(p) for path in paths for p in b.get_submodule(path).parameters()}
    outside = {n for n, p in b.named_parameters() if id(p) not in in_stages}
    assert outside == ({"model.cls_token", "model.pos_embed"} if name.startswith("vit") else set())
    x = torch.randn(2, 3, 32, 32)
    assert b(x).shape == (2, 10)


def test_explicit_cuts_and_bad_feature_names():
    b = backbone("resnet10t", kwargs=SMALL_RESNET, cuts=["layer2", "layer4"])
    assert plain(b) == {
        "stem": ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2"],
        "layer4": ["layer3", "layer4"],
        "head": ["global_pool", "fc"],
    }
    with pytest.raises(ba.UserError, match=r"model.cuts names \['layer9'\]"):
        backbone("resnet10t", kwargs=SMALL_RESNET, cuts=["layer9"])
    with pytest.raises(
        ba.UserError, match=r"model.cuts is not in the model's order; .*\['layer2', 'layer4'\]"
    ):
        backbone("resnet10t", kwargs=SMALL_RESNET, cuts=["layer4", "layer2"])
    with pytest.raises(ba.UserError, match=r"model.cuts names \['layer2'\] more than once"):
        backbone("resnet10t", kwargs=SMALL_RESNET, cuts=["layer2", "layer2", "layer4"])
    with pytest.raises(ba.UserError, match="no feature_info"):
        discover_stages(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_unknown_name_lists_close_timm_names():
    with pytest.raises(ba.UserError, match=r"'resnet10x' is not a timm model; closest: .*resnet10t"):
        backbone("resnet10x")
    with pytest.raises(ba.UserError, match=r"model\.kwargs"):
        backbone("resnet10t", kwargs={"no_such_argument": 1})


# ---------------------------------------------------------------------------- branching
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_depth_k_makes_exactly_the_first_k_stages_per_group(k):
    b = backbone("resnet10t", kwargs=SMALL_RESNET)
    names = b.stage_names()
    expected = {p for s in names[:k] for p in b.stage_paths(s)}
    model = ba.branch(b, ["a", "b", "c"], low=k, top=0)
    routers = {n.removeprefix("backbone.") for n, m in model.named_modules() if isinstance(m, GroupBranches)}
    assert routers == expected
    for path in expected:
        assert set(model.backbone.get_submodule(path).branches) == {"a", "b", "c"}
    # everything outside the first k stages is one shared copy
    shared = {n for n, _ in model.named_parameters() if ".branches." not in n}
    assert all(not any(n.startswith(f"backbone.{p}.") for p in expected) for n in shared)
    assert model(torch.randn(6, 3, 32, 32), groups=[0, 1, 2, 2, 1, 0]).shape == (6, 10)


def test_selective_bp_on_a_timm_model():
    model = BranchedModel(
        # zero_init_last = false: every weight gets a gradient from the anchor's loss
        backbone("resnet10t", kwargs=SMALL_RESNET | {"zero_init_last": False}),
        ("anchor", "few"),
        ["stem", "layer1"],
        {"anchor": Participation.LIVE, "few": Participation.DETACHED},
    ).train()
    shared_stats = {n: b.clone() for n, b in model.named_buffers() if ".branches." not in n}
    x = torch.randn(4, 3, 32, 32)
    # a few-shot group's loss: no shared parameter moves, its own branch does, the anchor's is untouched
    model(x, groups=[1, 1, 1, 1]).logsumexp(1).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.shared_parameters())
    few = [p.grad for p in model.branch_parameters("few")]
    assert all(g is not None for g in few) and sum(float(g.abs().sum()) for g in few) > 0
    assert all(p.grad is None for p in model.branch_parameters("anchor"))
    # ... and the shared BatchNorm running statistics are not the few-shot group's either
    assert all(torch.equal(b, shared_stats[n]) for n, b in model.named_buffers() if n in shared_stats)
    # the anchor's loss trains the shared stages
    model.zero_grad(set_to_none=True)
    model(x, groups=[0, 0, 1, 1]).logsumexp(1).sum().backward()
    grads = [p.grad for p in model.shared_parameters()]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_vit_parameters_of_the_model_itself_stay_shared():
    b = backbone(
        "vit_tiny_patch16_224", kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48}
    )
    model = BranchedModel(b, ("anchor", "few"), ["stem", "blocks.0"], {"few": Participation.DETACHED})
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(b.model.pos_embed), id(b.model.cls_token)} <= shared
    model(torch.randn(2, 3, 32, 32), groups=[1, 1]).sum().backward()
    assert b.model.pos_embed.grad is None and b.model.cls_token.grad is None
    assert all(p.grad is not None for p in model.branch_parameters("few"))


def test_features_output_matches_logits():
    b = backbone("resnet10t", kwargs=SMALL_RESNET).eval()
    x = torch.randn(3, 3, 32, 32)
    out = b(x, features=True)
    assert out["features"].shape == (3, 64)
    assert torch.allclose(out["logits"], b(x), atol=1e-6)
    assert torch.allclose(b.model.fc(out["features"]), out["logits"], atol=1e-5)


# ---------------------------------------------------------------------------- weights
def test_weights_from_safetensors_and_torch_state_dicts(tmp_path):
    src = backbone("resnet10t", kwargs=SMALL_RESNET)
    state = {k: v.clone() for k, v in src.model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    torch.save({f"model.{k}": v for k, v in state.items()}, tmp_path / "backbone.pt")  # a TimmBackbone's
    # what `branchadapt export --format safetensors` writes for one group of a run
    ba.save_weights(tmp_path / "export.safetensors", {"backbone": src})
    torch.save(state, tmp_path / "torch.safetensors")  # read by its content, not its name
    save_file(state, str(tmp_path / "safetensors.pt"))
    names = ("w.safetensors", "w.pt", "wrapped.pth", "backbone.pt", "export.safetensors")
    for name in (*names, "torch.safetensors", "safetensors.pt"):
        torch.manual_seed(1)  # another random init: equality proves the file was loaded
        b = TimmBackbone(
            TimmOptions(model="resnet10t", num_classes=10, kwargs=SMALL_RESNET, weights=tmp_path / name)
        )
        assert all(torch.equal(v, state[k]) for k, v in b.model.state_dict().items()), name


def test_weights_that_do_not_match_name_the_keys(tmp_path):
    state = backbone("resnet10t", kwargs=SMALL_RESNET).model.state_dict()
    renamed = {k.replace("layer1.", "stage1."): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(ba.CheckpointError, match=r"(?s)missing keys: layer1\..*unexpected keys: stage1\."):
        backbone("resnet10t", kwargs=SMALL_RESNET, weights=tmp_path / "renamed.safetensors")
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ba.CheckpointError, match=r"(?s)shape mismatch: fc.weight.*skip_classifier"):
        backbone("resnet10t", kwargs=SMALL_RESNET, num_classes=5, weights=tmp_path / "w.pt")
    # weights trained for other classes: everything but the classifier loads
    b = TimmBackbone(
        TimmOptions(
            model="resnet10t",
            num_classes=5,
            kwargs=SMALL_RESNET,
            weights=tmp_path / "w.pt",
            skip_classifier=True,
        )
    )
    assert torch.equal(b.model.conv1[0].weight, state["conv1.0.weight"]) and b.model.fc.out_features == 5
    with pytest.raises(ba.UserError, match="does not exist"):
        backbone("resnet10t", weights=tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ba.UserError, match="cannot read"):
        backbone("resnet10t", weights=tmp_path / "junk.pt")


def test_option_mistakes_are_named_as_they_are(tmp_path):
    with pytest.raises(ba.UserError, match=r"model\.cuts is empty"):
        backbone("resnet10t", kwargs=SMALL_RESNET, cuts=[])
    with pytest.raises(ba.UserError, match=f"model.weights: {tmp_path} is a folder"):
        backbone("resnet10t", weights=tmp_path)
    for key in ("pretrained", "checkpoint_path"):
        with pytest.raises(ba.UserError, match=f"model.kwargs: {key} is not allowed.*model.weights"):
            backbone("resnet10t", kwargs={key: True if key == "pretrained" else "x.pt"})
    # weights for another number of input channels: no hint about the classifier
    torch.save(backbone("resnet10t", kwargs=SMALL_RESNET).model.state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(ba.CheckpointError, match=r"shape mismatch: conv1\.0\.weight") as info:
        backbone("resnet10t", kwargs=SMALL_RESNET, in_chans=1, weights=tmp_path / "rgb.pt")
    assert "skip_classifier" not in str(info.value)


def test_example_inputs_follow_an_image_size_given_to_timm():
    vit = backbone(
        "vit_tiny_patch16_224", kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48}
    )
    (x,) = vit.example_inputs(2)
    assert x.shape == (2, 3, 32, 32) and vit(x).shape == (2, 10)  # 224 px would not fit its patch grid
    rect = backbone(
        "vit_tiny_patch16_224", kwargs={"img_size": (16, 24), "patch_size": 8, "depth": 1, "embed_dim": 48}
    )
    assert rect.example_inputs()[0].shape == (1, 3, 16, 24)
    resnet = backbone("resnet10t", kwargs=SMALL_RESNET)  # no img_size: timm's own input size
    assert resnet.example_inputs()[0].shape == (1, *resnet.model.pretrained_cfg["input_size"])

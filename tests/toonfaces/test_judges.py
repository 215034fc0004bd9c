"""The shipped toonfaces judges: identity encoder and trait classifier, on fresh held-out identities."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from branchadapt.errors import CheckpointError, UserError
from branchadapt.plugins import PluginSet

tf = pytest.importorskip("branchadapt_toonfaces")
from branchadapt_toonfaces import judges  # noqa: E402

SEED = 3  # the judges trained on their own "fit" stream of seed 0; this test split is never trained on
PER_GROUP = 5


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def held_out():
    """20 paired identities (5 per group) of the data set's test split at seed 3."""
    keys = [(g, i) for g in tf.GROUPS for i in range(PER_GROUP)]
    photos = _tensor([tf.generate_image(SEED, "test", g, "photo", i, 64) for g, i in keys])
    cartoons = _tensor([tf.generate_image(SEED, "test", g, "cartoon", i, 64) for g, i in keys])
    identities = [tf.identity_for(SEED, "test", g, "cartoon", i) for g, i in keys]
    return photos, cartoons, identities


@pytest.fixture(scope="module")
def encoder():
    return judges.load_identity_encoder()


@pytest.fixture(scope="module")
def classifier():
    return judges.load_trait_classifier()


def test_shipped_files_and_sidecars() -> None:
    for name, model in (
        ("identity_encoder", judges.IdentityEncoder),
        ("trait_classifier", judges.TraitClassifier),
    ):
        path = judges.WEIGHTS_DIR / f"{name}.safetensors"
        assert path.stat().st_size < 2_000_000
        meta = judges.read_sidecar(name)
        assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert meta["input_size"] == judges.INPUT_SIZE and meta["model"] == model.__name__
        assert meta["command"].startswith("python -m branchadapt_toonfaces.judges train")
        assert meta["held_out_metrics"]
    assert judges.read_sidecar("trait_classifier")["traits"] == list(judges.TRAITS)


def test_loaded_judges_are_frozen(encoder, classifier) -> None:
    for model in (encoder, classifier):
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_same_identity_closer_than_others(encoder, held_out) -> None:
    photos, cartoons, _ = held_out
    with torch.no_grad():
        sim = encoder(photos) @ encoder(cartoons).T
    n = len(sim)
    off = ~torch.eye(n, dtype=torch.bool)
    wins = (sim.diagonal()[:, None] > sim)[off].float().mean()
    assert wins >= 0.9, f"same-identity cosine beat a different identity in only {wins:.2%} of cases"
    # a random encoder already wins ~70-85% on aligned pairs; retrieval and margin tell it apart
    assert (sim.argmax(1) == torch.arange(n)).float().mean() >= 0.9  # top-1 retrieval among 20
    assert sim.diagonal().mean() - sim[off].mean() >= 0.5


def test_identity_encoder_any_size_and_differentiable(encoder) -> None:
    x = torch.zeros(2, 3, 100, 90, requires_grad=True)
    emb = encoder(x)
    assert emb.shape == (2, judges.IdentityEncoder.embedding_dim)
    emb.sum().backward()  # the face-ID loss back-propagates into the generator through it
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_trait_labels_follow_groups() -> None:
    t = {g: judges.trait_labels(tf.identity_for(0, "test", g, "photo", 0)) for g in tf.GROUPS}
    assert t["women"].tolist() == [1, 0, 0, 0, 0]
    assert t["men"].tolist() == [0, 1, 0, 0, 0]
    assert t["kids"].tolist() == [0, 0, 1, 0, 0]
    assert t["elderly"][[0, 2, 3, 4]].tolist() == [0, 0, 1, 1]


def test_trait_accuracy_on_ground_truth_cartoons(classifier, held_out) -> None:
    _, cartoons, identities = held_out
    target = torch.stack([judges.trait_labels(i) for i in identities])
    acc = judges.trait_accuracy(judges.predict_traits(classifier, cartoons), target)
    assert acc["exact"] >= 0.9, acc
    match = judges.trait_match(classifier, cartoons, identities)
    assert match.dtype == torch.bool and match.shape == (len(identities),)
    assert match.float().mean().item() == pytest.approx(acc["exact"])
    # a cartoon judged against the wrong group's identity fails (women vs men: eyelashes, beard)
    assert not judges.trait_match(classifier, cartoons[:1], identities[PER_GROUP : PER_GROUP + 1]).any()


def test_judges_are_deterministic(held_out) -> None:
    photos, cartoons, _ = held_out
    with torch.no_grad():
        first = (judges.load_identity_encoder()(photos), judges.load_trait_classifier()(cartoons))
        second = (judges.load_identity_encoder()(photos), judges.load_trait_classifier()(cartoons))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_judge_identities_are_disjoint_from_the_data_set() -> None:
    data = {
        tf.identity_seed(0, split, g, kind, i)
        for split in tf.SPLITS
        for kind in tf.KINDS
        for g in tf.GROUPS
        for i in range(200)
    }
    ours = {
        judges.judge_identity_seed(0, s, g, i) for s in ("fit", "val") for g in tf.GROUPS for i in range(200)
    }
    assert len(ours) == 2 * 4 * 200 and not data & ours


def test_registered_backbone_and_bad_files(tmp_path: Path) -> None:
    plugins = PluginSet(entry_points=False)  # only this plugin set, whatever else is installed
    plugins.load_modules(["branchadapt_toonfaces.plugin"])
    cls = plugins.registry.get("backbone", "toonfaces_id")
    net = cls(cls.Options())
    assert isinstance(net, judges.IdentityEncoder)
    assert net.stage_names() == ["stem", "block1", "block2", "block3", "head"]
    state = net.state_dict()
    state["extra.weight"] = state.pop("head.3.weight")
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"head\.3\.weight"):
        judges.load_identity_encoder(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="not found"):
        judges.load_trait_classifier(tmp_path / "missing.safetensors")

"""Each loss term on small tensors with values computed by hand."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

import branchadapt as ba
from branchadapt_cartoon import losses

D = namedtuple("D", "patch cam_logit heatmap group_logits")
KEYS = ("GA", "LA", "GB", "LB")


def d_out(patch: float, cam: float, logits=None) -> D:
    return D(torch.full((2, 1, 3, 3), patch), torch.full((2, 1), cam), None, logits)


def test_adversarial_lsgan_in_both_phases():
    real = {k: d_out(1.0, 1.0) for k in KEYS}
    fake = {k: d_out(0.0, 0.0) for k in KEYS}
    d_term = losses.Adversarial(losses.AdversarialOptions(phase="discriminator"))
    assert float(d_term({"d_real": real, "d_fake": fake}, {})) == 0.0  # a perfect discriminator
    fake = {k: d_out(0.5, 0.0) for k in KEYS}
    # (1 - 0.5)^2 patch + (1 - 0)^2 cam, for 4 discriminators
    g_term = losses.Adversarial(losses.AdversarialOptions(phase="generator"))
    assert float(g_term({"d_fake": fake}, {})) == pytest.approx(4 * (0.25 + 1.0))
    g_nocam = losses.Adversarial(losses.AdversarialOptions(phase="generator", cam_logits=False))
    assert float(g_nocam({"d_fake": fake}, {})) == pytest.approx(4 * 0.25)


def test_cam_generator_bce_and_discriminator_least_squares():
    big = 30.0
    cam = {"a2b": torch.full((2, 1), big), "b2a": torch.full((2, 1), big),
           "b2b": torch.full((2, 1), -big), "a2a": torch.full((2, 1), -big)}  # fmt: skip
    g = losses.Cam(losses.LossOptions(phase="generator"))
    assert float(g({"cam": cam}, {})) < 1e-6
    cam["a2b"] = torch.zeros(2, 1)
    assert float(g({"cam": cam}, {})) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-4)
    d = losses.Cam(losses.LossOptions(phase="discriminator"))
    real = {k: d_out(0.0, 0.5) for k in KEYS}
    fake = {k: d_out(0.0, 0.5) for k in KEYS}
    assert float(d({"d_real": real, "d_fake": fake}, {})) == pytest.approx(4 * (0.25 + 0.25))


def test_cycle_and_identity_l1():
    a, b = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    out = {"real_a": a, "real_b": b, "rec_a": a + 0.5, "rec_b": b, "id_a": a, "id_b": b - 0.25}
    assert float(losses.Cycle()(out, {})) == pytest.approx(0.5)
    assert float(losses.Identity()(out, {})) == pytest.approx(0.25)


def test_group_cls_uses_real_groups_for_d_and_source_groups_for_g():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    ids = torch.tensor([0, 1])
    real = {"GA": d_out(0, 0, logits), "GB": d_out(0, 0, logits), "LA": d_out(0, 0), "LB": d_out(0, 0)}
    d = losses.GroupCls(losses.LossOptions(phase="discriminator"))
    expected = 2 * float(F.cross_entropy(logits, ids))
    assert float(d({"d_real": real, "groups": {"A": ids, "B": ids}}, {})) == pytest.approx(expected)
    g = losses.GroupCls(losses.LossOptions(phase="generator"))
    swapped = {"A": ids.flip(0), "B": ids}
    value = float(g({"d_fake": real, "fake_groups": swapped}, {}))
    assert value == pytest.approx(float(F.cross_entropy(logits, ids.flip(0)) + F.cross_entropy(logits, ids)))
    no_head = {k: d_out(0, 0) for k in KEYS}
    with pytest.raises(ba.ConfigError, match="group head"):
        d({"d_real": no_head, "groups": {"A": ids, "B": ids}}, {})


def test_face_id_is_one_minus_cosine_both_directions():
    term = losses.FaceId(losses.FaceIdOptions(recognizer={"type": "toonfaces_id"}))
    assert all(not p.requires_grad for p in term.recognizer.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    same = term({"real_a": x, "fake_b": x, "real_b": y, "fake_a": y}, {})
    assert float(same) == pytest.approx(0.0, abs=1e-5)
    diff = term({"real_a": x, "fake_b": y, "real_b": y, "fake_a": x}, {})
    fx, fy = term.recognizer(x), term.recognizer(y)
    expected = 2 * float((1 - F.cosine_similarity(fx, fy)).mean())
    assert float(diff) == pytest.approx(expected, rel=1e-4)
    # gradients reach the translation, not the recognizer
    fake = y.clone().requires_grad_(True)
    term({"real_a": x, "fake_b": fake, "real_b": y, "fake_a": x}, {}).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_phase_must_be_a_translator_phase():
    with pytest.raises(ba.ConfigError, match="discriminator"):
        losses.Adversarial(losses.AdversarialOptions(phase="main"))
